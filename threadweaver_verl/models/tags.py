"""Tokenizer and model preparation: every format tag becomes one token.

:func:`add_tags` adds the tags of :data:`threadweaver_verl.format.ALL_TAGS` to
any HF tokenizer as added tokens, grows the model's embeddings when needed and
initialises each new row as the mean of the rows of the tag's sub-word pieces
under the ORIGINAL tokenizer (input embeddings, and the output head when it is
not tied). :func:`check_tags` fails loudly, naming the tag, when a tag is not
exactly one token.

CLI::

    python -m threadweaver_verl prepare-model model=DIR out=DIR [special=false]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threadweaver_verl.format import ALL_TAGS, Tag, TagTokenError, TagVocab


def tag_pieces(tokenizer: Any) -> dict[Tag, list[int]]:
    """The ids each tag encodes to under ``tokenizer`` as it is now."""
    return {t: list(tokenizer.encode(t.value, add_special_tokens=False)) for t in ALL_TAGS}


def add_tags(tokenizer: Any, model: Any = None, special: bool = False) -> tuple[Any, Any]:
    """Add every tag to ``tokenizer`` (in place) and initialise new embedding rows of ``model``.

    A tag that already is one token keeps its id and its row. ``special=True``
    registers the tags as special tokens (``decode(skip_special_tokens=True)``
    then drops them); the default keeps them as ordinary added tokens, like
    Qwen3's ``<think>``, so decoded text keeps its structure.
    Returns ``(tokenizer, model)``; the model may be ``None``.
    """
    from tokenizers import AddedToken

    pieces = tag_pieces(tokenizer)
    before = len(tokenizer)
    tokenizer.add_tokens(
        [
            AddedToken(t.value, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for t in ALL_TAGS
        ],
        special_tokens=special,
    )
    vocab = check_tags(tokenizer)
    new = {t: pieces[t] for t in ALL_TAGS if vocab.id(t) >= before}
    if model is not None:
        _init_rows(model, {vocab.id(t): p for t, p in new.items()}, len(tokenizer))
    return tokenizer, model


def _init_rows(model: Any, rows: dict[int, list[int]], vocab_len: int) -> None:
    """Grow the embeddings to ``vocab_len`` rows if needed; set ``rows[id]`` = mean of its pieces' rows."""
    import torch

    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    old_in = inp.weight.detach().clone()
    old_out = out.weight.detach().clone() if out is not None else None
    tied = out is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    if vocab_len > inp.weight.shape[0]:
        model.resize_token_embeddings(vocab_len, mean_resizing=False)
        inp = model.get_input_embeddings()
        out = model.get_output_embeddings()
    with torch.no_grad():
        for new_id, piece_ids in rows.items():
            bad = [i for i in piece_ids if i >= old_in.shape[0]]
            if not piece_ids or bad:
                raise TagTokenError(
                    f"cannot initialise token {new_id}: its pieces {piece_ids} are not rows of the "
                    f"original embeddings ({old_in.shape[0]} rows)"
                )
            inp.weight[new_id] = old_in[piece_ids].float().mean(0).to(inp.weight.dtype)
            if out is not None and not tied:
                out.weight[new_id] = old_out[piece_ids].float().mean(0).to(out.weight.dtype)


def check_tags(tokenizer: Any) -> TagVocab:
    """The tag ids of ``tokenizer``; raises :class:`TagTokenError` naming a tag that is not one token.

    Beyond :meth:`TagVocab.from_tokenizer` (each tag alone is one token), this
    checks each tag stays one token between text on both sides.
    """
    vocab = TagVocab.from_tokenizer(tokenizer)
    for tag in ALL_TAGS:
        ids = list(tokenizer.encode(f"a{tag.value}1", add_special_tokens=False))
        if ids.count(vocab.id(tag)) != 1:
            raise TagTokenError(
                f"tag {tag.value!r} does not stay one token inside text: 'a{tag.value}1' encodes to {ids}. "
                "Add the tags as added tokens: `python -m threadweaver_verl prepare-model model=DIR out=DIR`."
            )
    return vocab


# --------------------------------------------------------------------------- CLI


@dataclass
class PrepareModelConfig:
    """``prepare-model``: add the format tags to a HF tokenizer + model folder."""

    model: str = ""
    """Input HF folder (required): the tokenizer, and the weights unless tokenizer_only."""
    out: str = ""
    """Output folder (required; created)."""
    special: bool = False
    """Register the tags as special tokens (decode(skip_special_tokens=True) drops them)."""
    tokenizer_only: bool = False
    """Only the tokenizer (no weights in `model`)."""


def main(argv: Sequence[str] = ()) -> int:
    from threadweaver_verl.config import run_command

    return run_command(PrepareModelConfig, argv, run, command="prepare-model")


def run(cfg: PrepareModelConfig) -> int:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    if not cfg.model or not cfg.out:
        print("prepare-model: pass model=DIR (a HF folder) and out=DIR", file=sys.stderr)
        return 2
    from threadweaver_verl.runs import output_dir, require_model_dir

    src = require_model_dir(cfg.model, "model", what="tokenizer" if cfg.tokenizer_only else "model")
    out = output_dir(cfg.out, "out")
    console = Console()
    tokenizer = AutoTokenizer.from_pretrained(src)
    pieces = tag_pieces(tokenizer)
    model = None
    if not cfg.tokenizer_only:
        from transformers import AutoModelForCausalLM

        with console.status(f"loading {src}"):
            model = AutoModelForCausalLM.from_pretrained(src)
    before = len(tokenizer)
    tokenizer, model = add_tags(tokenizer, model, special=cfg.special)
    out.mkdir(parents=True, exist_ok=True)
    with console.status(f"saving to {out}"):
        tokenizer.save_pretrained(out)
        if model is not None:
            model.save_pretrained(out)
    vocab = check_tags(AutoTokenizer.from_pretrained(out))  # the saved folder, as users will load it
    table = Table(title=f"format tags in {out}")
    for col in ("tag", "id", "new", "pieces before (initialised from)"):
        table.add_column(col)
    for t in ALL_TAGS:
        table.add_row(t.value, str(vocab.id(t)), "yes" if vocab.id(t) >= before else "no", str(pieces[t]))
    console.print(table)
    console.print(
        f"vocabulary {before} -> {len(tokenizer)} tokens"
        + ("" if model is None else f"; embedding rows {model.get_input_embeddings().weight.shape[0]}")
    )
    return 0
