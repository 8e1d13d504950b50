"""The RL dataset, built by verl's own create_rl_dataset from the composed Hydra preset, on local
parquet/jsonl files with the tiny model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from threadweaver_verl.data.chat import DEFAULT_INSTRUCTION, prompt_ids
from threadweaver_verl.data.preprocess import PreprocessConfig, run
from threadweaver_verl.data.schema import SchemaError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def preset_data_config():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(
            config_name="threadweaver_pgrpo",
            overrides=["data.max_prompt_length=256", "data.filter_overlong_prompts_workers=1"],
        )
    return cfg.data


def make(data_config, files, tokenizer, **changes):
    """The dataset as verl's trainer builds it (create_rl_dataset -> data.custom_cls)."""
    from omegaconf import OmegaConf, open_dict
    from verl.trainer.ppo.utils import create_rl_dataset

    cfg = OmegaConf.create(OmegaConf.to_container(data_config))
    with open_dict(cfg):
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    return create_rl_dataset(files, cfg, tokenizer, None, is_train=True)


RAW = [
    {"problem": "What is 2 + 3?", "answer": "5", "unique_id": "a"},
    {"problem": "What is 4 * 5?", "answer": "20", "unique_id": "b"},
    {"problem": "Compute 7 - 2.", "answer": "5", "unique_id": "c"},
]


@pytest.fixture()
def raw_parquet(tmp_path):
    p = tmp_path / "raw.parquet"
    pd.DataFrame(RAW).to_parquet(p)
    return str(p)


def test_raw_rows_get_our_prompt_agent_and_reward(preset_data_config, tiny_tokenizer, raw_parquet):
    from threadweaver_verl.integrations.verl.rl_dataset import ThreadWeaverRLDataset

    ds = make(preset_data_config, raw_parquet, tiny_tokenizer, **{"threadweaver.data_source": "toy"})
    assert isinstance(ds, ThreadWeaverRLDataset) and len(ds) == 3
    item = ds[1]
    # verl's outputs are kept
    assert item["raw_prompt"] == item["prompt"] and item["index"] == 1 and item["tools_kwargs"] == {}
    assert item["dummy_tensor"].tolist() == [0]
    # our formatting: question + the trained instruction, as PromptStyle writes it
    assert item["prompt"] == [{"role": "user", "content": f"What is 4 * 5?\n\n{DEFAULT_INSTRUCTION}"}]
    assert item["agent_name"] == "threadweaver"
    assert item["reward_model"] == {"style": "rule", "ground_truth": "20"}
    assert item["data_source"] == "toy" and item["ability"] == "math"
    assert item["extra_info"]["question"] == "What is 4 * 5?" and item["extra_info"]["source_id"] == "b"


def test_batches_through_verl_collate(preset_data_config, tiny_tokenizer, raw_parquet):
    from torch.utils.data import DataLoader
    from verl.utils.dataset.rl_dataset import collate_fn

    ds = make(preset_data_config, raw_parquet, tiny_tokenizer, **{"threadweaver.data_source": "toy"})
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_fn)))
    assert list(batch["agent_name"]) == ["threadweaver"] * 3
    assert [rm["ground_truth"] for rm in batch["reward_model"]] == ["5", "20", "5"]
    assert batch["dummy_tensor"].shape == (3, 1)


def test_preprocessed_parquet_is_used_as_written(preset_data_config, tiny_tokenizer, raw_parquet, tmp_path):
    out = tmp_path / "rl.parquet"
    run(PreprocessConfig(input=raw_parquet, output=str(out), data_source="toy"), progress=False)
    ds = make(preset_data_config, str(out), tiny_tokenizer)
    written = pd.read_parquet(out)
    assert len(ds) == 3
    assert ds[2]["prompt"] == [dict(m) for m in written["prompt"][2]]
    assert ds[2]["extra_info"]["index"] == 2


def test_agent_name_setting(preset_data_config, tiny_tokenizer, raw_parquet, tmp_path):
    out = tmp_path / "rl.parquet"
    run(PreprocessConfig(input=raw_parquet, output=str(out), data_source="toy", agent_name="my_loop"), progress=False)
    assert make(preset_data_config, str(out), tiny_tokenizer)[0]["agent_name"] == "threadweaver"  # config wins
    ds = make(preset_data_config, str(out), tiny_tokenizer, **{"threadweaver.agent_name": None})
    assert ds[0]["agent_name"] == "my_loop"  # null keeps the row's own
    ds = make(preset_data_config, str(out), tiny_tokenizer, **{"threadweaver.agent_name": "single_turn_agent"})
    assert {ds[i]["agent_name"] for i in range(3)} == {"single_turn_agent"}


def test_jsonl_input(preset_data_config, tiny_tokenizer, tmp_path):
    p = tmp_path / "aime.jsonl"
    p.write_text("\n".join(json.dumps({"ID": f"2024-{i}", "Problem": f"Find {i}.", "Answer": i}) for i in (1, 2)))
    ds = make(preset_data_config, str(p), tiny_tokenizer, **{"threadweaver.data_source": "aime"})
    assert [ds[i]["reward_model"]["ground_truth"] for i in range(2)] == ["1", "2"]


def test_overlong_prompts_filtered_with_our_prompt_ids(preset_data_config, tiny_tokenizer, tmp_path):
    p = tmp_path / "mixed.parquet"
    pd.DataFrame([{"problem": "1+1?", "answer": "2"}, {"problem": "9 " * 400, "answer": "9"}]).to_parquet(p)
    ds = make(preset_data_config, str(p), tiny_tokenizer, **{"threadweaver.data_source": "toy"})
    assert len(ds) == 1 and ds[0]["reward_model"]["ground_truth"] == "2"
    assert len(prompt_ids(tiny_tokenizer, ds[0]["prompt"])) <= 256
    with pytest.raises(SchemaError, match="longer than data.max_prompt_length"):
        make(preset_data_config, str(p), tiny_tokenizer, max_prompt_length=10, **{"threadweaver.data_source": "toy"})


# ------------------------------------------------------------------ clear errors
def write(tmp_path, rows, name="bad.parquet"):
    p = tmp_path / name
    pd.DataFrame(rows).to_parquet(p)
    return str(p)


def test_missing_columns(preset_data_config, tiny_tokenizer, tmp_path):
    p = write(tmp_path, [{"text": "What is 1?", "answer": "1"}])
    with pytest.raises(SchemaError, match="no question field found.*question_key"):
        make(preset_data_config, p, tiny_tokenizer, **{"threadweaver.data_source": "toy"})
    p = write(tmp_path, [{"problem": "What is 1?", "hint": "1"}])
    with pytest.raises(SchemaError, match="no answer field found"):
        make(preset_data_config, p, tiny_tokenizer, **{"threadweaver.data_source": "toy"})
    p = write(tmp_path, RAW)
    with pytest.raises(SchemaError, match="data_source"):
        make(preset_data_config, p, tiny_tokenizer)


def test_empty_prompt_and_missing_ground_truth(preset_data_config, tiny_tokenizer, raw_parquet, tmp_path):
    out = tmp_path / "rl.parquet"
    run(PreprocessConfig(input=raw_parquet, output=str(out), data_source="toy"), progress=False)
    frame = pd.read_parquet(out)
    bad = frame.copy()
    bad.at[0, "reward_model"] = {"style": "rule", "ground_truth": " "}
    bad.at[1, "prompt"] = [{"role": "user", "content": "  "}]
    p = tmp_path / "bad_rl.parquet"
    bad.to_parquet(p)
    with pytest.raises(SchemaError) as err:
        make(preset_data_config, str(p), tiny_tokenizer)
    text = str(err.value)
    assert "2 bad row(s) of 3" in text and "row 0" in text and "ground_truth is empty" in text
    assert "row 1" in text and "user message is empty" in text
    p = write(tmp_path, [{"problem": "   ", "answer": "1"}], "empty_q.parquet")
    with pytest.raises(SchemaError, match="question field 'problem' is empty"):
        make(preset_data_config, p, tiny_tokenizer, **{"threadweaver.data_source": "toy"})


def test_prompt_without_our_instruction(preset_data_config, tiny_tokenizer, raw_parquet, tmp_path):
    out = tmp_path / "plain.parquet"
    run(PreprocessConfig(input=raw_parquet, output=str(out), data_source="toy", instruction=None), progress=False)
    with pytest.raises(SchemaError, match="lacks the instruction"):
        make(preset_data_config, str(out), tiny_tokenizer)
    ds = make(preset_data_config, str(out), tiny_tokenizer, **{"threadweaver.require_instruction": False})
    assert ds[0]["prompt"][-1]["content"] == "What is 2 + 3?"


def test_bad_settings(preset_data_config, tiny_tokenizer, raw_parquet):
    with pytest.raises(SchemaError, match="unknown key.*agent"):
        make(preset_data_config, raw_parquet, tiny_tokenizer, **{"threadweaver.agent": "x"})
    with pytest.raises(SchemaError, match="answer_format"):
        make(preset_data_config, raw_parquet, tiny_tokenizer, **{"threadweaver.answer_format": "latex"})
    with pytest.raises(SchemaError, match="prompt_key"):
        make(preset_data_config, raw_parquet, tiny_tokenizer, prompt_key="question")


def test_missing_file(preset_data_config, tiny_tokenizer, tmp_path):
    with pytest.raises(SchemaError, match="nope.parquet' not found: check data.train_files"):
        make(preset_data_config, str(tmp_path / "nope.parquet"), tiny_tokenizer)
