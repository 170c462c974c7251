"""`at2po experiment staleness|compare`: sweeps of local runs, a results table and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.config import ConfigError, RunConfig
from common.log import configure_logging
from ops.replay_cmd import ConfigOption, SetOption, load_or_exit
from ops.run_cmd import embedded_overrides

experiment_app = typer.Typer(help="Experiment sweeps over `at2po run` (each variant a full local run).")
OutOption = Annotated[Path, typer.Option("--out", help="sweep directory (one run directory per variant)")]
MinutesOption = Annotated[float, typer.Option("--minutes", help="wall-clock budget of each run")]


@experiment_app.callback()
def _group() -> None:
    """Experiments."""


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None


def _sweep_config(config: Path | None, overrides: list[str] | None, minutes: float) -> RunConfig:
    """The run config every variant starts from (the embedded default without --config), logging set up."""
    run_config = load_or_exit(
        config, [*embedded_overrides(config), *(overrides or []), f"supervisor.max_minutes={minutes}"]
    )
    configure_logging(run_config.logging.level, run_config.logging.json_logs, role="experiment")
    return run_config


def _print_table(rows: list[dict[str, object]], title: str) -> None:
    table = Table(title=title)
    for key in rows[0] if rows else []:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console(stderr=True).print(table)


@experiment_app.command("staleness")
def staleness(
    out: OutOption = Path("runs/exp-staleness"),
    values: Annotated[str, typer.Option(help="replay.max_staleness values")] = "0,1,2,4,8",
    actors: Annotated[str, typer.Option(help="actor counts (second axis)")] = "2",
    minutes: MinutesOption = 15.0,
    target_gain: Annotated[float, typer.Option(help="EM points above the warm start that count as reached")] = 10.0,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """The same training at each max staleness (0 = synchronous) and actor count, side by side."""
    from ops.experiments import plot_staleness, run_sweep, staleness_table, staleness_variants

    run_config = _sweep_config(config, overrides, minutes)
    variants = staleness_variants(_ints(values, "--values"), _ints(actors, "--actors"))
    try:
        result = run_sweep(run_config, variants, out)
    except (ConfigError, RuntimeError) as error:
        typer.echo(f"experiment failed: {error}", err=True)
        raise typer.Exit(1) from None
    rows = staleness_table(result, out, target_gain)
    plot_staleness(result, out)
    (out / "staleness.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    _print_table(rows, "staleness sweep")
    typer.echo(json.dumps(rows))


@experiment_app.command("compare")
def compare(
    out: OutOption = Path("runs/exp-compare"),
    algorithms: Annotated[str, typer.Option(help="chain, tree-grpo, arpo, at2po")] = "chain,tree-grpo,arpo,at2po",
    seeds: Annotated[str, typer.Option(help="seeds per algorithm")] = "0,1,2",
    token_budget: Annotated[int, typer.Option(help="generated tokens per run (equal cost)")] = 2_000_000,
    minutes: MinutesOption = 15.0,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Chain-GRPO, Tree-GRPO, ARPO and AT2PO at an equal generated-token budget, over seeds."""
    from ops.experiments import compare_table, compare_variants, plot_compare, run_sweep

    run_config = _sweep_config(config, overrides, minutes)
    try:
        variants = compare_variants([a.strip() for a in algorithms.split(",") if a.strip()], _ints(seeds, "--seeds"))
        result = run_sweep(run_config, variants, out, token_budget=token_budget)
    except (ConfigError, RuntimeError, ValueError) as error:
        typer.echo(f"experiment failed: {error}", err=True)
        raise typer.Exit(1) from None
    rows = compare_table(result)
    plot_compare(rows, out)
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    _print_table(rows, "algorithms at equal generated tokens")
    typer.echo(json.dumps(rows))
