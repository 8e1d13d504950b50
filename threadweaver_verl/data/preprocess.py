"""Turn a math dataset with question/answer fields into the RL parquet (``data.schema``).

Sources: a ``.parquet``, ``.jsonl`` or ``.json`` file, or a Hugging Face hub dataset
(``hub=owner/name``, loaded with the ``datasets`` library). Field conventions are
detected per file (``question_key=auto``, ``answer_key=auto``) or set explicitly:

=============  ==========================  ==============================================
dataset        question / answer fields    answer handling
=============  ==========================  ==============================================
MATH-500       problem / answer            as is (``solution`` is ignored when ``answer``
                                           exists; without it, its last ``\\boxed{}``)
AIME           Problem|problem / Answer|   as is (integers become strings)
               answer
GSM8K          question / answer           text after the last ``####``, commas removed
=============  ==========================  ==============================================

Each row gets our prompt (``PromptStyle``: the instruction our models are trained with),
``reward_model={style: rule, ground_truth}``, ``extra_info={index, split, question, ...}``
and ``agent_name``. Bad rows are errors naming the row and the fix; ``skip_invalid=true``
drops them instead and the summary counts them.

    python -m threadweaver_verl preprocess input=aime24.jsonl output=data/aime24.parquet data_source=aime24

The RL dataset (:mod:`threadweaver_verl.integrations.verl.rl_dataset`) converts raw rows with the same
:func:`to_rl_row`, so a raw problem/answer parquet can also be given to verl directly.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from threadweaver_verl.data.chat import DEFAULT_INSTRUCTION, PromptStyle
from threadweaver_verl.data.schema import AGENT_NAME, SchemaError, read_records, rl_row, write_rl
from threadweaver_verl.runs import output_file

QUESTION_KEYS = ("problem", "question", "Problem", "Question", "query")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "ground_truth", "expected_answer")
SOLUTION_KEYS = ("solution", "Solution")  # full worked solutions: the answer is their last \boxed{}
ID_KEYS = ("unique_id", "id", "ID", "problem_id", "idx")


class AnswerFormat(enum.StrEnum):
    """``RowConversion.answer_format``: how the ground truth is read from the answer field."""

    AUTO = "auto"  # boxed for a solution field, gsm8k when the text has '####', else plain
    PLAIN = "plain"  # the field as it is
    GSM8K = "gsm8k"  # the text after the last '####', thousands separators removed
    BOXED = "boxed"  # the last \boxed{} of a worked solution


@dataclass
class RowConversion:
    """How one raw record becomes an RL row (shared by the preprocessor and the RL dataset)."""

    question_key: str = "auto"
    """Field holding the problem text; auto: first of QUESTION_KEYS present."""
    answer_key: str = "auto"
    """Field holding the answer; auto: first of ANSWER_KEYS, else SOLUTION_KEYS."""
    answer_format: str = AnswerFormat.AUTO.value
    """``plain``, ``gsm8k`` ("... #### 72"), ``boxed`` (last \boxed{} of a solution) or ``auto``."""
    data_source: str | None = None
    """The rows' data_source (needed unless the records carry their own)."""
    ability: str = "math"
    """The row's ``ability`` column (verl's schema)."""
    split: str = "train"
    """Recorded in extra_info.split."""
    instruction: str | None = "default"
    """``default``: our trained instruction; null: none; anything else: this text."""
    system: str | None = None
    """Optional system message."""
    agent_name: str = AGENT_NAME
    """The agent loop verl runs for each row."""

    def style(self) -> PromptStyle:
        text = DEFAULT_INSTRUCTION if self.instruction == "default" else (self.instruction or None)
        return PromptStyle(instruction=text, system=self.system)

    def __post_init__(self) -> None:
        if self.answer_format not in tuple(AnswerFormat):
            raise SchemaError(f"answer_format={self.answer_format!r}: choose one of {[f.value for f in AnswerFormat]}")
        if self.agent_name is not None and not self.agent_name:
            raise SchemaError("agent_name is empty: name the agent loop verl runs for each row (e.g. 'threadweaver')")


@dataclass
class PreprocessConfig(RowConversion):
    """A preprocessing run: where the records come from and where the parquet goes."""

    input: str | None = None
    """A .parquet / .jsonl / .json file."""
    hub: str | None = None
    """Or a Hugging Face hub dataset name (needs ``datasets`` and network or a cache)."""
    subset: str | None = None
    """Hub config name (e.g. "main" for openai/gsm8k)."""
    hub_split: str = "test"
    """Hub split to load."""
    output: str = "rl.parquet"
    """The RL parquet written."""
    limit: int = -1
    """Keep the first N records (-1: all)."""
    skip_invalid: bool = False
    """Drop bad records (counted) instead of stopping at the first."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limit < -1:
            raise SchemaError(f"limit={self.limit}: keep the first N >= 0 records, or -1 for all")


# --------------------------------------------------------------------------- loading
def load_records(cfg: PreprocessConfig) -> list[dict[str, Any]]:
    """The raw records of ``cfg.input`` or ``cfg.hub`` as plain dicts."""
    if bool(cfg.input) == bool(cfg.hub):
        raise SchemaError("give exactly one source: input=<file.parquet|.jsonl|.json> or hub=<owner/name>")
    if cfg.hub:
        try:
            import datasets
        except ImportError as e:
            raise SchemaError(
                "hub=... needs the `datasets` library: pip install datasets "
                "(or download the data and pass input=<file>)"
            ) from e
        try:
            ds = datasets.load_dataset(cfg.hub, cfg.subset, split=cfg.hub_split)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise SchemaError(
                f"could not load hub dataset {cfg.hub!r} (subset={cfg.subset!r}, split={cfg.hub_split!r}): "
                f"{type(e).__name__}: {e}. Offline? Download it and pass input=<file>."
            ) from e
        records = [dict(r) for r in ds]
    else:
        records = read_records(cfg.input)
    return records[: cfg.limit] if cfg.limit >= 0 else records


# --------------------------------------------------------------------------- one record
def _pick(record: Mapping[str, Any], key: str, candidates: Sequence[str], what: str) -> str:
    if key != "auto":
        if key not in record:
            raise SchemaError(f"{what} field {key!r} missing; the record has {sorted(record)}")
        return key
    for k in candidates:
        if k in record:
            return k
    raise SchemaError(
        f"no {what} field found (looked for {list(candidates)}); the record has {sorted(record)}. "
        f"Set {what}_key=<field>"
    )


def gsm8k_answer(text: str) -> str:
    """GSM8K's final answer: what follows the last ``####``, without thousands separators."""
    if "####" not in text:
        raise SchemaError(f"GSM8K-style answer without '####': {text[-80:]!r}")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def ground_truth_of(record: Mapping[str, Any], conv: RowConversion) -> str:
    if conv.answer_key == "auto" and not any(k in record for k in ANSWER_KEYS):
        key = _pick(record, "auto", SOLUTION_KEYS, "answer")
    else:
        key = _pick(record, conv.answer_key, ANSWER_KEYS, "answer")
    value = record[key]
    if value is None or isinstance(value, (list, dict)):
        raise SchemaError(f"answer field {key!r} is {value!r}; expected a string or number")
    text = str(value).strip()
    fmt = conv.answer_format
    if fmt == AnswerFormat.AUTO:
        fmt = (
            AnswerFormat.BOXED
            if key in SOLUTION_KEYS
            else (AnswerFormat.GSM8K if "####" in text else AnswerFormat.PLAIN)
        )
    if fmt == AnswerFormat.GSM8K:
        text = gsm8k_answer(text)
    elif fmt == AnswerFormat.BOXED:
        from threadweaver_verl.rl.correctness import last_boxed

        boxed = last_boxed(text)
        if boxed is None:
            raise SchemaError(f"answer field {key!r} has no complete \\boxed{{}} to take the answer from")
        text = boxed.strip()
    if not text:
        raise SchemaError(f"empty ground truth in field {key!r}")
    return text


def to_rl_row(record: Mapping[str, Any], index: int, conv: RowConversion) -> dict[str, Any]:
    """The RL row of one raw record (raises SchemaError naming what is wrong)."""
    qkey = _pick(record, conv.question_key, QUESTION_KEYS, "question")
    question = record[qkey]
    if not isinstance(question, str) or not question.strip():
        raise SchemaError(f"question field {qkey!r} is empty or not text: {question!r}")
    data_source = record.get("data_source") or conv.data_source
    if not data_source:
        raise SchemaError("no data_source: the record has none; set data_source=<name> (e.g. math500)")
    extra = {}
    for k in ID_KEYS:
        if k in record and record[k] is not None:
            extra["source_id"] = str(record[k])
            break
    return rl_row(
        data_source=str(data_source),
        question=question.strip(),
        ground_truth=ground_truth_of(record, conv),
        index=index,
        split=conv.split,
        style=conv.style(),
        ability=conv.ability,
        agent_name=conv.agent_name,
        extra=extra,
    )


def convert(
    records: Sequence[Mapping[str, Any]],
    conv: RowConversion,
    skip_invalid: bool = False,
    source: str = "input",
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """RL rows of ``records`` and the messages of the skipped ones (only when ``skip_invalid``)."""
    rows, skipped = [], []
    it = enumerate(records)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(records), desc="converting", unit="row")
    for i, rec in it:
        try:
            rows.append(to_rl_row(rec, i, conv))
        except SchemaError as e:
            msg = f"{source}, record {i}: {e}"
            if not skip_invalid:
                raise SchemaError(msg + " (skip_invalid=true drops such records)") from e
            skipped.append(msg)
    return rows, skipped


# --------------------------------------------------------------------------- command
def run(cfg: PreprocessConfig, progress: bool = True) -> dict[str, Any]:
    output_file(cfg.output, "output", ".parquet")  # before any work
    records = load_records(cfg)
    source = cfg.input or f"hub:{cfg.hub}"
    rows, skipped = convert(records, cfg, cfg.skip_invalid, source, progress)
    if not rows:
        raise SchemaError(f"no usable records in {source} ({len(skipped)} skipped)")
    out = write_rl(rows, cfg.output)
    return {
        "source": source,
        "records": len(records),
        "rows": len(rows),
        "skipped": len(skipped),
        "skipped_examples": skipped[:5],
        "data_sources": sorted({r["data_source"] for r in rows}),
        "output": str(out),
    }


def script_main(defaults: Mapping[str, Any], argv: Sequence[str]) -> int:
    """Entry point of the ``examples/data_preprocess`` scripts: their defaults, then the user's
    ``key=value`` arguments. A user ``input=`` replaces a default ``hub=`` (and the other way round)."""
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv if not a.startswith("-")}
    base = dict(defaults)
    if given & {"input", "hub"}:
        base.pop("input", None)
        base.pop("hub", None)
    from threadweaver_verl.cli import run_command

    args = [f"{k}={v}" for k, v in base.items()] + [a for a in argv if a != "--debug"]
    return run_command("preprocess", args, debug="--debug" in argv)  # the commands' error policy (exit 2)


def main(argv: Sequence[str] = ()) -> int:
    from threadweaver_verl.config import run_command

    return run_command(PreprocessConfig, argv, print_run, command="preprocess")


def print_run(cfg: PreprocessConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    summary = run(cfg)
    table = Table(title="RL parquet written")
    table.add_column("field")
    table.add_column("value")
    for k in ("source", "records", "rows", "skipped", "data_sources", "output"):
        table.add_row(k, str(summary[k]))
    console = Console()
    console.print(table)
    for msg in summary["skipped_examples"]:
        console.print(f"[yellow]skipped[/yellow] {msg}")
    return 0
