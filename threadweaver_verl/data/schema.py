"""The two dataset schemas of the project, their validators, writers and readers.

RL rows follow verl's RLHFDataset layout (one row per problem)::

    data_source  str                         e.g. "threadweaver/multiplication"
    prompt       list[{role, content}]       chat messages (PromptStyle.messages)
    ability      str                         e.g. "math"
    reward_model {style: "rule", ground_truth: str}
    extra_info   {index: int, split: str, question: str, ...}
    agent_name   str                         the agent loop verl runs for the row

SFT rows (one row per training trajectory)::

    data_source  str
    prompt       list[{role, content}]
    response     str    the trajectory text WITHOUT EOS (data.chat.response_ids adds it)
    extra_info   {index: int, split: str, question: str, ...}

Build rows with :func:`rl_row` / :func:`sft_row`; every writer and reader checks
the rows and raises :class:`SchemaError` naming the file, row and column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from threadweaver_verl.data.chat import PromptStyle
from threadweaver_verl.runs import UserError, atomic_path

# The name the plugin registers its fork/join agent loop under, and the default agent_name of the rows:
# the one definition (integrations.verl.agent_loop, the RL dataset and the task commands import it).
AGENT_NAME = "threadweaver"

RL_COLUMNS: tuple[str, ...] = ("data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name")
SFT_COLUMNS: tuple[str, ...] = ("data_source", "prompt", "response", "extra_info")
EXTRA_INFO_KEYS: tuple[str, ...] = ("index", "split", "question")
ROLES = ("system", "user", "assistant")


class SchemaError(UserError, ValueError):
    """A dataset row or file that does not follow the schema."""


# --------------------------------------------------------------------------- builders


def _extra(index: int, split: str, question: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    info: dict[str, Any] = {"index": int(index), "split": str(split), "question": str(question)}
    for k, v in (extra or {}).items():
        if k in info:
            raise SchemaError(f"extra_info key {k!r} is set by the schema itself; pick another name")
        info[k] = v
    return info


def rl_row(
    *,
    data_source: str,
    question: str,
    ground_truth: str,
    index: int,
    split: str,
    style: PromptStyle = PromptStyle(),
    ability: str = "math",
    agent_name: str = AGENT_NAME,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One RL row (verl's schema) for a question with a rule-checked answer."""
    row = {
        "data_source": data_source,
        "prompt": style.messages(question),
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": str(ground_truth)},
        "extra_info": _extra(index, split, question, extra),
        "agent_name": agent_name,
    }
    check_rl_row(row)
    return row


def sft_row(
    *,
    data_source: str,
    question: str,
    response: str,
    index: int,
    split: str,
    style: PromptStyle = PromptStyle(),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One SFT row: the chat prompt of ``question`` and the trajectory text ``response`` (no EOS)."""
    row = {
        "data_source": data_source,
        "prompt": style.messages(question),
        "response": response,
        "extra_info": _extra(index, split, question, extra),
    }
    check_sft_row(row)
    return row


# --------------------------------------------------------------------------- checks


def _where(i: int | None, source: str | None) -> str:
    parts = [p for p in (source, f"row {i}" if i is not None else None) if p]
    return f" ({', '.join(parts)})" if parts else ""


def _check_messages(msgs: Any, where: str) -> None:
    if hasattr(msgs, "tolist"):  # numpy array from parquet
        msgs = msgs.tolist()
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise SchemaError(
            f"column 'prompt'{where} must be a non-empty list of chat messages, got {type(msgs).__name__}"
        )
    for k, m in enumerate(msgs):
        if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
            raise SchemaError(f"column 'prompt'{where}: message {k} must be {{role, content}}, got {m!r}")
        if m["role"] not in ROLES:
            raise SchemaError(f"column 'prompt'{where}: message {k} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise SchemaError(f"column 'prompt'{where}: message {k} content is {type(m['content']).__name__}, not str")
    if msgs[-1]["role"] != "user":
        raise SchemaError(f"column 'prompt'{where}: the last message must be the user's question")


def _check_common(row: Mapping[str, Any], columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise SchemaError(f"missing column(s) {missing}{where}; the schema needs {list(columns)}")
    if not isinstance(row["data_source"], str) or not row["data_source"]:
        raise SchemaError(f"column 'data_source'{where} must be a non-empty string, got {row['data_source']!r}")
    _check_messages(row["prompt"], where)
    info = row["extra_info"]
    if not isinstance(info, Mapping):
        raise SchemaError(f"column 'extra_info'{where} must be a dict, got {type(info).__name__}")
    lacking = [k for k in EXTRA_INFO_KEYS if k not in info]
    if lacking:
        raise SchemaError(f"column 'extra_info'{where} lacks key(s) {lacking}")


def check_rl_row(row: Mapping[str, Any], i: int | None = None, source: str | None = None) -> None:
    where = _where(i, source)
    _check_common(row, RL_COLUMNS, where)
    rm = row["reward_model"]
    if not isinstance(rm, Mapping) or rm.get("style") != "rule" or not isinstance(rm.get("ground_truth"), str):
        raise SchemaError(f"column 'reward_model'{where} must be {{style: 'rule', ground_truth: str}}, got {rm!r}")
    for col in ("ability", "agent_name"):
        if not isinstance(row[col], str) or not row[col]:
            raise SchemaError(f"column {col!r}{where} must be a non-empty string, got {row[col]!r}")


def check_sft_row(
    row: Mapping[str, Any], i: int | None = None, source: str | None = None, eos_token: str | None = None
) -> None:
    where = _where(i, source)
    _check_common(row, SFT_COLUMNS, where)
    resp = row["response"]
    if not isinstance(resp, str) or not resp.strip():
        raise SchemaError(f"column 'response'{where} must be a non-empty trajectory text")
    if eos_token and resp.rstrip().endswith(eos_token):
        raise SchemaError(
            f"column 'response'{where} ends with EOS {eos_token!r}; store it without "
            "(data.chat.response_ids appends EOS)"
        )


# --------------------------------------------------------------------------- files


def _write(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str]) -> Path:
    import pandas as pd

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([{c: r[c] for c in columns} | {k: v for k, v in r.items() if k not in columns} for r in rows])
    if not len(frame):
        raise SchemaError(f"refusing to write an empty dataset to {out}")
    with atomic_path(out) as tmp:  # a reader (or a killed run) never sees half a file
        frame.to_parquet(tmp, index=False)
    return out


def _plain(v: Any) -> Any:
    """Parquet hands back numpy arrays for lists; turn them (recursively) into lists."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(f"{str(p)!r} is not UTF-8 text ({e}); pass a .parquet, .jsonl or .json file") from e


def read_records(path: str | os.PathLike, what: str = "records") -> list[dict[str, Any]]:
    """The records of a ``.parquet`` (lists as lists), ``.jsonl`` (one JSON object a line, blank lines
    skipped) or ``.json`` file (a list of objects, or ``{"data": [...]}``): the one reader of record files.
    A missing, unreadable or empty file is a :class:`SchemaError` (``what`` names the records in the message,
    e.g. "problems"); :func:`read_rl` and :func:`read_sft` check the records' columns."""
    p = Path(path)
    if not p.exists():
        raise SchemaError(f"input file {str(p)!r} not found")
    if not p.is_file():
        raise SchemaError(f"input path {str(p)!r} is a folder; pass a .parquet, .jsonl or .json file")
    name = p.name.lower()
    if name.endswith(".parquet"):
        import pandas as pd
        import pyarrow

        try:
            frame = pd.read_parquet(p)
        except (pyarrow.ArrowException, OSError, ValueError) as e:
            raise SchemaError(f"{str(p)!r} is not a readable parquet file ({type(e).__name__}: {e})") from e
        if not len(frame) or not len(frame.columns):
            raise SchemaError(
                f"no {what} in {str(p)!r}: the file has {len(frame)} rows and {len(frame.columns)} columns"
            )
        return [{k: _plain(v) for k, v in r.items()} for r in frame.to_dict(orient="records")]
    if name.endswith(".jsonl"):
        out = []
        for n, line in enumerate(_text(p).splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SchemaError(f"{p}: line {n} is not valid JSON: {e}") from e
                if not isinstance(out[-1], dict):
                    raise SchemaError(f"{p}: line {n} must be a JSON object (one record a line)")
    elif name.endswith(".json"):
        try:
            out = json.loads(_text(p))
        except json.JSONDecodeError as e:
            raise SchemaError(f"{p} is not valid JSON: {e}") from e
        if isinstance(out, Mapping) and isinstance(out.get("data"), list):
            out = out["data"]
        if not isinstance(out, list):
            raise SchemaError(f"{p}: expected a JSON list of records (or {{'data': [...]}})")
        bad = next((i for i, r in enumerate(out) if not isinstance(r, dict)), None)
        if bad is not None:
            raise SchemaError(f"{p}: record {bad} is {type(out[bad]).__name__}, not a JSON object (one per record)")
    else:
        raise SchemaError(f"input {str(p)!r}: unsupported file type; use .parquet, .jsonl or .json")
    if not out:
        raise SchemaError(f"no {what} in {str(p)!r}: the file is empty")
    return out


def write_rl(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    for i, r in enumerate(rows):
        check_rl_row(r, i, str(path))
    return _write(rows, path, RL_COLUMNS)


def write_sft(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    for i, r in enumerate(rows):
        check_sft_row(r, i, str(path))
    return _write(rows, path, SFT_COLUMNS)


def read_rl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of an RL dataset file (parquet, or JSON lines) as plain dicts/lists (checked; an empty file is an
    error)."""
    rows = read_records(path, "problems")
    for i, r in enumerate(rows):
        check_rl_row(r, i, str(path))
    return rows


def read_sft(path: str | os.PathLike, eos_token: str | None = None) -> list[dict[str, Any]]:
    """Rows of an SFT dataset file (parquet, or JSON lines) as plain dicts/lists (checked; an empty file is an
    error)."""
    rows = read_records(path, "SFT rows")
    for i, r in enumerate(rows):
        check_sft_row(r, i, str(path), eos_token)
    return rows


def questions(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The question text of each row (``extra_info.question``)."""
    return [r["extra_info"]["question"] for r in rows]
