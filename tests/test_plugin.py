"""The verl.plugins entry point: registration through `import verl`, loud failures, doctor."""

from __future__ import annotations

import subprocess
import sys

import pytest

from threadweaver_verl.integrations.verl import plugin


def test_import_verl_registers_every_component():
    code = (
        "import verl, threadweaver_verl.integrations.verl.plugin as p; "
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn; "
        "get_adv_estimator_fn('p_grpo'); "
        "print(sorted(p.STATUS.items()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in plugin.REGISTRATIONS:
        assert f"('{name}', 'ok')" in out.stdout


def test_a_failing_registration_is_printed_and_re_raised_where_used(monkeypatch, capsys):
    monkeypatch.setitem(plugin.REGISTRATIONS, "broken:thing", ("threadweaver_verl.no_such_module", "register"))
    plugin.register_all(force=True)
    assert "registering broken:thing FAILED" in capsys.readouterr().err
    with pytest.raises(plugin.PluginNotActive, match="broken:thing.*doctor"):
        plugin.require("broken:thing")
    plugin.require("adv_estimator:p_grpo")  # the others still work
    monkeypatch.delitem(plugin.REGISTRATIONS, "broken:thing")
    plugin.STATUS.pop("broken:thing")


def test_doctor_reports_an_active_plugin():
    out = subprocess.run(
        [sys.executable, "-m", "threadweaver_verl", "doctor"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "plugin active" in out.stdout and "agent_loop:threadweaver" in out.stdout
    # vLLM (the CPU build here) must find its platform, or every server start fails.
    assert "vLLM platform" in out.stdout and "ok (cpu)" in out.stdout


def test_unknown_command_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "threadweaver_verl", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr
