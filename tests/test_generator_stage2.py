"""Stage 2 through the real controller, the real OpenAI engine and a real HTTP server on loopback that
plays back chosen trajectories (the oracle): judging, selection policies, SFT output, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _scripted_openai import ScriptedOpenAI
from generator_oracle import Oracle, Raw

from threadweaver_verl.cli import main as cli
from threadweaver_verl.config import load_config
from threadweaver_verl.data.chat import DEFAULT_INSTRUCTION, PromptStyle, prompt_ids, response_ids
from threadweaver_verl.data.schema import read_rl, read_sft, rl_row, write_rl
from threadweaver_verl.format import BlockLayout
from threadweaver_verl.generator.stage2 import Stage2Config, run_stage2


def cli_main(argv: list[str]) -> int:
    """`threadweaver generate ...` through the dispatcher, under the error policy of every command."""
    return cli(["generate", *argv])


STYLE = PromptStyle(instruction=DEFAULT_INSTRUCTION)


def _block(outlines: list[str], threads: list[str]) -> str:
    return BlockLayout().block_text(outlines, [" " + t for t in threads])


# Problem 1: 12*34 + 5*6 = 438.
LONG = (
    "<think>\nTwo products, then the sum.\n"
    + _block(["12*34", "5*6"], ["12*34 = 12*30 + 12*4 = 360 + 48 = 408.", "5*6 = 30, five sixes."])
    + "\n408 + 30 = 438.\n</think>\nThe answer is \\boxed{438}."
)
SHORT = "<think>\nProducts first.\n" + _block(["12*34", "5*6"], ["408.", "30."]) + "\nSum 438.\n</think>\n\\boxed{438}"
WRONG = "<think>\nGuess.\n" + _block(["a", "b"], ["400.", "31."]) + "\nSum 431.\n</think>\n\\boxed{431}"
SEQUENTIAL = (
    "<think>\nFirst 12*34: 12*30 = 360, 12*4 = 48, 360 + 48 = 408. Then 5*6 = 30. "
    "Finally 408 + 30 = 438.\n</think>\n\\boxed{438}"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tiny_tokenizer, tiny_fmt):
    d = tmp_path_factory.mktemp("stage2")
    rows = [
        rl_row(data_source="test/arith", question=q, ground_truth=a, index=i, split="test", style=STYLE)
        for i, (q, a) in enumerate([("What is 12*34 + 5*6?", "438"), ("What is 7*8?", "56"), ("What is 9*9?", "81")])
    ]
    write_rl(rows, d / "prompts.parquet")
    p = [tuple(prompt_ids(tiny_tokenizer, r["prompt"])) for r in rows]
    enc = tiny_fmt.encode
    eos = tiny_fmt.eos_ids[0]
    # EOS with <think> still open: the controller closes it (the validator then passes), but the model
    # did not write a valid trajectory itself.
    unclosed = Raw(enc("<think>\nhm") + [eos])
    seq_56 = response_ids(tiny_fmt, "<think>\nthe product is 56\n</think>\n\\boxed{56}")
    # Same text, but "product" spelled letter by letter: not the ids canonical encoding gives.
    spelled = Raw(
        enc("<think>\nthe ") + [i for ch in "product" for i in enc(ch)] + enc(" is 56\n</think>\n\\boxed{56}") + [eos]
    )
    assert spelled != seq_56 and tiny_fmt.decode(spelled) == tiny_fmt.decode(seq_56)
    wrong = [f"<think>\nmaybe {x}\n</think>\n\\boxed{{{x}}}" for x in (55, 57, 58, 59)]
    candidates = {
        p[0]: [LONG, SHORT, WRONG, SEQUENTIAL, unclosed],
        p[1]: [spelled, *wrong],
        p[2]: [f"<think>\nnine nines {k}\n</think>\n\\boxed{{81}}" for k in range(5)],
    }
    return d, rows, p, candidates


def _cfg(d: Path, url: str, tok: Path, out: str, *extra: str) -> Stage2Config:
    return load_config(
        Stage2Config,
        [
            f"data={d / 'prompts.parquet'}",
            f"server_url={url}",
            f"tokenizer={tok}",
            f"out_dir={d / out}",
            "n_samples=5",
            "progress=false",
            "temperature=0",
            "engine.http.max_retries=0",
            "chunk_size=2",
            *extra,
        ],
    )


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_keeps_only_valid_correct_canonical_trajectories_and_resumes(setup, tiny_model_dir, tiny_fmt):
    d, rows, p, candidates = setup
    oracle = Oracle(tiny_fmt, candidates)
    oracle.broken.add(p[2])  # problem 3's engine calls fail: logged, retried by the next run
    with ScriptedOpenAI(completions=oracle) as server:
        s1 = run_stage2(_cfg(d, server.url, tiny_model_dir, "out"))
        assert s1["failed_problems_to_retry"] == 1 and s1["problems_done"] == 2
        assert s1["samples"] == 10
        assert s1["format_valid_rate"] == pytest.approx(9 / 10)  # the unclosed one was repaired by the controller
        assert s1["validator_pass_rate"] == pytest.approx(10 / 10)
        assert s1["accuracy"] == pytest.approx(4 / 10)  # LONG, SHORT, SEQUENTIAL, spelled
        assert s1["valid_and_correct"] == 4 and s1["non_canonical_dropped"] == 1
        assert s1["kept"] == 1 and s1["problems_with_kept"] == 1

        recs = _records(d / "out" / "round_1" / "records.jsonl")
        assert set(recs) == {"test/arith#0", "test/arith#1"}
        kept = recs["test/arith#0"]["kept"]
        assert [k["response"] for k in kept] == [SHORT]  # shortest critical path among the correct ones
        unclosed = [s for s in recs["test/arith#0"]["samples"] if not s["format_valid"]]
        assert len(unclosed) == 1 and "closed_at_eos" in unclosed[0]["terminations"]

        sft = read_sft(d / "out" / "round_1" / "sft.parquet")
        assert len(sft) == 1 and sft[0]["response"] == SHORT and sft[0]["prompt"] == rows[0]["prompt"]
        assert response_ids(tiny_fmt, sft[0]["response"]) == sft[0]["extra_info"]["response_ids"]
        assert sft[0]["extra_info"]["stage"] == 2 and sft[0]["extra_info"]["round"] == 1
        assert [r["extra_info"]["index"] for r in read_rl(d / "out" / "round_1" / "rl_unsolved.parquet")] == [1]

        # Rerun, problem 3 fixed: only it is sampled; problem 1 and 2 records stay as they are.
        oracle.broken.clear()
        before = len(server.received)
        s2 = run_stage2(_cfg(d, server.url, tiny_model_dir, "out"))
        assert server.received[before:] and all(
            tuple(b["prompt"][: len(p[2])]) == p[2] for b in server.received[before:]
        )
        assert s2["attempted_this_run"] == 1 and s2["problems_done"] == 3 and s2["failed_problems_to_retry"] == 0
        assert s2["kept"] == 2 and s2["accuracy"] == pytest.approx(9 / 15)
        lines = (d / "out" / "round_1" / "records.jsonl").read_text().splitlines()
        assert len(lines) == 3
        rounds = json.loads((d / "out" / "rounds.json").read_text())
        assert [r["round"] for r in rounds] == [1] and rounds[0]["kept"] == 2


@pytest.mark.parametrize(
    "policy, min_blocks, expected",
    [
        ("all_correct", 0, {LONG, SHORT, SEQUENTIAL}),
        ("all_correct", 1, {LONG, SHORT}),
        ("random_one", 0, None),
    ],
)
def test_selection_policies(setup, tiny_model_dir, tiny_fmt, policy, min_blocks, expected):
    d, rows, p, candidates = setup
    picks = []
    for attempt in range(2):
        with ScriptedOpenAI(completions=Oracle(tiny_fmt, candidates)) as server:
            run_stage2(
                _cfg(
                    d,
                    server.url,
                    tiny_model_dir,
                    f"sel-{policy}-{min_blocks}-{attempt}",
                    f"selection={policy}",
                    f"min_blocks={min_blocks}",
                    "max_problems=1",
                )
            )
        recs = _records(d / f"sel-{policy}-{min_blocks}-{attempt}" / "round_1" / "records.jsonl")
        picks.append([k["response"] for k in recs["test/arith#0"]["kept"]])
    if expected is not None:
        assert set(picks[0]) == expected and len(picks[0]) == len(expected)
    else:
        assert len(picks[0]) == 1 and picks[0][0] in {LONG, SHORT, SEQUENTIAL}
        assert picks[0] == picks[1]  # seeded per problem: the same pick on every run


def test_next_round_data_merges_earlier_sft_files_and_the_cli_reports_rounds(setup, tiny_model_dir, tiny_fmt, capsys):
    d, rows, p, candidates = setup
    with ScriptedOpenAI(completions=Oracle(tiny_fmt, candidates)) as server:
        run_stage2(_cfg(d, server.url, tiny_model_dir, "merge", "max_problems=1", "selection=all_correct"))
        first = d / "merge" / "round_1" / "sft.parquet"
        argv = [
            f"data={d / 'prompts.parquet'}",
            f"server_url={server.url}",
            f"tokenizer={tiny_model_dir}",
            f"out_dir={d / 'merge'}",
            "n_samples=5",
            "progress=false",
            "max_problems=1",
            "round=2",
            f"include_sft=[{first}]",
        ]
        assert cli_main(["stage=2", *argv]) == 0
    out = capsys.readouterr().out
    assert "stage 2: self-training rounds" in out and "format_valid_rate" in out
    merged = read_sft(d / "merge" / "round_2" / "next_sft.parquet")
    assert sorted(r["response"] for r in merged) == sorted({LONG, SHORT, SEQUENTIAL})  # duplicates once
    rounds = json.loads((d / "merge" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]

    assert cli_main(["stage=2", f"data={d / 'prompts.parquet'}"]) == 2
    assert "exactly one of model=FOLDER" in capsys.readouterr().err
    assert (
        cli_main(["stage=2", f"data={d / 'prompts.parquet'}", "server_url=http://x", "tokenizer=t", "selection=best"])
        == 2
    )
    assert "selection='best'" in capsys.readouterr().err


def test_min_blocks_counts_the_blocks_the_format_accepts():
    from threadweaver_verl.format import Limits, compute_stats, parse_text, validate
    from threadweaver_verl.generator.stage2 import parallel_blocks

    empty = "<Parallel>\n<Outlines>\n</Outlines>\n\n</Parallel>"
    text = _block(["a", "b"], ["x", "y"]) + "\n" + _block(["c"], ["z"]) + "\n" + empty
    stats = compute_stats(parse_text(text)).as_dict()
    assert stats["num_blocks"] == 3  # every block, whatever it holds
    for limits, counted in ((Limits(), 1), (Limits(single_thread_blocks=True), 2)):
        assert parallel_blocks(stats, limits) == counted
        # the validator agrees: a block that does not count is a format error under the same setting
        rules = {e.rule for e in validate(parse_text(text), limits=limits)}
        assert ("single_thread_block" in rules) == (not limits.single_thread_blocks) and "empty_block" in rules


def test_a_bug_while_encoding_is_raised_not_counted_as_non_canonical(fmt):
    """Only the format's NonCanonicalTrajectory means "not the sampled ids"; any other error is a bug."""
    import dataclasses

    from threadweaver_verl.eval.records import TrajectoryRecord
    from threadweaver_verl.generator.stage2 import _judge

    ids = response_ids(fmt, "<think>\nthe product is 56\n</think>\n\\boxed{56}")
    rec = TrajectoryRecord(
        problem="p", sample=0, data_source="t", index=0, ground_truth="56", valid=True, correct=True, response_ids=ids
    )
    assert _judge(rec, fmt, record_response=False)[0]["canonical"] is True

    def encode(text: str) -> list[int]:
        if "product" in text:
            raise ValueError("a bug in the tokenizer wrapper")
        return fmt.encode(text)

    with pytest.raises(ValueError, match="a bug in the tokenizer wrapper"):
        _judge(rec, dataclasses.replace(fmt, encode=encode), record_response=False)
