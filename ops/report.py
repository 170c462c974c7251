"""`at2po report RUN_DIR`: PNG plots of a run and a Markdown + HTML page that puts them together.

Reads only files: `metrics/*.jsonl` (every role's records), `summary.json` when present. Plots:
- `reward_em.png`: training reward (mean leaf reward per update) and held-out EM, each against the
  learner step and against wall-clock minutes;
- `entropy.png`: policy entropy and AT²PO's turn-KL entropy against the step (AT²PO's claim is that
  the entropy does not collapse early);
- `staleness.png`: histogram of the staleness of trained trees (versions behind the learner);
- `throughput.png`: trees/min and generated tokens/s of each actor, and the learner's tokens/s;
- `busy.png`: the learner's busy fraction (update time over wall time) along the run.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ops.run_metrics import MetricsTail, RunHistory

PLOTS = ("reward_em.png", "entropy.png", "staleness.png", "throughput.png", "busy.png")


def _minutes(records: list[dict[str, Any]], start: float) -> list[float]:
    return [(float(r["ts"]) - start) / 60.0 for r in records]


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    out = []
    for record in records:
        value = record.get(key)
        out.append(float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan)
    return out


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_reward_em(history: RunHistory, start: float, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = history.learner_steps
    for ax, x, label in (
        (axes[0][0], _values(steps, "step"), "learner step"),
        (axes[0][1], _minutes(steps, start), "minutes"),
    ):
        if steps:
            ax.plot(x, _values(steps, "reward_mean"), marker=".", lw=1)
        else:
            _empty(ax, "no learner steps")
        ax.set_xlabel(label)
        ax.set_ylabel("training reward (mean leaf reward)")
    evals = history.evals
    for ax, x, label in (
        (axes[1][0], _values(evals, "step"), "learner step"),
        (axes[1][1], _minutes(evals, start), "minutes"),
    ):
        if evals:
            ax.plot(x, _values(evals, "em"), marker="o")
            for xi, record in zip(x, evals, strict=True):
                ax.annotate(str(record.get("label", "")), (xi, float(record.get("em") or 0.0)), fontsize=7)
        else:
            _empty(ax, "no evaluations")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out EM (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_entropy(history: RunHistory, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    steps = history.learner_steps
    if steps:
        x = _values(steps, "step")
        ax.plot(x, _values(steps, "policy_entropy"), label="policy entropy (nats/token)")
        ax2 = ax.twinx()
        ax2.plot(x, _values(steps, "turn_kl_entropy"), color="tab:orange", label="turn-KL entropy (Eq. 13)")
        ax2.set_ylabel("turn-KL entropy (normalised)")
        ax2.legend(loc="upper right")
        ax.legend(loc="upper left")
    else:
        _empty(ax, "no learner steps")
    ax.set_xlabel("learner step")
    ax.set_ylabel("policy entropy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_staleness(history: RunHistory, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = history.staleness_counts
    if counts:
        keys = sorted(counts)
        ax.bar(keys, [counts[k] for k in keys])
        ax.set_xticks(keys)
    else:
        _empty(ax, "no trained trees")
    ax.set_xlabel("staleness (learner version - tree's oldest version)")
    ax.set_ylabel("trees trained")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(history: RunHistory, start: float, path: Path, bucket_s: float = 60.0) -> None:
    fig, (ax_trees, ax_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    per_actor: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for tree in history.trees:
        bucket = int((float(tree["ts"]) - start) // bucket_s)
        per_actor[str(tree.get("source", "actor"))][bucket].append(float(tree.get("generated_tokens", 0)))
    for actor, buckets in sorted(per_actor.items()):
        keys = sorted(buckets)
        minutes = [(k + 0.5) * bucket_s / 60 for k in keys]
        ax_trees.plot(minutes, [len(buckets[k]) * 60 / bucket_s for k in keys], marker=".", label=actor)
        ax_tokens.plot(minutes, [sum(buckets[k]) / bucket_s for k in keys], marker=".", label=f"{actor} generated")
    steps = history.learner_steps
    if steps:
        ax_tokens.plot(_minutes(steps, start), _values(steps, "tokens_per_s"), label="learner trained", alpha=0.7)
    if not per_actor and not steps:
        _empty(ax_trees, "no throughput records")
    ax_trees.set_xlabel("minutes")
    ax_trees.set_ylabel("trees per minute")
    ax_tokens.set_xlabel("minutes")
    ax_tokens.set_ylabel("tokens/s")
    for ax in (ax_trees, ax_tokens):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_busy(history: RunHistory, start: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    steps = history.learner_steps
    if len(steps) > 1:
        times = [float(s["ts"]) for s in steps]
        fractions = [
            min(1.0, float(s.get("update_seconds") or 0.0) / (t1 - t0)) if t1 > t0 else math.nan
            for s, t0, t1 in zip(steps[1:], times[:-1], times[1:], strict=True)
        ]
        ax.plot([(t - start) / 60 for t in times[1:]], fractions, marker=".")
        ax.set_ylim(0, 1.05)
        overall = history.learner_busy_fraction()
        ax.axhline(overall, color="grey", ls="--", label=f"whole run {overall:.0%}")
        ax.legend()
    else:
        _empty(ax, "fewer than two learner steps")
    ax.set_xlabel("minutes")
    ax.set_ylabel("learner busy fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_history(run_dir: Path) -> RunHistory:
    history = RunHistory()
    history.add(MetricsTail(run_dir / "metrics").read_new())
    return history


def write_report(run_dir: Path) -> Path:
    """Draw every plot and write report.md and report.html into `run_dir`; returns the Markdown path."""
    history = load_history(run_dir)
    start = history.started_ts or 0.0
    plot_reward_em(history, start, run_dir / "reward_em.png")
    plot_entropy(history, run_dir / "entropy.png")
    plot_staleness(history, run_dir / "staleness.png")
    plot_throughput(history, start, run_dir / "throughput.png")
    plot_busy(history, start, run_dir / "busy.png")
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, dict | list)]
    md = [f"# at2po run: {run_dir.name}", ""]
    if rows:
        md += ["| figure | value |", "|---|---|", *[f"| {k} | {_show(v)} |" for k, v in rows], ""]
    captions = {
        "reward_em.png": "Training reward and held-out EM, against learner step and wall-clock time",
        "entropy.png": "Policy entropy and turn-KL entropy against learner step",
        "staleness.png": "Staleness of the trees the learner trained on",
        "throughput.png": "Throughput of each role",
        "busy.png": "Learner busy fraction",
    }
    for name in PLOTS:
        md += [f"## {captions[name]}", "", f"![{captions[name]}]({name})", ""]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_show(v))}</td></tr>" for k, v in rows)
    figures = "".join(f"<h2>{html.escape(captions[n])}</h2><img src='{n}' style='max-width:100%'>" for n in PLOTS)
    (run_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>at2po run {html.escape(run_dir.name)}</title>"
        f"</head><body style='font-family:sans-serif;max-width:1100px;margin:auto'><h1>at2po run: "
        f"{html.escape(run_dir.name)}</h1><table border='1' cellpadding='4'>{table}</table>{figures}</body></html>\n",
        encoding="utf-8",
    )
    return md_path


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
