"""`at2po bench ...`: benchmarks that print JSON figures, each against a baseline from the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ops.bench_learner import bench_learner_command
from ops.bench_retrieval import bench_retrieval_command
from ops.bench_rollout import bench_rollout_command
from ops.bench_world import bench_world_command

bench_app = typer.Typer(help="Benchmarks (JSON figures; ratios against a baseline measured in the same run).")
bench_app.command("retrieval")(bench_retrieval_command)
bench_app.command("world")(bench_world_command)
bench_app.command("rollout")(bench_rollout_command)
bench_app.command("learner")(bench_learner_command)


@bench_app.callback()
def _group() -> None:
    """Benchmarks."""


@bench_app.command("replay")
def replay(
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON object")] = False,
    total_mb: Annotated[float, typer.Option(help="bytes streamed by all clients together, in MB")] = 1024.0,
    clients: Annotated[int, typer.Option(help="concurrent actor client processes")] = 2,
    message_kb: Annotated[float, typer.Option(help="size of one subtree message")] = 256.0,
    messages_per_tree: Annotated[int, typer.Option(help="subtree messages per tree")] = 1,
    sample_trees: Annotated[int, typer.Option(help="trees per sample batch")] = 64,
    sample_interval_s: Annotated[float, typer.Option(help="pause between sample requests")] = 0.1,
    work_dir: Annotated[Path | None, typer.Option(help="where the temporary stores go")] = None,
) -> None:
    """Ingest through ZeroMQ vs raw LMDB, and sample latency while ingest runs."""
    from ops.bench_replay import BenchSettings, run_replay_bench

    settings = BenchSettings(
        total_mb=total_mb,
        clients=clients,
        message_kb=message_kb,
        messages_per_tree=messages_per_tree,
        sample_trees=sample_trees,
        sample_interval_s=sample_interval_s,
    )
    if not as_json:
        typer.echo(f"at2po bench replay: {settings}", err=True)
    figures = run_replay_bench(settings, work_dir)
    typer.echo(json.dumps(figures, indent=None if as_json else 2))
