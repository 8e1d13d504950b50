"""Configuration: every command composes its dataclass with Hydra (verl's override grammar, ``--help``,
``--cfg job``), the YAML files in configs/ set only valid keys, an unknown key names the nearest valid
one, and every verl config section goes through the one reader."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from threadweaver_verl.__main__ import main as cli
from threadweaver_verl.cli import COMMANDS
from threadweaver_verl.config import ConfigError, field_docs, knobs, load_config, read_section

REPO = Path(__file__).resolve().parents[1]

# Each command's argv prefix and its config dataclass.
COMMAND_CONFIGS = [
    (["doctor"], "threadweaver_verl.cli.doctor:DoctorConfig"),
    (["tiny-model"], "threadweaver_verl.cli.tiny_model:TinyModelCommand"),
    (["prepare-model"], "threadweaver_verl.models.tags:PrepareModelConfig"),
    (["preprocess"], "threadweaver_verl.data.preprocess:PreprocessConfig"),
    (["make-data"], "threadweaver_verl.tasks.cli:MakeDataConfig"),
    (["eval"], "threadweaver_verl.eval.evaluate:EvalConfig"),
    (["sft"], "threadweaver_verl.sft.train:SFTConfig"),
    (["generate", "stage=1"], "threadweaver_verl.generator.stage1:Stage1Config"),
    (["generate", "stage=2"], "threadweaver_verl.generator.stage2:Stage2Config"),
    (["demo"], "threadweaver_verl.cli.demo:DemoConfig"),
]
# The YAML files of our commands (configs/ also holds verl presets: those are verl's configs).
YAMLS = {
    "demo.yaml": "threadweaver_verl.cli.demo:DemoConfig",
    "sft.yaml": "threadweaver_verl.sft.train:SFTConfig",
    "eval.yaml": "threadweaver_verl.eval.evaluate:EvalConfig",
    "make_data.yaml": "threadweaver_verl.tasks.cli:MakeDataConfig",
    "tiny_model.yaml": "threadweaver_verl.cli.tiny_model:TinyModelCommand",
    "prepare_model.yaml": "threadweaver_verl.models.tags:PrepareModelConfig",
    "generate_stage1.yaml": "threadweaver_verl.generator.stage1:Stage1Config",
    "generate_stage2.yaml": "threadweaver_verl.generator.stage2:Stage2Config",
}


def _cls(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}.")
    return out


def test_every_command_is_listed_here():
    assert {argv[0] for argv, _ in COMMAND_CONFIGS} == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_every_key_of_the_yaml_files_is_a_field(name):
    """The files name their dataclass and set only its fields (they carry no copy of the defaults)."""
    cls = _cls(YAMLS[name])
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    assert raw["defaults"] == [cls.__name__, "_self_"]
    valid = {k.key for k in knobs(cls)}
    settings = {k: v for k, v in raw.items() if k != "defaults"}
    assert set(_keys(settings)) <= valid, set(_keys(settings)) - valid
    assert isinstance(load_config(cls, ["--config", str(REPO / "configs" / name)]), cls)


@pytest.mark.parametrize("argv,path", COMMAND_CONFIGS, ids=[" ".join(a) for a, _ in COMMAND_CONFIGS])
def test_help_lists_every_knob(argv, path, capsys):
    cls = _cls(path)
    assert cli([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: threadweaver {' '.join(argv)}")
    for knob in knobs(cls):
        assert f"\n  {knob.key}: " in out, knob.key
        assert knob.doc, f"{knob.key} of {cls.__name__} has no attribute docstring"
        assert " ".join(knob.doc.split()[:4]) in " ".join(out.split()), knob.key


@pytest.mark.parametrize(
    "path",
    [
        "threadweaver_verl.rl.advantage:PGRPOConfig",
        "threadweaver_verl.integrations.verl.rl_dataset:RLDatasetConfig",
        "threadweaver_verl.rl.reward:RewardConfig",
        "threadweaver_verl.rollout.controller:ControllerConfig",
        "threadweaver_verl.integrations.verl.sft_dataset:SFTDataKeys",
    ],
)
def test_every_knob_of_the_verl_sections_is_documented(path):
    cls = _cls(path)
    undocumented = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
    assert not undocumented, f"{cls.__name__}: {undocumented}"


@pytest.mark.parametrize("argv,path", COMMAND_CONFIGS, ids=[" ".join(a) for a, _ in COMMAND_CONFIGS])
def test_cfg_job_prints_the_composed_config_and_touches_nothing(argv, path, capsys, tmp_path, monkeypatch):
    cls = _cls(path)
    monkeypatch.chdir(tmp_path)
    handlers = list(logging.getLogger().handlers)
    assert cli([*argv, "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out) or {}
    assert read_section(cls, printed, "the printed config") == cls()
    assert os.getcwd() == str(tmp_path) and list(tmp_path.iterdir()) == []  # no chdir, no outputs/ folder
    assert logging.getLogger().handlers == handlers  # logging untouched: rich output stays readable


def test_hydra_settings_keep_the_working_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["make-data", "--cfg", "hydra"]) == 0
    hydra = yaml.safe_load(capsys.readouterr().out)
    assert hydra["run"]["dir"] == "." and hydra["output_subdir"] is None and hydra["job"]["chdir"] is False
    # a real run: the list of presets, written nowhere
    assert cli(["make-data", "list_presets=true", "table_samples=2"]) == 0
    assert "3x4" in capsys.readouterr().out
    assert os.getcwd() == str(tmp_path) and list(tmp_path.iterdir()) == []


def test_override_grammar():
    from threadweaver_verl.eval.evaluate import EvalConfig
    from threadweaver_verl.generator.stage1 import Stage1Config

    cfg = load_config(
        EvalConfig,
        ["n_samples=4", "controller.fork=false", "vllm.extra_args=[--block-size,16]", "tokenizer=null", "top_k=-1"],
    )
    assert (cfg.n_samples, cfg.controller.fork, cfg.vllm.extra_args) == (4, False, ["--block-size", "16"])
    assert isinstance(cfg.controller, type(EvalConfig().controller))
    cfg = load_config(
        Stage1Config,
        [
            "+llm.extra_params.reasoning_effort=medium",
            "+llm.extra_params.seed=3",
            "~llm.extra_params.seed",
            "++llm.http.headers.X-Team=a",
        ],
    )
    assert cfg.llm.extra_params == {"reasoning_effort": "medium"} and cfg.llm.http.headers == {"X-Team": "a"}
    with pytest.raises(ConfigError, match="cannot be removed"):
        load_config(EvalConfig, ["~n_samples"])


def test_an_unknown_key_names_the_nearest_valid_one(tmp_path):
    from threadweaver_verl.eval.evaluate import EvalConfig
    from threadweaver_verl.tasks.cli import MakeDataConfig

    with pytest.raises(ConfigError, match="unknown key 'n_trian' in MakeDataConfig; did you mean 'n_train'"):
        load_config(MakeDataConfig, ["n_trian=3"])
    with pytest.raises(ConfigError, match="unknown key 'n_trian'.*did you mean 'n_train'"):
        load_config(MakeDataConfig, ["+n_trian=3"])
    with pytest.raises(ConfigError, match="'controller.max_thread_token'.*did you mean 'controller.max_thread_tokens'"):
        load_config(EvalConfig, ["controller.max_thread_token=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  - MakeDataConfig\n  - _self_\nn_tset: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'n_tset' in bad.yaml; did you mean 'n_test'"):
        load_config(MakeDataConfig, ["--config", str(bad)])
    plain = tmp_path / "plain.yaml"
    plain.write_text("n_test: 3\n")
    with pytest.raises(ConfigError, match="defaults:\n  - MakeDataConfig\n  - _self_"):
        load_config(MakeDataConfig, ["--config", str(plain)])
    with pytest.raises(ConfigError, match="n_train"):
        load_config(MakeDataConfig, ["n_train=many"])
    with pytest.raises(ConfigError, match="n_train and n_test must be >= 1"):  # __post_init__, through the loader
        load_config(MakeDataConfig, ["n_train=0"])
    with pytest.raises(ConfigError, match="unknown option '--qiuck'"):
        load_config(MakeDataConfig, ["--qiuck"])


def test_yaml_values_apply_and_overrides_win(tmp_path):
    from threadweaver_verl.tasks.cli import MakeDataConfig

    f = tmp_path / "mine.yaml"
    f.write_text("defaults:\n  - MakeDataConfig\n  - _self_\npreset: 5x3\nn_test: 7\n")
    cfg = load_config(MakeDataConfig, ["--config", str(f), "n_test=9"])
    assert (cfg.preset, cfg.n_test, cfg.n_train) == ("5x3", 9, MakeDataConfig().n_train)
    same = load_config(MakeDataConfig, ["--config-path", str(tmp_path), "--config-name", "mine", "n_test=9"])
    assert same == cfg


# --------------------------------------------------------------------------- the one reader
@dataclasses.dataclass
class _Inner:
    depth: int = 2
    """How deep."""


@dataclasses.dataclass
class _Section:
    rate: float = 0.5
    """A rate."""
    name: str = "x"
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")


def test_read_section():
    assert read_section(_Section, None, "algo.s") == _Section()
    given = _Section(rate=0.1)
    assert read_section(_Section, given, "algo.s") is given
    node = OmegaConf.create({"base": 0.25, "s": {"rate": "${base}", "inner": {"depth": 3}, "extra": {"k": 1}}})
    assert read_section(_Section, node.s, "algo.s") == _Section(rate=0.25, inner=_Inner(3), extra={"k": 1})
    with pytest.raises(ConfigError, match="unknown key 'rat' in algo.s; did you mean 'rate'"):
        read_section(_Section, {"rat": 0.2}, "algo.s")
    with pytest.raises(ConfigError, match="unknown key 'inner.dept'.*did you mean 'inner.depth'"):
        read_section(_Section, {"inner": {"dept": 1}}, "algo.s")
    with pytest.raises(ConfigError, match="algo.s: bad value for inner.depth"):
        read_section(_Section, {"inner": {"depth": "deep"}}, "algo.s")
    with pytest.raises(ConfigError, match=r"algo.s: rate must be in \[0, 1\]"):
        read_section(_Section, {"rate": 2.0}, "algo.s")


def test_read_section_of_a_foreign_section_needs_the_fields_without_default():
    from threadweaver_verl.integrations.verl.sft_dataset import SFTDataKeys

    verl_data = OmegaConf.create({"max_length": 64, "pad_mode": "no_padding", "truncation": "error"})
    assert read_section(SFTDataKeys, verl_data, "data", foreign=True).max_length == 64
    with pytest.raises(ConfigError, match="'max_length' in data is required"):
        read_section(SFTDataKeys, {"pad_mode": "no_padding"}, "data", foreign=True)
    with pytest.raises(ConfigError, match="pad_mode=no_padding"):
        read_section(SFTDataKeys, {"max_length": 8, "pad_mode": "right"}, "data", foreign=True)


def test_the_verl_sections_use_the_one_reader():
    from threadweaver_verl.integrations.verl.advantage import read_config
    from threadweaver_verl.integrations.verl.agent_loop import controller_config
    from threadweaver_verl.integrations.verl.rl_dataset import dataset_config
    from threadweaver_verl.rl.advantage import PGRPOError
    from threadweaver_verl.rl.reward import config_from_kwargs

    assert read_config(OmegaConf.create({"p_grpo": {"epsilon": 0.1}})).epsilon == 0.1
    with pytest.raises(PGRPOError, match="unknown key 'epsilo' in algorithm.p_grpo; did you mean 'epsilon'"):
        read_config(OmegaConf.create({"p_grpo": {"epsilo": 0.1}}))
    with pytest.raises(ValueError, match="unknown key 'require_instructions'.*'require_instruction'"):
        dataset_config(OmegaConf.create({"threadweaver": {"require_instructions": False}}))
    with pytest.raises(ValueError, match="unknown key 'max_block'.*did you mean 'max_blocks'"):
        controller_config({"max_block": 2}, response_length=100)
    with pytest.raises(ValueError, match="unknown key 'correctness.timeout'.*'correctness.timeout_s'"):
        config_from_kwargs({"correctness": {"timeout": 3}})
    assert config_from_kwargs({"correctness": {"timeout_s": 3}}).correctness.timeout_s == 3
