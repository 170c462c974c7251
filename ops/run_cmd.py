"""`at2po run` (the embedded default, every role local) and `at2po report RUN_DIR`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from common.config import ConfigError
from common.log import configure_logging
from ops.replay_cmd import ConfigOption, SetOption, load_or_exit

# `at2po run` without --config: the embedded default, sized for the tiny policy on a 2-core CPU (turns of the
# synthetic world are short; a learner step needs 8 trees; a checkpoint and a held-out evaluation every 5
# steps draw the EM curve; one retrieved sentence per search keeps trees short; the warm start takes many small
# steps, which a tiny policy learns from far better than from few large ones; plain EM as the reward: with
# AT2PO's format penalty and hardly any correct leaf, RL learnt that answering without searching avoids the
# penalty, and held-out EM fell 4.0 -> 0.5 in 30 steps).
# RL trains on world 2 and is evaluated on world 3, never on worlds 0 and 1, whose text the tiny tokenizer was
# trained on (`actors.tiny_model.world_training_texts`): there BPE made many names one token of their own, which
# the policy cannot copy. With RL on world 0, 6.6% of its one-hop trees held a correct leaf (0 of 81 whose
# answer was one such token); on world 2, 36% and 41% in two runs.
# The warm start sees 3,000 demonstrations from 30 fresh-named worlds for 5 epochs rather than 1,500 from 10 for
# 10 (the same 1,814 steps): more distinct names teach copying instead of memorising, held-out demonstration loss
# 0.43 -> 0.23 and warm-start EM on world 3 14.5 -> 27.0. From that warm start RL samples at the papers'
# temperature 1.0 (the config default): +8.5 EM in about 5.5 minutes of RL against +5.5 at 0.6, whose trees more
# often had every leaf alike (4.8 of 8 trees a step skipped for zero advantage against 4.0).
# (Those figures are from the 2026-12-04 install; README gives the 2026-12-06 fresh install's, lower ones.)
# A --config file replaces these; --set still overrides either.
EMBEDDED_OVERRIDES = (
    "tree.max_new_tokens=96",
    "replay.trees_per_step=8",
    "learner.checkpoint_every=5",
    "supervisor.eval_every_steps=5",
    "search.result_style=snippet",
    "search.topk=1",
    "sft.epochs=5",
    "sft.n_demos=3000",
    "sft.demo_worlds=30",
    "sft.batch_tokens=2048",
    "sft.micro_batch_tokens=2048",
    "env.reward=search_r1_em",
    "tasks.train_seed=2",
    "tasks.test_seed=3",
)


def embedded_overrides(config: Path | None) -> tuple[str, ...]:
    """The embedded default's settings when no --config is given (`at2po run` and the experiments alike)."""
    return EMBEDDED_OVERRIDES if config is None else ()


OutOption = Annotated[Path | None, typer.Option("--out", help="run directory (default: supervisor.out_dir)")]
MinutesOption = Annotated[
    float | None, typer.Option("--max-minutes", help="wall-clock budget (default: supervisor.max_minutes)")
]


def run_command(
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    max_minutes: MinutesOption = None,
) -> None:
    """Tiny policy, warm start, then replay + actors + learner training with AT2PO, evaluation and a report."""
    extra = [*embedded_overrides(config), *(overrides or [])]
    if max_minutes is not None:
        extra.append(f"supervisor.max_minutes={max_minutes}")
    run_config = load_or_exit(config, extra)
    configure_logging(run_config.logging.level, run_config.logging.json_logs, role="supervisor")
    from ops.local_run import LocalRun

    out_dir = out or Path(run_config.supervisor.out_dir)
    if (out_dir / "metrics").exists():  # never mix two runs' metrics: a used directory gets a dated sibling
        out_dir = out_dir.with_name(f"{out_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        typer.echo(f"{out or run_config.supervisor.out_dir} holds an earlier run; writing to {out_dir}", err=True)
    try:
        summary = LocalRun(run_config, out_dir).run()
    except (ConfigError, RuntimeError) as error:
        typer.echo(f"at2po run failed: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(summary))
    if summary.get("em_warmstart") is not None:
        typer.echo(
            f"held-out EM: warm start {summary['em_warmstart']:.1f} -> final "
            f"{summary['em_final'] if summary['em_final'] is None else format(summary['em_final'], '.1f')}; "
            f"report: {out_dir / 'report.md'}",
            err=True,
        )


def report_command(run_dir: Annotated[Path, typer.Argument(help="a run directory written by `at2po run`")]) -> None:
    """Draw the run's plots (PNG) and write report.md and report.html into the run directory."""
    from ops.report import write_report

    if not (run_dir / "metrics").is_dir():
        typer.echo(f"{run_dir} has no metrics/ directory: not an at2po run directory", err=True)
        raise typer.Exit(2)
    typer.echo(str(write_report(run_dir)))
