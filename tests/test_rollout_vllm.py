"""Fork/join on a real vLLM server (CPU build) serving the tiny random model, through the
OpenAI-compatible engine adapter; and the eval command against it. One server per session
(tests/conftest.py); slow."""

from __future__ import annotations

import asyncio
import json

import pytest
from _steered_engine import SteeredEngine

from threadweaver_verl.data.chat import PromptStyle, prompt_ids
from threadweaver_verl.data.schema import rl_row, write_rl
from threadweaver_verl.format import BlockLayout, RequestKind, Rule, Tag, split_requests
from threadweaver_verl.format.tree import atoms_text
from threadweaver_verl.rollout.controller import ControllerConfig, ForkJoinController, Reason
from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine

pytestmark = pytest.mark.slow

OUTLINES = ("the tens", "the ones", "the carry")


def block_text(outlines=OUTLINES) -> str:
    """A block up to its </Outlines>, as the data writers lay it out (outline k reads "k: ...")."""
    return atoms_text(BlockLayout.outline_atoms(outlines))


def long_question() -> str:
    return "Multiply 4821 by 37 and add the carry of each partial product. " * 12


def test_fork_join_on_vllm(vllm_server, tiny_tokenizer, tiny_fmt):
    fmt = tiny_fmt
    prompt = prompt_ids(tiny_tokenizer, PromptStyle().messages(long_question()))
    block_ids = fmt.fragment_ids(block_text())
    # Threads and the final line may only write digits and spaces (no EOS: sampling at temperature 1
    # could draw it): the threads then never close themselves (the controller closes them at
    # max_thread_tokens), the last line ends at the response budget, and the result is format-valid.
    allowed = sorted(set(fmt.encode("0123456789 ")))
    sampling = {"temperature": 1.0, "allowed_token_ids": allowed}
    cfg = ControllerConfig(max_response_tokens=300, max_thread_tokens=24)

    async def go():
        async with OpenAICompletionsEngine(base_url=vllm_server.url) as real:
            engine = SteeredEngine(real, [block_ids], thread_close_id=fmt.tag_id(Tag.THREAD_CLOSE), prefill=True)
            return await ForkJoinController(fmt, cfg).run(engine, prompt, routing_key="vllm-traj-1", sampling=sampling)

    result = asyncio.run(go())
    assert [(r.kind, r.path) for r in result.requests] == [
        (RequestKind.SEQUENTIAL, ()),
        (RequestKind.THREAD, (1, 1)),
        (RequestKind.THREAD, (1, 2)),
        (RequestKind.THREAD, (1, 3)),
        (RequestKind.SEQUENTIAL, ()),
    ]
    # every thread ran on the real server, all in flight together, then were joined in outline order
    threads = [c for c in result.calls if c.kind == RequestKind.THREAD]
    assert len(threads) == 3
    assert max(c.started_s for c in threads) < min(c.ended_s for c in threads)
    shared = list(result.requests[0].ids)
    for n, r in enumerate(result.requests[1:4], start=1):
        assert list(r.context_ids) == fmt.fork_context(shared, n)
        assert r.completion_ids[-1] == fmt.tag_id(Tag.THREAD_CLOSE)
        assert r.logprobs is not None and len(r.logprobs) == len(r.completion_ids) - r.forced
    joined = fmt.join(shared, [(n, r.completion_ids) for n, r in enumerate(result.requests[1:4], start=1)])
    assert list(result.requests[4].context_ids) == joined
    assert result.valid, result.format_errors
    assert result.requests == split_requests(prompt, result.response_ids, fmt)
    assert Reason.BUDGET_THREAD in result.terminations  # the threads could not close themselves
    assert result.stats.threads_per_block == (3,) and result.stats.speedup > 1.0
    # the threads re-read the shared context from the prefix cache
    for c in threads:
        assert c.cached_tokens is not None and c.cached_tokens >= len(shared) // 2, (c, len(shared))
    assert result.cache_hit_rate is not None and result.cache_hit_rate > 0.5


def test_random_model_on_vllm_terminates_well_formed(vllm_server, tiny_tokenizer, tiny_fmt):
    """Unsteered: whatever the random model writes (tags anywhere), every trajectory is closed."""
    fmt = tiny_fmt
    prompt = prompt_ids(tiny_tokenizer, PromptStyle().messages("What is 12 * 34?"))
    cfg = ControllerConfig(max_response_tokens=200, max_thread_tokens=40, max_requests=16)

    async def go():
        async with OpenAICompletionsEngine(base_url=vllm_server.url) as engine:
            ctrl = ForkJoinController(fmt, cfg)
            return await asyncio.gather(
                *(ctrl.run(engine, prompt, routing_key=f"rand-{i}", sampling={"temperature": 1.0}) for i in range(6))
            )

    for result in asyncio.run(go()):
        assert len(result.response_ids) <= 200 and result.num_engine_calls <= 16
        assert not [e for e in result.format_errors if e.rule == Rule.UNCLOSED], result.format_errors
        if result.valid:
            assert result.requests == split_requests(prompt, result.response_ids, fmt)


def test_eval_command_on_vllm(vllm_server, tiny_model_dir, tmp_path, capsys):
    from threadweaver_verl.eval.evaluate import main

    rows = [
        rl_row(data_source="tiny/mult", question=f"What is {a} * {b}?", ground_truth=str(a * b), index=i, split="test")
        for i, (a, b) in enumerate([(3, 4), (12, 5), (7, 8)])
    ]
    data = write_rl(rows, tmp_path / "test.parquet")
    common = [
        f"data={data}",
        f"server_url={vllm_server.url}",
        f"tokenizer={tiny_model_dir}",
        "n_samples=2",
        "controller.max_response_tokens=96",
        "controller.max_thread_tokens=32",
        "progress=false",
    ]
    seq = tmp_path / "seq"
    assert main(common + [f"out_dir={seq}", "controller.fork=false"]) == 0
    out = tmp_path / "fj"
    assert main(common + [f"out_dir={out}", f"baseline={seq / 'trajectories.jsonl'}"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "token_speedup" in printed

    lines = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {r["problem"] for r in lines} == {"tiny/mult#0", "tiny/mult#1", "tiny/mult#2"}
    for r in lines:
        assert r["error"] is None and r["answer_status"] in ("no_answer", "ok", "unparseable")
        assert r["correct"] is False or r["extracted"] is not None
        assert len(r["response_ids"]) <= 96
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trajectories"] == 6 and summary["failed_trajectories"] == 0
    assert summary["mode"] == "fork/join" and summary["token_speedup"] is not None
    assert summary["prefix_cache_hit_rate"] is not None
    seq_summary = json.loads((seq / "summary.json").read_text())
    assert seq_summary["mode"] == "sequential" and seq_summary["mean_engine_calls"] == 1.0
    assert (out / "report.html").read_text().count("speedup_hist.png") == 1
    assert (out / "speedup_hist.png").stat().st_size > 1000


def test_server_that_fails_to_start_reports_its_log(tiny_model_dir, tmp_path):
    from threadweaver_verl.rollout.vllm_server import ServerStartError, VLLMServer

    with pytest.raises(ServerStartError, match="exited with code .*last lines"):
        with VLLMServer(str(tiny_model_dir), work_dir=str(tmp_path), extra_args=["--no-such-flag"]):
            pass
