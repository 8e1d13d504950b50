"""The HTML reports: one page writer (:func:`write_page`) and one table cell format (:func:`format_cell`)
for every report and table of the package.

- :func:`write_eval_report`: the eval command's summary table and per-problem speedup histogram;
- :func:`write_demo_report`: the demo's results table, accuracy-vs-steps curve, speedup histogram, one
  trajectory with its threads, the trie attention mask of that trajectory and the training loss curves.
"""

from __future__ import annotations

import csv
import html
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from threadweaver_verl.format import Block, Marker, Outlines, Span, Stray, Thread, Trajectory, iter_atoms
from threadweaver_verl.format.tags import Tag

if TYPE_CHECKING:
    from threadweaver_verl.eval.records import EvalSummary, TrajectoryRecord

_THREAD_COLOURS = ("#e8f0fe", "#fde8e8", "#e8fde9", "#fdf6e3", "#f0e8fd", "#e3f7fd", "#fde3f4", "#eeeeee")
_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1100px}td,th{padding:3px 10px;border-bottom:1px solid #ddd}"
    ".traj{white-space:pre-wrap;font-size:12px;background:#fafafa;padding:8px}.tag{color:#888}"
    ".thread{border-left:3px solid #4477aa;margin:2px 0;padding:2px 6px}.block{border:1px dashed #aaa;padding:4px}"
)


def write_page(path: Path, title: str, intro: str, sections: Sequence[str]) -> Path:
    """Write an HTML report page: ``title`` as its heading, ``intro`` (plain text) under it, then the
    ``sections`` (HTML, each starting with its ``<h2>``). The one page writer of the package."""
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        + (f"<p>{html.escape(intro)}</p>" if intro else "")
        + "".join(sections)
        + "</body></html>"
    )
    return path


def format_cell(v: Any) -> str:
    """How every report and console table shows a value: ``-`` for None, floats with 3 decimals (3
    significant digits below 0.01), a dict as ``key=value, ...``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"
    if isinstance(v, Mapping):
        return ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
    return str(v)


def table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of equal keys as an HTML table, the keys as its header."""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in r.values()) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_trajectory(jsonl: Path) -> TrajectoryRecord | None:
    """A correct, format-valid trajectory with the most threads (the first such one)."""
    from threadweaver_verl.eval.records import read_trajectories

    best = None
    for rec in read_trajectories(jsonl):
        if not rec.ok or not rec.valid:
            continue
        key = (rec.correct, rec.stats["num_threads"])
        if best is None or key > best[0]:
            best = (key, rec)
    return best[1] if best else None


def trajectory_html(tree: Trajectory, decode) -> str:
    """The trajectory as HTML: each thread in its own coloured box, tags shown dimmed."""

    def text(content) -> str:
        return html.escape(content if isinstance(content, str) else decode(content))

    def tag(t: Tag) -> str:
        return f"<span class='tag'>{html.escape(t.value)}</span>"

    def nodes(ns, depth: int) -> str:
        out = []
        for n in ns:
            if isinstance(n, Span):
                out.append(text(n.content))
            elif isinstance(n, (Marker, Stray)):
                out.append(tag(n.tag))
            elif isinstance(n, Block):
                parts = [tag(Tag.PARALLEL_OPEN)]
                k = 0
                for p in n.parts:
                    if isinstance(p, Thread):
                        colour = _THREAD_COLOURS[k % len(_THREAD_COLOURS)]
                        k += 1
                        close = tag(Tag.THREAD_CLOSE) if p.closed else ""
                        parts.append(
                            f"<div class='thread' style='background:{colour}'>{tag(Tag.THREAD_OPEN)}"
                            f"{nodes(p.body, depth + 1)}{close}</div>"
                        )
                    elif isinstance(p, Outlines):
                        parts.append(
                            "<div class='outlines'>"
                            + "".join(tag(a) if isinstance(a, Tag) else text(a) for a in iter_atoms(p))
                            + "</div>"
                        )
                    else:
                        parts.append(nodes((p,), depth))
                if n.closed:
                    parts.append(tag(Tag.PARALLEL_CLOSE))
                out.append("<div class='block'>" + "".join(parts) + "</div>")
        return "".join(out)

    return f"<pre class='traj'>{nodes(tree.body, 0)}</pre>"


def mask_png(trie, path: Path, max_tokens: int = 400) -> Path:
    """A picture of the ancestor-only attention mask of a trie (first ``max_tokens`` tokens)."""
    import numpy as np

    plt = _matplotlib()
    n = min(len(trie), max_tokens)
    tin = np.arange(n)
    tout = np.minimum(trie.tout[:n], n - 1)
    q = tin[:, None]
    mask = (tin[None, :] <= q) & (q <= tout[None, :])
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.imshow(mask, cmap="Blues", interpolation="nearest")
    ax.set_title(f"trie attention mask ({n} of {len(trie)} tokens)\nrow = query token, column = key token")
    ax.set_xlabel("key (trie order)")
    ax.set_ylabel("query (trie order)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_png(curves: dict[str, Path], path: Path) -> Path:
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, csv_path in curves.items():
        steps, losses = [], []
        if csv_path.exists():
            with open(csv_path) as f:
                for row in csv.DictReader(f):
                    if row.get("loss"):
                        steps.append(int(float(row["step"])))
                        losses.append(float(row["loss"]))
        ax.plot(steps, losses, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over loss tokens)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_png(curve: dict[str, dict[str, float]], path: Path) -> Path:
    """Held-out accuracy against training steps, one line per model (``curve[model][step] = accuracy``)."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curve.items():
        steps = sorted(points, key=int)
        ax.plot([int(s) for s in steps], [points[s] for s in steps], marker="o", label=name)
    ax.axhline(0.99, color="#999", linestyle=":", linewidth=1, label="99%")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedup_bins(values: list[float], width: float = 0.02, max_bins: int = 60) -> list[float]:
    """Bin edges for a speedup histogram: ``width`` apart on a fixed grid, so that near-equal speedups (a task
    with a fixed layout) stay one visible bar instead of slivers; wider bins when the spread needs > max_bins."""
    lo, hi = min(values), max(values)
    while (hi - lo) / width > max_bins:
        width *= 2
    start = math.floor(lo / width) * width
    n = max(1, math.ceil((hi - start) / width + 1e-9))
    return [start + i * width for i in range(n + 1)]


def speedup_hist_png(per_problem: Mapping[str, float], path: Path, summary: EvalSummary, vs_baseline: bool) -> Path:
    """The per-problem speedups as a histogram. Against a baseline they are ``L_seq / L`` and the line marks
    the token speedup (:mod:`threadweaver_verl.eval.metrics`); without one they are T / L, marked at its mean."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [v for v in per_problem.values() if v == v] or [1.0]
    ax.hist(values, bins=speedup_bins(values), color="#4477aa")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    marked = summary.token_speedup if vs_baseline else summary.mean_T_over_L
    if marked is not None:
        label = f"token speedup {marked:.3f}" if vs_baseline else f"mean T / L {marked:.3f}"
        ax.axvline(marked, color="#cc6677", linewidth=1.5, label=label)
        ax.legend(loc="upper left")
    ax.set_xlabel("per-problem L_seq / L (sequential baseline)" if vs_baseline else "per-problem T / L")
    ax.set_ylabel("problems")
    ax.set_title("per-problem speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_SPEEDUP_CAPTION = (
    "Each bar counts problems by their sequential baseline's mean critical path over this run's (L_seq / L); "
    "the red line is the token speedup: the baseline's mean L over this run's mean L on those problems "
    "(a ratio of means, not the mean of the bars)."
)


def write_eval_report(out: Path, summary: EvalSummary, per_problem: Mapping[str, float], vs_baseline: bool) -> Path:
    """``report.html`` of the eval command: its summary table and ``speedup_hist.png``."""
    png = speedup_hist_png(per_problem, out / "speedup_hist.png", summary, vs_baseline)
    caption = _SPEEDUP_CAPTION if vs_baseline else "Each bar counts problems by their trajectories' mean T / L."
    return write_page(
        out / "report.html",
        "threadweaver eval",
        f"{summary.mode or 'evaluation'}: {summary.problems} problems, {summary.trajectories} trajectories",
        [
            "<h2>Summary</h2>" + table_html([{"metric": k, "value": v} for k, v in summary.to_json().items()]),
            f"<h2>Per-problem speedup</h2><p>{html.escape(caption)}</p><img src='{png.name}' alt='histogram'>",
        ],
    )


def write_demo_report(
    out: Path, cfg: Any, rows: Sequence[dict], sft: dict, data: Path, curve: dict[str, dict[str, float]] | None = None
) -> Path:
    from transformers import AutoTokenizer

    from threadweaver_verl.format import TokenFormat, split_requests
    from threadweaver_verl.sft.trie import build_trie

    assets = out / "report_assets"
    assets.mkdir(exist_ok=True)
    sections = [
        f"<h2>Results</h2>{table_html(rows)}"
        "<p>token_speedup = the sequential model's mean critical path L over this model's, on the same "
        "problems (a ratio of means; the sequential model has T = L, so its own is 1). "
        "Latency is what a user waits for one answer: latency_s_at_1_in_flight is the mean wall time of a "
        "trajectory with one problem in flight (the first latency_problems held-out problems), and "
        "latency_speedup_at_1_in_flight the sequential model's over this model's; "
        "latency_share_of_token_speedup is that latency speedup over the token speedup on the same "
        "problems (1 = every token saved on the critical path is time saved). Throughput is what a batch "
        "gets: problems and response tokens per second with eval_concurrency problems in flight, and "
        "throughput_speedup this model's problems per second over the sequential model's.</p>"
    ]
    if curve:
        curve_png(curve, assets / "accuracy_curve.png")
        sections.append(
            "<h2>Held-out accuracy vs training steps</h2><p>Intermediate checkpoints of both models on "
            "the same held-out problems; the step budget ends training, not the clock.</p>"
            "<img src='report_assets/accuracy_curve.png'>"
        )
    hist = out / "eval_parallel" / "speedup_hist.png"
    if hist.exists():
        shutil.copy(hist, assets / "speedup_hist.png")
        sections.append(
            f"<h2>Per-problem speedup</h2><p>{html.escape(_SPEEDUP_CAPTION)}</p>"
            "<img src='report_assets/speedup_hist.png'>"
        )
    rec = pick_trajectory(out / "eval_parallel" / "trajectories.jsonl")
    if rec is not None:
        tok = AutoTokenizer.from_pretrained(sft["parallel"]["model_dir"])
        fmt = TokenFormat.from_tokenizer(tok)
        tree = fmt.parse(rec.response_ids)
        st = rec.stats
        sections.append(
            f"<h2>One trajectory (problem {html.escape(rec.problem)}, "
            f"{'correct' if rec.correct else 'wrong'}, T={st['total_tokens']}, "
            f"L={st['critical_path']})</h2>" + trajectory_html(tree, fmt.decode)
        )
        trie = build_trie(split_requests(rec.prompt_ids, rec.response_ids, fmt))
        mask_png(trie, assets / "trie_mask.png")
        sections.append(
            "<h2>Its trie attention mask</h2><p>Each token attends only to its ancestors in the "
            "trie: a thread never sees a sibling.</p><img src='report_assets/trie_mask.png'>"
        )
    else:
        sections.append("<h2>One trajectory</h2><p>No format-valid trajectory to show.</p>")
    loss_png(
        {k: Path(v["loss_curve"]) for k, v in sft.items() if isinstance(v, dict) and "loss_curve" in v},
        assets / "loss.png",
    )
    sections.append("<h2>Training loss</h2><img src='report_assets/loss.png'>")
    return write_page(
        out / "report.html",
        "ThreadWeaver demo",
        f"multiplication {cfg.preset}, {cfg.n_test} held-out problems, "
        "tiny Qwen3-style models trained from scratch on a CPU.",
        sections,
    )
