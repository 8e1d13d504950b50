"""verl integration on CPU: the SFT dataset classes, the trie engine's registration, and the
engine's real ``forward_step`` (verl's code, our overrides, verl's ``sft_loss``) run on CPU
tensors. Only the device lookup is redirected to the CPU (verl's FSDP engine is CUDA/NPU only);
FSDP wrapping, NCCL and the optimizer step need a GPU and are not exercised here."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _sft_common import NESTED, load_model, multiplication_texts, reference_logprobs, three_threads, write_sft_parquet

from threadweaver_verl.sft.batch import TrieCollator, forward_logprobs, row_features
from threadweaver_verl.sft.loss import mean_nll, token_nll

VENDOR = "threadweaver_trie"


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    items = [("What is 12 * 34?", NESTED), ("57?", three_threads())] + multiplication_texts(3, "3x3")
    return write_sft_parquet(tmp_path_factory.mktemp("sft") / "sft.parquet", items)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def expanded_ds(parquet, tiny_tokenizer):
    from threadweaver_verl.integrations.verl.sft_dataset import ExpandedSFTDataset

    return ExpandedSFTDataset(str(parquet), tiny_tokenizer, data_config())


@pytest.fixture(scope="module")
def trie_ds(parquet, tiny_tokenizer):
    from threadweaver_verl.integrations.verl.sft_dataset import TrieSFTDataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VERL_ENGINE_VENDOR", VENDOR)
        ds = TrieSFTDataset(str(parquet), tiny_tokenizer, data_config(max_length=700))
    assert len(ds) >= 2  # several packed rows of unequal length
    return ds


@pytest.fixture
def trie_env(monkeypatch):
    monkeypatch.setenv("VERL_ENGINE_VENDOR", VENDOR)


def data_config(max_length=4096):
    from omegaconf import OmegaConf

    return OmegaConf.create({"max_length": max_length, "pad_mode": "no_padding", "truncation": "error"})


def verl_batch(dataset, indices=None):
    """The TensorDict verl's SFT trainer hands the engine (collator, meta info, token count)."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import SFTTensorCollator

    indices = list(range(len(dataset))) if indices is None else indices
    batch = SFTTensorCollator("no_padding")([dataset[i] for i in indices])
    meta = {
        "use_remove_padding": True,
        "use_dynamic_bsz": False,
        "max_token_len_per_gpu": 8192,
        "micro_batch_size_per_gpu": len(indices),
        "temperature": 1.0,
        "global_batch_size": len(indices),
        "pad_mode": "no_padding",
        "pad_token_id": dataset.tokenizer.pad_token_id,
    }
    data = tu.get_tensordict(tensor_dict=batch, non_tensor_dict=meta)
    tu.assign_non_tensor(data, batch_num_tokens=int(data["loss_mask"].values().sum()), dp_size=1)
    return data


def cpu_engine(cls, module, monkeypatch):
    """An engine object around an unwrapped HF model; verl's device lookup pointed at the CPU."""
    import verl.workers.engine.fsdp.transformer_impl as impl

    monkeypatch.setattr(impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(impl, "get_device_name", lambda: "cpu")
    eng = object.__new__(cls)
    eng.module = module
    eng._autocast_dtype = torch.float32
    eng.use_ulysses_sp = False
    eng.ulysses_device_mesh = None
    eng.pad_to_length = False
    return eng


def run_forward_step(eng, data):
    from verl.workers.utils.losses import sft_loss

    with torch.no_grad():  # as verl's forward_backward_batch(forward_only=True) runs it
        loss, out = eng.forward_step(data, loss_function=partial(sft_loss, config=None), forward_only=True)
    return float(loss.detach()), out["model_output"]["log_probs"]


# --------------------------------------------------------------------------- registration


def test_plugin_registers_the_trie_engine_under_its_own_vendor(monkeypatch):
    import verl  # noqa: F401 - loads the plugin
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from threadweaver_verl.integrations.verl.plugin import STATUS, require
    from threadweaver_verl.integrations.verl.sft_engine import engine_class, register

    require("engine:trie")
    assert STATUS["engine:trie"] == "ok"
    register()
    register()  # idempotent: re-registering in verl's registry would assert
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    monkeypatch.setenv("VERL_ENGINE_VENDOR", VENDOR)
    for backend in ("fsdp", "fsdp2"):
        assert EngineRegistry.get_engine_cls("language_model", backend) is engine_class()
    assert issubclass(engine_class(), FSDPEngineWithLMHead)
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "nvidia")  # opt-in only: the stock engine otherwise
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead


def test_trie_dataset_refuses_to_run_without_the_trie_engine(tiny_tokenizer, parquet, monkeypatch):
    from threadweaver_verl.integrations.verl.sft_dataset import TrieSFTDataset
    from threadweaver_verl.integrations.verl.sft_engine import TrieEngineError

    monkeypatch.delenv("VERL_ENGINE_VENDOR", raising=False)
    with pytest.raises(TrieEngineError, match="VERL_ENGINE_VENDOR=threadweaver_trie"):
        TrieSFTDataset(str(parquet), tiny_tokenizer, data_config())


def test_datasets_load_through_verls_own_factory(tiny_tokenizer, parquet, trie_env):
    from omegaconf import OmegaConf
    from verl.trainer.sft_trainer import create_sft_dataset

    for name in ("ExpandedSFTDataset", "TrieSFTDataset"):
        cfg = OmegaConf.merge(
            data_config(),
            {"custom_cls": {"path": "pkg://threadweaver_verl.integrations.verl.sft_dataset", "name": name}},
        )
        ds = create_sft_dataset([str(parquet)], cfg, tiny_tokenizer, None, max_samples=-1)
        assert type(ds).__name__ == name and len(ds) > 0


def test_expanded_rows_are_the_requests(expanded_ds, tiny_tokenizer, parquet):
    from threadweaver_verl.integrations.verl.sft_dataset import ExpandedSFTDataset

    ds = expanded_ds
    reqs = [r for e in ds.examples for r in e.requests if r.completion_ids]
    assert len(ds) == len(reqs)
    for i, r in enumerate(reqs):
        row = ds[i]
        assert set(row) == {"input_ids", "position_ids", "loss_mask"}
        assert row["input_ids"].tolist() == list(r.ids)
        assert row["position_ids"].tolist() == list(range(len(r.ids)))
        assert row["loss_mask"].tolist() == [0] * len(r.context_ids) + [1] * len(r.completion_ids)
    with pytest.raises(ValueError, match="max_length"):
        ExpandedSFTDataset(str(parquet), tiny_tokenizer, data_config(max_length=40))


# --------------------------------------------------------------------------- forward_step on CPU


def test_expanded_rows_on_the_stock_engine_score_each_request_as_alone(expanded_ds, tiny, monkeypatch):
    """Stock verl (use_remove_padding: all rows packed into one sequence, no mask) on CPU/sdpa."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    ds = expanded_ds
    idx = list(range(6))
    loss, lp = run_forward_step(cpu_engine(FSDPEngineWithLMHead, tiny, monkeypatch), verl_batch(ds, idx))
    reqs = [r for e in ds.examples for r in e.requests if r.completion_ids][:6]
    total, count = 0.0, 0
    for row_lp, r in zip(lp.unbind(), reqs):
        got = row_lp[len(r.context_ids) - 1 : len(r.ids) - 1]  # verl: log_probs[i] scores token i + 1
        ref = reference_logprobs(tiny, r)
        assert (got - ref).abs().max().item() <= 1e-5
        total, count = total - float(ref.sum()), count + len(ref)
    assert abs(loss - total / count) <= 1e-5


def test_trie_rows_on_the_trie_engine_equal_the_hf_path_token_for_token(trie_ds, tiny, monkeypatch):
    from threadweaver_verl.integrations.verl.sft_engine import engine_class

    ds = trie_ds
    for idx in (list(range(len(ds))), [len(ds) - 1]):  # a padded multi-row micro-batch, and one row
        loss, lp = run_forward_step(cpu_engine(engine_class(), tiny, monkeypatch), verl_batch(ds, idx))
        # the run-anywhere path on the same rows
        batch = TrieCollator(ds.tokenizer.pad_token_id)([row_features(ds.rows[i]) for i in idx])
        with torch.no_grad():
            hf_lp = forward_logprobs(tiny, batch, "sdpa")
        hf_nll = token_nll(hf_lp, batch["loss_mask"])
        for b, row_lp in enumerate(lp.unbind()):
            n = len(ds.rows[idx[b]])
            verl_nll = -row_lp[: n - 1] * batch["loss_mask"][b, 1:n]  # log_probs[i] scores token i + 1
            assert (verl_nll - hf_nll[b, 1:n]).abs().max().item() <= 1e-5
        assert abs(loss - float(mean_nll(hf_lp, batch["loss_mask"]))) <= 1e-5
    # and the first trajectory (the first trie of row 0) scores each Request as if run alone
    row0 = run_forward_step(cpu_engine(engine_class(), tiny, monkeypatch), verl_batch(ds, [0]))[1].unbind()[0]
    for r in [r for r in ds.examples[0].requests if r.completion_ids]:
        nodes = ds.rows[0].index_of(r.ids, 0)[len(r.context_ids) :]
        assert (row0[[n - 1 for n in nodes]] - reference_logprobs(tiny, r)).abs().max().item() <= 1e-5


def test_trie_engine_refuses_a_model_without_mask_support(trie_ds, tiny, monkeypatch):
    from threadweaver_verl.integrations.verl.sft_engine import TrieEngineError, engine_class

    eng = cpu_engine(engine_class(), tiny, monkeypatch)
    monkeypatch.setattr(tiny.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(TrieEngineError, match="attn_implementation=sdpa"):
        eng.prepare_model_inputs(verl_batch(trie_ds, [0]))


def test_trie_engine_passes_ordinary_rows_to_verls_code(expanded_ds, tiny, monkeypatch):
    from threadweaver_verl.integrations.verl.sft_engine import engine_class

    eng = cpu_engine(engine_class(), tiny, monkeypatch)
    model_inputs, out_args = eng.prepare_model_inputs(verl_batch(expanded_ds, [0, 1]))
    assert model_inputs["attention_mask"] is None and "input_ids_rmpad_rolled" in out_args


@pytest.mark.slow
def test_trie_rows_with_flex_attention_on_the_trie_engine(trie_ds, tiny, monkeypatch):
    """The BlockMask branch (all rows of the micro-batch in one sequence); compiles flex on CPU."""
    from threadweaver_verl.integrations.verl.sft_engine import engine_class

    data = verl_batch(trie_ds)
    _, lp_sdpa = run_forward_step(cpu_engine(engine_class(), tiny, monkeypatch), data)
    tiny.set_attn_implementation("flex_attention")
    try:
        _, lp_flex = run_forward_step(cpu_engine(engine_class(), tiny, monkeypatch), data)
    finally:
        tiny.set_attn_implementation("sdpa")
    assert (lp_flex.values() - lp_sdpa.values()).abs().max().item() <= 1e-5


def test_missing_data_keys_are_an_error_not_a_default(parquet, tiny_tokenizer):
    """verl's data section must give max_length and pad_mode; nothing falls back to a default."""
    from omegaconf import OmegaConf

    from threadweaver_verl.config import ConfigError
    from threadweaver_verl.integrations.verl.sft_dataset import ExpandedSFTDataset

    with pytest.raises(ConfigError, match="'max_length' in data is required"):
        ExpandedSFTDataset(str(parquet), tiny_tokenizer, OmegaConf.create({"pad_mode": "no_padding"}))
    with pytest.raises(ConfigError, match="'pad_mode' in data is required"):
        ExpandedSFTDataset(str(parquet), tiny_tokenizer, OmegaConf.create({"max_length": 64}))
