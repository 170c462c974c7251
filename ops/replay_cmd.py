"""`at2po replay ...`: serve the tree-replay store, query its stats, export its trees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from common.config import ConfigError, RunConfig, load_config
from common.log import configure_logging

replay_app = typer.Typer(help="The tree-replay service (LMDB store behind a ZeroMQ ROUTER).", no_args_is_help=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML run configuration")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key: section.key=value")]


def load_or_exit(config: Path | None, overrides: list[str] | None) -> RunConfig:
    """Load the run configuration, turning a bad key or value into a one-line error and exit code 2."""
    try:
        return load_config(config, overrides or [])
    except ConfigError as error:
        typer.echo(f"configuration error: {error}", err=True)
        raise typer.Exit(2) from None


@replay_app.command("serve")
def serve(
    config: ConfigOption = None,
    store_dir: Annotated[Path | None, typer.Option("--dir", help="store directory (default: replay.dir)")] = None,
    endpoint: Annotated[str | None, typer.Option(help="bind endpoint (default: transport.replay_endpoint)")] = None,
    overrides: SetOption = None,
) -> None:
    """Run the replay service until SIGTERM/SIGINT."""
    from common.transport import SecurityError
    from replay.limits import DeadlockConfigError
    from replay.service import ReplayService

    run_config = load_or_exit(config, overrides)
    configure_logging(run_config.logging.level, run_config.logging.json_logs, role="replay")
    try:
        service = ReplayService(run_config, store_dir=store_dir, endpoint=endpoint)
    except DeadlockConfigError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    except SecurityError as error:
        typer.echo(f"refusing to start: {error}", err=True)
        raise typer.Exit(2) from None
    service.serve_forever()


@replay_app.command("stats")
def stats(
    config: ConfigOption = None,
    endpoint: Annotated[str | None, typer.Option(help="service endpoint (default: transport.replay_endpoint)")] = None,
    timeout_s: Annotated[float, typer.Option(help="give up after this many seconds")] = 5.0,
    overrides: SetOption = None,
) -> None:
    """Print the running service's counters as JSON."""
    from common.replay_client import LearnerReplayClient, ReplayTimeout

    run_config = load_or_exit(config, overrides)
    target = endpoint or run_config.transport.replay_endpoint
    with LearnerReplayClient(target, run_config.transport) as client:
        try:
            figures = client.stats(timeout_s=timeout_s)
        except ReplayTimeout as error:
            typer.echo(f"no answer from {target}: {error}", err=True)
            raise typer.Exit(1) from None
    typer.echo(json.dumps(figures, indent=2, sort_keys=True))


@replay_app.command("export")
def export(
    store_dir: Annotated[Path, typer.Option("--dir", help="store directory")],
    out: Annotated[Path, typer.Option("--out", help="output file")],
    file_format: Annotated[str, typer.Option("--format", help="output format (parquet)")] = "parquet",
    include_growing: Annotated[bool, typer.Option(help="also export trees that are not complete")] = False,
) -> None:
    """Write the stored trees as a table, one row per node (readable by pyarrow, pandas, DuckDB)."""
    import lmdb

    from replay.export import export_parquet

    if file_format != "parquet":
        typer.echo(f"unknown format {file_format!r}; supported: parquet", err=True)
        raise typer.Exit(2)
    if not (store_dir / "data.mdb").is_file():
        typer.echo(f"{store_dir} holds no replay store (no data.mdb)", err=True)
        raise typer.Exit(2)
    try:
        summary = export_parquet(store_dir, out, include_growing=include_growing)
    except lmdb.Error as error:
        typer.echo(f"{store_dir} is not a readable at2po replay store: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary))
