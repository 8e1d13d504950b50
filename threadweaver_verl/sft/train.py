"""``python -m threadweaver_verl sft model=DIR train_files=DATA.parquet output_dir=OUT [key=value ...]``

Trie SFT that runs anywhere (CPU or one GPU, no verl needed): the HF Trainer
with the trie collator and the parent-gathered loss. Same rows, same mask, same
per-token loss as the verl path (:mod:`.verl_dataset` + :mod:`.verl_engine`).

Writes in ``output_dir``: ``model/`` (the final HF checkpoint with its tokenizer:
load it with transformers or serve it with vLLM), ``loss_curve.csv`` (step,
epoch, elapsed_s, loss, learning_rate, grad_norm), ``sft_summary.json``,
``sft.yaml`` (the settings) and, with ``save_steps > 0``, HF ``checkpoint-N``
folders (``resume=true`` continues from the last one).

Training ends at its step (or epoch) budget, so the same settings give the same model on any
machine. ``time_limit_minutes`` is only a safety stop: a run it ends is reported as such
(``stopped_by="time_limit"``, exit status 1), never as a normal result.
"""

from __future__ import annotations

import csv
import enum
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from threadweaver_verl.config import ConfigError
from threadweaver_verl.runs import UserError, require_model_dir
from threadweaver_verl.sft.batch import Attention, TrieCollator, forward_logprobs, row_features
from threadweaver_verl.sft.data import Layout, SFTExample, build_rows, load_examples
from threadweaver_verl.sft.loss import mean_nll
from threadweaver_verl.sft.trie import Trie


@dataclass
class SFTConfig:
    """``sft``: trie-packed supervised fine-tuning with the HF Trainer."""

    model: str = ""
    """HF model folder (tokenizer with the format tags; see `prepare-model`)."""
    train_files: list[str] = field(default_factory=list)
    """SFT parquet files (data.schema's SFT schema)."""
    val_files: list[str] = field(default_factory=list)
    """Optional held-out SFT parquet files: their mean loss is reported at the end."""
    output_dir: str = ""
    """Everything goes here; the final model in output_dir/model."""
    layout: str = Layout.TRIE.value
    """``trie`` (one trie per trajectory) or ``expanded`` (one chain per Request)."""
    max_tokens: int = 1024
    """Token budget of one row (sdpa's bool mask costs O(N^2) per row: keep it short)."""
    pack: bool = True
    """Several tries per row up to max_tokens; false: one trie (trajectory) per row."""
    batch_size: int = 4
    """Rows per optimizer step (per device)."""
    batch_tokens: int = 0
    """If > 0: rows per step = batch_tokens // the longest row's length (replaces batch_size)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (each micro-batch's loss is its own token mean)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    epochs: float = 1.0
    """Passes over the data when max_steps is -1."""
    time_limit_minutes: float = 0.0
    """Safety stop, not a budget: a run it ends fails loudly (0: no limit)."""
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps of the schedule."""
    lr_scheduler: str = "cosine"
    """Any HF scheduler name (over the step budget): cosine | linear | constant ..."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    attention: str = Attention.AUTO.value
    """``auto``, ``sdpa`` (4-D bool mask) or ``flex`` (BlockMask, GPU only for training)."""
    flex_min_tokens: int = 4096
    """``auto`` uses flex for rows at least this long (on a GPU; a CPU stays on sdpa)."""
    bf16: bool = False
    """Run in bf16 autocast (GPU, or a CPU with bf16)."""
    seed: int = 0
    """Seed of the data order and of any other randomness in training (HF ``set_seed``)."""
    max_samples: int = -1
    """Use only the first N trajectories (-1: all)."""
    logging_steps: int = 10
    """Steps between two lines of ``loss_curve.csv`` and the console log."""
    save_steps: int = 0
    """HF checkpoint-N every N steps (0: only the final model)."""
    save_total_limit: int | None = 2
    """Most ``checkpoint-N`` folders kept (older ones are deleted); null: keep all."""
    save_only_model: bool = False
    """``checkpoint-N`` holds only the weights (no optimizer state: cannot resume)."""
    resume: bool = False
    """Continue from the last checkpoint-N in output_dir."""
    num_workers: int = 0
    """Dataloader workers."""

    def __post_init__(self) -> None:
        problems = []
        if self.layout not in tuple(Layout):
            problems.append(f"layout must be one of {[x.value for x in Layout]}, got {self.layout!r}")
        if self.attention not in tuple(Attention):
            problems.append(f"attention must be one of {[a.value for a in Attention]}, got {self.attention!r}")
        if self.time_limit_minutes < 0:
            problems.append(f"time_limit_minutes must be >= 0 (0: no limit), got {self.time_limit_minutes}")
        if self.batch_tokens < 0:
            problems.append(f"batch_tokens must be >= 0 (0: use batch_size), got {self.batch_tokens}")
        if self.max_steps <= 0 and self.epochs <= 0:
            problems.append("set max_steps > 0 or epochs > 0")
        for name in ("max_tokens", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if problems:
            raise ConfigError("sft settings: " + "; ".join(problems))


class StoppedBy(enum.StrEnum):
    """``SFTResult.stopped_by``: what ended the training."""

    STEPS = "steps"  # max_steps reached
    EPOCHS = "epochs"  # the epochs ran out (max_steps <= 0)
    TIME_LIMIT = "time_limit"  # the safety stop (time_limit_minutes): not a finished run


@dataclass
class SFTResult:
    model_dir: str
    steps: int
    seconds: float
    final_loss: float
    val_loss: float | None
    rows: int
    trajectories: int
    row_tokens: int
    loss_tokens: int
    stopped_by: StoppedBy
    loss_curve: str
    batch_size: int = 0  # rows per optimizer step actually used
    longest_row: int = 0  # tokens of the longest row


class RowDataset(Dataset):
    """Training rows (tries or chains) as feature dicts."""

    def __init__(self, rows: Sequence[Trie]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return row_features(self.rows[i])


def check_config(cfg: SFTConfig) -> None:
    """The inputs a run needs (the values themselves are checked by ``SFTConfig.__post_init__``)."""
    problems = []
    if not cfg.model:
        problems.append("model=DIR (an HF model folder) is required")
    if not cfg.train_files:
        problems.append("train_files=[a.parquet,...] is required")
    if not cfg.output_dir:
        problems.append("output_dir=DIR is required")
    if cfg.model:
        try:
            require_model_dir(cfg.model, "model")
        except UserError as e:
            problems.append(str(e))
    problems += [f"train file {f!r} not found" for f in cfg.train_files or () if not Path(f).is_file()]
    if cfg.output_dir and Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        problems.append(f"output_dir={cfg.output_dir!r} is a file; pass a folder")
    if cfg.attention == Attention.FLEX and not torch.cuda.is_available():
        problems.append(
            "attention=flex cannot train on a CPU (torch's flex attention has no CPU backward); "
            "use attention=auto or sdpa here"
        )
    if problems:
        raise ConfigError("sft settings: " + "; ".join(problems))


def mean_loss(
    model: Any,
    rows: Sequence[Trie],
    pad_token_id: int,
    batch_size: int,
    attention: str = Attention.AUTO,
    flex_min_tokens: int = 4096,
) -> float:
    """Mean NLL over all loss tokens of ``rows`` (no gradient)."""
    collate = TrieCollator(pad_token_id)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate([row_features(r) for r in rows[i : i + batch_size]])
            lp = forward_logprobs(model, batch, attention, flex_min_tokens)
            mask = batch["loss_mask"].to(lp.device).bool()
            total += float(-(lp[mask]).sum())
            count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1)


class TrieTrainer(Trainer):
    """HF Trainer whose loss is the parent-gathered trie NLL."""

    def __init__(self, *args, attention: str = Attention.AUTO, flex_min_tokens: int = 4096, **kwargs):
        super().__init__(*args, **kwargs)
        self.attention = attention
        self.flex_min_tokens = flex_min_tokens
        self.model_accepts_loss_kwargs = False  # the loss is a token mean per micro-batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        lp = forward_logprobs(model, inputs, self.attention, self.flex_min_tokens)
        loss = mean_nll(lp, inputs["loss_mask"].to(lp.device))
        return (loss, {"logprobs": lp}) if return_outputs else loss


class TimeLimitAndCurve(TrainerCallback):
    """The safety stop (``time_limit_minutes``), and every log appended to the loss curve CSV."""

    FIELDS = ("step", "epoch", "elapsed_s", "loss", "learning_rate", "grad_norm")

    def __init__(self, minutes: float, curve: Path, append: bool):
        self.limit_s = minutes * 60.0
        self.curve = curve
        self.start = time.monotonic()
        self.hit_time_limit = False
        if not append or not curve.exists():
            with curve.open("w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)

    def on_step_end(self, args, state, control, **kwargs):
        if self.limit_s > 0 and time.monotonic() - self.start >= self.limit_s:
            self.hit_time_limit = True
            control.should_training_stop = True
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        row = {
            "step": state.global_step,
            "epoch": logs.get("epoch", state.epoch),
            "elapsed_s": round(time.monotonic() - self.start, 3),
            "loss": logs.get("loss"),
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
        }
        with self.curve.open("a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in self.FIELDS])


def _last_checkpoint(out: Path) -> str | None:
    ckpts = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1]))) if ckpts else None


def train(cfg: SFTConfig, console: Any = None) -> SFTResult:
    """Run SFT; returns where the model went and how it ended."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

    from threadweaver_verl.config import to_yaml
    from threadweaver_verl.format import TokenFormat

    check_config(cfg)
    console = console or Console()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft.yaml").write_text(to_yaml(cfg))
    set_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    fmt = TokenFormat.from_tokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.eos_ids[0]
    examples: list[SFTExample] = load_examples(cfg.train_files, tokenizer, fmt, cfg.max_samples)
    rows = build_rows(examples, cfg.layout, cfg.max_tokens, cfg.pack)
    val_rows = (
        build_rows(load_examples(cfg.val_files, tokenizer, fmt), cfg.layout, cfg.max_tokens, cfg.pack)
        if cfg.val_files
        else []
    )
    row_tokens = sum(len(r) for r in rows)
    loss_tokens = sum(r.num_loss_tokens for r in rows)
    longest = max(len(r) for r in rows)
    batch_size = max(1, cfg.batch_tokens // longest) if cfg.batch_tokens > 0 else cfg.batch_size
    console.print(
        f"[bold]sft[/bold] {len(examples)} trajectories -> {len(rows)} {cfg.layout} rows "
        f"({row_tokens} tokens, {loss_tokens} with loss, longest {longest}, budget {cfg.max_tokens}/row), "
        f"{batch_size} rows per step"
    )

    use_cpu = not torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, attn_implementation="sdpa")
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.epochs if cfg.max_steps <= 0 else 1.0,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        save_only_model=cfg.save_only_model,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        use_cpu=use_cpu,
        disable_tqdm=False,
    )
    curve_path = out / "loss_curve.csv"
    resume_from = _last_checkpoint(out) if cfg.resume else None
    limit = TimeLimitAndCurve(cfg.time_limit_minutes, curve_path, append=resume_from is not None)
    trainer = TrieTrainer(
        model=model,
        args=args,
        train_dataset=RowDataset(rows),
        data_collator=TrieCollator(pad_id),
        processing_class=tokenizer,
        callbacks=[limit],
        attention=cfg.attention,
        flex_min_tokens=cfg.flex_min_tokens,
    )
    start = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.monotonic() - start

    model_dir = out / "model"
    trainer.save_model(str(model_dir))  # weights + config + tokenizer (processing_class)
    model.generation_config.save_pretrained(str(model_dir))
    val_loss = (
        mean_loss(model, val_rows, pad_id, cfg.batch_size, cfg.attention, cfg.flex_min_tokens) if val_rows else None
    )
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if limit.hit_time_limit:
        stopped_by = StoppedBy.TIME_LIMIT
    else:
        stopped_by = StoppedBy.STEPS if cfg.max_steps > 0 else StoppedBy.EPOCHS
    res = SFTResult(
        model_dir=str(model_dir),
        steps=int(trainer.state.global_step),
        seconds=round(seconds, 2),
        final_loss=float(history[-1]) if history else float(result.training_loss),
        val_loss=val_loss,
        rows=len(rows),
        trajectories=len(examples),
        row_tokens=row_tokens,
        loss_tokens=loss_tokens,
        stopped_by=stopped_by,
        loss_curve=str(curve_path),
        batch_size=batch_size,
        longest_row=longest,
    )
    (out / "sft_summary.json").write_text(json.dumps({"config": asdict(cfg), "result": asdict(res)}, indent=2))
    _print_summary(console, res)
    return res


def _print_summary(console: Any, res: SFTResult) -> None:
    from rich.table import Table

    table = Table(title="sft summary")
    table.add_column("item")
    table.add_column("value", justify="right")
    for k, v in asdict(res).items():
        if isinstance(v, float) and not math.isnan(v):
            v = f"{v:.4f}"
        table.add_row(k, str(v))
    console.print(table)


def main(argv: Sequence[str] = ()) -> int:
    from threadweaver_verl.config import run_command

    return run_command(SFTConfig, argv, run, command="sft")


def run(cfg: SFTConfig) -> int:
    res = train(cfg)
    if res.stopped_by == StoppedBy.TIME_LIMIT:
        print(time_limit_message(res.steps, cfg.max_steps, cfg.time_limit_minutes), file=sys.stderr)
        return 1
    return 0


def time_limit_message(steps: int, max_steps: int, minutes: float) -> str:
    """What a run ended by the safety stop says (the model is saved, but it is not the budgeted result)."""
    budget = f"{max_steps}" if max_steps > 0 else "the epoch budget"
    return (
        f"stopped by the time limit ({minutes:g} min) at step {steps} of {budget}: the result is not the "
        "reference result. The machine is slower or busier than the limit allows; raise "
        "time_limit_minutes (0: no limit) and rerun."
    )
