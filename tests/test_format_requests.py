"""TokenFormat layout and the request splitter, on the tiny BPE tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadweaver_verl.data.chat import response_ids
from threadweaver_verl.format import (
    BlockLayout,
    NonCanonicalTrajectory,
    RequestKind,
    Tag,
    TagTokenError,
    TagVocab,
    split_requests,
)
from threadweaver_verl.models.tiny import build_tokenizer


def block(outlines: list[str], threads: list[str]) -> str:
    return BlockLayout().block_text(outlines, threads)


NESTED = (
    "<think>\nsplit it"
    + block(["a", "b"], [" left " + block(["p", "q"], [" 11 ", " 22 "]) + " after", " right 7\n"])
    + "\nthen "
    + block(["c", "d"], [" only\n", " also"])
    + "\ndone</think>\n\\boxed{42}"
)


def replay(prompt: list[int], requests) -> list[int]:
    """Rebuild the response from the Requests the way inference does: main line grows by each
    completion; a block's threads are joined into the main line before the next main-line request."""
    main = list(prompt)
    for r in requests:
        if r.kind == RequestKind.SEQUENTIAL:
            assert list(r.context_ids[: len(main)]) == main[: len(r.context_ids)]
            main = list(r.context_ids) + list(r.completion_ids)
    return main[len(prompt) :]


def test_tags_are_single_tokens_and_missing_tags_fail_loudly(tok, fmt):
    assert set(fmt.vocab.ids) == set(Tag)
    plain = build_tokenizer(tags=False)
    with pytest.raises(TagTokenError, match="<think>.*prepare-model"):
        TagVocab.from_tokenizer(plain)


def test_split_nested_trajectory(tok, fmt):
    prompt = tok.encode("Q: 6*7?")
    ids = response_ids(fmt, NESTED)
    reqs = split_requests(prompt, ids, fmt)
    kinds = [(r.kind, r.path) for r in reqs]
    assert kinds == [
        (RequestKind.SEQUENTIAL, ()),
        (RequestKind.THREAD, (1, 1)),
        (RequestKind.THREAD, (1, 1, 1, 1)),
        (RequestKind.THREAD, (1, 1, 1, 2)),
        (RequestKind.THREAD, (1, 1)),
        (RequestKind.THREAD, (1, 2)),
        (RequestKind.SEQUENTIAL, ()),
        (RequestKind.THREAD, (2, 1)),
        (RequestKind.THREAD, (2, 2)),
        (RequestKind.SEQUENTIAL, ()),
    ]
    # every request stops where inference stops: </Outlines>, </Thread> or EOS
    stops = {fmt.tag_id(Tag.OUTLINES_CLOSE), fmt.tag_id(Tag.THREAD_CLOSE), *fmt.eos_ids}
    assert all(r.completion_ids[-1] in stops for r in reqs)
    # threads of one block share the context up to the fork, and see no sibling
    t1, t2 = reqs[1], reqs[5]
    shared = reqs[0].context_ids + reqs[0].completion_ids
    assert t1.context_ids == tuple(fmt.fork_context(shared, 1))
    assert t2.context_ids == tuple(fmt.fork_context(shared, 2))
    assert " left" not in tok.decode(t2.context_ids)
    # the main line after the join re-reads both threads
    assert " left" in tok.decode(reqs[6].context_ids) and " right" in tok.decode(reqs[6].context_ids)
    assert replay(prompt, reqs) == ids
    # every response token is a completion token of exactly one main-line or thread request, once
    assert sum(len(r.completion_ids) for r in reqs) == len(ids) - sum(
        len(fmt.thread_header(1)) + 1 for _ in range(6)
    ) - 3 * (1 + 1)  # headers+gaps inserted per thread, join gaps per block


def test_splitter_never_retokenizes_joined_text(tok, fmt):
    # Pieces are encoded one by one; a tokenizer may merge differently across the joins.
    text = "<think>" + block(["x", "y"], [":: 12 ab", "ab"]) + "ab</think>\\boxed{1}"
    ids = response_ids(fmt, text)
    reqs = split_requests([], ids, fmt)
    assert replay([], reqs) == ids
    assert tok.decode(ids) == text + tok.eos_token


def test_sequential_trajectory_is_one_request(tok, fmt):
    ids = response_ids(fmt, "<think>\n3*4 = 12\n</think>\n\\boxed{12}")
    (req,) = split_requests([7, 8], ids, fmt)
    assert req.kind == RequestKind.SEQUENTIAL and req.context_ids == (7, 8) and list(req.completion_ids) == ids


def test_invalid_or_non_canonical_trajectories_are_refused(tok, fmt):
    with pytest.raises(NonCanonicalTrajectory, match="invalid"):
        split_requests([], fmt.encode("a") + [fmt.tag_id(Tag.THREAD_CLOSE)], fmt)
    good = response_ids(fmt, block(["a", "b"], [" b", " c"]))
    # a double newline where inference inserts one: not what fork/join could produce
    bad = fmt.encode_text(block(["a", "b"], [" b", " c"]))
    k = bad.index(fmt.tag_id(Tag.THREAD_OPEN))
    bad = bad[:k] + fmt.encode("\n") + bad[k:]
    with pytest.raises(NonCanonicalTrajectory, match="layout"):
        split_requests([], bad, fmt)
    assert split_requests([], good, fmt)


_piece = st.text(alphabet="ab 12:\n", min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(_piece, min_size=2, max_size=3), _piece), min_size=0, max_size=3), _piece)
def test_replaying_requests_rebuilds_any_valid_trajectory(fmt, blocks, tail):
    text = (
        "<think>"
        + "".join(pre + block([f"o{i}" for i in range(len(th))], th) for th, pre in blocks)
        + tail
        + "</think>"
    )
    ids = response_ids(fmt, text)
    reqs = split_requests([1, 2], ids, fmt)
    assert replay([1, 2], reqs) == ids
    assert sum(r.kind == RequestKind.THREAD for r in reqs) == sum(len(th) for th, _ in blocks)
