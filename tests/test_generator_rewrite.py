"""Stage 1's pure parts: trace cutting, strict JSON checks, trajectory assembly and step-5 validation."""

from __future__ import annotations

import pytest

from threadweaver_verl.format import Block, Limits, Span, Thread, Trajectory, parse_text, validate
from threadweaver_verl.generator.inputs import InputError, split_trace
from threadweaver_verl.generator.rewrite import (
    BlockPlan,
    PlanError,
    assemble,
    check_blocks,
    check_edits,
    check_outlines,
    check_structure,
    check_trajectory,
    parse_json_object,
)


def _steps(n_units: int, relies: list[list[int]]):
    return check_structure(
        {
            "steps": [
                {"step": k, "units": [k, k], "purpose": f"s{k}", "relies_on": r} for k, r in enumerate(relies, start=1)
            ]
        },
        n_units,
    )


def test_split_trace_keeps_the_text_and_the_final_section():
    trace = "<think>\nA first.\n\n  B second.\nstill B.\n\n\nC third.\n</think>\n\nFinal: \\boxed{3}\n"
    s = split_trace(trace, min_units=2)
    assert s.units == ("A first.", "B second.\nstill B.", "C third.")
    assert s.join(0, 2) == "A first.\n\n  B second.\nstill B.\n\n\nC third."
    assert s.final == "Final: \\boxed{3}"
    lines = split_trace("one\ntwo\nthree", min_units=6)  # too few paragraphs: cut into lines
    assert lines.units == ("one", "two", "three") and lines.final is None
    with pytest.raises(InputError, match="already holds format tags"):
        split_trace("a\n\n<Parallel> b")
    with pytest.raises(InputError, match="no reasoning"):
        split_trace("<think> </think> \\boxed{1}")


def test_json_answers_are_parsed_strictly():
    assert parse_json_object('```json\n{"a": 1}\n```') == {"a": 1}
    for bad, why in [
        ("", "empty"),
        ('Here it is: {"a": 1}', "not valid JSON"),
        ("[1, 2]", "not an object"),
        ('{"a": 1} trailing', "not valid JSON"),
    ]:
        with pytest.raises(PlanError, match=why):
            parse_json_object(bad)


def test_structure_and_blocks_contracts():
    steps = _steps(4, [[], [1], [1], [2, 3]])
    assert [s.relies_on for s in steps] == [(), (1,), (1,), (2, 3)]
    with pytest.raises(PlanError, match="must be an integer"):
        check_structure({"steps": [{"step": True, "units": [1, 1], "purpose": "", "relies_on": []}]}, 1)
    with pytest.raises(PlanError, match="unexpected key"):
        check_structure({"steps": [{"step": 1, "units": [1, 1], "purpose": "", "relies_on": [], "x": 0}]}, 1)
    with pytest.raises(PlanError, match="only rely on earlier steps"):
        check_structure({"steps": [{"step": 1, "units": [1, 1], "purpose": "", "relies_on": [1]}]}, 1)
    with pytest.raises(PlanError, match="cover all of them"):
        check_structure({"steps": [{"step": 1, "units": [1, 1], "purpose": "", "relies_on": []}]}, 2)

    assert check_blocks({"blocks": [{"threads": [[2, 2], [3, 3]]}]}, steps, 4) == [BlockPlan(((2, 2), (3, 3)))]
    for blocks, why in [
        ([{"threads": [[2, 2]]}], "needs 2 to 4"),
        ([{"threads": [[2, 2], [4, 4]]}], "without gaps"),
        ([{"threads": [[2, 2], [3, 3]]}, {"threads": [[3, 3], [4, 4]]}], "must not overlap"),
        ([{"threads": [[3, 3], [4, 4]]}], "relies on step 3, which is in thread 1"),
        ([{"threads": [[2, 3], [5, 5]]}], "without gaps"),
        ([{"threads": [[3, 3], [5, 6]]}], "without gaps"),
    ]:
        with pytest.raises(PlanError, match=why):
            check_blocks({"blocks": blocks}, steps, 4)


def test_edits_and_outlines_contracts():
    originals = [["alpha beta gamma delta", "one two three four"]]
    assert check_edits({"blocks": [{"threads": ["alpha beta gamma", "one two three four"]}]}, originals, 0.6) == [
        ["alpha beta gamma", "one two three four"]
    ]
    with pytest.raises(PlanError, match="has 1 threads"):
        check_edits({"blocks": [{"threads": ["alpha"]}]}, originals, 0.6)
    with pytest.raises(PlanError, match="not minimally edited"):
        check_edits({"blocks": [{"threads": ["x y z", "one two three four"]}]}, originals, 0.6)
    assert check_outlines({"blocks": [{"outlines": ["Do\n a", "Do b"]}]}, [2], 50) == [["Do a", "Do b"]]
    with pytest.raises(PlanError, match="characters"):
        check_outlines({"blocks": [{"outlines": ["x" * 60, "y"]}]}, [2], 50)
    with pytest.raises(PlanError, match="markup tag"):
        check_outlines({"blocks": [{"outlines": ["a </Outline>", "b"]}]}, [2], 50)


def test_assembly_with_two_blocks_validates_and_keeps_every_sequential_unit():
    trace = "\n\n".join(["Plan.", "Case A.", "Case B.", "Merge.", "Part X.", "Part Y.", "Part Z.", "Done \\boxed{1}."])
    split = split_trace(trace)
    steps = _steps(8, [[], [1], [1], [2, 3], [4], [4], [4], [5, 6, 7]])
    plans = check_blocks({"blocks": [{"threads": [[2, 2], [3, 3]]}, {"threads": [[5, 5], [6, 6], [7, 7]]}]}, steps, 4)
    traj = assemble(
        split,
        steps,
        plans,
        [["Case A.", "Case B."], ["Part X.", "Part Y.", "Part Z."]],
        [["a", "b"], ["x", "y", "z"]],
        "\\boxed{1}",
    )
    checked = check_trajectory(traj, Limits(4, 1))
    text = checked.text
    assert text.startswith("<think>\nPlan.\n<Parallel>") and text.endswith("</think>\n\\boxed{1}")
    assert "\nMerge.\n<Parallel>" in text and "</Parallel>\nDone \\boxed{1}.\n</think>" in text
    assert checked.stats["num_blocks"] == 2 and checked.stats["threads_per_block"] == [2, 3]
    assert validate(parse_text(text)) == []


def test_step5_rejects_what_the_format_module_rejects():
    hidden = Trajectory((Block((Thread((Span("\n1: a <Thread> b"),)),)),))
    with pytest.raises(PlanError, match="does not parse back"):
        check_trajectory(hidden, Limits())
    no_outlines = Trajectory((Block((Thread((Span("\n1: a"),)),)),))
    with pytest.raises(PlanError, match="no_outlines"):
        check_trajectory(no_outlines, Limits())
    with pytest.raises(PlanError, match="no parallel block"):
        check_trajectory(Trajectory((Span("just text"),)), Limits())


def test_inputs_load_from_parquet_and_jsonl_with_stable_ids(tmp_path):
    import json

    import pandas as pd

    from threadweaver_verl.generator.inputs import load_samples

    rows = [
        {"q": "1+1?", "t": "a\n\nb \\boxed{2}", "a": 2},
        {"q": "2+2?", "t": "c\n\nd \\boxed{4}", "a": 4},
        {"q": "1+1?", "t": "a\n\nb \\boxed{2}", "a": 2},
    ]  # an exact duplicate
    pd.DataFrame(rows).to_parquet(tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    a, dup_a = load_samples(str(tmp_path / "in.parquet"), "q", "t", "a")
    b, dup_b = load_samples(str(tmp_path / "in.jsonl"), "q", "t", "a")
    assert dup_a == dup_b == 1 and [s.answer for s in a] == ["2", "4"]
    assert {s.id: s.question for s in a} == {s.id: s.question for s in b}  # ids do not depend on row order
    (tmp_path / "clash.jsonl").write_text(
        json.dumps({"id": "x", "q": "a", "t": "b", "a": 1})
        + "\n"
        + json.dumps({"id": "x", "q": "c", "t": "d", "a": 2})
        + "\n"
    )
    with pytest.raises(InputError, match="share the id 'x'"):
        load_samples(str(tmp_path / "clash.jsonl"), "q", "t", "a", id_field="id")
    with pytest.raises(InputError, match="use .parquet, .jsonl or .json"):
        (tmp_path / "in.csv").write_text("q,t,a\n")
        load_samples(str(tmp_path / "in.csv"))


TWO_THREADS = (
    "<think>\nPlan.\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
    "<Thread>\n1: first</Thread>\n<Thread>\n2: second</Thread>\n</Parallel>\nDone.\n</think>\n\\boxed{1}"
)


def test_step5_rejects_a_trajectory_the_format_cannot_encode(fmt):
    import dataclasses

    assert check_trajectory(parse_text(TWO_THREADS), Limits(), fmt).response_ids is not None
    one_thread_per_block = dataclasses.replace(fmt, limits=Limits(max_threads_per_block=1))
    with pytest.raises(PlanError, match="cannot be encoded as a training trajectory"):
        check_trajectory(parse_text(TWO_THREADS), Limits(), one_thread_per_block)


def test_step5_raises_a_bug_instead_of_counting_it_as_a_rejected_plan(fmt):
    """Only the format's NonCanonicalTrajectory rejects a plan; any other error is a bug and surfaces."""
    import dataclasses

    def encode(text: str) -> list[int]:
        if "Plan." in text:
            raise ValueError("a bug in the tokenizer wrapper")
        return fmt.encode(text)

    with pytest.raises(ValueError, match="a bug in the tokenizer wrapper") as raised:
        check_trajectory(parse_text(TWO_THREADS), Limits(), dataclasses.replace(fmt, encode=encode))
    assert not isinstance(raised.value, PlanError)  # (a PlanError is a ValueError too)
