"""Parse / render / validate: hand-written cases and property tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadweaver_verl.format import (
    ALL_TAGS,
    Block,
    BlockLayout,
    Outline,
    Outlines,
    Span,
    Tag,
    TagVocab,
    Thread,
    Trajectory,
    compute_stats,
    iter_atoms,
    parse_ids,
    parse_text,
    render_ids,
    render_text,
    validate,
)
from threadweaver_verl.format import validation as V
from threadweaver_verl.format.tree import Parser, id_atoms, node_length, parse_atoms, text_atoms

GOOD = (
    "<think>\nLet us split.\n<Parallel>\n<Outlines>\n<Outline>1: left</Outline>\n<Outline>2: right</Outline>\n"
    "</Outlines>\n<Thread>\n1: left is 3\n</Thread>\n<Thread>\n2: right is 4\n</Thread>\n</Parallel>\n"
    "So 7.\n</think>\n\\boxed{7}"
)


def rules(text: str) -> set[str]:
    return {e.rule for e in validate(parse_text(text))}


def test_good_trajectory_is_valid_and_round_trips():
    tree = parse_text(GOOD)
    assert validate(tree) == []
    assert render_text(tree) == GOOD
    (block,) = tree.blocks
    assert [t.body[0].content.split(":")[0].strip() for t in block.threads] == ["1", "2"]


@pytest.mark.parametrize(
    "text, rule",
    [
        (
            "<Parallel>\n<Outlines>\n<Outline>2: a</Outline>\n</Outlines>\n<Thread>\n2: x</Thread>\n</Parallel>",
            V.Rule.OUTLINE_NUMBERING,
        ),
        (
            "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n2: x</Thread>\n</Parallel>",
            V.Rule.THREAD_NUMBERING,
        ),
        (
            "<Parallel>\n<Outlines>\n<Outline>a</Outline>\n</Outlines>\n<Thread>\n1: x</Thread>\n</Parallel>",
            V.Rule.OUTLINE_NUMBER,
        ),
        (
            "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\nx</Thread>\n</Parallel>",
            V.Rule.THREAD_NUMBER,
        ),
        (
            "<Parallel>\n<Outlines>\n<Outline>1: a<think></Outline>\n</Outlines>\n<Thread>\n1: x</Thread>\n</Parallel>",
            V.Rule.STRAY_TAG,
        ),
        ("<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n1: x</Thread>\n", V.Rule.UNCLOSED),
        ("<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n1: x\n</Parallel>", V.Rule.UNCLOSED),
        ("<Parallel>\n<Thread>\n1: x</Thread>\n</Parallel>", V.Rule.NO_OUTLINES),
        (
            "<Parallel>\nhello<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n1: x</Thread>\n</Parallel>",
            V.Rule.TEXT_IN_BLOCK,
        ),
        (
            "<Parallel>\n<Outlines>\nhi<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n1: x</Thread>\n</Parallel>",
            V.Rule.TEXT_IN_OUTLINES,
        ),
        (
            "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n1: x</Thread>\n"
            "<Outlines>\n</Outlines></Parallel>",
            V.Rule.MULTIPLE_OUTLINES,
        ),
        ("a </Thread> b", V.Rule.STRAY_TAG),
        ("a </Outlines> b", V.Rule.STRAY_TAG),
        ("</think><think>", V.Rule.THINK_ORDER),
        ("<think> never closed", V.Rule.UNCLOSED),
    ],
)
def test_each_rule_is_named(text, rule):
    assert rule in rules(text)
    assert render_text(parse_text(text)) == text


def test_error_names_position_and_path():
    text = "abc<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\nx</Thread>\n</Parallel>"
    errors = validate(parse_text(text), limits=V.Limits(single_thread_blocks=True))
    assert {e.rule for e in errors} == {V.Rule.THREAD_NUMBER, V.Rule.THREAD_NUMBERING}
    (err,) = [e for e in errors if e.rule == V.Rule.THREAD_NUMBER]
    assert err.path == "block 1 > thread 1"
    # offset counts characters in a text tree: "abc" + <Parallel> + "\n" + outlines(1 + 1 + 1+4+1 + 1 + 1) + "\n"
    assert err.offset == len("abc") + 1 + 1 + (1 + 1 + 1 + len("1: a") + 1 + 1 + 1) + 1


def nested(depth: int) -> str:
    inner = "x"
    for _ in range(depth):
        inner = BlockLayout().block_text(["a", "b"], [f" {inner}", " y"])
    return inner


def test_limits_on_depth_and_threads():
    assert validate(parse_text(nested(2)), limits=V.Limits(max_depth=2)) == []
    assert V.Rule.TOO_DEEP in {e.rule for e in validate(parse_text(nested(3)), limits=V.Limits(max_depth=2))}
    text = BlockLayout().block_text(["a"] * 4, [" b"] * 4)
    assert validate(parse_text(text), limits=V.Limits(max_threads_per_block=4)) == []
    assert V.Rule.TOO_MANY_THREADS in {
        e.rule for e in validate(parse_text(text), limits=V.Limits(max_threads_per_block=3))
    }


def test_degenerate_blocks():
    # no outline and no thread: never valid (it used to pass, and counted as a block)
    empty = "<Parallel>\n<Outlines>\n</Outlines>\n\n</Parallel>"
    for limits in (V.Limits(), V.Limits(single_thread_blocks=True)):
        assert [e.rule for e in validate(parse_text(empty), limits=limits)] == [V.Rule.EMPTY_BLOCK]
    assert [e.rule for e in validate(parse_text("<Parallel><Outlines></Outlines></Parallel>"))] == [V.Rule.EMPTY_BLOCK]
    # one thread: a rule the setting controls
    single = BlockLayout().block_text(["a"], [" x"])
    assert [e.rule for e in validate(parse_text(single))] == [V.Rule.SINGLE_THREAD_BLOCK]
    assert validate(parse_text(single), limits=V.Limits(single_thread_blocks=True)) == []
    nested_single = BlockLayout().block_text(["a", "b"], [" " + single, " y"])
    (err,) = validate(parse_text(nested_single))
    assert err.rule == V.Rule.SINGLE_THREAD_BLOCK and err.path == "block 1 > thread 1 > block 1"


def test_deep_untrusted_nesting_does_not_exhaust_the_stack():
    text = "<Parallel><Outlines></Outlines><Thread>" * 5000
    tree = parse_text(text)
    assert render_text(tree) == text
    assert validate(tree)  # errors, no exception


# ----------------------------------------------------------------------------- stats


def test_stats_hand_worked_flat():
    # ids: each content token is one int; tags count one token each
    vocab = TagVocab({t: 1000 + i for i, t in enumerate(ALL_TAGS)})
    P, p, OS, os_, O, o, T, t = (
        vocab.id(x)
        for x in (
            Tag.PARALLEL_OPEN,
            Tag.PARALLEL_CLOSE,
            Tag.OUTLINES_OPEN,
            Tag.OUTLINES_CLOSE,
            Tag.OUTLINE_OPEN,
            Tag.OUTLINE_CLOSE,
            Tag.THREAD_OPEN,
            Tag.THREAD_CLOSE,
        )
    )
    ids = [1, 2, 3, P, OS, O, 4, o, O, 5, o, os_, T, 6, 6, 6, 6, t, T, 7, 7, t, p, 8, 9]
    s = compute_stats(parse_ids(ids, vocab))
    assert s.total_tokens == len(ids) == 25
    # outside: 3 + 2 = 5; block own: P + OS + (O 4 o)x2 + os_ + p = 1+1+6+1+1 = 10; longest thread: T+4+t = 6
    assert s.critical_path == 5 + 10 + 6
    assert s.threads_per_block == (2,)
    assert s.thread_tokens == 6 + 4
    assert s.speedup == pytest.approx(25 / 21)


def test_stats_hand_worked_nested_and_truncated():
    vocab = TagVocab({t: 1000 + i for i, t in enumerate(ALL_TAGS)})
    g = {tag: vocab.id(tag) for tag in ALL_TAGS}
    inner = [
        g[Tag.PARALLEL_OPEN],
        g[Tag.OUTLINES_OPEN],
        g[Tag.OUTLINES_CLOSE],
        g[Tag.THREAD_OPEN],
        1,
        1,
        1,
        g[Tag.THREAD_CLOSE],
        g[Tag.THREAD_OPEN],
        1,
        g[Tag.THREAD_CLOSE],
        g[Tag.PARALLEL_CLOSE],
    ]  # own 4, longest thread 5 -> L 9, T 12
    ids = [
        g[Tag.PARALLEL_OPEN],
        g[Tag.OUTLINES_OPEN],
        g[Tag.OUTLINES_CLOSE],
        g[Tag.THREAD_OPEN],
        2,
        *inner,
        2,
        g[Tag.THREAD_CLOSE],  # thread A: 2 tags + 2 + inner L 9 = 13 (T 16)
        g[Tag.THREAD_OPEN],
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        3,
        g[Tag.THREAD_CLOSE],  # thread B: 13
        g[Tag.PARALLEL_CLOSE],
    ]
    s = compute_stats(parse_ids(ids, vocab))
    assert s.total_tokens == len(ids) == 4 + 16 + 13
    assert s.critical_path == 4 + 13
    assert s.num_blocks == 2 and s.max_depth == 2 and s.threads_per_block == (2, 2)
    # truncated in the middle of the second thread: it has no </Thread>, the block no </Parallel>
    cut = ids[: 4 + 16 + 6]
    s2 = compute_stats(parse_ids(cut, vocab))
    assert s2.total_tokens == len(cut)
    assert s2.critical_path == 3 + 13  # <Parallel><Outlines></Outlines> + longest (thread A, 13 > 1+5)


# ----------------------------------------------------------------------------- properties

_text = st.text(alphabet="ab1 :\n<>/x", min_size=1, max_size=6).filter(
    lambda s: (
        not parse_text(s).blocks
        and render_text(parse_text(s)) == s
        and all(isinstance(n, Span) for n in parse_text(s).body)
    )
)


def _line(children):
    """A line (top level / thread body) in parser-normal form: no two Spans side by side."""

    def norm(items):
        out = []
        for it in items:
            if isinstance(it, Span) and out and isinstance(out[-1], Span):
                out[-1] = Span(out[-1].content + it.content)
            else:
                out.append(it)
        return tuple(out)

    return st.lists(st.one_of(_text.map(Span), children), max_size=4).map(norm)


def _block(line):
    """A block of 2-3 threads in the format's layout (each thread body a generated line)."""

    def make(args):
        n, bodies = args
        threads = [
            (i, [a for node in body for a in iter_atoms(node)] + [Tag.THREAD_CLOSE])
            for i, body in enumerate(bodies[:n], start=1)
        ]
        (block,) = parse_atoms(BlockLayout.outline_atoms(["o"] * n) + BlockLayout().join_atoms(threads)).body
        return block

    return st.tuples(st.integers(2, 3), st.lists(line, min_size=3, max_size=3)).map(make)


def _trees():
    thread_line = _line(st.nothing())
    nested_block = _block(thread_line)
    inner_line = _line(nested_block)
    top_block = _block(inner_line)
    return _line(top_block).map(Trajectory)


@settings(max_examples=200, deadline=None)
@given(_trees())
def test_valid_trees_round_trip(tree):
    assert validate(tree) == []
    assert parse_text(render_text(tree)) == tree
    vocab = TagVocab({t: 10_000 + i for i, t in enumerate(ALL_TAGS)})
    # an id tree: one id per character
    ids = [
        vocab.id(a) if isinstance(a, Tag) else ord(c) for a in _atoms(tree) for c in ([a] if isinstance(a, Tag) else a)
    ]
    id_tree = parse_ids(ids, vocab)
    assert render_ids(id_tree, vocab) == ids
    assert validate(id_tree, decode=lambda xs: "".join(map(chr, xs))) == []
    assert compute_stats(id_tree).total_tokens == len(ids)


def _atoms(tree):
    return list(iter_atoms(tree))


_soup_text = st.lists(
    st.one_of(st.sampled_from([t.value for t in ALL_TAGS]), st.text(alphabet="1: ab\n", max_size=4)), max_size=40
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_soup_text)
def test_tag_soup_text_never_raises(text):
    tree = parse_text(text)
    assert render_text(tree) == text
    errors = validate(tree)
    assert all(e.rule and e.message for e in errors)
    compute_stats(tree)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 14), max_size=60))
def test_tag_soup_ids_never_raises(ids):
    vocab = TagVocab({t: i for i, t in enumerate(ALL_TAGS)})  # ids 0..9 are tags, 10..14 content
    tree = parse_ids(ids, vocab)
    assert render_ids(tree, vocab) == ids
    validate(tree, decode=lambda xs: "".join("1:a \n"[x - 10] for x in xs))
    s = compute_stats(tree)
    assert 0 <= s.critical_path <= s.total_tokens == len(ids)


def _ended_open_by_walk(tree: Trajectory, from_offset: int):
    """The reference for :meth:`Parser.first_ended_open`, from the finished tree alone: the elements that
    are not closed yet end before the end of the input (so a tag ended them), grouped by where they end,
    innermost first; the first group at or after ``from_offset``."""
    total = sum(node_length(n) for n in tree.body)
    found: dict[int, list] = {}

    def walk(nodes, offset):
        for n in nodes:
            length = node_length(n)
            if isinstance(n, (Block, Outlines, Outline, Thread)):
                walk(n.parts if isinstance(n, (Block, Outlines)) else n.body, offset + 1)
                end = offset + length
                if not n.closed and from_offset <= end < total:
                    found.setdefault(end, []).append(n)
            offset += length

    walk(tree.body, 0)
    return (min(found), found[min(found)]) if found else None


def test_parser_records_the_tags_that_end_open_elements():
    parser = Parser().feed(text_atoms("<Parallel>\n<Outlines>\n<Outline>1: a<Outline>2: b</Outline>"))
    # offsets count a tag as 1 and text by characters: the second <Outline> is at 1 + 1 + 1 + 1 + 1 + 4
    assert parser.first_ended_open(0) == (9, [Outline((Span("1: a"),), closed=False)])
    assert parser.first_ended_open(9) is not None and parser.first_ended_open(10) is None
    parser = Parser().feed(text_atoms("<Parallel><Outlines><Outline>x<Thread>y"))
    offset, ended = parser.first_ended_open(0)
    assert offset == 4 and ended == [Outline((Span("x"),), False), Outlines((Outline((Span("x"),), False),), False)]
    block = parser.tree().body[0]
    assert ended[1] is block.parts[0]  # the recorded element is the tree's own node
    assert parser.length == 6 and Parser().feed(text_atoms("ab<think>")).length == 3


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 14), max_size=60), st.lists(st.integers(0, 60), max_size=6))
def test_parser_fed_piece_by_piece_reads_what_one_pass_reads(ids, cuts):
    """The fork/join controller feeds a line's parser each completion (cut anywhere, also inside a run of
    content) and reads continuations from copies: every tree must be the one parse of the same ids, and
    every element ended without its closing tag the one a walk over that tree finds."""
    vocab = TagVocab({t: i for i, t in enumerate(ALL_TAGS)})  # ids 0..9 are tags, 10..14 content
    parser, start = Parser(), 0
    for cut in [*sorted({c for c in cuts if c <= len(ids)}), len(ids)]:
        before = parser.tree()
        parser.copy().feed(id_atoms([0, 10, 2, 4, 11], vocab))  # a what-if leaves the parser as it was
        assert parser.tree() == before
        parser.feed(id_atoms(ids[start:cut], vocab))
        start = cut
        tree = parser.tree()
        assert tree == parse_ids(ids[:cut], vocab) and parser.length == cut
        for offset in range(cut + 1):
            got, want = parser.first_ended_open(offset), _ended_open_by_walk(tree, offset)
            assert got == want
            if got is not None:
                assert all(a is b for a, b in zip(got[1], want[1]))  # the tree's own nodes
