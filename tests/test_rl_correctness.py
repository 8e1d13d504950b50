"""math-verify answer checking: extraction rules, statuses, and the time bound on a real hang."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from threadweaver_verl.rl import correctness as C
from threadweaver_verl.rl.correctness import AnswerCheck, CorrectnessConfig, check_answer, extract_answer, last_boxed

# 117 vs 9^(9^(9^9)): sympy tries to evaluate the power tower and never returns (a C-level bignum
# loop that signal.alarm could not interrupt either).
HANG_ANSWER = "9^{9^{9^{9}}}"


@pytest.fixture(autouse=True)
def _counters():
    C.reset_verifier_counters()
    yield


def test_last_boxed_takes_last_complete_outermost_box():
    assert last_boxed(r"\boxed{1} then \boxed{2}") == "2"
    assert last_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{a \boxed{b}}") == r"a \boxed{b}"
    assert last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces are literal
    assert last_boxed(r"\boxed{7} and a truncated \boxed{8") == "7"  # unclosed box ignored
    assert last_boxed(r"\fbox{5}") == "5"
    assert last_boxed("no box } { here") is None
    assert last_boxed("") is None


def test_answer_rules():
    text = r"<think>draft \boxed{1}</think> final \boxed{2}"
    assert extract_answer(text, "boxed_after_think") == "2"
    assert extract_answer(r"<think>draft \boxed{1}</think> no box", "boxed_after_think") is None
    # no </think>: no final answer under the default rule, but the anywhere rule takes it
    assert extract_answer(r"<think>draft \boxed{1}", "boxed_after_think") is None
    assert extract_answer(r"<think>draft \boxed{1}", "last_boxed_anywhere") == "1"
    with pytest.raises(ValueError, match="answer_rule"):
        CorrectnessConfig(answer_rule="first_boxed")


def test_statuses_and_values():
    cfg = CorrectnessConfig()
    assert check_answer(r"<think>x</think>\boxed{117}", "117", cfg) == AnswerCheck(True, "117", "ok")
    assert check_answer(r"<think>x</think>\boxed{\frac{1}{2}}", "0.5", cfg).correct
    wrong = check_answer(r"<think>x</think>\boxed{118}", "117", cfg)
    assert (wrong.correct, wrong.status, wrong.extracted) == (False, "ok", "118")
    assert check_answer(r"<think>\boxed{117}", "117", cfg).status == "no_answer"
    assert check_answer(r"<think>x</think>\boxed{}", "117", cfg).status == "unparseable"
    assert check_answer(r"<think>x</think>\boxed{117}", "", cfg).status == "bad_ground_truth"
    long = check_answer("<think>x</think>\\boxed{" + "1" * 50 + "}", "1", CorrectnessConfig(max_answer_chars=10))
    assert (long.correct, long.status) == (False, "answer_too_long")
    counts = C.verifier_counters()
    assert counts["ok"] == 3 and counts["no_answer"] == 1 and counts["unparseable"] == 1
    assert counts["bad_ground_truth"] == 1 and counts["answer_too_long"] == 1


def test_real_hang_is_bounded_counted_and_recovered():
    cfg = CorrectnessConfig(timeout_s=1.0)
    assert check_answer(r"<think>x</think>\boxed{117}", "117", cfg).correct  # worker warm
    start = time.monotonic()
    hung = check_answer(f"<think>x</think>\\boxed{{{HANG_ANSWER}}}", "117", cfg)
    took = time.monotonic() - start
    assert (hung.correct, hung.status, hung.extracted) == (False, "timeout", HANG_ANSWER)
    assert took < 60, "the deadline did not bound the call"  # loose sanity bound, not a timing test
    assert C.verifier_counters()["timeout"] == 1
    # the hung worker was replaced: the next call works
    assert check_answer(r"<think>x</think>\boxed{3}", "3", cfg).correct
    assert C.verifier_counters()["starts"] >= 1  # the replacement process


def test_worker_crash_mid_call_scores_error_and_recovers():
    cfg = CorrectnessConfig(timeout_s=30.0)
    C.shutdown_verifiers()  # so that the only worker is the one this call uses
    assert check_answer(r"<think>x</think>\boxed{1}", "1", cfg).correct
    [pid] = C.verifier_pids()
    killer = threading.Timer(0.5, os.kill, args=(pid, signal.SIGKILL))
    killer.start()
    crashed = check_answer(f"<think>x</think>\\boxed{{{HANG_ANSWER}}}", "117", cfg)  # busy when killed
    killer.join()
    assert (crashed.correct, crashed.status) == (False, "error")
    assert check_answer(r"<think>x</think>\boxed{2}", "2", cfg).correct


def test_worker_death_between_calls_is_transparent():
    cfg = CorrectnessConfig()
    assert check_answer(r"<think>x</think>\boxed{1}", "1", cfg).correct
    for pid in C.verifier_pids():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    assert check_answer(r"<think>x</think>\boxed{1}", "1", cfg) == AnswerCheck(True, "1", "ok")
    assert C.verifier_counters()["restarts"] >= 1


def test_concurrent_callers_from_threads():
    """verl calls compute_score from a thread pool: no signals, no crossed replies."""
    cfg = CorrectnessConfig(num_workers=2)
    results: dict[int, AnswerCheck] = {}

    def one(i: int) -> None:
        results[i] = check_answer(f"<think>x</think>\\boxed{{{i}}}", str(i if i % 3 else i + 1), cfg)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i].correct == bool(i % 3) for i in range(24))
    assert all(results[i].extracted == str(i) for i in range(24))


def test_huge_response_is_linear_and_well_formed():
    junk = ("\\boxed{" * 200_000) + "</think>" + ("{" * 100_000) + "\\boxed{42}" + ("}" * 3)
    assert check_answer(junk, "42") == AnswerCheck(True, "42", "ok")
    assert check_answer(junk, "42", CorrectnessConfig(answer_rule="last_boxed_anywhere")).extracted == "42"
    unclosed = "</think>" + "\\boxed{" * 300_000  # nothing complete to extract
    assert check_answer(unclosed, "42").status == "no_answer"
