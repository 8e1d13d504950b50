"""Crash-resume: a real stage-1 process killed with SIGKILL mid-run, rerun, and compared with a clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _scripted_openai import Reply, ScriptedOpenAI, Slow
from generator_script import make_sample, script

from threadweaver_verl.config import load_config
from threadweaver_verl.generator.records import RecordStore, RecordStoreError
from threadweaver_verl.generator.stage1 import Stage1Config, run_stage1

KINDS = ["good", "dependent", "repair", "tagged", "good", "noblocks"] * 4  # 24 samples


def _slowly(body, attempt):
    action = script(body, attempt)
    return Slow(0.08, action) if isinstance(action, Reply) else action


def _args(inp: Path, out: Path, url: str, cache: Path) -> list[str]:
    return [
        f"input={inp}",
        f"out_dir={out}",
        "id_field=id",
        "progress=false",
        "llm.model=scripted-model",
        f"llm.http.base_url={url}",
        "llm.http.api_key_env=null",
        "llm.http.max_concurrency=2",
        "samples_in_flight=2",
        f"llm.cache_path={cache}",
    ]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _key(r: dict) -> tuple:
    return r["id"], r["status"], r["step"], r["reason"], r.get("response")


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "threadweaver_verl", "generate", "stage=1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(Path(__file__).parents[1]),
    )


def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path):
    rows = [make_sample(kind, k) for k, kind in enumerate(KINDS)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with ScriptedOpenAI(_slowly) as server:
        reference = run_stage1(
            load_config(Stage1Config, _args(inp, tmp_path / "ref", server.url, tmp_path / "ref_cache.sqlite"))
        )
        assert reference["records"] == len(rows)
        ref = {r["id"]: _key(r) for r in map(json.loads, _lines(tmp_path / "ref" / "records.jsonl"))}

        out, cache = tmp_path / "out", tmp_path / "cache.sqlite"
        proc = _cli(_args(inp, out, server.url, cache))
        deadline = time.monotonic() + 120
        while _complete_lines(out / "records.jsonl") < 6:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "stage 1 wrote no records in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        data = (out / "records.jsonl").read_bytes()
        complete = data[: data.rfind(b"\n") + 1].decode().splitlines()
        assert 6 <= len(complete) < len(rows), "the run must have been cut short"

        # The kill may land inside a write. Unless it did, tear the last record the way it would:
        # keep only the first half of its line.
        if data.endswith(b"\n"):
            last = complete.pop().encode()
            data = data[: len(data) - len(last) - 1] + last[: len(last) // 2]
            (out / "records.jsonl").write_bytes(data)
            torn = json.loads(last)["id"]
        else:
            torn = None
        finished_before = {json.loads(x)["id"] for x in complete}

        seen = len(server.received)
        rerun = _cli(_args(inp, out, server.url, cache))
        stdout, stderr = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, stderr.decode()[-3000:]
        rerun_requests = server.received[seen:]

    after = [json.loads(x) for x in _lines(out / "records.jsonl")]
    ids = [r["id"] for r in after]
    assert len(ids) == len(set(ids)) == len(rows)  # no record lost, none duplicated
    assert {r["id"]: _key(r) for r in after} == ref  # the same records as the uninterrupted run
    assert RecordStore(out / "records.jsonl").torn_bytes == 0  # the file is clean again

    summary = json.loads((out / "summary.json").read_text())
    assert summary["torn_record_bytes_repaired"] > 0
    assert summary["resumed_from_records"] == len(finished_before)
    assert torn is None or (torn not in finished_before and torn in ids)  # the torn record was produced again
    asked = {
        next(m["content"] for m in b["messages"] if m["role"] == "user").split("Problem ", 1)[1].split(":")[0]
        for b in rerun_requests
    }
    assert not asked & finished_before  # finished samples cost nothing on the rerun
    assert "stage 1: LLM rewriting" in stdout.decode()


def test_record_store_repairs_a_torn_tail_and_refuses_duplicates(tmp_path):
    path = tmp_path / "r.jsonl"
    with RecordStore(path) as store:
        store.append({"id": "a", "x": 1})
        store.append({"id": "b", "x": 2})
        with pytest.raises(RecordStoreError, match="already has a record"):
            store.append({"id": "a", "x": 3})
    with open(path, "ab") as fh:
        fh.write(b'{"id": "c", "x"')  # a write cut short by a crash
    store = RecordStore(path)
    assert store.torn_bytes == len(b'{"id": "c", "x"') and store.done == {"a", "b"}
    store.append({"id": "c", "x": 3})
    store.close()
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c"]

    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')  # damage in the middle is not a crash: refuse
    with pytest.raises(RecordStoreError, match="edited by hand"):
        RecordStore(path)
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(RecordStoreError, match="two records"):
        RecordStore(path)
