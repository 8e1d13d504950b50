"""examples/data_preprocess and data.preprocess on local fixture files in MATH-500, AIME and GSM8K
field conventions (parquet, jsonl, json), written here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from threadweaver_verl.data import preprocess as P
from threadweaver_verl.data.chat import DEFAULT_INSTRUCTION
from threadweaver_verl.data.schema import SchemaError, read_rl
from threadweaver_verl.runs import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "data_preprocess"

MATH500 = [
    {
        "problem": "Convert $(0,3)$ to polar coordinates.",
        "solution": "... $\\boxed{(3,\\frac{\\pi}{2})}$.",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    },
    {
        "problem": "What is $1+1$?",
        "solution": "It is $\\boxed{2}$.",
        "answer": "2",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
]
AIME = [
    {"ID": "2024-I-1", "Problem": "Find the number of ...", "Solution": "... so 204.", "Answer": 204},
    {"ID": "2024-I-2", "Problem": "Find xy.", "Solution": "...", "Answer": 25},
]
GSM8K = [
    {"question": "Natalia sold clips to 48 friends...", "answer": "48/2 = 24\n48+24 = 72\n#### 72"},
    {"question": "A shop sells 1,000 pens...", "answer": "so 1,250 in total\n#### 1,250"},
]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_math500_parquet_via_script(tmp_path):
    src, out = tmp_path / "math500.parquet", tmp_path / "out" / "math500.parquet"
    pd.DataFrame(MATH500).to_parquet(src)
    res = run_script("math500.py", f"input={src}", f"output={out}")
    assert res.returncode == 0, res.stderr
    assert "RL parquet written" in res.stdout
    rows = read_rl(out)  # the project's schema reader checks every row
    assert [r["reward_model"] for r in rows] == [
        {"style": "rule", "ground_truth": "\\left( 3, \\frac{\\pi}{2} \\right)"},  # `answer` wins over `solution`
        {"style": "rule", "ground_truth": "2"},
    ]
    first = rows[0]
    assert first["data_source"] == "math500" and first["agent_name"] == "threadweaver"
    assert first["prompt"] == [{"role": "user", "content": f"{MATH500[0]['problem']}\n\n{DEFAULT_INSTRUCTION}"}]
    assert first["extra_info"] == {
        "index": 0,
        "split": "test",
        "question": MATH500[0]["problem"],
        "source_id": "test/precalculus/807.json",
    }


def test_aime_jsonl_via_script(tmp_path):
    src, out = tmp_path / "aime.jsonl", tmp_path / "aime.parquet"
    src.write_text("\n".join(json.dumps(r) for r in AIME) + "\n")
    res = run_script("aime.py", f"input={src}", f"output={out}", "data_source=aime24x")
    assert res.returncode == 0, res.stderr
    rows = read_rl(out)
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["204", "25"]
    assert [r["extra_info"]["source_id"] for r in rows] == ["2024-I-1", "2024-I-2"]
    assert {r["data_source"] for r in rows} == {"aime24x"}


def test_gsm8k_jsonl_via_script(tmp_path):
    src, out = tmp_path / "gsm8k.jsonl", tmp_path / "gsm8k.parquet"
    src.write_text("\n".join(json.dumps(r) for r in GSM8K))
    res = run_script("gsm8k.py", f"input={src}", f"output={out}", "split=train")
    assert res.returncode == 0, res.stderr
    rows = read_rl(out)
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["72", "1250"]
    assert rows[1]["extra_info"]["split"] == "train" and rows[1]["data_source"] == "gsm8k"


def test_generic_cli_json_list_solution_only(tmp_path):
    src, out = tmp_path / "sol.json", tmp_path / "sol.parquet"
    src.write_text(json.dumps({"data": [{"question": "Q1", "solution": "so \\boxed{\\frac{1}{2}} done"}]}))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "threadweaver_verl",
            "preprocess",
            f"input={src}",
            f"output={out}",
            "data_source=mine",
            "instruction=null",
            "system=Be brief.",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    [row] = read_rl(out)
    assert row["reward_model"]["ground_truth"] == "\\frac{1}{2}"  # last \boxed{} of the solution
    assert row["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}]


def test_explicit_keys_and_formats():
    conv = P.RowConversion(question_key="q", answer_key="a", data_source="d", instruction="Answer in \\boxed{}.")
    row = P.to_rl_row({"q": "2+2?", "a": 4}, 7, conv)
    assert row["prompt"][0]["content"] == "2+2?\n\nAnswer in \\boxed{}."
    assert row["reward_model"]["ground_truth"] == "4" and row["extra_info"]["index"] == 7
    assert P.gsm8k_answer("x #### 3 #### 1,234") == "1234"
    plain = P.RowConversion(data_source="d", answer_format="plain")
    assert P.ground_truth_of({"answer": "#### 5"}, plain) == "#### 5"


@pytest.mark.parametrize(
    "record,match",
    [
        ({"text": "q", "answer": "1"}, "no question field found"),
        ({"problem": "q"}, "no answer field found"),
        ({"problem": "  ", "answer": "1"}, "question field 'problem' is empty"),
        ({"problem": "q", "answer": None}, "answer field 'answer' is None"),
        ({"problem": "q", "answer": "  "}, "empty ground truth"),
        ({"problem": "q", "solution": "no box here"}, "no complete \\\\boxed"),
        ({"question": "q", "answer": "no hashes"}, "without '####'"),
    ],
)
def test_bad_records_are_named(record, match):
    fmt = "gsm8k" if record.get("answer") == "no hashes" else "auto"
    with pytest.raises(SchemaError, match=match):
        P.to_rl_row(record, 0, P.RowConversion(data_source="d", answer_format=fmt))


def test_errors_name_the_record_or_skip_and_count(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text(
        "\n".join(
            json.dumps(r) for r in [{"problem": "a", "answer": "1"}, {"problem": "b"}, {"problem": "c", "answer": "3"}]
        )
    )
    cfg = P.PreprocessConfig(input=str(src), output=str(tmp_path / "o.parquet"), data_source="d")
    with pytest.raises(SchemaError, match=r"mixed.jsonl, record 1: no answer field.*skip_invalid=true"):
        P.run(cfg, progress=False)
    cfg.skip_invalid = True
    summary = P.run(cfg, progress=False)
    assert (summary["records"], summary["rows"], summary["skipped"]) == (3, 2, 1)
    assert [r["extra_info"]["index"] for r in read_rl(cfg.output)] == [0, 2]


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(SchemaError, match="exactly one source"):
        P.load_records(P.PreprocessConfig())
    with pytest.raises(SchemaError, match="not found"):
        P.load_records(P.PreprocessConfig(input=str(tmp_path / "none.jsonl")))
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n")
    with pytest.raises(SchemaError, match="unsupported file type"):
        P.load_records(P.PreprocessConfig(input=str(bad)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "a"}\n{oops\n')
    with pytest.raises(SchemaError, match="line 2 is not valid JSON"):
        P.load_records(P.PreprocessConfig(input=str(broken)))
    with pytest.raises(SchemaError, match="data_source"):
        P.to_rl_row({"problem": "q", "answer": "1"}, 0, P.RowConversion())
    not_json = tmp_path / "x.json"
    not_json.write_text('[{"problem": "a"}, {oops')
    with pytest.raises(SchemaError, match="x.json is not valid JSON"):
        P.load_records(P.PreprocessConfig(input=str(not_json)))
    not_json.write_text('[{"problem": "a", "answer": "1"}, 7]')
    with pytest.raises(SchemaError, match="record 1 is int, not a JSON object"):
        P.load_records(P.PreprocessConfig(input=str(not_json)))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SchemaError, match="is not UTF-8 text"):
        P.load_records(P.PreprocessConfig(input=str(binary)))
    with pytest.raises(SchemaError, match="limit=-2"):
        P.PreprocessConfig(limit=-2)
    # hub: a clear error when `datasets` is missing (simulated: the import fails)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SchemaError, match="needs the `datasets` library"):
        P.load_records(P.PreprocessConfig(hub="HuggingFaceH4/MATH-500"))


def test_output_path_is_checked_before_any_work(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"problem": "q", "answer": "1"}) + "\n")
    (tmp_path / "a_file").write_text("x")
    for output, match in (
        (tmp_path / "rl.jsonl", r"the file written is \.parquet"),
        (tmp_path, "is a folder"),
        (tmp_path / "a_file" / "sub" / "rl.parquet", "runs through the file"),
    ):
        with pytest.raises(UserError, match=match):
            P.run(P.PreprocessConfig(input=str(src), output=str(output), data_source="d"), progress=False)
    assert not (tmp_path / "rl.jsonl").exists() and (tmp_path / "a_file").read_text() == "x"
    nested = tmp_path / "new" / "folder" / "rl.parquet"  # missing folders are fine: created when writing
    assert P.run(P.PreprocessConfig(input=str(src), output=str(nested), data_source="d"), progress=False)["rows"] == 1


def test_hub_errors_are_explained(monkeypatch):
    """No model/data hub here: the loader's failure must come back with the fix (input=<file>)."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SchemaError, match="could not load hub dataset 'openai/gsm8k'.*input=<file>"):
        P.load_records(P.PreprocessConfig(hub="openai/gsm8k", subset="main"))


def test_script_defaults_yield_to_user_source(monkeypatch):
    seen = {}
    monkeypatch.setattr(P, "main", lambda argv: seen.setdefault("argv", list(argv)) and 0)
    P.script_main({"hub": "h/x", "data_source": "m", "output": "o"}, ["input=f.jsonl", "output=mine"])
    assert "hub=h/x" not in seen["argv"] and seen["argv"][-2:] == ["input=f.jsonl", "output=mine"]
    seen.clear()
    P.script_main({"hub": "h/x", "data_source": "m"}, [])
    assert seen["argv"] == ["hub=h/x", "data_source=m"]
