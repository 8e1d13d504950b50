"""Stage 1 against a real OpenAI-API HTTP server on loopback with scripted answers.

Covers good rewrites, malformed JSON (with and without a successful repair), a
cut-off answer, wrong structures at every step, HTTP 429 and 500, an answer
slower than the client timeout, an API that is down (retried by the next run),
the request cache, and the SFT/RL outputs.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
from _scripted_openai import ScriptedOpenAI
from generator_script import EXPECTED, make_sample, script

from threadweaver_verl.cli import main as cli
from threadweaver_verl.config import load_config
from threadweaver_verl.data.chat import response_ids
from threadweaver_verl.data.schema import read_rl, read_sft
from threadweaver_verl.format import Limits, TokenFormat, parse_text, split_requests, validate
from threadweaver_verl.generator import prompts
from threadweaver_verl.generator.stage1 import Stage1Config, run_stage1
from threadweaver_verl.rl.correctness import check_answer


def cli_main(argv: list[str]) -> int:
    """`threadweaver generate ...` through the dispatcher, under the error policy of every command."""
    return cli(["generate", *argv])


def _write_input(path: Path, kinds) -> list[dict]:
    rows = [make_sample(kind, k) for k, kind in enumerate(kinds)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _config(inp: Path, out: Path, url: str, *extra: str) -> Stage1Config:
    return load_config(
        Stage1Config,
        [
            f"input={inp}",
            f"out_dir={out}",
            "id_field=id",
            "progress=false",
            "llm.model=scripted-model",
            f"llm.http.base_url={url}",
            "llm.http.api_key_env=null",
            "llm.http.timeout_s=0.5",
            "llm.http.max_retries=2",
            "llm.price_prompt_per_mtok=2.0",
            "llm.price_completion_per_mtok=8.0",
            *extra,
        ],
    )


def _records(out: Path) -> list[dict]:
    lines = (out / "records.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def _user_questions(bodies) -> Counter:
    """Requests per sample id (the question names it)."""
    c: Counter = Counter()
    for b in bodies:
        user = next(m["content"] for m in b["messages"] if m["role"] == "user")
        c[user.split("Problem ", 1)[1].split(":", 1)[0]] += 1
    return c


def test_every_scripted_behaviour_ends_in_the_right_record(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    rows = _write_input(tmp_path / "in.jsonl", list(EXPECTED))
    with ScriptedOpenAI(script) as server:
        summary = run_stage1(_config(tmp_path / "in.jsonl", tmp_path / "out", server.url, f"tokenizer={tok_dir}"))
        received = list(server.received)

    recs = {r["id"]: r for r in _records(tmp_path / "out")}
    assert sorted(recs) == sorted(r["id"] for r in rows)  # one record per sample, no duplicate
    for r in rows:
        kind = r["id"].split("-")[0]
        status, step = EXPECTED[kind]
        assert (recs[r["id"]]["status"], recs[r["id"]]["step"]) == (status, step), (kind, recs[r["id"]]["reason"])

    reasons = {r["id"].split("-")[0]: r["reason"] for r in recs.values()}
    assert "not valid JSON" in reasons["badjson"]
    assert "cut off at the token limit" in reasons["truncated"]
    assert "without gaps" in reasons["gaps"]
    assert "relies on step 2, which is in thread 1" in reasons["dependent"]
    assert "no independent spans" in reasons["noblocks"]
    assert "not minimally edited" in reasons["rewritten"]
    assert "<Thread>" in reasons["tagged"]
    assert "not the ground truth" in reasons["wrongtrace"]

    # Calls per sample: 4 steps; one repair re-ask per faulty step; no call for a wrong input trace.
    per_sample = _user_questions(received)
    assert "wrongtrace-14" not in per_sample
    assert per_sample["good-0"] == 4
    assert per_sample["repair-3"] == 5
    assert per_sample["badjson-7"] == 2 and per_sample["truncated-8"] == 2 and per_sample["gaps-9"] == 2
    assert per_sample["dependent-10"] == 3 and per_sample["noblocks-11"] == 2
    assert per_sample["r429-4"] == 5 and per_sample["r500-5"] == 5 and per_sample["slow-6"] == 5  # one retry each
    # Usage: every request but the 429, the 500 and the timed-out one was answered and paid.
    usage = summary["llm_usage"]
    assert usage["calls"] == len(received) - 3 and usage["cache_hits"] == 0
    assert usage["prompt_tokens"] == 100 * usage["calls"] and usage["completion_tokens"] == 20 * usage["calls"]
    assert usage["cost"] == pytest.approx((100 * 2.0 + 20 * 8.0) * usage["calls"] / 1e6)

    # Accepted rewrites: valid trajectories that keep the answer and encode to training ids.
    fmt = TokenFormat.from_tokenizer(AutoTokenizer.from_pretrained(tok_dir), limits=Limits(4, 1))
    accepted = [r for r in recs.values() if r["status"] == "accepted"]
    assert summary["accepted"] == len(accepted) == 7
    assert summary["rejected_by_step"] == {
        "input": 1,
        prompts.Step.STRUCTURE: 3,
        prompts.Step.BLOCKS: 2,
        prompts.Step.EDITS: 1,
        prompts.Step.OUTLINES: 1,
        "validate": 0,
    }
    for r in accepted:
        text = r["response"]
        assert validate(parse_text(text)) == []
        assert parse_text(text).blocks[0].outlines is not None and len(parse_text(text).blocks[0].threads) == 2
        assert check_answer(text, r["answer"]).correct
        ids = response_ids(fmt, text)
        assert fmt.decode(ids[:-1]) == text
        assert split_requests([1, 2], ids, fmt)  # the training units exist
        assert r["stats_unit"] == "tokens" and r["stats"]["total_tokens"] == len(ids) - 1
        assert r["stats"]["critical_path"] < r["stats"]["total_tokens"]
        assert "as before" not in text  # step 3's edit landed in the thread
    nothink = recs["nothink-1"]["response"]
    assert nothink.endswith(f"</think>\nThe final answer is $\\boxed{{{recs['nothink-1']['answer']}}}$.")

    sft = read_sft(tmp_path / "out" / "sft.parquet")
    assert sorted(x["response"] for x in sft) == sorted(r["response"] for r in accepted)
    assert all(x["extra_info"]["stage"] == 1 for x in sft)
    rl = read_rl(tmp_path / "out" / "rl.parquet")
    assert sorted(x["reward_model"]["ground_truth"] for x in rl) == sorted(r["answer"] for r in rows)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["accepted"] == 7


def test_api_down_is_retried_by_the_next_run_and_the_cache_makes_reruns_free(tmp_path):
    kinds = ["good", "r500", "badjson", "good", "tagged"]
    _write_input(tmp_path / "in.jsonl", kinds)
    cache = tmp_path / "cache.sqlite"
    extra = (f"llm.cache_path={cache}", "llm.http.max_retries=1")

    # Run 1: every call of sample good-3 fails with HTTP 500: no record, an error to retry.
    with ScriptedOpenAI(partial(script, broken=frozenset({"good"}))) as server:
        s1 = run_stage1(_config(tmp_path / "in.jsonl", tmp_path / "out", server.url, *extra))
    assert s1["errors_to_retry"] == 2 and s1["missing"] == 2 and s1["records"] == 3
    assert {r["id"] for r in _records(tmp_path / "out")} == {"r500-1", "badjson-2", "tagged-4"}
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert {e["id"] for e in errors} == {"good-0", "good-3"} and all("HTTP 500" in e["error"] for e in errors)

    # Run 2, API back: only the two missing samples are processed, each with its 4 calls.
    with ScriptedOpenAI(script) as server:
        s2 = run_stage1(_config(tmp_path / "in.jsonl", tmp_path / "out", server.url, *extra))
        assert _user_questions(server.received) == Counter({"good-0": 4, "good-3": 4})
    assert s2["attempted_this_run"] == 2 and s2["resumed_from_records"] == 3 and s2["errors_to_retry"] == 0
    recs = _records(tmp_path / "out")
    assert len(recs) == 5 and len({r["id"] for r in recs}) == 5
    assert s2["accepted"] == 3  # good-0, r500-1, good-3

    # Run 3, fresh output folder, same cache: no HTTP request at all, the same records.
    with ScriptedOpenAI(script) as server:
        s3 = run_stage1(_config(tmp_path / "in.jsonl", tmp_path / "out3", server.url, *extra))
        assert server.received == []
    assert s3["llm_usage"]["calls"] == 0 and s3["llm_usage"]["cache_hits"] > 0
    assert s3["llm_usage"]["saved_prompt_tokens"] == 100 * s3["llm_usage"]["cache_hits"]
    key = lambda r: (r["id"], r["status"], r["step"], r["reason"], r.get("response"))  # noqa: E731
    assert sorted(map(key, _records(tmp_path / "out3"))) == sorted(map(key, recs))


def test_cli_runs_stage1_and_names_bad_settings(tmp_path, capsys):
    _write_input(tmp_path / "in.jsonl", ["good", "noblocks"])
    with ScriptedOpenAI(script) as server:
        cfg = _config(tmp_path / "in.jsonl", tmp_path / "out", server.url)
        argv = [
            "stage=1",
            f"input={cfg.input}",
            f"out_dir={cfg.out_dir}",
            "id_field=id",
            "progress=false",
            "llm.model=m",
            f"llm.http.base_url={server.url}",
            "llm.http.api_key_env=null",
        ]
        assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "stage 1: LLM rewriting" in out and "rejected_by_step.blocks" in out

    assert cli_main(["input=x.jsonl"]) == 2
    assert "stage=1 or stage=2" in capsys.readouterr().err
    assert cli_main(["stage=1", "llm.model=m", f"out_dir={tmp_path / 'o'}"]) == 2
    assert "needs input=FILE" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "stage=1",
                f"input={tmp_path / 'in.jsonl'}",
                "trace_field=reasoning",
                "llm.model=m",
                f"out_dir={tmp_path / 'o'}",
                "llm.http.api_key_env=null",
            ]
        )
        == 2
    )
    assert "no column 'reasoning'" in capsys.readouterr().err
    assert cli_main(["stage=1", "no_such_setting=1"]) == 2
    assert "no_such_setting" in capsys.readouterr().err


def test_llm_client_caches_by_every_parameter_and_sends_identical_calls_once(tmp_path):
    import asyncio

    from _scripted_openai import Reply, Slow

    from threadweaver_verl.generator.llm import ChatLLM, LLMConfig
    from threadweaver_verl.rollout.http import OpenAIHTTPConfig

    def answer(body, attempt):
        return Slow(0.2, Reply(f"t={body.get('temperature')}"))

    async def go(url: str) -> tuple[list, ChatLLM]:
        cfg = LLMConfig(model="m", http=OpenAIHTTPConfig(base_url=url, api_key_env=None), temperature=0.0)
        llm = ChatLLM(cfg, tmp_path / "cache.sqlite")
        msgs = [{"role": "user", "content": "hi"}]
        first = await asyncio.gather(*(llm.chat(msgs) for _ in range(3)))  # in flight together: one call
        again = await llm.chat(msgs)  # from the cache
        llm.config.temperature = 0.5
        other = await llm.chat(msgs)  # another parameter: another call
        await llm.aclose()
        return [*first, again, other], llm

    with ScriptedOpenAI(answer) as server:
        replies, llm = asyncio.run(go(server.url))
        assert len(server.received) == 2
    assert [r.content for r in replies] == ["t=0.0"] * 4 + ["t=0.5"]
    assert [r.cached for r in replies] == [False, True, True, True, False]
    assert llm.usage.calls == 2 and llm.usage.cache_hits == 3
