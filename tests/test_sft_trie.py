"""The token trie: paths, positions, loss placement, thread copies, entry/exit times, packing."""

from __future__ import annotations

import random

import numpy as np
import pytest
from _sft_common import NESTED, SEQUENTIAL, requests_of, three_threads

from threadweaver_verl.format import Request, RequestKind
from threadweaver_verl.sft.data import SFTDataError, SFTExample, build_rows
from threadweaver_verl.sft.synthetic import TrajectoryShape, random_trajectory
from threadweaver_verl.sft.trie import TrieError, build_trie, chain, concat, pack


@pytest.fixture(scope="module")
def split(tiny_tokenizer, tiny_fmt):
    """text (+ question) -> the Requests fork/join inference issues for it."""
    return lambda text, question="What is 12 * 34?": requests_of(tiny_tokenizer, tiny_fmt, text, question)


def ancestors_or_self(parent: np.ndarray, i: int) -> set[int]:
    out = set()
    while i >= 0:
        out.add(i)
        i = int(parent[i])
    return out


@pytest.mark.parametrize("text", [NESTED, three_threads(), SEQUENTIAL])
def test_every_request_is_one_path_with_depth_positions_and_completion_loss(split, text):
    reqs = split(text)
    t = build_trie(reqs)
    for r in reqs:
        idx = t.index_of(r.ids)
        assert list(t.position_ids[idx]) == list(range(len(r.ids)))
        assert t.loss_mask[idx[len(r.context_ids) :]].all()
        assert list(t.input_ids[idx]) == list(r.ids)
    # loss exactly once: one loss node per completion token, none elsewhere
    assert t.num_loss_tokens == sum(len(r.completion_ids) for r in reqs)
    assert t.loss_collisions == 0
    completion_nodes = {i for r in reqs for i in t.index_of(r.ids)[len(r.context_ids) :]}
    assert set(np.flatnonzero(t.loss_mask)) == completion_nodes


@pytest.mark.parametrize("text", [NESTED, three_threads()])
def test_each_distinct_path_appears_once(split, text):
    reqs = split(text)
    t = build_trie(reqs)
    prefixes = {tuple(r.ids[:k]) for r in reqs for k in range(1, len(r.ids) + 1)}
    assert len(t) == len(prefixes)
    assert len({(int(p), int(x)) for p, x in zip(t.parent, t.input_ids)}) == len(t)  # no duplicate child


def test_threads_after_the_first_appear_twice_thread_one_once(split):
    reqs = split(three_threads())
    t = build_trie(reqs)
    threads = [r for r in reqs if r.kind == RequestKind.THREAD]
    final = reqs[-1]  # main line after the join: re-reads all threads as causal context
    final_idx = t.index_of(final.ids)
    for k, r in enumerate(threads, start=1):
        own = t.index_of(r.ids)[len(r.context_ids) :]  # the thread's own branch (with loss)
        assert t.loss_mask[own].all()
        # its own branch starts at the fork point, not after the earlier threads
        assert t.position_ids[own[0]] == len(r.context_ids)
        inside_join = [i for i in final_idx if i in set(own)]
        if k == 1:
            assert inside_join == own  # thread 1's branch is a prefix of the joined context
        else:
            assert inside_join == []  # a second copy, later positions, no loss
            copy = _find_run(t.input_ids[final_idx], r.completion_ids)
            assert copy is not None
            copy_idx = final_idx[copy : copy + len(r.completion_ids)]
            assert not t.loss_mask[copy_idx].any()
            assert t.position_ids[copy_idx[0]] > t.position_ids[own[0]]


def _find_run(hay, needle):
    hay, needle = list(hay), list(needle)
    for s in range(len(hay) - len(needle) + 1):
        if hay[s : s + len(needle)] == needle:
            return s
    return None


def test_sequential_trajectory_flattens_to_its_plain_sequence(split):
    reqs = split(SEQUENTIAL)
    assert len(reqs) == 1
    t = build_trie(reqs)
    assert list(t.input_ids) == list(reqs[0].ids)
    assert list(t.parent) == list(range(-1, len(t) - 1))
    assert list(t.tout) == [len(t) - 1] * len(t)


@pytest.mark.parametrize("seed", [0, 1])
def test_entry_exit_times_encode_ancestry(split, seed):
    rng = random.Random(seed)
    text = random_trajectory(rng, TrajectoryShape(tokens=80, blocks=2, max_threads=3, nested_prob=0.7))
    t = build_trie(split(text))
    tin, tout = t.tin, t.tout
    for i in range(len(t)):
        anc = ancestors_or_self(t.parent, i)
        by_time = {j for j in range(len(t)) if tin[j] <= tin[i] <= tout[j]}
        assert by_time == anc
        if t.parent[i] >= 0:
            assert t.position_ids[i] == t.position_ids[t.parent[i]] + 1
        else:
            assert t.position_ids[i] == 0


def test_pack_is_block_diagonal_and_respects_the_budget(split):
    tries = [build_trie(split(x)) for x in (NESTED, three_threads(), SEQUENTIAL, three_threads("2: 1 + 1 = 2"))]
    budget = max(len(x) for x in tries) + 40
    rows = pack(tries, budget)
    assert sorted(i for _, members in rows for i in members) == list(range(len(tries)))
    for row, members in rows:
        assert len(row) <= budget
        assert len(row.starts) == len(members)
        assert row.num_loss_tokens == sum(tries[i].num_loss_tokens for i in members)
        ends = list(row.starts[1:]) + [len(row)]
        for s, e in zip(row.starts, ends):
            seg = slice(s, e)
            assert ((row.parent[seg] == -1) | ((row.parent[seg] >= s) & (row.parent[seg] < e))).all()
            assert (row.tout[seg] < e).all() and (row.tout[seg] >= np.arange(s, e)).all()
            assert row.position_ids[s] == 0
    with pytest.raises(TrieError, match="row budget"):
        pack(tries, 10)


def test_build_rows_names_the_sample_that_does_not_fit(split):
    ex = [SFTExample("data.parquet:7", tuple(split(NESTED)))]
    with pytest.raises(SFTDataError, match=r"data.parquet:7.*row budget"):
        build_rows(ex, "trie", 50)
    chains = build_rows(ex, "expanded", 10_000)
    assert sum(r.num_requests for r in chains) == len(ex[0].requests)
    assert sum(r.request_tokens for r in chains) == sum(len(r) for r in chains)  # chains share nothing


def test_two_requests_completing_the_same_token_count_its_loss_once():
    a = Request((1, 2), (3, 4), RequestKind.SEQUENTIAL)
    b = Request((1, 2, 3), (4, 5), RequestKind.SEQUENTIAL)  # token 4 is a completion token of both
    t = build_trie([a, b])
    assert len(t) == 5
    assert t.num_loss_tokens == 3 and t.loss_collisions == 1


def test_empty_context_is_refused():
    with pytest.raises(TrieError, match="empty context"):
        build_trie([Request((), (5, 6), RequestKind.SEQUENTIAL)])


def test_chain_is_the_plain_request(split):
    r = split(NESTED)[2]
    c = chain(r)
    assert list(c.input_ids) == list(r.ids)
    assert int(c.loss_mask.sum()) == len(r.completion_ids)
    assert len(concat([c, c])) == 2 * len(c)


def test_ids_the_controller_inserted_carry_no_loss():
    r = Request((1, 2), (3, 4, 5, 6), RequestKind.THREAD, forced=2)  # e.g. closing tags after a truncation
    t = build_trie([r])
    assert t.loss_mask.tolist() == [False, False, True, True, False, False]
