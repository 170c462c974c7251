"""Experiment sweeps over `at2po run`: off-policy staleness, and algorithms at an equal token budget.

Decided here:
- A sweep is a list of variants (a name and config overrides); each variant is one full local run
  (`LocalRun`) in `<out>/<variant>/`, one after the other (they would compete for the same cores).
  The warm start is made once (shared `sft.out_dir`) and evaluated once: later variants reuse the
  warm-start EM, so every variant starts from the same policy and the same number.
- `staleness`: `replay.max_staleness` in the given values (0 = synchronous: admission lets the actors
  run only `trees_per_step` trees ahead, so they wait for every update) times actor counts; each
  variant gets the same wall-clock budget. Figures per variant: held-out EM against minutes and
  against trees trained, the learner's busy fraction, the sampler-to-trainer KL (mean `kl_behav_k3`),
  and the minutes to reach warm start + `target_gain` EM when a periodic evaluation saw it.
- `compare`: `chain` (credit grpo), `tree-grpo` (tree-grpo), `arpo` (grpo: ARPO's advantage is
  trajectory-level) and `at2po` (at2po), each for the given seeds, every run ended at the same number
  of generated tokens (`token_budget`) or the time budget, whichever comes first; the table gives the
  held-out EM mean and standard deviation over seeds.
- Results: `<out>/results.json` (every variant's summary) and PNG plots; `at2po experiment ...`
  prints the headline table.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common.config import RunConfig, build_config
from common.log import get_logger
from ops.local_run import LocalRun
from ops.report import load_history

ALGORITHMS: dict[str, dict[str, str]] = {
    "chain": {"tree.builder": "chain", "learner.credit": "grpo"},
    "tree-grpo": {"tree.builder": "tree-grpo", "learner.credit": "tree-grpo"},
    "arpo": {"tree.builder": "arpo", "learner.credit": "grpo"},
    "at2po": {"tree.builder": "at2po", "learner.credit": "at2po"},
}

log = get_logger("ops.experiments")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    group: str = ""  # variants of one group are aggregated (e.g. seeds of an algorithm)


@dataclass
class SweepResult:
    variants: list[Variant]
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)


def with_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    data = config.model_dump()
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        data[section][key] = value
    return build_config(data)


def staleness_variants(values: Sequence[int], actor_counts: Sequence[int]) -> list[Variant]:
    return [
        Variant(
            f"staleness{s}-actors{a}",
            {"replay.max_staleness": s, "supervisor.actors": a},
            group=f"actors{a}",
        )
        for a in actor_counts
        for s in values
    ]


def compare_variants(algorithms: Sequence[str], seeds: Sequence[int]) -> list[Variant]:
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; known: {sorted(ALGORITHMS)}")
    return [
        Variant(
            f"{name}-seed{seed}",
            {**ALGORITHMS[name], "actor.seed": seed, "learner.seed": seed, "env.seed": seed},
            group=name,
        )
        for name in algorithms
        for seed in seeds
    ]


def run_sweep(
    config: RunConfig, variants: Sequence[Variant], out_dir: Path, token_budget: int | None = None
) -> SweepResult:
    """Run every variant in turn; the first one makes and evaluates the warm start, the others reuse it.

    Ctrl-C (or SIGTERM) ends the variant running then, as it ends `at2po run`, and the sweep with it:
    results.json keeps the variants done so far, the interrupted one included.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = SweepResult(list(variants))
    em_warmstart: float | None = None
    for variant in variants:
        run = LocalRun(
            with_overrides(config, variant.overrides),
            out_dir / variant.name,
            token_budget=token_budget,
            em_warmstart=em_warmstart,
        )
        summary = run.run()
        em_warmstart = summary.get("em_warmstart", em_warmstart)
        result.summaries[variant.name] = summary
        (out_dir / "results.json").write_text(
            json.dumps({"variants": [v.__dict__ for v in variants], "summaries": result.summaries}, indent=2) + "\n",
            encoding="utf-8",
        )
        if summary.get("stopped_by") == "interrupted":
            log.info("sweep interrupted", variant=variant.name, done=len(result.summaries), of=len(variants))
            break
    return result


# --------------------------------------------------------------------------------------- figures


def variant_curves(run_dir: Path) -> dict[str, Any]:
    """EM against minutes and trees trained, busy fraction and mean sampler-trainer KL of one run."""
    history = load_history(run_dir)
    start = history.started_ts or 0.0
    steps = history.learner_steps
    trees_at: list[tuple[float, int]] = []
    total = 0
    for step in steps:
        total += int(step.get("trees", 0))
        trees_at.append((float(step["ts"]), total))

    def trees_before(ts: float) -> int:
        done = [n for t, n in trees_at if t <= ts]
        return done[-1] if done else 0

    evals = [e for e in history.evals if isinstance(e.get("em"), int | float)]
    kl = [float(s["kl_behav_k3"]) for s in steps if isinstance(s.get("kl_behav_k3"), int | float)]
    return {
        "minutes": [(float(e["ts"]) - start) / 60 for e in evals],
        "trees": [trees_before(float(e["ts"])) for e in evals],
        "em": [float(e["em"]) for e in evals],
        "busy_fraction": history.learner_busy_fraction(),
        "kl_behav_k3_mean": sum(kl) / len(kl) if kl else math.nan,
    }


def minutes_to_target(curve: dict[str, Any], target: float) -> float | None:
    for minute, em in zip(curve["minutes"], curve["em"], strict=True):
        if em >= target:
            return minute
    return None


def staleness_table(result: SweepResult, out_dir: Path, target_gain: float = 10.0) -> list[dict[str, Any]]:
    rows = []
    for variant in result.variants:
        summary = result.summaries.get(variant.name, {})
        curve = variant_curves(out_dir / variant.name)
        base = summary.get("em_warmstart")
        rows.append(
            {
                "variant": variant.name,
                "max_staleness": variant.overrides.get("replay.max_staleness"),
                "actors": variant.overrides.get("supervisor.actors"),
                "em_warmstart": base,
                "em_final": summary.get("em_final"),
                "minutes": summary.get("minutes"),
                "trees_done": summary.get("trees_done"),
                "learner_busy_fraction": _clean(curve["busy_fraction"]),
                "kl_behav_k3_mean": _clean(curve["kl_behav_k3_mean"]),
                "minutes_to_target": minutes_to_target(curve, base + target_gain) if base is not None else None,
            }
        )
    return rows


def plot_staleness(result: SweepResult, out_dir: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names, busy, kls = [], [], []
    for variant in result.variants:
        curve = variant_curves(out_dir / variant.name)
        axes[0][0].plot(curve["minutes"], curve["em"], marker="o", label=variant.name)
        axes[0][1].plot(curve["trees"], curve["em"], marker="o", label=variant.name)
        names.append(variant.name)
        busy.append(_clean(curve["busy_fraction"]) or 0.0)
        kls.append(_clean(curve["kl_behav_k3_mean"]) or 0.0)
    axes[0][0].set(xlabel="minutes", ylabel="held-out EM (%)", title="EM against wall-clock time")
    axes[0][1].set(xlabel="trees trained", ylabel="held-out EM (%)", title="EM against samples")
    axes[1][0].bar(names, busy)
    axes[1][0].set(ylabel="learner busy fraction", ylim=(0, 1.05))
    axes[1][1].bar(names, kls)
    axes[1][1].set(ylabel="mean sampler-to-trainer KL (k3)")
    for ax in (axes[1][0], axes[1][1]):
        ax.tick_params(axis="x", rotation=30)
    for ax in (axes[0][0], axes[0][1]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "staleness.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_table(result: SweepResult) -> list[dict[str, Any]]:
    by_group: dict[str, list[dict[str, Any]]] = {}
    for variant in result.variants:
        by_group.setdefault(variant.group, []).append(result.summaries.get(variant.name, {}))
    rows = []
    for group, summaries in by_group.items():
        ems = [s["em_final"] for s in summaries if isinstance(s.get("em_final"), int | float)]
        tokens = [s.get("generated_tokens") or 0 for s in summaries]
        rows.append(
            {
                "algorithm": group,
                "seeds": len(summaries),
                "em_final_mean": statistics.fmean(ems) if ems else None,
                "em_final_std": statistics.pstdev(ems) if len(ems) > 1 else 0.0 if ems else None,
                "em_warmstart": summaries[0].get("em_warmstart") if summaries else None,
                "generated_tokens_mean": statistics.fmean(tokens) if tokens else None,
            }
        )
    return rows


def plot_compare(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["algorithm"] for r in rows]
    means = [r["em_final_mean"] or 0.0 for r in rows]
    stds = [r["em_final_std"] or 0.0 for r in rows]
    ax.bar(names, means, yerr=stds, capsize=4)
    base = rows[0]["em_warmstart"] if rows else None
    if isinstance(base, int | float):
        ax.axhline(base, color="grey", ls="--", label=f"warm start {base:.1f}")
        ax.legend()
    ax.set_ylabel("held-out EM (%) at equal generated tokens")
    fig.tight_layout()
    path = out_dir / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _clean(value: float) -> float | None:
    return value if isinstance(value, int | float) and math.isfinite(value) else None
