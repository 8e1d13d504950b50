"""The RL and SFT dataset schemas: builders, checks naming the bad column, parquet round trips."""

from __future__ import annotations

import pandas as pd
import pytest

from threadweaver_verl.data import schema
from threadweaver_verl.data.chat import DEFAULT_INSTRUCTION, PromptStyle


def _rl(i=0, **kw):
    args = dict(data_source="src", question=f"What is {i} * 3?", ground_truth=str(3 * i), index=i, split="train")
    args.update(kw)
    return schema.rl_row(**args)


def _sft(i=0, **kw):
    args = dict(
        data_source="src",
        question=f"What is {i} * 3?",
        response=f"<think>\nx\n</think>\n\\boxed{{{3 * i}}}",
        index=i,
        split="train",
    )
    args.update(kw)
    return schema.sft_row(**args)


def test_rl_row_is_verls_layout():
    row = _rl(4, style=PromptStyle(instruction=DEFAULT_INSTRUCTION, system="be brief"), extra={"digits": [1, 1]})
    assert list(row) == list(schema.RL_COLUMNS)
    assert row["prompt"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"What is 4 * 3?\n\n{DEFAULT_INSTRUCTION}"},
    ]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "12"}
    assert row["extra_info"] == {"index": 4, "split": "train", "question": "What is 4 * 3?", "digits": [1, 1]}
    assert row["agent_name"] == schema.AGENT_NAME and row["ability"] == "math"


def test_round_trips(tmp_path):
    rl = [_rl(i, extra={"answer": str(3 * i), "digits": [1, 2]}) for i in range(5)]
    sft = [_sft(i) for i in range(5)]
    assert schema.read_rl(schema.write_rl(rl, tmp_path / "rl.parquet")) == rl
    assert schema.read_sft(schema.write_sft(sft, tmp_path / "sft.parquet")) == sft
    assert schema.questions(rl) == [f"What is {i} * 3?" for i in range(5)]
    # The file has exactly the schema's columns, in order, readable by plain pandas (as verl reads it).
    assert list(pd.read_parquet(tmp_path / "rl.parquet").columns) == list(schema.RL_COLUMNS)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop("reward_model"), r"missing column\(s\) \['reward_model'\]"),
        (lambda r: r.update(prompt="What is 2?"), "column 'prompt'.*list of chat messages"),
        (lambda r: r.update(prompt=[{"role": "bot", "content": "hi"}]), "role 'bot'"),
        (
            lambda r: r.update(prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
            "last message must be the user",
        ),
        (lambda r: r.update(reward_model={"style": "model", "ground_truth": "1"}), "column 'reward_model'"),
        (lambda r: r.update(reward_model={"style": "rule", "ground_truth": 12}), "column 'reward_model'"),
        (lambda r: r["extra_info"].pop("index"), r"column 'extra_info'.*lacks key\(s\) \['index'\]"),
        (lambda r: r.update(data_source=""), "column 'data_source'"),
        (lambda r: r.update(agent_name=None), "column 'agent_name'"),
    ],
)
def test_rl_checks_name_the_bad_column(mutate, match, tmp_path):
    rows = [_rl(0), _rl(1)]
    mutate(rows[1])
    with pytest.raises(schema.SchemaError, match=match) as e:
        schema.write_rl(rows, tmp_path / "bad.parquet")
    assert "row 1" in str(e.value) and "bad.parquet" in str(e.value)
    assert not (tmp_path / "bad.parquet").exists()


def test_sft_checks(tmp_path):
    with pytest.raises(schema.SchemaError, match="column 'response'"):
        _sft(0, response="  ")
    row = _sft(0, response="<think>x</think>\\boxed{1}<|im_end|>")
    with pytest.raises(schema.SchemaError, match="ends with EOS"):
        schema.check_sft_row(row, eos_token="<|im_end|>")
    with pytest.raises(schema.SchemaError, match="set by the schema"):
        _sft(0, extra={"index": 3})
    with pytest.raises(schema.SchemaError, match=r"missing column\(s\) \['response'\]"):
        schema.write_sft([{k: v for k, v in _sft(0).items() if k != "response"}], tmp_path / "x.parquet")
    # A file missing a column fails on reading too, naming the file.
    pd.DataFrame([{k: v for k, v in _sft(0).items() if k != "extra_info"}]).to_parquet(tmp_path / "old.parquet")
    with pytest.raises(schema.SchemaError, match=r"\['extra_info'\] \(.*old\.parquet, row 0\)"):
        schema.read_sft(tmp_path / "old.parquet")
    with pytest.raises(schema.SchemaError, match="not found"):
        schema.read_rl(tmp_path / "missing.parquet")
    with pytest.raises(schema.SchemaError, match="empty"):
        schema.write_rl([], tmp_path / "empty.parquet")


def test_the_agent_name_and_the_stats_key_are_defined_once():
    """One constant each (data.schema.AGENT_NAME, rl.reward.STATS_KEY); every other module imports it, so a
    second literal copy, which could drift, fails here."""
    import re
    from pathlib import Path

    package = Path(schema.__file__).resolve().parents[1]
    definition = re.compile(r"^\s*(\w*(?:agent|stats)\w*)\s*(?::[^=]*)?=\s*[\"']threadweaver[\"']", re.IGNORECASE)
    found = sorted(
        (str(path.relative_to(package)), m.group(1))
        for path in package.rglob("*.py")
        for line in path.read_text().splitlines()
        if (m := definition.match(line))
    )
    assert found == [("data/schema.py", "AGENT_NAME"), ("rl/reward.py", "STATS_KEY")]
