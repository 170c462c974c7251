"""`at2po eval`: greedy EM/F1 of a model directory on a task split, as a table and as JSON.

Decided interface: `at2po eval [--config F] [--set k=v ...] --model DIR [--split test|train]
[--limit N] [--concurrency N] [--out FILE.json] [--json]`. `eval_app` is a one-command typer app
(registered with `app.add_typer(eval_app, name="eval")`). The table (per data source, per hop count,
then both averages, labelled with the paper that uses each) goes to stdout, progress to stderr.
`--json` prints the report JSON instead, without the per-episode records; `--out` writes the full
report (with one record per episode). A bad config, split or model directory exits 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.config import ConfigError
from common.log import configure_logging
from ops.evaluation import EvalReport, GroupScores
from ops.replay_cmd import ConfigOption, SetOption, load_or_exit

eval_app = typer.Typer(help="Greedy held-out evaluation of a policy: EM/F1 per data source and averaged.")


def report_table(report: EvalReport) -> Table:
    """Rows per source and hop count, then the size-weighted and the plain average (they differ by paper)."""
    table = Table(title=f"{report.model_dir} on {report.split} ({report.n_episodes} episodes, greedy)")
    for column in ("group", "n", "EM %", "F1 %", "turns", "tool calls", "format valid"):
        table.add_column(column, justify="left" if column == "group" else "right")

    def row(name: str, scores: GroupScores) -> None:
        table.add_row(
            name,
            str(scores.n),
            f"{scores.em:.2f}",
            f"{scores.f1:.2f}",
            f"{scores.mean_turns:.2f}",
            f"{scores.mean_tool_calls:.2f}",
            f"{scores.format_valid_fraction:.2f}",
        )

    for name, scores in report.by_source.items():
        row(f"source {name}", scores)
    for hops, scores in report.by_hops.items():
        row(f"  {hops}-hop", scores)
    table.add_section()
    table.add_row(
        "Avg, weighted by size (AT²PO)",
        str(report.n_episodes),
        f"{report.em_weighted_by_size:.2f}",
        f"{report.f1_weighted_by_size:.2f}",
        f"{report.mean_turns:.2f}",
        f"{report.mean_tool_calls:.2f}",
        f"{report.format_valid_fraction:.2f}",
        style="bold",
    )
    table.add_row(
        "Avg, mean of sources (Tree-GRPO)",
        str(len(report.by_source)),
        f"{report.em_mean_of_sources:.2f}",
        f"{report.f1_mean_of_sources:.2f}",
        "",
        "",
        "",
    )
    return table


@eval_app.callback(invoke_without_command=True)
def eval_command(
    model: Annotated[Path, typer.Option("--model", help="model directory (HF format; a checkpoint's model/)")],
    config: ConfigOption = None,
    overrides: SetOption = None,
    split: Annotated[str, typer.Option("--split", help="task split: test (held out) or train")] = "test",
    limit: Annotated[int | None, typer.Option("--limit", help="first N tasks of the split", min=1)] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", help="episodes at once (default: actor.max_batch)", min=1)
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the full JSON report (with episodes) here")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the JSON report (no episodes) instead of a table")
    ] = False,
) -> None:
    """Greedy (temperature 0) rollouts of a model directory: EM/F1 per data source and both averages."""
    from actors.policy_model import ModelDirError
    from ops.evaluation import evaluate

    run_config = load_or_exit(config, overrides)
    configure_logging("warning" if as_json else run_config.logging.level, run_config.logging.json_logs, role="eval")
    errors = Console(stderr=True)
    done = 0

    def progress(_record: object) -> None:
        nonlocal done
        done += 1
        if not as_json and (done % 10 == 0):
            errors.print(f"eval: {done} episodes done", highlight=False)

    try:
        report = evaluate(run_config, model, split=split, limit=limit, concurrency=concurrency, on_episode=progress)
    except (ConfigError, ModelDirError, ValueError) as error:
        typer.echo(f"eval cannot run: {error}", err=True)
        raise typer.Exit(2) from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.to_json() + "\n", encoding="utf-8")
    if as_json:
        typer.echo(report.to_json(include_episodes=False))
        return
    console = Console()
    console.print(report_table(report))
    console.print(
        f"{report.seconds:.1f} s rollouts ({report.episodes_per_s:.2f} episodes/s, "
        f"{report.generated_tokens_per_s:.0f} tokens/s, mean batch {report.mean_batch_size:.1f}), "
        f"{report.load_seconds:.1f} s loading" + (f"; report written to {out}" if out is not None else ""),
        highlight=False,
    )
