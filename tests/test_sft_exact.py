"""Exactness (CPU, float32, tiny model): one trie-packed forward gives every completion token
the log-prob it gets when its Request runs alone, and no thread sees a sibling."""

from __future__ import annotations

import pytest
import torch
from _sft_common import (
    NESTED,
    SEQUENTIAL,
    load_model,
    multiplication_texts,
    reference_logprobs,
    requests_of,
    three_threads,
)

from threadweaver_verl.sft.batch import TrieCollator, forward_logprobs, row_features
from threadweaver_verl.sft.loss import mean_nll
from threadweaver_verl.sft.trie import build_trie, chain, pack

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def split(tiny_tokenizer, tiny_fmt):
    return lambda text, question="What is 12 * 34?": requests_of(tiny_tokenizer, tiny_fmt, text, question)


def trajectories():
    out = [
        ("nested", NESTED, "What is 12 * 34?"),
        ("three", three_threads(), "57?"),
        ("sequential", SEQUENTIAL, "What is 12 * 34?"),
    ]
    out += [(f"mul{i}", r, q) for i, (q, r) in enumerate(multiplication_texts(1, "3x3"))]
    return out


def worst_diff(m, rows_and_requests, attention="sdpa"):
    """Max |trie log-prob - alone log-prob| over every completion token of every Request."""
    batch = TrieCollator()([row_features(row) for row, _ in rows_and_requests])
    with torch.no_grad():
        lp = forward_logprobs(m, batch, attention)
    worst, count = 0.0, 0
    for b, (row, reqs) in enumerate(rows_and_requests):
        for r in reqs:
            idx = _index_in_packed(row, r)
            got = lp[b, idx[len(r.context_ids) :]]
            ref = reference_logprobs(m, r)
            worst = max(worst, (got - ref).abs().max().item())
            count += len(r.completion_ids)
    return worst, count


def _index_in_packed(row, r):
    for seg in range(len(row.starts)):
        try:
            return row.index_of(r.ids, seg)
        except KeyError:
            continue
    raise AssertionError("request not found in the row")


@pytest.mark.parametrize("name,text,question", trajectories(), ids=[t[0] for t in trajectories()])
def test_one_trie_forward_matches_each_request_alone(split, tiny, name, text, question):
    reqs = split(text, question)
    worst, count = worst_diff(tiny, [(build_trie(reqs), reqs)])
    assert count == sum(len(r.completion_ids) for r in reqs) > 0
    assert worst <= TOL, f"{name}: max abs diff {worst}"


def test_packed_rows_and_padded_batches_match_each_request_alone(split, tiny):
    items = trajectories()
    reqs = [split(t, q) for _, t, q in items]
    tries = [build_trie(r) for r in reqs]
    rows = pack(tries, max(len(t) for t in tries) + 200)  # several trajectories per row, rows of unequal length
    assert any(len(members) > 1 for _, members in rows) and len(rows) > 1
    pairs = [(row, [q for i in members for q in reqs[i]]) for row, members in rows]
    worst, count = worst_diff(tiny, pairs)
    assert count == sum(len(q.completion_ids) for r in reqs for q in r)
    assert worst <= TOL, worst


def test_changing_a_sibling_thread_leaves_a_threads_logits_unchanged(split, tiny):
    a_reqs = split(three_threads("2: 57 * 2 = 114"), "57?")
    b_reqs = split(three_threads("2: 9 9 9 carry 1 row 4 4 = 0"), "57?")
    ta, tb = build_trie(a_reqs), build_trie(b_reqs)
    with torch.no_grad():
        la = tiny(
            input_ids=torch.as_tensor(ta.input_ids)[None],
            position_ids=torch.as_tensor(ta.position_ids)[None],
            attention_mask=_mask(ta),
        ).logits[0]
        lb = tiny(
            input_ids=torch.as_tensor(tb.input_ids)[None],
            position_ids=torch.as_tensor(tb.position_ids)[None],
            attention_mask=_mask(tb),
        ).logits[0]
    for ra, rb in zip(a_reqs, b_reqs):
        if ra.path in ((1, 1), (1, 3)):  # threads 1 and 3: their own branches
            assert ra.ids == rb.ids
            ia, ib = ta.index_of(ra.ids), tb.index_of(rb.ids)
            assert (la[ia] - lb[ib]).abs().max().item() <= TOL  # float noise only (rows differ in length)
    # The same change DOES move thread 3 when the full sequence is read causally (the reference's leak):
    seq_a, seq_b = a_reqs[-1].ids, b_reqs[-1].ids
    t3 = [r for r in a_reqs if r.path == (1, 3)][0].completion_ids
    sa, sb = _find(seq_a, t3), _find(seq_b, t3)
    with torch.no_grad():
        fa = tiny(input_ids=torch.tensor(seq_a)[None]).logits[0, sa : sa + len(t3)]
        fb = tiny(input_ids=torch.tensor(seq_b)[None]).logits[0, sb : sb + len(t3)]
    assert (fa - fb).abs().max().item() > 1e-3


def test_trie_of_two_trajectories_of_one_prompt_and_why_targets_come_from_parents(split, tiny):
    """Two trajectories of one prompt in ONE trie share the prompt; the second one's first
    completion token starts a branch after the first trajectory's whole subtree. Its target
    is predicted at its parent (the prompt's last token): exact. A flat shift-by-one would
    predict it from the previous flat token (the end of the other trajectory): wrong."""
    first, second = split(three_threads(), "57?"), split(NESTED, "57?")
    reqs = first + second
    t = build_trie(reqs)
    # both open with the same tokens ("<think>\n"): the same (context, target) pair, counted once
    assert t.loss_collisions == 2
    assert t.num_loss_tokens + t.loss_collisions == sum(len(r.completion_ids) for r in reqs)
    worst, _ = worst_diff(tiny, [(t, [second[0], second[-1]])])  # the second trajectory's first and last
    assert worst <= TOL, worst
    batch = TrieCollator()([row_features(t)])
    with torch.no_grad():
        lp = forward_logprobs(tiny, batch, "sdpa")[0]
        logits = tiny(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=_mask(t)).logits[
            0
        ]
    flat = torch.log_softmax(logits[:-1], -1).gather(-1, batch["input_ids"][0, 1:, None])[:, 0]
    jumps = [i for i in range(1, len(t)) if t.parent[i] != i - 1 and t.loss_mask[i]]
    assert jumps  # loss tokens whose previous flat token is not their parent
    assert all(abs(float(flat[i - 1] - lp[i])) > 1e-3 for i in jumps)


def _mask(t):
    from threadweaver_verl.sft.masks import bool_mask

    return bool_mask(torch.arange(len(t))[None], torch.as_tensor(t.tout)[None])


def _find(hay, needle):
    hay, needle = list(hay), list(needle)
    return next(s for s in range(len(hay)) if hay[s : s + len(needle)] == needle)


def test_training_on_the_trie_gives_the_gradient_of_training_on_the_requests(split, tiny_model_dir):
    m = load_model(tiny_model_dir)
    reqs = split(NESTED)
    grads, losses = [], []
    for rows in ([build_trie(reqs)], [chain(r) for r in reqs]):  # one trie row vs one row per Request
        m.zero_grad()
        batch = TrieCollator()([row_features(r) for r in rows])
        loss = mean_nll(forward_logprobs(m, batch, "sdpa"), batch["loss_mask"])
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert abs(losses[0] - losses[1]) <= TOL
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_flex_block_mask_forward_matches_each_request_alone(split, tiny):
    """Through HF's flex_attention integration (torch.compile on CPU: ~30-60 s the first time)."""
    reqs = split(NESTED)
    worst, _ = worst_diff(tiny, [(build_trie(reqs), reqs)], attention="flex")
    assert worst <= TOL, worst
