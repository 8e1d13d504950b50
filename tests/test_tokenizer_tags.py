"""Adding the format tags to a tokenizer and model that lack them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from threadweaver_verl.__main__ import main as cli
from threadweaver_verl.format import ALL_TAGS, TagTokenError, TokenFormat
from threadweaver_verl.models.tags import add_tags, check_tags, tag_pieces
from threadweaver_verl.models.tiny import TinyModelConfig, build_tiny_model, build_tokenizer
from threadweaver_verl.tasks import multiplication as mul


def _model(vocab: int, tied: bool) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=tied,
        )
    )


@pytest.fixture(scope="module")
def plain_tokenizer_files(tmp_path_factory):
    """A saved tokenizer without the tags (each tag splits into several pieces)."""
    path = tmp_path_factory.mktemp("plain_tok")
    build_tokenizer(tags=False).save_pretrained(path)
    return path


def _fresh(path):
    return AutoTokenizer.from_pretrained(path)


def test_without_tags_the_check_names_the_tag(plain_tokenizer_files):
    tok = _fresh(plain_tokenizer_files)
    assert all(len(p) > 1 for p in tag_pieces(tok).values())
    with pytest.raises(TagTokenError, match=r"'<think>' is \d+ tokens .*prepare-model model=DIR out=DIR"):
        check_tags(tok)


@pytest.mark.parametrize("tied", [True, False])
def test_add_tags_initialises_new_rows_as_mean_of_pieces(plain_tokenizer_files, tied):
    tok = _fresh(plain_tokenizer_files)
    model = _model(len(tok), tied)
    before = len(tok)
    pieces = tag_pieces(tok)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    tok, model = add_tags(tok, model)

    vocab = check_tags(tok)
    assert len(tok) == before + len(ALL_TAGS)
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert inp.shape[0] == len(tok) and out.shape[0] == len(tok)
    assert torch.equal(inp[:before], old_in) and torch.equal(out[:before], old_out)  # other rows unchanged
    for tag in ALL_TAGS:
        i = vocab.id(tag)
        assert tok.encode(tag.value, add_special_tokens=False) == [i]
        assert torch.allclose(inp[i], old_in[pieces[tag]].mean(0))
        assert torch.allclose(out[i], (old_in if tied else old_out)[pieces[tag]].mean(0))
    assert (out.data_ptr() == inp.data_ptr()) == tied
    # Decoding keeps the tags (added tokens, not special ones), and the format module accepts the tokenizer.
    assert (
        tok.decode(tok.encode("<think>\n<Parallel>", add_special_tokens=False), skip_special_tokens=True)
        == "<think>\n<Parallel>"
    )
    fmt = TokenFormat.from_tokenizer(tok)
    s = mul.make_samples(mul.Difficulty.parse("3x3"), 3, seed=0)[0]
    mul.check_sample(s, fmt)


def test_add_tags_is_idempotent_and_keeps_existing_ids():
    tok = build_tokenizer()  # already has every tag as one token
    ids = {t: check_tags(tok).id(t) for t in ALL_TAGS}
    model = _model(len(tok), tied=False)
    w = model.get_input_embeddings().weight.detach().clone()
    tok, model = add_tags(tok, model)
    assert {t: check_tags(tok).id(t) for t in ALL_TAGS} == ids
    assert torch.equal(model.get_input_embeddings().weight, w)


def test_model_with_spare_rows_is_not_resized(plain_tokenizer_files):
    tok = _fresh(plain_tokenizer_files)
    model = _model(len(tok) + 64, tied=True)  # like Qwen's padded vocabulary
    tok, model = add_tags(tok, model)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) - len(ALL_TAGS) + 64


def test_special_tags_are_dropped_by_skip_special_tokens(plain_tokenizer_files):
    tok, _ = add_tags(_fresh(plain_tokenizer_files), special=True)
    assert tok.decode(tok.encode("a<Thread>b", add_special_tokens=False), skip_special_tokens=True) == "ab"
    check_tags(tok)


def test_prepare_model_cli_round_trip(tmp_path):
    src = build_tiny_model(
        tmp_path / "plain",
        TinyModelConfig(
            tags=False, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16
        ),
    )
    before = AutoModelForCausalLM.from_pretrained(src).get_input_embeddings().weight.detach().clone()
    pieces = tag_pieces(AutoTokenizer.from_pretrained(src))
    config = Path(__file__).resolve().parents[1] / "configs" / "prepare_model.yaml"
    assert cli(["prepare-model", "--config", str(config), f"model={src}", f"out={tmp_path / 'ready'}"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "ready")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ready")
    vocab = check_tags(tok)
    w = model.get_input_embeddings().weight
    assert w.shape[0] == len(tok) == before.shape[0] + len(ALL_TAGS)
    assert torch.equal(w[: before.shape[0]], before)
    for tag in ALL_TAGS:
        assert torch.allclose(w[vocab.id(tag)], before[pieces[tag]].mean(0))
    assert model.config.vocab_size == len(tok)
    # The prepared folder serves the format end to end (chat template and EOS kept).
    fmt = TokenFormat.from_tokenizer(tok)
    assert fmt.eos_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prepare_model_cli_errors(tmp_path, capsys):
    assert cli(["prepare-model", f"out={tmp_path}"]) == 2
    assert "model=DIR" in capsys.readouterr().err
    assert cli(["prepare-model", f"model={tmp_path / 'nope'}", f"out={tmp_path}"]) == 2
    assert "not found" in capsys.readouterr().err
