"""A tiny model that follows the ThreadWeaver format, built by rewriting the tiny model's weights.

The random tiny model almost never writes ``</Outlines>``, so a real engine serving it never forks.
This turns it into a token-bigram machine with the same architecture and tokenizer: every layer's
output projections are zeroed (each layer is the identity on the residual stream), the embeddings of
the tokens below are made orthonormal, and an untied LM head maps each of them to its successor with
a logit margin of ``margin``. Served by vLLM, the model then writes (temperature 1)::

    <think> a <Parallel> <Outlines> (<Outline> b </Outline>)+ </Outlines>      main line, forks
    x </Thread>                                                               each thread, after "N:"
    </think> \\boxed{3} <|im_end|>                                             after the join

where each ``</Outline>`` is followed by another outline or by ``</Outlines>`` with probability 1/2
each, so trajectories differ in their number of threads (hence T/L and the reward's bonus). Outlines
carry no numbers: run the controller with ``outline_numbers=by_position``.
"""

from __future__ import annotations

from pathlib import Path

START_TEXT = "a"  # after <think>
OUTLINE_TEXT = "b"  # inside each outline
THREAD_TEXT = "x"  # each thread's body
ANSWER = "3"


def chain(tokenizer) -> dict[int, list[int]]:
    """current token id -> the ids that may follow it (uniformly)."""
    from threadweaver_verl.data.chat import prompt_ids
    from threadweaver_verl.format import Tag, TokenFormat

    fmt = TokenFormat.from_tokenizer(tokenizer)
    t = fmt.tag_id

    def one(text: str) -> int:
        ids = fmt.encode(text)
        assert len(ids) == 1, f"{text!r} is {ids}, not one token"
        return ids[0]

    start = prompt_ids(tokenizer, [{"role": "user", "content": "q"}])[-1]  # the assistant turn's last id
    colon = fmt.thread_header(1)[-1]
    assert all(fmt.thread_header(n)[-1] == colon for n in range(1, 10))
    boxed = fmt.encode(f"\\boxed{{{ANSWER}}}")
    links: dict[int, list[int]] = {
        start: [t(Tag.THINK_OPEN)],
        t(Tag.THINK_OPEN): [one(START_TEXT)],
        one(START_TEXT): [t(Tag.PARALLEL_OPEN)],
        t(Tag.PARALLEL_OPEN): [t(Tag.OUTLINES_OPEN)],
        t(Tag.OUTLINES_OPEN): [t(Tag.OUTLINE_OPEN)],
        t(Tag.OUTLINE_OPEN): [one(OUTLINE_TEXT)],
        one(OUTLINE_TEXT): [t(Tag.OUTLINE_CLOSE)],
        t(Tag.OUTLINE_CLOSE): [t(Tag.OUTLINE_OPEN), t(Tag.OUTLINES_CLOSE)],
        colon: [one(THREAD_TEXT)],
        one(THREAD_TEXT): [t(Tag.THREAD_CLOSE)],
        t(Tag.PARALLEL_CLOSE): [t(Tag.THINK_CLOSE)],
        t(Tag.THINK_CLOSE): [boxed[0]],
    }
    for a, b in zip(boxed, boxed[1:] + [fmt.eos_ids[0]]):
        links[a] = [b]
    assert len(links) == len(set(links)), "a token appears twice as a chain link"
    return links


def build_format_following_model(src_dir: str | Path, out_dir: str | Path, margin: float = 40.0) -> Path:
    """Write the format-following variant of the tiny model at ``src_dir`` to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src_dir))
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32)
    links = chain(tokenizer)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        vocab, dim = emb.shape
        assert len(links) <= dim
        gen = torch.Generator().manual_seed(0)
        basis, _ = torch.linalg.qr(torch.randn(dim, len(links), generator=gen))  # orthonormal columns
        scale = emb.norm(dim=1).mean()
        head = torch.zeros(vocab, dim)
        for k, (cur, nexts) in enumerate(links.items()):
            emb[cur] = basis[:, k] * scale
            for nxt in nexts:  # final RMSNorm turns emb[cur] into sqrt(dim) * basis[:, k]
                head[nxt] += basis[:, k] * (margin / dim**0.5)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(head)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
