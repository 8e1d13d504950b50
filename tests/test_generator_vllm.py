"""Both generator stages against a real vLLM CPU server serving the tiny random model (the session's
shared server). Its output is junk: each stage must finish, filter out every invalid sample and report
counts that match an independent recount of what the server produced."""

from __future__ import annotations

import json

import pytest
from generator_script import make_sample

from threadweaver_verl.config import load_config
from threadweaver_verl.data.chat import DEFAULT_INSTRUCTION, PromptStyle, response_ids
from threadweaver_verl.data.schema import read_rl, rl_row, write_rl
from threadweaver_verl.generator.stage1 import Stage1Config, run_stage1
from threadweaver_verl.generator.stage2 import Stage2Config, run_stage2
from threadweaver_verl.rl.correctness import check_answer

pytestmark = pytest.mark.slow


def test_stage1_with_a_junk_llm_rejects_everything_honestly(tmp_path, vllm_server, tiny_model_dir):
    rows = [make_sample(kind, k) for k, kind in enumerate(["good", "good", "good", "wrongtrace"])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        Stage1Config,
        [
            f"input={tmp_path / 'in.jsonl'}",
            f"out_dir={tmp_path / 'out'}",
            "id_field=id",
            "progress=false",
            f"llm.model={tiny_model_dir}",
            f"llm.http.base_url={vllm_server.url}/v1",
            "llm.http.api_key_env=null",
            "llm.max_tokens=48",
            "llm.temperature=1.0",
            f"tokenizer={tiny_model_dir}",
        ],
    )
    summary = run_stage1(cfg)

    recs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(r["id"] for r in rows)
    assert summary["records"] == 4 and summary["errors_to_retry"] == 0
    by_status = {s: [r for r in recs if r["status"] == s] for s in ("accepted", "rejected")}
    assert summary["accepted"] == len(by_status["accepted"]) and summary["rejected"] == len(by_status["rejected"])
    for step, n in summary["rejected_by_step"].items():
        assert n == sum(1 for r in by_status["rejected"] if r["step"] == step)
    wrong = next(r for r in recs if r["id"].startswith("wrongtrace"))
    assert (wrong["status"], wrong["step"], wrong["llm"]["calls"]) == ("rejected", "input", 0)
    for r in by_status["rejected"]:
        assert r["reason"] and "response" not in r
    for r in by_status["accepted"]:  # a random model should never get here; if it does, it must be right
        assert check_answer(r["response"], r["answer"]).correct
    # Usage comes from vLLM's own token counts; each LLM sample made at least its first call.
    usage = summary["llm_usage"]
    assert usage["calls"] == sum(r["llm"]["calls"] for r in recs) >= 3
    assert usage["prompt_tokens"] > 100 * usage["calls"] and usage["completion_tokens"] > 0
    assert not (tmp_path / "out" / "sft.parquet").exists() or summary["accepted"] > 0


def test_stage2_with_the_junk_model_keeps_nothing_invalid(tmp_path, vllm_server, tiny_model_dir, tiny_fmt):
    style = PromptStyle(instruction=DEFAULT_INSTRUCTION)
    rows = [
        rl_row(
            data_source="test/mul",
            question=f"What is {a}*{b}?",
            ground_truth=str(a * b),
            index=i,
            split="test",
            style=style,
        )
        for i, (a, b) in enumerate([(12, 34), (56, 7), (8, 9)])
    ]
    write_rl(rows, tmp_path / "prompts.parquet")
    cfg = load_config(
        Stage2Config,
        [
            f"data={tmp_path / 'prompts.parquet'}",
            f"server_url={vllm_server.url}",
            f"tokenizer={tiny_model_dir}",
            f"out_dir={tmp_path / 'out'}",
            "n_samples=3",
            "progress=false",
            "record_responses=true",
            "controller.max_response_tokens=96",
            "controller.max_thread_tokens=32",
            "temperature=1.0",
        ],
    )
    summary = run_stage2(cfg)

    recs = [json.loads(x) for x in (tmp_path / "out" / "round_1" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and summary["failed_problems_to_retry"] == 0 and summary["samples"] == 9
    truth = {r["id"]: r["ground_truth"] for r in recs}
    valid = correct = passes = 0
    problems_with_keepable = 0
    for r in recs:
        keepable = 0
        for s in r["samples"]:
            ids = s["response_ids"]
            assert 0 < len(ids) <= 96
            errors = tiny_fmt.validate(ids)
            v = not errors and not s["terminations"] and ids[-1] in tiny_fmt.eos_ids
            c = check_answer(tiny_fmt.decode(ids), truth[r["id"]]).correct
            assert (s["validator_pass"], s["format_valid"], s["correct"]) == (not errors, v, c)
            passes += not errors
            valid += v
            correct += c
            if v and c:
                keepable += response_ids(tiny_fmt, tiny_fmt.decode(ids[:-1])) == ids
        problems_with_keepable += keepable > 0
    assert summary["format_valid_rate"] == pytest.approx(valid / 9)
    assert summary["validator_pass_rate"] == pytest.approx(passes / 9)
    assert summary["accuracy"] == pytest.approx(correct / 9)
    assert summary["kept"] == problems_with_keepable == sum(len(r["kept"]) for r in recs)  # one per problem
    if summary["kept"] == 0:
        assert not (tmp_path / "out" / "round_1" / "sft.parquet").exists()
        assert len(read_rl(tmp_path / "out" / "round_1" / "rl_unsolved.parquet")) == 3
