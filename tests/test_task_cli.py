"""``make-data``: the files it writes follow the schemas, hold the generator's
solutions, split cleanly, and are identical for a seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from threadweaver_verl.__main__ import main as cli
from threadweaver_verl.config import ConfigError
from threadweaver_verl.data import schema
from threadweaver_verl.data.chat import DEFAULT_INSTRUCTION, prompt_ids, response_ids
from threadweaver_verl.format import TokenFormat, split_requests
from threadweaver_verl.models.tiny import build_tokenizer
from threadweaver_verl.tasks import multiplication as mul

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "mul"
    assert (
        cli(
            [
                "make-data",
                "--config",
                str(REPO / "configs" / "make_data.yaml"),
                f"out={out}",
                "preset=4x3",
                "n_train=300",
                "n_test=60",
                "seed=5",
                "instruction=default",
            ]
        )
        == 0
    )
    return out


def test_files_follow_the_schemas(made):
    train, test = schema.read_rl(made / "train.parquet"), schema.read_rl(made / "test.parquet")
    par, seq = schema.read_sft(made / "sft_parallel.parquet"), schema.read_sft(made / "sft_sequential.parquet")
    assert (len(train), len(test), len(par), len(seq)) == (300, 60, 300, 300)
    for split, rows in (("train", train), ("test", test)):
        for i, r in enumerate(rows):
            assert r["data_source"] == mul.DATA_SOURCE and r["agent_name"] == "threadweaver"
            assert r["extra_info"]["index"] == i and r["extra_info"]["split"] == split
            factors = [int(x) for x in r["extra_info"]["question"][len("What is ") : -1].split(" * ")]
            assert [len(str(f)) for f in factors] == [4, 3]
            assert r["reward_model"]["ground_truth"] == str(math.prod(factors))
            assert r["prompt"][-1]["content"].endswith(DEFAULT_INSTRUCTION)
    assert not set(schema.questions(train)) & set(schema.questions(test))
    # The SFT files hold exactly the generator's solutions of the train problems, without EOS.
    for r, p, s in zip(train, par, seq):
        assert p["prompt"] == s["prompt"] == r["prompt"]
        problem = mul.Problem(tuple(int(x) for x in r["extra_info"]["question"][8:-1].split(" * ")))
        assert p["response"] == mul.parallel_solution(problem)
        assert s["response"] == mul.sequential_solution(problem)
        assert not p["response"].endswith("<|im_end|>")
    summary = json.loads((made / "summary.json").read_text())
    assert summary["difficulty"] == "4x3" and [r["split"] for r in summary["stats"]] == ["train", "test"]
    assert summary["stats"][0]["ideal_speedup"] > 1.0


def test_sft_rows_become_training_requests(made):
    """The path a trainer takes: prompt ids + response ids (with EOS) -> fork/join Requests."""
    tok = build_tokenizer()
    fmt = TokenFormat.from_tokenizer(tok)
    for row in schema.read_sft(made / "sft_parallel.parquet", eos_token="<|im_end|>")[:50]:
        prompt = prompt_ids(tok, row["prompt"])
        ids = response_ids(fmt, row["response"])
        assert ids[-1] == tok.eos_token_id
        requests = split_requests(prompt, ids, fmt)
        assert list(requests[-1].ids) == prompt + ids
        assert requests[-1].completion_ids[-1] == tok.eos_token_id


def test_same_seed_same_files(made, tmp_path):
    again = tmp_path / "again"
    assert (
        cli(["make-data", f"out={again}", "preset=4x3", "n_train=300", "n_test=60", "seed=5", "instruction=default"])
        == 0
    )
    for name in ("train", "test", "sft_parallel", "sft_sequential"):
        assert (again / f"{name}.parquet").read_bytes() == (made / f"{name}.parquet").read_bytes(), name
    other = tmp_path / "other"
    assert cli(["make-data", f"out={other}", "preset=4x3", "n_train=300", "n_test=60", "seed=6"]) == 0
    assert schema.read_rl(other / "test.parquet") != schema.read_rl(made / "test.parquet")


def test_bad_settings_fail_clearly(tmp_path, capsys):
    assert cli(["make-data", "preset=4x3"]) == 2
    assert "out=DIR" in capsys.readouterr().err
    # a message and exit 2 (issue 13); --debug raises the error itself
    assert cli(["make-data", f"out={tmp_path}", "preset=nope"]) == 2
    assert "unknown difficulty 'nope': use a preset" in capsys.readouterr().err
    with pytest.raises(mul.DifficultyError, match="preset"):
        cli(["make-data", f"out={tmp_path}", "preset=nope", "--debug"])
    assert cli(["make-data", f"out={tmp_path}", "n_trian=3"]) == 2
    assert "n_trian" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="n_trian"):
        cli(["make-data", f"out={tmp_path}", "n_trian=3", "--debug"])


def test_list_presets(capsys):
    assert cli(["make-data", "list_presets=true", "table_samples=20"]) == 0
    text = capsys.readouterr().out
    for name in mul.PRESETS:
        assert name in text
