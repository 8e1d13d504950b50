"""The demo's HTML report: results table, per-problem speedup histogram, one trajectory with its
threads, the trie attention mask of that trajectory and the training loss curves."""

from __future__ import annotations

import csv
import html
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from threadweaver_verl.format import Block, Marker, Outlines, Span, Stray, Thread, Trajectory, iter_atoms
from threadweaver_verl.format.tags import Tag

_THREAD_COLOURS = ("#e8f0fe", "#fde8e8", "#e8fde9", "#fdf6e3", "#f0e8fd", "#e3f7fd", "#fde3f4", "#eeeeee")


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_trajectory(jsonl: Path) -> dict | None:
    """A correct, format-valid trajectory with the most threads (the first such one)."""
    best = None
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("error") or not rec.get("valid"):
            continue
        key = (bool(rec.get("correct")), rec["stats"]["num_threads"])
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


def table_html(rows: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in r.values()) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def format_cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


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
        "<p>token_speedup = sequential model's mean T / this model's mean L (critical path). "
        "wall_speedup = sequential wall clock per problem / this one's.</p>"
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
            "<h2>Per-problem token speedup (sequential L / parallel L)</h2><img src='report_assets/speedup_hist.png'>"
        )
    rec = pick_trajectory(out / "eval_parallel" / "trajectories.jsonl")
    if rec is not None:
        tok = AutoTokenizer.from_pretrained(sft["parallel"]["model_dir"])
        fmt = TokenFormat.from_tokenizer(tok)
        tree = fmt.parse(rec["response_ids"])
        st = rec["stats"]
        sections.append(
            f"<h2>One trajectory (problem {html.escape(rec['problem'])}, "
            f"{'correct' if rec['correct'] else 'wrong'}, T={st['total_tokens']}, "
            f"L={st['critical_path']})</h2>" + trajectory_html(tree, fmt.decode)
        )
        trie = build_trie(split_requests(rec["prompt_ids"], rec["response_ids"], fmt))
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
    page = out / "report.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>ThreadWeaver demo</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1100px}td,th{padding:3px 10px;border-bottom:1px solid #ddd}"
        ".traj{white-space:pre-wrap;font-size:12px;background:#fafafa;padding:8px}.tag{color:#888}"
        ".thread{border-left:3px solid #4477aa;margin:2px 0;padding:2px 6px}.block{border:1px dashed #aaa;padding:4px}"
        "</style></head><body><h1>ThreadWeaver demo</h1>"
        f"<p>multiplication {html.escape(str(cfg.preset))}, {cfg.n_test} held-out problems, "
        f"tiny Qwen3-style models trained from scratch on a CPU.</p>" + "".join(sections) + "</body></html>"
    )
    return page
