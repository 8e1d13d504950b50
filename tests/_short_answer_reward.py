"""Test reward for the learning test: ThreadWeaver's P-GRPO reward plus a bonus for a shorter answer.

The format-following model (``_format_following_model.py``) always answers 3, so on the
multiplication task the P-GRPO reward is the same (0) for every trajectory and gives no signal.
The bonus ``-T / 30`` (T = the trajectory's response tokens, from the agent loop's stats) does: a
trajectory is shorter when the model closes its outline list earlier, a choice the policy makes
at every ``</Outline>``.
"""

from __future__ import annotations

from threadweaver_verl.rl.reward import compute_score as p_grpo_score

TOKENS_PER_POINT = 30.0


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    out = dict(p_grpo_score(data_source, solution_str, ground_truth, extra_info, **kwargs))
    out["p_grpo_score"] = out["score"]
    out["score"] = out["score"] - float(out["T"]) / TOKENS_PER_POINT
    return out
