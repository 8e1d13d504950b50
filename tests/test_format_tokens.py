"""One block layout for every writer, one reading of the ``N:`` numbers, and the EOS ids of a model.

Every text writer (the multiplication task, stage 1's assembly, the random test trajectories) and the
token format build a block with :class:`BlockLayout`. The tests give them a layout unlike the default: a
writer with its own copy of the gaps or headers then writes text that the token format (which inserts
the layout's ids at every fork and join) does not rebuild."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from threadweaver_verl.format import (
    BlockLayout,
    Limits,
    Span,
    TokenFormat,
    eos_token_ids,
    leading_number,
    parse_text,
    split_number,
    split_requests,
)
from threadweaver_verl.format.tree import atoms_text

# whitespace gaps and a header the number reading accepts, all unlike the default layout
ODD = BlockLayout(fork_gap="\n\n", thread_sep=" \n", join_gap="\n \n", header_template=" {n} :")


@pytest.fixture(scope="module")
def odd_fmt(tok):
    return TokenFormat.from_tokenizer(tok, layout=ODD)


def rebuilds(fmt: TokenFormat, text: str) -> bool:
    """The ids inference would produce for ``text`` (layout inserted at every fork and join) decode to it."""
    return fmt.decode(fmt.encode_text(text)) == text


def test_block_text_is_the_token_formats_layout(fmt, odd_fmt):
    for f in (fmt, odd_fmt):
        text = f.layout.block_text(["a", "b"], [" x", " y\n"])
        ids = f.encode_text(text)
        assert f.decode(ids) == text
        # the ids after </Outlines> are exactly the join of the threads' completions
        (block,) = parse_text(text).blocks
        shared = f.atom_ids(BlockLayout.outline_atoms(["a", "b"]))
        threads = [(1, f.fragment_ids(" x</Thread>")), (2, f.fragment_ids(" y\n</Thread>"))]
        assert ids == f.join(shared, threads)
        assert ids[: len(f.fork_context(shared, 1))] == f.fork_context(shared, 1)  # thread 1's prompt
    assert fmt.layout.block_text(["a"], [" x"]) == (
        "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n1: x</Thread>\n</Parallel>"
    )


def test_multiplication_writes_the_format_layout(odd_fmt):
    from threadweaver_verl.tasks import multiplication as mul

    problem = mul.Problem((2468, 37))
    text = mul.parallel_solution(problem, ODD)
    assert rebuilds(odd_fmt, text)
    (stage,) = mul.solve(problem)
    assert ODD.block_text(["*7", "*3"], [mul._row_text(steps) for steps in stage.partials]) in text
    sample = mul.Sample(problem, text, mul.sequential_solution(problem, ODD))
    assert mul.check_sample(sample, odd_fmt).threads_per_block == (2,)
    # the default layout is the default format's
    assert mul.parallel_solution(problem) == mul.parallel_solution(problem, BlockLayout())


def test_random_trajectories_write_the_format_layout(odd_fmt):
    from threadweaver_verl.sft.synthetic import TrajectoryShape, random_trajectory

    shape = TrajectoryShape(tokens=200, blocks=2, nested_prob=1.0)
    for seed in range(5):
        text = random_trajectory(random.Random(seed), shape, ODD)
        assert rebuilds(odd_fmt, text)
        assert split_requests([1], odd_fmt.encode_text(text), odd_fmt)


def test_stage1_assembly_writes_the_format_layout(odd_fmt):
    from threadweaver_verl.generator.inputs import split_trace
    from threadweaver_verl.generator.rewrite import PlanError, assemble, check_blocks, check_structure, check_trajectory

    trace = "\n\n".join(["Plan.", "Case A.", "Case B.", "Merge.", "Part X.", "Part Y.", "Part Z.", "Done \\boxed{1}."])
    split = split_trace(trace)
    relies = [[], [1], [1], [2, 3], [4], [4], [4], [5, 6, 7]]
    steps = check_structure(
        {"steps": [{"step": k, "units": [k, k], "purpose": "p", "relies_on": r} for k, r in enumerate(relies, 1)]},
        8,
    )
    plans = check_blocks({"blocks": [{"threads": [[2, 2], [3, 3]]}, {"threads": [[5, 5], [6, 6], [7, 7]]}]}, steps, 4)
    threads = [["Case A.", "Case B."], ["Part X.", "Part Y.", "Part Z."]]
    outlines = [["a", "b"], ["x", "y", "z"]]
    traj = assemble(split, steps, plans, threads, outlines, "\\boxed{1}", layout=ODD)
    checked = check_trajectory(traj, Limits(), odd_fmt)  # raises unless the text decodes from its own ids
    assert ODD.block_text(["a", "b"], [" Case A.", " Case B."]) in checked.text
    default = assemble(split, steps, plans, threads, outlines, "\\boxed{1}")
    with pytest.raises(PlanError, match="decode back"):
        check_trajectory(default, Limits(), odd_fmt)


def test_one_reading_of_outline_and_thread_numbers(fmt):
    assert split_number(" 12 : x") == (12, " x")
    assert split_number("\n3:") == (3, "")
    assert split_number("x 3:") is None and split_number("1234567: x") is None
    assert leading_number((Span(" 12 : x"),), None) == 12
    # a thread headed " 2 :" is read as thread 2 by the validator and re-headed by the encoder alike
    text = "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
    text += "<Thread>\n1: x</Thread>\n<Thread> 2 : y</Thread>\n</Parallel>"
    assert fmt.validate(parse_text(text)) == []
    assert fmt.decode(fmt.encode_text(text)).endswith("<Thread>\n2: y</Thread>\n</Parallel>")


def test_fragment_ids_encode_each_piece_alone(fmt):
    ids = fmt.fragment_ids("ab<Thread>\n1: c</Thread>")
    assert ids == fmt.encode("ab") + fmt.thread_header(1) + fmt.encode(" c") + fmt.fragment_ids("</Thread>")
    assert fmt.fragment_ids(atoms_text(BlockLayout.outline_atoms(["a"]))) == fmt.atom_ids(
        BlockLayout.outline_atoms(["a"])
    )


def test_eos_ids_are_the_tokenizers_and_the_generation_configs(tok, tmp_path):
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert eos_token_ids(tok) == (im_end,)  # no folder, no generation config
    assert eos_token_ids(tok, {"eos_token_id": [im_end, endoftext]}) == (im_end, endoftext)
    assert eos_token_ids(tok, {"eos_token_id": endoftext}) == (im_end, endoftext)
    # a model folder like Qwen3's: the generation config adds <|endoftext|>; read from the tokenizer's folder
    tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, endoftext]}))
    fmt = TokenFormat.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    assert fmt.eos_ids == (im_end, endoftext)
    assert fmt.sequential_stop_ids[-2:] == [im_end, endoftext] and fmt.thread_stop_ids[-2:] == [im_end, endoftext]
    assert TokenFormat.from_tokenizer(tok, generation_config=tmp_path).eos_ids == (im_end, endoftext)
