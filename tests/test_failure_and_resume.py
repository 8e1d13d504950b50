"""Every command fails clearly and loses nothing (README "Failure and resume").

Real parts throughout: commands run as real processes (``python -m threadweaver_verl``) and get real
signals; an OpenAI-compatible server runs in its own process and is killed for real; two real processes
compete for one output folder; every input is a real file. Each test checks that nothing finished is
lost, nothing is duplicated, and the message names the problem.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from _scripted_openai import ScriptedOpenAI, Slow
from generator_oracle import Oracle
from generator_script import EXPECTED, make_sample
from generator_script import script as rewrite_script

from threadweaver_verl.cli import main as cli
from threadweaver_verl.data.schema import rl_row, write_rl
from threadweaver_verl.runs import LOCK_NAME, Marker, OutputLock, UserError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "threadweaver_verl", *args]


def start(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """A command as a real process; its stdout+stderr go to a file (read with ``log.read_text()``)."""
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as fh:
        p = subprocess.Popen(command(*args), stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=tmp_path)
    return p, log


def wait_for(predicate, timeout: float = 300.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


class FakeServer:
    """tests/_fake_completions_server.py in its own process."""

    def __init__(self, tmp: Path, ids: list[int], delay: float = 0.0, max_model_len: int = 4096, status: int = 200):
        self.dir = tmp
        n = len(list(tmp.glob("server-*.port")))
        self.port_file, self.log = tmp / f"server-{n}.port", tmp / f"server-{n}.requests.jsonl"
        script = Path(__file__).with_name("_fake_completions_server.py")
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(self.port_file), str(self.log), "--ids", ",".join(map(str, ids))]
            + ["--delay", str(delay), "--max-model-len", str(max_model_len), "--status", str(status)]
        )
        wait_for(self.port_file.exists, 60, "the fake server to listen")
        self.url = f"http://127.0.0.1:{self.port_file.read_text()}"

    def requests(self) -> list[dict]:
        return lines(self.log)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture()
def servers(tmp_path):
    made: list[FakeServer] = []

    def make(**kw) -> FakeServer:
        made.append(FakeServer(tmp_path, **kw))
        return made[-1]

    yield make
    for s in made:
        s.kill()


@pytest.fixture(scope="module")
def answer_ids(tiny_tokenizer) -> list[int]:
    """A completion that ends the think section and boxes 12, then EOS."""
    ids = tiny_tokenizer.encode("</think>\nThe answer is \\boxed{12}.", add_special_tokens=False)
    return ids + [tiny_tokenizer.eos_token_id]


def problems(path: Path, n: int) -> Path:
    """n problems; the even ones have the answer 12 (the fake server's), the odd ones 13."""
    rows = [
        rl_row(
            data_source="t/mult",
            question=f"What is {i} * 1?",
            ground_truth="12" if i % 2 == 0 else "13",
            index=i,
            split="test",
        )
        for i in range(n)
    ]
    return write_rl(rows, path)


def eval_args(data: Path, url: str, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        f"data={data}",
        f"server_url={url}",
        f"tokenizer={tokenizer}",
        f"out_dir={out}",
        "controller.fork=false",
        "controller.max_response_tokens=64",
        "concurrency=1",
        "progress=false",
        "engine.http.max_retries=0",
        *extra,
    ]


def routing_to_id(user: str) -> str:
    """The eval's routing key ``eval-<problem>-<sample>`` as its trajectory id ``<problem>/<sample>``."""
    key, sample = user.removeprefix("eval-").rsplit("-", 1)
    return f"{key}/{sample}"


# --------------------------------------------------------------------------- eval: interrupt and resume


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_eval_signal_keeps_finished_trajectories_and_rerun_resumes(sig, tmp_path, servers, answer_ids, tiny_model_dir):
    server = servers(ids=answer_ids, delay=0.7)
    data, out = problems(tmp_path / "p.parquet", 8), tmp_path / "out"
    args = eval_args(data, server.url, tiny_model_dir, out)
    p, log = start(tmp_path, "first", *args)
    wait_for(lambda: len(lines(out / "trajectories.jsonl")) >= 2, what="two finished trajectories")
    p.send_signal(sig)
    assert p.wait(120) == 128 + sig, log.read_text()
    message = log.read_text()
    assert f"stopped by {sig.name}" in message and "rerun the same command to resume" in message
    assert "Traceback" not in message
    kept = lines(out / "trajectories.jsonl")
    assert len(kept) >= 2 and len({r["id"] for r in kept}) == len(kept)
    assert not (out / LOCK_NAME).exists() and not list(out.glob(".*.tmp-*"))
    assert not (out / "summary.json").exists()  # unfinished
    asked_first = len(server.requests())

    p, log = start(tmp_path, "second", *args)
    assert p.wait(300) == 0, log.read_text()
    assert "resuming" in log.read_text()
    done = lines(out / "trajectories.jsonl")
    assert done[: len(kept)] == kept  # appended to, never rewritten
    assert sorted(r["id"] for r in done) == sorted(f"t/mult#{i}/0" for i in range(8))
    rerun_ids = [routing_to_id(r["user"]) for r in server.requests()[asked_first:]]
    assert not {r["id"] for r in kept} & set(rerun_ids)  # finished work was not redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trajectories"] == 8 and summary["failed_trajectories"] == 0 and summary["accuracy"] == 0.5
    # the timings are this run's: they cover the trajectories it ran, and say so
    assert summary["timed_trajectories"] == 8 - len(kept) and summary["timed_wall_s"] > 0
    assert summary["problems_per_s"] == pytest.approx((8 - len(kept)) / summary["timed_wall_s"])


def test_eval_timings_cover_the_trajectories_this_run_made(tmp_path, servers, answer_ids, tiny_model_dir):
    server = servers(ids=answer_ids)
    data, out = problems(tmp_path / "p.parquet", 4), tmp_path / "out"

    def run(*extra: str) -> dict:
        assert cli(eval_args(data, server.url, tiny_model_dir, out, *extra)) == 0
        return json.loads((out / "summary.json").read_text())

    first = run("max_problems=2")
    assert first["timed_trajectories"] == 2 and first["latency_mean_s"] > 0
    summary = run()  # two more problems: the summary covers 4, its timings the 2 this run made
    assert summary["trajectories"] == 4 and summary["timed_trajectories"] == 2
    assert summary["problems_per_s"] == pytest.approx(2 / summary["timed_wall_s"])
    done = run()  # nothing left to run: no timings rather than 0 s
    assert done["trajectories"] == 4 and done["timed_trajectories"] == 0
    assert done["timed_wall_s"] is None and done["latency_mean_s"] is None and done["problems_per_s"] is None


def test_two_evals_on_one_out_dir_the_second_refuses(tmp_path, servers, answer_ids, tiny_model_dir):
    server = servers(ids=answer_ids, delay=1.0)
    data, out = problems(tmp_path / "p.parquet", 200), tmp_path / "out"
    first, first_log = start(tmp_path, "first", *eval_args(data, server.url, tiny_model_dir, out))
    wait_for(lambda: len(lines(out / "trajectories.jsonl")) >= 1, what="the first eval to run")
    second, second_log = start(tmp_path, "second", *eval_args(data, server.url, tiny_model_dir, out))
    assert second.wait(300) == 2, second_log.read_text()
    message = second_log.read_text()
    assert f"is in use by `eval` (PID {first.pid}" in message and "another output folder" in message
    first.send_signal(signal.SIGTERM)  # enough: the first ran alone all along
    assert first.wait(120) == 143, first_log.read_text()
    done = lines(out / "trajectories.jsonl")
    asked = [routing_to_id(r["user"]) for r in server.requests()]
    assert len(set(asked)) == len(asked)  # the second run sent nothing
    assert len({r["id"] for r in done}) == len(done) and {r["id"] for r in done} <= set(asked)


def test_eval_killed_hard_leaves_a_stale_lock_that_the_rerun_takes_over(tmp_path, servers, answer_ids, tiny_model_dir):
    server = servers(ids=answer_ids, delay=0.5)
    data, out = problems(tmp_path / "p.parquet", 6), tmp_path / "out"
    args = eval_args(data, server.url, tiny_model_dir, out)
    p, _ = start(tmp_path, "first", *args)
    wait_for(lambda: len(lines(out / "trajectories.jsonl")) >= 2, what="two finished trajectories")
    p.kill()
    p.wait(60)
    dead = p.pid
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == dead
    kept = lines(out / "trajectories.jsonl")
    p, log = start(tmp_path, "second", *args)
    assert p.wait(300) == 0, log.read_text()
    message = log.read_text()
    assert f"taking over the lock of {out} left by `eval` (PID {dead} on host" in message
    assert "(no longer running)" in message
    done = lines(out / "trajectories.jsonl")
    assert done[: len(kept)] == kept and len({r["id"] for r in done}) == len(done) == 6


# --------------------------------------------------------------------------- eval: infrastructure failures


def test_server_killed_mid_run_counts_failures_apart_and_rerun_retries_them(
    tmp_path, servers, answer_ids, tiny_model_dir
):
    server = servers(ids=answer_ids, delay=0.5)
    data, out = problems(tmp_path / "p.parquet", 8), tmp_path / "out"
    p, log = start(tmp_path, "first", *eval_args(data, server.url, tiny_model_dir, out))
    wait_for(lambda: len(lines(out / "trajectories.jsonl")) >= 3, what="three finished trajectories")
    server.kill()
    assert p.wait(300) == 1, log.read_text()
    ran = lines(out / "trajectories.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_trajectories"] == 8 - len(ran)
    assert summary["failed_by_cause"] == {"connection_error": 8 - len(ran)}
    assert summary["accuracy"] == sum(r["correct"] for r in ran) / len(ran)  # only trajectories that ran
    message = log.read_text()
    assert f"{8 - len(ran)} of 8 trajectories FAILED" in message and "most often connection_error" in message

    again = servers(ids=answer_ids)
    p, log = start(tmp_path, "second", *eval_args(data, again.url, tiny_model_dir, out))
    assert p.wait(300) == 0, log.read_text()
    done = lines(out / "trajectories.jsonl")
    assert done[: len(ran)] == ran and len({r["id"] for r in done}) == len(done) == 8
    assert {routing_to_id(r["user"]) for r in again.requests()} == {r["id"] for r in done[len(ran) :]}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_trajectories"] == 0 and summary["accuracy"] == 0.5


def test_http_errors_are_failures_by_cause_not_wrong_answers(tmp_path, servers, answer_ids, tiny_model_dir, capsys):
    server = servers(ids=answer_ids, status=400)
    data, out = problems(tmp_path / "p.parquet", 3), tmp_path / "out"
    assert cli(eval_args(data, server.url, tiny_model_dir, out)) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_by_cause"] == {"http_400": 3} and summary["accuracy"] is None
    assert "most often http_400: 3" in capsys.readouterr().err
    assert [r["step"] for r in lines(out / "failed.jsonl")] == ["http_400"] * 3


def test_unreachable_server_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    data, out = problems(tmp_path / "p.parquet", 2), tmp_path / "out"
    assert cli(eval_args(data, "http://127.0.0.1:9", tiny_model_dir, out)) == 2
    assert "does not answer http://127.0.0.1:9/v1/models" in capsys.readouterr().err


def test_budget_beyond_the_servers_context_is_clamped_with_a_warning(
    tmp_path, servers, answer_ids, tiny_model_dir, capsys
):
    server = servers(ids=answer_ids, max_model_len=80)
    data, out = problems(tmp_path / "p.parquet", 2), tmp_path / "out"
    args = eval_args(data, server.url, tiny_model_dir, out, "controller.max_response_tokens=4096")
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "exceeds the server's max_model_len 80" in err
    requests = server.requests()
    assert requests and all(r["prompt_len"] + r["max_tokens"] <= 80 for r in requests)
    tight = servers(ids=answer_ids, max_model_len=5)
    assert cli(eval_args(data, tight.url, tiny_model_dir, tmp_path / "out2")) == 2
    assert "no room for a response" in capsys.readouterr().err and not tight.requests()


# --------------------------------------------------------------------------- eval: counts, inputs, settings


def test_eval_counts_and_inputs(tmp_path, servers, answer_ids, tiny_model_dir, capsys):
    server = servers(ids=answer_ids)
    data = problems(tmp_path / "p.parquet", 4)

    def run(*extra: str, data: Path = data, out: str = "out") -> tuple[int, str]:
        code = cli(eval_args(data, server.url, tiny_model_dir, tmp_path / out, *extra))
        return code, capsys.readouterr().err

    assert run("max_problems=0", out="none")[0] == 0
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["trajectories"] == 0
    assert not server.requests()
    code, err = run("max_problems=-1")
    assert code == 2 and "max_problems=-1: a count cannot be negative" in err
    assert run("max_problems=3", out="three")[0] == 0
    assert len(lines(tmp_path / "three" / "trajectories.jsonl")) == 3

    dup = write_rl(
        [
            rl_row(data_source="t/mult", question=f"q{i}", ground_truth="1", index=i // 2, split="test")
            for i in range(5)
        ],
        tmp_path / "dup.parquet",
    )
    code, err = run(data=dup, out="dup")
    assert code == 2 and "t/mult#0, t/mult#1" in err and "appear on more than one row" in err
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": []}).to_parquet(empty)
    code, err = run(data=empty, out="e")
    assert code == 2 and f"no problems in {str(empty)!r}" in err
    no_columns = tmp_path / "nocols.parquet"
    pd.DataFrame().to_parquet(no_columns)
    code, err = run(data=no_columns, out="e")
    assert code == 2 and "no problems in" in err
    text = tmp_path / "text.parquet"
    text.write_text("not parquet\n")
    code, err = run(data=text, out="e")
    assert code == 2 and "is not a readable parquet file" in err and "Traceback" not in err
    (tmp_path / "a_file").write_text("x")
    code, err = run(out="a_file")
    assert code == 2 and "is a file, not a folder" in err
    assert len(server.requests()) == 3  # no bad run sent anything


def test_eval_rerun_with_other_settings_is_refused(tmp_path, servers, answer_ids, tiny_model_dir, capsys):
    server = servers(ids=answer_ids)
    data, out = problems(tmp_path / "p.parquet", 2), tmp_path / "out"
    assert cli(eval_args(data, server.url, tiny_model_dir, out)) == 0
    before = (out / "trajectories.jsonl").read_text()
    capsys.readouterr()
    assert cli(eval_args(data, server.url, tiny_model_dir, out, "temperature=0.5")) == 2
    err = capsys.readouterr().err
    assert "holds trajectories of another run" in err and "temperature: 1.0 then, 0.5 now" in err
    assert cli(eval_args(data, server.url, tiny_model_dir, out, "controller.max_response_tokens=32")) == 2
    assert "controller.max_response_tokens: 64 then, 32 now" in capsys.readouterr().err
    assert (out / "trajectories.jsonl").read_text() == before


def test_missing_or_wrong_model_folders_are_named(tmp_path, capsys):
    data = problems(tmp_path / "p.parquet", 1)
    (tmp_path / "empty_dir").mkdir()
    for model, expect in (
        (tmp_path / "nope", "not found"),
        (tmp_path / "empty_dir", "is not a model folder"),
        (data, "is a file"),
    ):
        assert cli(["eval", f"data={data}", f"model={model}", f"out_dir={tmp_path / 'o'}"]) == 2
        err = capsys.readouterr().err
        assert f"model={str(model)!r}" in err and expect in err and "Traceback" not in err
    empty = tmp_path / "empty_dir"
    for argv in (
        ["prepare-model", f"model={empty}", f"out={tmp_path / 'o'}"],
        ["sft", f"model={empty}", f"train_files=[{data}]", f"output_dir={tmp_path / 'o'}"],
        ["generate", "stage=2", f"data={data}", "server_url=http://127.0.0.1:9", f"tokenizer={empty}"],
    ):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert f"={str(empty)!r} is not a" in err and "folder" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="not found"):
        cli(["eval", f"data={tmp_path / 'p.parquet'}", f"model={tmp_path / 'nope'}", "--debug"])


# --------------------------------------------------------------------------- one writer per folder


def hold_lock(tmp_path: Path, folder: Path, command_name: str) -> subprocess.Popen:
    """Another real process holding ``folder``'s lock, as a running command would."""
    code = (
        "import sys, time\nfrom threadweaver_verl.runs import OutputLock\n"
        f"OutputLock({str(folder)!r}, {command_name!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(600)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=ENV, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_output_lock_between_real_processes(tmp_path):
    folder = tmp_path / "out"
    holder = hold_lock(tmp_path, folder, "make-data")
    try:
        with pytest.raises(UserError, match=rf"in use by `make-data` \(PID {holder.pid} on host "):
            OutputLock(folder, "eval").acquire()
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(folder, "eval"):  # the kernel lock died with its holder: taken over
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()


@pytest.mark.parametrize("name", ["make-data", "stage1", "stage2"])
def test_every_writer_refuses_a_busy_folder(name, tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "out"
    holder = hold_lock(tmp_path, out, "someone")
    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps({"question": "q", "trace": "t", "answer": "1"}) + "\n")
    data = problems(tmp_path / "p.parquet", 2)
    argv = {
        "make-data": ["make-data", f"out={out}", "n_train=5", "n_test=2"],
        "stage1": [
            "generate",
            "stage=1",
            f"input={traces}",
            "llm.model=m",
            "llm.http.api_key_env=null",
            f"out_dir={out}",
        ],
        "stage2": [
            "generate",
            "stage=2",
            f"data={data}",
            "server_url=http://127.0.0.1:9",
            f"tokenizer={tiny_model_dir}",
        ]
        + [f"out_dir={out}"],
    }[name]
    try:
        assert cli(argv) == 2
        captured = capsys.readouterr()
        assert f"in use by `someone` (PID {holder.pid}" in captured.err
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- make-data


def test_make_data_killed_mid_run_leaves_an_unfinished_folder_never_a_mixed_one(tmp_path, capsys):
    from threadweaver_verl.data import schema

    out = tmp_path / "data"
    assert cli(["make-data", f"out={out}", "preset=3x3", "n_train=40", "n_test=10", "seed=0"]) == 0
    assert (out / "summary.json").exists()
    p, log = start(tmp_path, "second", "make-data", f"out={out}", "preset=3x3", "n_train=200000", "n_test=10", "seed=1")
    wait_for(lambda: not (out / "summary.json").exists() or p.poll() is not None, what="make-data to start")
    p.kill()
    p.wait(60)
    assert not (out / "summary.json").exists(), log.read_text()  # unfinished, and says so
    for f in out.glob("*.parquet"):
        pd.read_parquet(f)  # never a torn file
    assert cli(["make-data", f"out={out}", "preset=3x3", "n_train=40", "n_test=10", "seed=1"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1
    held_out = {r["extra_info"]["question"] for r in schema.read_rl(out / "test.parquet")}
    assert not held_out & {r["extra_info"]["question"] for r in schema.read_sft(out / "sft_parallel.parquet")}


def test_make_data_checks_its_output_folder_before_any_work(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert cli(["make-data", f"out={target}", "n_train=5", "n_test=2"]) == 2
    assert "out=" in capsys.readouterr().err and target.read_text() == "x"


# --------------------------------------------------------------------------- demo stages


def test_demo_stage_is_reused_only_with_its_settings_and_inputs(tmp_path):
    from rich.console import Console

    from threadweaver_verl.cli.demo import DemoConfig, Stages, stage_settings

    console = Console(quiet=True)
    runs: list[str] = []
    inp = tmp_path / "input.txt"
    inp.write_text("a")

    def stage(tag: str):
        def fn() -> dict:
            runs.append(tag)
            return {"made_by": tag}

        return fn

    first = stage_settings(DemoConfig(preset="3x3", n_test=200))["data"]
    assert Stages(tmp_path, False).run("data", stage("3x3"), console, first, {"input": inp})["made_by"] == "3x3"
    assert Stages(tmp_path, False).run("data", stage("again"), console, first, {"input": inp})["made_by"] == "3x3"
    other = stage_settings(DemoConfig(preset="4x3", n_test=50))["data"]
    with pytest.raises(UserError, match=r"n_test: 200 then, 50 now.*preset: '3x3' then, '4x3' now.*force=true"):
        Stages(tmp_path, False).run("data", stage("4x3"), console, other, {"input": inp})
    inp.write_text("b")
    with pytest.raises(UserError, match="input input changed"):
        Stages(tmp_path, False).run("data", stage("changed"), console, first, {"input": inp})
    assert Stages(tmp_path, True).run("data", stage("4x3"), console, other, {"input": inp})["made_by"] == "4x3"
    assert runs == ["3x3", "4x3"]
    assert Marker(tmp_path / "stages" / "data.json").mismatch(other, {"input": inp}) is None


def test_demo_stage_interrupted_with_other_settings_clears_its_outputs(tmp_path):
    from rich.console import Console

    from threadweaver_verl.cli.demo import Stages

    console = Console(quiet=True)
    made = tmp_path / "eval_out"

    def interrupted() -> dict:
        made.mkdir()
        (made / "partial").write_text("from settings A")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, False).run("eval", interrupted, console, {"t": "A"}, outputs=[made])
    seen: list[bool] = []

    def resume() -> dict:
        seen.append((made / "partial").exists())
        return {}

    Stages(tmp_path, False).run("eval", resume, console, {"t": "A"}, outputs=[made])  # same settings: resumed
    (tmp_path / "stages" / "eval.json").unlink()
    shutil.rmtree(made)
    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, False).run("eval", interrupted, console, {"t": "A"}, outputs=[made])
    Stages(tmp_path, False).run("eval", resume, console, {"t": "B"}, outputs=[made])  # other settings: cleared
    assert seen == [True, False]


# --------------------------------------------------------------------------- generator: interrupt and resume


def slowly(script, seconds: float):
    """``script`` with every answer ``seconds`` late, so that records trickle in."""

    def slow(body: dict, attempt: int):
        return Slow(seconds, script(body, attempt))

    return slow


def complete_lines(path: Path) -> int:
    """Records fully written so far (a line being written has no newline yet)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def assert_stopped_cleanly(p: subprocess.Popen, log: Path, sig: signal.Signals, *folders: Path) -> None:
    """The documented exit status and message; no lock, temporary file or finished-marker left."""
    assert p.wait(120) == 128 + sig, log.read_text()
    message = log.read_text()
    assert f"stopped by {sig.name}" in message and "rerun the same command to resume" in message
    assert "Traceback" not in message and "exception" not in message.lower(), message
    for folder in folders:
        assert not (folder / LOCK_NAME).exists() and not list(folder.glob(".*.tmp-*"))
        assert not (folder / "summary.json").exists()  # unfinished
        assert not list(folder.glob("*-journal")) and not list(folder.glob("*-wal"))  # the LLM cache is closed
        assert not lines(folder / "errors.jsonl")  # an interruption is not an API failure to retry


STAGE1_KINDS = ["good", "dependent", "repair", "tagged", "nothink", "noblocks"] * 4  # 24 samples


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stage1_signal_keeps_finished_records_and_rerun_completes(sig, tmp_path):
    samples = [make_sample(kind, k) for k, kind in enumerate(STAGE1_KINDS)]
    expected = {s["id"]: EXPECTED[s["id"].split("-")[0]] for s in samples}
    traces, out = tmp_path / "traces.jsonl", tmp_path / "out"
    traces.write_text("".join(json.dumps(s) + "\n" for s in samples))
    with ScriptedOpenAI(slowly(rewrite_script, 0.2)) as server:
        args = ["generate", "stage=1", f"input={traces}", "id_field=id", f"out_dir={out}", "progress=false"]
        args += ["llm.model=scripted", f"llm.http.base_url={server.url}", "llm.http.api_key_env=null"]
        args += ["llm.http.max_concurrency=2", "samples_in_flight=2", "llm.http.max_retries=0"]
        p, log = start(tmp_path, "first", *args)
        wait_for(lambda: complete_lines(out / "records.jsonl") >= 3 or p.poll() is not None, what="three records")
        p.send_signal(sig)
        assert_stopped_cleanly(p, log, sig, out)
        kept = lines(out / "records.jsonl")
        assert 3 <= len(kept) < len(samples), "the run must have been cut short"
        assert len({r["id"] for r in kept}) == len(kept)
        assert all((r["status"], r["step"]) == expected[r["id"]] for r in kept)

        asked_first = len(server.requests)
        p, log = start(tmp_path, "second", *args)
        assert p.wait(300) == 0, log.read_text()
        asked_again = {
            next(m["content"] for m in r.body["messages"] if m["role"] == "user").split("Problem ", 1)[1].split(":")[0]
            for r in server.requests[asked_first:]
        }
    done = lines(out / "records.jsonl")
    assert done[: len(kept)] == kept  # appended to, never rewritten
    assert sorted(r["id"] for r in done) == sorted(expected)  # every sample exactly once
    assert all((r["status"], r["step"]) == expected[r["id"]] for r in done)
    assert not asked_again & {r["id"] for r in kept}  # finished samples cost nothing on the rerun
    summary = json.loads((out / "summary.json").read_text())
    accepted = sum(status == "accepted" for status, _ in expected.values())
    assert summary["samples"] == summary["records"] == len(samples) and summary["missing"] == 0
    assert summary["resumed_from_records"] == len(kept) and summary["attempted_this_run"] == len(samples) - len(kept)
    assert summary["accepted"] == accepted and summary["rejected"] == len(samples) - accepted
    assert summary["errors_to_retry"] == 0 and not lines(out / "errors.jsonl")
    assert not (out / LOCK_NAME).exists()


def stage2_prompts(path: Path, n: int, tokenizer) -> tuple[Path, dict[tuple[int, ...], list[str]]]:
    """n addition problems, and for the oracle one correct fork/join answer to each."""
    from threadweaver_verl.data.chat import prompt_ids
    from threadweaver_verl.format import BlockLayout

    rows, answers = [], {}
    for i in range(n):
        row = rl_row(
            data_source="t/add", question=f"What is {i} + {i}?", ground_truth=str(2 * i), index=i, split="train"
        )
        block = BlockLayout().block_text(["left", "right"], [f" {i}.", f" {i} again."])
        answer = f"<think>\nTwo halves.\n{block}\nSum {2 * i}.\n</think>\n\\boxed{{{2 * i}}}"
        rows.append(row)
        answers[tuple(prompt_ids(tokenizer, row["prompt"]))] = [answer]
    return write_rl(rows, path), answers


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stage2_signal_keeps_finished_records_and_rerun_completes(
    sig, tmp_path, tiny_model_dir, tiny_tokenizer, tiny_fmt
):
    n = 12
    data, answers = stage2_prompts(tmp_path / "p.parquet", n, tiny_tokenizer)
    out = tmp_path / "out"
    round_dir = out / "round_1"
    with ScriptedOpenAI(completions=slowly(Oracle(tiny_fmt, answers), 0.1)) as server:
        args = ["generate", "stage=2", f"data={data}", f"server_url={server.url}", f"tokenizer={tiny_model_dir}"]
        args += [f"out_dir={out}", "n_samples=2", "chunk_size=3", "concurrency=2", "temperature=0", "progress=false"]
        args += ["engine.http.max_retries=0"]
        p, log = start(tmp_path, "first", *args)
        wait_for(lambda: complete_lines(round_dir / "records.jsonl") >= 2 or p.poll() is not None, what="two records")
        p.send_signal(sig)
        assert_stopped_cleanly(p, log, sig, out, round_dir)
        kept = lines(round_dir / "records.jsonl")
        assert 2 <= len(kept) < n, "the run must have been cut short"
        assert len({r["id"] for r in kept}) == len(kept) and all(len(r["kept"]) == 1 for r in kept)

        asked_first = len(server.requests)
        assert cli(args) == 0  # the same command again (in this process: no second start-up)
        asked_again = {tuple(r.body["prompt"]) for r in server.requests[asked_first:]}
    done = lines(round_dir / "records.jsonl")
    assert done[: len(kept)] == kept  # appended to, never rewritten
    assert sorted(r["id"] for r in done) == sorted(f"t/add#{i}" for i in range(n))  # every problem exactly once
    prompt_of = {f"t/add#{i}": prompt for i, prompt in enumerate(answers)}
    for r in kept:  # finished problems cost nothing on the rerun
        assert not any(ctx[: len(prompt_of[r["id"]])] == prompt_of[r["id"]] for ctx in asked_again)
    summary = json.loads((round_dir / "summary.json").read_text())
    assert summary["prompts"] == summary["problems_done"] == n and summary["failed_problems_to_retry"] == 0
    assert summary["resumed_from_records"] == len(kept) and summary["attempted_this_run"] == n - len(kept)
    assert summary["samples"] == 2 * n and summary["valid_and_correct"] == 2 * n and summary["accuracy"] == 1.0
    assert summary["kept"] == summary["problems_with_kept"] == n
    sft = pd.read_parquet(summary["outputs"]["sft"])
    assert sorted(e["sample_id"] for e in sft["extra_info"]) == sorted(prompt_of)  # one kept answer each
    assert not lines(round_dir / "errors.jsonl") and not (out / LOCK_NAME).exists()


# --------------------------------------------------------------------------- generator counts and inputs


def test_stage1_counts_and_empty_input(tmp_path, capsys):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"question": f"q{i}", "trace": "t", "answer": "1"}) + "\n" for i in range(3)))
    base = ["generate", "stage=1", "llm.model=m", "llm.http.api_key_env=null", "llm.http.base_url=http://127.0.0.1:9"]
    assert cli(base + [f"input={traces}", "limit=0", f"out_dir={tmp_path / 'zero'}", "progress=false"]) == 0
    summary = json.loads((tmp_path / "zero" / "summary.json").read_text())
    assert summary["samples"] == 0 and summary["llm_usage"]["calls"] == 0
    capsys.readouterr()
    assert cli(base + [f"input={traces}", "limit=-3", f"out_dir={tmp_path / 'neg'}"]) == 2
    assert "limit=-3: a count cannot be negative" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli(base + [f"input={empty}", f"out_dir={tmp_path / 'e'}"]) == 2
    assert "no samples in" in capsys.readouterr().err
    empty_parquet = tmp_path / "empty.parquet"
    pd.DataFrame({"question": []}).to_parquet(empty_parquet)
    assert cli(base + [f"input={empty_parquet}", f"out_dir={tmp_path / 'e'}"]) == 2
    assert "no samples in" in capsys.readouterr().err


def test_stage2_counts_and_empty_input(tmp_path, capsys, servers, answer_ids, tiny_model_dir):
    server = servers(ids=answer_ids)
    data = problems(tmp_path / "p.parquet", 3)
    base = ["generate", "stage=2", f"server_url={server.url}", f"tokenizer={tiny_model_dir}", "progress=false"]
    assert cli(base + [f"data={data}", "max_problems=0", f"out_dir={tmp_path / 'zero'}"]) == 0
    assert not server.requests()
    capsys.readouterr()
    assert cli(base + [f"data={data}", "max_problems=-2", f"out_dir={tmp_path / 'neg'}"]) == 2
    assert "max_problems=-2: a count cannot be negative" in capsys.readouterr().err
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": []}).to_parquet(empty)
    assert cli(base + [f"data={empty}", f"out_dir={tmp_path / 'e'}"]) == 2
    assert "no problems in" in capsys.readouterr().err


# --------------------------------------------------------------------------- nonsense settings


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["tiny-model", "out=OUT", "hidden_size=0"], "hidden_size must be >= 1, got 0"),
        (
            ["tiny-model", "out=OUT", "num_attention_heads=3", "num_key_value_heads=2"],
            "num_attention_heads (3) must be a multiple of num_key_value_heads (2)",
        ),
        (
            ["sft", "model=M", "train_files=[x.parquet]", "output_dir=OUT", "time_limit_minutes=-3"],
            "time_limit_minutes",
        ),
        (["sft", "minutes=-3"], "minutes"),
        (["doctor", "bogus=1"], "unknown key 'bogus' in DoctorConfig"),  # doctor has no settings
    ],
)
def test_nonsense_settings_are_refused_with_a_message(argv, expect, tmp_path, capsys, tiny_model_dir):
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("model=M", f"model={tiny_model_dir}") for a in argv]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------- clear failure, as real processes


def bad_files(tmp: Path) -> dict[str, str]:
    """Real files for the bad-input cases, by the placeholder their argv uses."""
    pd.DataFrame({"problem": []}).to_parquet(tmp / "empty.parquet")
    pd.DataFrame({"text": ["What is 2 + 2?"], "label": ["4"]}).to_parquet(tmp / "wrong_columns.parquet")
    (tmp / "good.jsonl").write_text(json.dumps({"problem": "What is 2 + 2?", "answer": "4"}) + "\n")
    (tmp / "a_folder.parquet").mkdir()
    (tmp / "a_file").write_text("x")
    return {
        "EMPTY": str(tmp / "empty.parquet"),
        "WRONG": str(tmp / "wrong_columns.parquet"),
        "GOOD": str(tmp / "good.jsonl"),
        "MISSING": str(tmp / "missing.jsonl"),
        "FOLDER": str(tmp / "a_folder.parquet"),
        "UNDER_A_FILE": str(tmp / "a_file" / "rl.parquet"),
        "OUT": str(tmp / "out"),
    }


CLEAR_FAILURES = [
    # config dataclasses that check their values at start-up (the message names the key)
    (["sft", "model=M", "train_files=[x.parquet]", "output_dir=OUT", "batch_size=0"], "batch_size must be positive"),
    (["eval", "controller.max_thread_tokens=-1"], "ControllerConfig.max_thread_tokens must be >= 1, got -1"),
    (["eval", "engine.http.timeout_s=0"], "OpenAIHTTPConfig.timeout_s must be > 0"),
    (["eval", "engine.server=tgi"], "OpenAIEngineConfig.server='tgi'"),
    (["eval", "correctness.num_workers=0"], "CorrectnessConfig.num_workers must be >= 1"),
    (["generate", "stage=1", "llm.model=m", "+llm.extra_params.model=x"], "llm.extra_params sets ['model']"),
    (["make-data", "out=OUT", "n_train=0"], "n_train and n_test must be >= 1"),
    (["demo", "out=OUT", "train_steps=0"], "train_steps must be >= 1, got 0"),
    (["demo", "out=OUT", "preset=banana"], "preset='banana'"),
    # preprocess: bad input files and output paths, before any work
    (["preprocess", "input=EMPTY", "data_source=d", "output=OUT/rl.parquet"], "no records in"),
    (["preprocess", "input=WRONG", "data_source=d", "output=OUT/rl.parquet"], "no question field found"),
    (["preprocess", "input=MISSING", "data_source=d", "output=OUT/rl.parquet"], "not found"),
    (["preprocess", "input=GOOD", "data_source=d", "output=FOLDER"], "is a folder"),
    (["preprocess", "input=GOOD", "data_source=d", "output=UNDER_A_FILE"], "runs through the file"),
]


def _fill(argv: list[str], files: dict[str, str], model: Path) -> list[str]:
    """argv with ``M`` replaced by the model folder and each placeholder of ``files`` (``OUT``, ``OUT/x``)."""

    def value(v: str) -> str:
        head, sep, rest = v.partition("/")
        return str(model) if v == "M" else (files[head] + sep + rest if head in files else v)

    return [f"{k}={value(v)}" if eq else a for a in argv for k, eq, v in [a.partition("=")]]


@pytest.mark.parametrize(("argv", "expect"), CLEAR_FAILURES, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_settings_and_inputs_exit_2_with_one_message(argv, expect, tmp_path, tiny_model_dir):
    files = bad_files(tmp_path)
    proc = subprocess.run(
        command(*_fill(argv, files, tiny_model_dir)), capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr  # a message, not a report
    assert not Path(files["OUT"]).exists() or not any(Path(files["OUT"]).iterdir())  # nothing written


def test_preprocess_script_goes_through_the_same_policy(tmp_path):
    files = bad_files(tmp_path)
    script = ROOT / "examples" / "data_preprocess" / "any_math.py"
    argv = [f"input={files['EMPTY']}", "data_source=d", f"output={tmp_path / 'rl.parquet'}"]
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 2 and "no records in" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    debug = subprocess.run([sys.executable, str(script), *argv, "--debug"], capture_output=True, text=True, env=ENV)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "SchemaError: no records in" in debug.stderr


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["eval", "controller.max_thread_tokens=-1"], "ConfigError: ControllerConfig.max_thread_tokens"),
        (["preprocess", "input=MISSING", "data_source=d", "output=OUT/rl.parquet"], "SchemaError: input file"),
    ],
)
def test_debug_prints_the_traceback_of_a_bad_setting(argv, error, tmp_path, tiny_model_dir):
    files = bad_files(tmp_path)
    proc = subprocess.run(
        command(*_fill(argv, files, tiny_model_dir), "--debug"), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr and error in proc.stderr, (
        proc.stderr[-3000:]
    )


# --------------------------------------------------------------------------- real vLLM (slow)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_stops_the_launched_vllm_server_and_keeps_trajectories(tmp_path, tiny_model_dir):
    data, out = problems(tmp_path / "p.parquet", 40), tmp_path / "out"
    args = ["eval", f"data={data}", f"model={tiny_model_dir}", f"out_dir={out}", "concurrency=1", "progress=false"]
    p, log = start(tmp_path, "eval", *args, "controller.max_response_tokens=200", "controller.max_thread_tokens=50")
    wait_for(lambda: len(lines(out / "trajectories.jsonl")) >= 1 or p.poll() is not None, 900, "a trajectory")
    servers_started = _children(p.pid)
    work_dirs = []
    for pid in servers_started:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        work_dirs += [Path(e.split(b"=", 1)[1].decode()).parent for e in env if e.startswith(b"VLLM_CACHE_ROOT=")]
    assert servers_started and work_dirs, log.read_text()
    p.send_signal(signal.SIGTERM)
    assert p.wait(180) == 143, log.read_text()
    kept = lines(out / "trajectories.jsonl")
    assert kept and len({r["id"] for r in kept}) == len(kept)
    assert not [pid for pid in servers_started if _alive(pid)]  # no orphan server
    assert not [d for d in work_dirs if d.exists()]  # its temporary folder is gone


@pytest.mark.slow
def test_vllm_server_killed_mid_eval_then_resumed(tmp_path, tiny_model_dir):
    from threadweaver_verl.rollout.vllm_server import VLLMServer, VLLMServerConfig

    data, out = problems(tmp_path / "p.parquet", 30), tmp_path / "out"
    config = VLLMServerConfig(model=str(tiny_model_dir), work_dir=str(tmp_path / "vllm"), max_model_len=4096)
    with VLLMServer(config) as server:
        budget = ["controller.max_response_tokens=200"]
        args = eval_args(data, server.url, tiny_model_dir, out, *budget)
        p, log = start(tmp_path, "first", *args)
        wait_for(lambda: len(lines(out / "trajectories.jsonl")) >= 2, 600, "two trajectories")
        os.killpg(server.process.pid, signal.SIGKILL)
        assert p.wait(300) == 1, log.read_text()
    ran = lines(out / "trajectories.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_trajectories"] == 30 - len(ran) and "connection_error" in summary["failed_by_cause"]
    assert "most often connection_error" in log.read_text()
    with VLLMServer(config) as server:
        p, log = start(tmp_path, "second", *eval_args(data, server.url, tiny_model_dir, out, *budget))
        assert p.wait(600) == 0, log.read_text()
    done = lines(out / "trajectories.jsonl")
    assert done[: len(ran)] == ran and len({r["id"] for r in done}) == len(done) == 30


@pytest.mark.slow
def test_server_start_error_names_a_log_that_exists(tiny_model_dir):
    from threadweaver_verl.rollout.vllm_server import ServerStartError, VLLMServer

    with pytest.raises(ServerStartError) as e:
        with VLLMServer(str(tiny_model_dir), extra_args=["--no-such-flag"]):
            pass
    log = Path(str(e.value).split("Log ", 1)[1].split(", last lines", 1)[0])
    assert log.is_file() and "no-such-flag" in log.read_text()
    log.unlink()
