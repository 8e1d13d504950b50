"""The P-GRPO reward on hand-worked trajectories, through verl's own loading and reward manager.

Trajectories are built token by token (each tag one token, each character one token), so
T and L below are counted by hand in the comments, and each acceleration form's number is
checked exactly.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction

import numpy as np
import pytest
import torch

from threadweaver_verl.format import Tag
from threadweaver_verl.rl import correctness as C
from threadweaver_verl.rl.reward import RewardConfig, acceleration_bonus, compute_score, score_response

HANG_ANSWER = "9^{9^{9^{9}}}"  # sympy evaluates the power tower forever (see test_rl_correctness)


@pytest.fixture(scope="module")
def build(tok):
    """ids from pieces: a tag string is its one token; other text is one token per character."""
    tags = {t.value for t in Tag}

    def ids(*pieces: str, eos: bool = True) -> list[int]:
        out: list[int] = []
        for p in pieces:
            if p in tags:
                out.append(tok.convert_tokens_to_ids(p))
                continue
            for ch in p:
                one = tok.encode(ch, add_special_tokens=False)
                assert len(one) == 1, ch
                out += one
        return out + ([tok.eos_token_id] if eos else [])

    return ids


def outline(n: str, text: str) -> tuple[str, ...]:
    return ("<Outline>", f"{n}:{text}", "</Outline>")


def thread(n: str, *body: str) -> tuple[str, ...]:
    return ("<Thread>", f"\n{n}:", *body, "</Thread>")


def flat_pieces(answer: str = "7") -> tuple[str, ...]:
    # <think>\nAA\n | <Parallel><Outlines> 2 outlines (5 each) </Outlines>\n | thread 1 (9) \n thread 2 (7)
    # \n</Parallel>
    # | \nC</think> \boxed{7} (9 chars) | EOS
    return (
        "<think>",
        "\nAA\n",
        "<Parallel>",
        "<Outlines>",
        *outline("1", "x"),
        *outline("2", "y"),
        "</Outlines>",
        "\n",
        *thread("1", "aaaa"),
        "\n",
        *thread("2", "bb"),
        "\n",
        "</Parallel>",
        "\nC",
        "</think>",
        f"\\boxed{{{answer}}}",
    )


# T = 5 + 1 + 1 + 5 + 5 + 1 + 1 + 9 + 1 + 7 + 1 + 1 + 2 + 1 + 9 + 1(EOS) = 51
# L = T - (9 + 7) + max(9, 7) = 44
FLAT_T, FLAT_L = 51, 44


def nested_pieces() -> tuple[str, ...]:
    inner = (
        "<Parallel>",
        "<Outlines>",
        *outline("1", "p"),
        *outline("2", "q"),
        "</Outlines>",
        "\n",
        *thread("1", "cccccc"),
        "\n",
        *thread("2", "dddddd"),
        "\n",
        "</Parallel>",
    )  # 14 + 11 + 1 + 11 + 2 = 39
    return (
        "<think>",
        "<Parallel>",
        "<Outlines>",
        *outline("1", "x"),
        *outline("2", "y"),
        "</Outlines>",
        "\n",
        *thread("1", " a", *inner, "e"),  # <Thread> + "\n1: a" (5) + inner (39) + e + </Thread> = 47
        "\n",
        *thread("2", "bbbbbbbb"),  # 4 + 8 + 1 = 13
        "\n",
        "</Parallel>",
        "</think>",
        "\\boxed{7}",
    )


# T = 1 + (1 + 1 + 5 + 5 + 1 + 1) + 47 + 1 + 13 + 2 + 1 + 9 + 1(EOS) = 89
# outer block: 77 tokens, threads 47 + 13 -> own 17; thread 1's critical path: 2 tags + 5 ("\n1: a") +
# inner block (own 39 - 22 = 17, + longest inner thread 11 = 28) + 1 (e) = 36; so L = 1 + 17 + 36 + 11 = 65
NESTED_T, NESTED_L = 89, 65


def approx_eq(a: float, b: Fraction) -> bool:
    return abs(a - float(b)) < 1e-12


# ------------------------------------------------------------------ the formulas
def test_acceleration_forms_exact():
    code = RewardConfig(acceleration="one_minus_ratio")
    readme = RewardConfig(acceleration="ratio_minus_one")
    assert approx_eq(acceleration_bonus(51, 44, code), Fraction(1, 2) * Fraction(7, 51))
    assert approx_eq(acceleration_bonus(51, 44, readme), Fraction(1, 2) * Fraction(7, 44))
    assert acceleration_bonus(89, 65, code) == pytest.approx(0.1)  # 24/89 > 0.2: clipped
    assert acceleration_bonus(89, 65, readme) == pytest.approx(0.1)  # 24/65 > 0.2: clipped
    assert acceleration_bonus(100, 100, code) == 0.0 and acceleration_bonus(100, 100, readme) == 0.0
    assert acceleration_bonus(0, 0, code) == 0.0
    assert acceleration_bonus(51, 44, RewardConfig(acceleration="none")) == 0.0
    assert approx_eq(
        acceleration_bonus(10, 8, RewardConfig(acceleration_factor=1.0, acceleration_clip=1.0)), Fraction(2, 10)
    )
    with pytest.raises(ValueError, match="exceeds"):
        acceleration_bonus(10, 11, code)
    with pytest.raises(ValueError, match="acceleration"):
        RewardConfig(acceleration="speedup")


# ------------------------------------------------------------------ hand-worked trajectories from ids
def test_flat_trajectory_both_forms(fmt, build, tok_dir):
    ids = build(*flat_pieces())
    assert len(ids) == FLAT_T and fmt.stats(ids).critical_path == FLAT_L
    for form, bonus in (("one_minus_ratio", Fraction(7, 102)), ("ratio_minus_one", Fraction(7, 88))):
        r = compute_score("math", "", "7", {}, response_ids=ids, tokenizer=tok_dir, acceleration=form)
        assert approx_eq(r["score"], 1 + bonus), form
        assert approx_eq(r["acceleration_bonus"], bonus)
        assert (r["correct"], r["acc"], r["pred"], r["answer_status"]) == (True, 1.0, "7", "ok")
        assert (r["T"], r["L"], r["blocks"], r["threads"]) == (FLAT_T, FLAT_L, 1, 2)
        assert r["speedup"] == pytest.approx(FLAT_T / FLAT_L)
        assert (r["format_ok"], r["termination"], r["stats_source"]) == (True, "eos", "response_ids")
        assert r["answer_source"] == "response_ids"  # decoded with the tags kept, not verl's stripped text


def test_nested_trajectory_clips(fmt, build, tok_dir):
    ids = build(*nested_pieces())
    assert fmt.validate(ids) == []
    r = compute_score("math", "", "7", {"threadweaver": {"response_ids": ids}}, tokenizer=tok_dir)
    assert (r["T"], r["L"], r["blocks"], r["threads"]) == (NESTED_T, NESTED_L, 2, 4)
    assert r["score"] == pytest.approx(1.1) and r["acceleration_bonus"] == pytest.approx(0.1)
    r = compute_score(
        "math",
        "",
        "7",
        {"threadweaver": {"response_ids": ids}},
        tokenizer=tok_dir,
        acceleration="ratio_minus_one",
        acceleration_clip=1.0,
    )
    assert approx_eq(r["score"], 1 + Fraction(1, 2) * Fraction(24, 65))  # unclipped README form


def test_truncated_trajectory(build, tok_dir):
    pieces = flat_pieces()
    cut = pieces.index("\n2:")  # stop inside thread 2, after "<Thread>\n2:b"
    ids = build(*pieces[:cut], "\n2:b", eos=False)
    # T = 29 (through the separator after thread 1) + <Thread> \n 2 : b = 34; thread 2 open (5 tokens):
    # L = 34 - (9 + 5) + 9 = 29
    for wrong, penalty in ((0.0, 0.0), (-1.0, 0.0), (0.0, 0.25)):
        r = compute_score(
            "math", "", "7", {}, response_ids=ids, tokenizer=tok_dir, wrong_score=wrong, format_penalty=penalty
        )
        assert (r["T"], r["L"]) == (34, 29)
        assert (r["correct"], r["answer_status"], r["format_ok"], r["termination"]) == (
            False,
            "no_answer",
            False,
            "no_eos",
        )
        assert r["acceleration_bonus"] == 0.0
        assert r["score"] == pytest.approx(wrong - penalty)


def test_wrong_answer_gets_no_bonus(build, tok_dir):
    ids = build(*flat_pieces(answer="8"))
    for wrong in (0.0, -1.0):
        r = compute_score("math", "", "7", {}, response_ids=ids, tokenizer=tok_dir, wrong_score=wrong)
        assert (r["correct"], r["answer_status"], r["pred"]) == (False, "ok", "8")
        assert r["score"] == wrong and r["acceleration_bonus"] == 0.0
        assert r["speedup"] == pytest.approx(FLAT_T / FLAT_L)  # measured, just not paid


def test_unparseable_answer(build, tok_dir):
    ids = build(*flat_pieces(answer=""))
    r = compute_score("math", "", "7", {}, response_ids=ids, tokenizer=tok_dir, wrong_score=-1.0)
    assert (r["score"], r["correct"], r["answer_status"]) == (-1.0, False, "unparseable")


def test_invalid_format_correct_answer(build, tok_dir):
    # thread numbers do not match the outlines (thread 3 answers no outline): valid answer, invalid format
    pieces = ["3:" if p == "\n2:" else p for p in flat_pieces()]
    pieces = ["\n3:" if p == "3:" else p for p in pieces]
    ids = build(*pieces)
    r = compute_score("math", "", "7", {}, response_ids=ids, tokenizer=tok_dir)
    assert (r["correct"], r["format_ok"], r["acceleration_bonus"], r["score"]) == (True, False, 0.0, 1.0)
    r = compute_score(
        "math", "", "7", {}, response_ids=ids, tokenizer=tok_dir, bonus_requires_format_ok=False, format_penalty=0.5
    )
    assert approx_eq(r["score"], 1 + Fraction(7, 102) - Fraction(1, 2))


def test_junk_ids_and_text(tok, tok_dir):
    rng = np.random.default_rng(0)
    junk = rng.integers(0, len(tok), size=3000).tolist()
    r = compute_score("math", "", "7", {}, response_ids=junk, tokenizer=tok_dir)
    assert r["T"] == 3000 and 0 < r["L"] <= 3000 and r["correct"] is False and r["score"] == 0.0
    r = compute_score("math", "}{ \\boxed{ </Thread> <Parallel> \x00 \\boxed{}}}", "7", None)
    assert (r["score"], r["stats_source"], r["T"], r["answer_status"]) == (0.0, "none", None, "no_answer")


def test_huge_inputs(build, tok_dir):
    body = "1234567890" * 20_000  # 200k tokens of sequential text
    ids = build("<think>", body, "</think>", "\\boxed{7}")
    r = compute_score("math", "", "7", {}, response_ids=ids, tokenizer=tok_dir)
    assert r["T"] == r["L"] == len(ids) and r["correct"] and r["score"] == 1.0  # sequential: no bonus
    text = ("\\boxed{" + "{" * 10) * 100_000 + "</think>\\boxed{7}"
    r = compute_score("math", text, "7", {})
    assert (r["correct"], r["score"], r["stats_source"]) == (True, 1.0, "none")  # correct, but no stats: no bonus


def test_math_verify_hang_scores_wrong_and_is_counted(build, tok_dir):
    C.reset_verifier_counters()
    ids = build(*flat_pieces(answer=HANG_ANSWER))
    r = compute_score(
        "math", "", "117", {}, response_ids=ids, tokenizer=tok_dir, wrong_score=-1.0, correctness={"timeout_s": 1.0}
    )
    assert (r["score"], r["correct"], r["answer_status"], r["verify_timeout"]) == (-1.0, False, "timeout", 1.0)
    assert C.verifier_counters()["timeout"] == 1
    r = compute_score(
        "math", "", "7", {}, response_ids=build(*flat_pieces()), tokenizer=tok_dir, correctness={"timeout_s": 1.0}
    )
    assert r["correct"] and r["verify_timeout"] == 0.0


# ------------------------------------------------------------------ stats from the agent loop's extra_fields
def test_stats_from_extra_fields_and_answer_from_response_text(tok, build):
    ids = build(*flat_pieces())
    stripped = tok.decode(ids, skip_special_tokens=True)  # what verl's naive manager passes as solution_str
    assert "</think>" not in stripped
    full = tok.decode(ids, skip_special_tokens=False)
    stats = {
        "total_tokens": FLAT_T,
        "critical_path": FLAT_L,
        "num_blocks": 1,
        "num_threads": 2,
        "format_ok": True,
        "termination": "eos",
    }
    r = compute_score("math", stripped, "7", {"threadweaver": stats})
    assert (r["answer_status"], r["score"], r["stats_source"]) == ("no_answer", 0.0, "extra_fields")
    r = compute_score("math", stripped, "7", {"threadweaver": {**stats, "response_text": full}})
    assert approx_eq(r["score"], 1 + Fraction(7, 102))
    assert (r["answer_source"], r["termination"], r["T"], r["L"]) == ("response_text", "eos", FLAT_T, FLAT_L)


def test_bad_contracts_fail_loudly(build):
    with pytest.raises(ValueError, match="critical_path"):
        compute_score("math", "", "7", {"threadweaver": {"total_tokens": 5}})
    with pytest.raises(ValueError, match="tokenizer"):
        compute_score("math", "", "7", {}, response_ids=build("x"))
    with pytest.raises(ValueError, match="unknown key 'wrong_scor'.*did you mean 'wrong_score'"):
        compute_score("math", "", "7", {}, wrong_scor=-1.0)
    with pytest.raises(ValueError, match="must be a dict"):
        compute_score("math", "", "7", {"threadweaver": [1, 2]})


def test_no_stats_no_bonus():
    r = compute_score("math", "<think>x</think>\\boxed{7}", "7", {"index": 3})
    assert (r["score"], r["acceleration_bonus"], r["stats_source"]) == (1.0, 0.0, "none")
    assert r["T"] is None and r["speedup"] is None and r["format_ok"] is None


def test_score_response_is_the_core():
    r = score_response("<think>x</think>\\boxed{7}", 7, None, RewardConfig(correct_score=2.0))
    assert r["score"] == 2.0


# ------------------------------------------------------------------ through verl's own code
def test_loaded_and_scored_by_verl_reward_manager(tok, build):
    """The composed preset -> verl's load_reward_manager (pkg:// path + reward_kwargs) -> naive manager."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from verl import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        config = compose(
            config_name="threadweaver_pgrpo",
            overrides=[
                "reward.custom_reward_function.reward_kwargs.wrong_score=-1.0",
                "reward.custom_reward_function.reward_kwargs.acceleration=ratio_minus_one",
            ],
        )

    prompt = [tok.convert_tokens_to_ids("<|im_start|>"), 5, 6]
    cases = [(build(*flat_pieces()), "7"), (build(*flat_pieces(answer="8")), "7")]

    async def run_all():
        manager = load_reward_manager(config, tok)
        outs = []
        for response, gt in cases:
            stats = {
                "total_tokens": FLAT_T,
                "critical_path": FLAT_L,
                "num_blocks": 1,
                "num_threads": 2,
                "format_ok": True,
                "termination": "eos",
                "response_text": tok.decode(response, skip_special_tokens=False),
            }
            data = DataProto.from_dict(
                tensors={
                    "prompts": torch.tensor([prompt]),
                    "responses": torch.tensor([response]),
                    "attention_mask": torch.ones(1, len(prompt) + len(response), dtype=torch.int64),
                },
                non_tensors={
                    "data_source": np.array(["math"], dtype=object),
                    "reward_model": np.array([{"style": "rule", "ground_truth": gt}], dtype=object),
                    "extra_info": np.array([{"index": 0}], dtype=object),
                    "tool_extra_fields": np.array([{"threadweaver": stats}], dtype=object),
                },
            )
            outs.append(await manager.run_single(data))
        return type(manager).__name__, outs

    name, (right, wrong) = asyncio.run(run_all())
    assert name == "NaiveRewardManager"
    assert approx_eq(right["reward_score"], 1 + Fraction(7, 88))
    assert right["reward_extra_info"]["T"] == FLAT_T and right["reward_extra_info"]["correct"] is True
    assert right["reward_extra_info"]["answer_source"] == "response_text"  # verl's solution_str lost </think>
    assert wrong["reward_score"] == -1.0 and wrong["reward_extra_info"]["pred"] == "8"
