"""`at2po cluster run | status | stop`: the run's roles as Ray actors on an existing Ray cluster.

`run` joins the cluster as a Ray driver, places the roles (see `ops/cluster.py`) and, unless
`--detach`, stays to print the roles' output prefixed with `role@node` and their restarts. It ends
the run (actors, then the learner, then replay) on Ctrl-C or SIGTERM, when the learner finishes or
gives up, when replay gives up, or, without a learner, when every actor is done; if the roles were
stopped from elsewhere (`at2po cluster stop`) it just leaves. `status` and `stop` find a run by its
name (`cluster.name`, the Ray namespace), so they work from any machine that can join the cluster.
Exit codes: 0 done, 1 the run could not be placed or a role it depends on failed, 2 bad configuration.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from common.config import ClusterConfig, RunConfig
from ops import cluster
from ops.replay_cmd import ConfigOption, SetOption, load_or_exit

cluster_app = typer.Typer(
    help="Run replay, the actors and the learner as Ray actors on a Ray cluster (placement, restarts, logs).",
    no_args_is_help=True,
)

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address HOST:PORT (default: RAY_ADDRESS, else a local cluster)"),
]
NameOption = Annotated[str | None, typer.Option("--name", help="run name (default: cluster.name of the config)")]
POLL_S = 0.5


def _say(text: str) -> None:
    typer.echo(f"[cluster] {text}", err=True)


def _connect(address: str | None, namespace: str) -> None:
    try:
        cluster.connect(address, namespace)
    except cluster.ClusterError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


def _run_name(name: str | None, config: Path | None, overrides: list[str] | None) -> str:
    if name is not None:
        try:
            ClusterConfig(name=name)  # the same rule as the config's
        except ValidationError as error:
            raise typer.BadParameter(error.errors()[0]["msg"], param_hint="--name") from None
        return name
    return load_or_exit(config, overrides).cluster.name


class _Interrupt:
    """Ctrl-C and SIGTERM set a flag; the follow loop stops the run cleanly when it sees it."""

    def __init__(self) -> None:
        self.signalled = False

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.signalled = True


def _print_lines(follower: cluster.LogFollower) -> None:
    for name, line in follower.poll():
        typer.echo(f"{name}@{follower.nodes.get(name, '?')} | {line}")


def _follow(
    launched: cluster.Launched, follower: cluster.LogFollower, config: RunConfig, interrupt: _Interrupt
) -> tuple[str, int]:
    """Print role output until the run should end; returns (reason, exit code) without stopping anything."""
    known: dict[str, tuple[str, int]] = {}
    nodes = follower.nodes
    next_status = 0.0
    while True:
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + 2.0
            for row in cluster.statuses(launched.handles):
                if row.node_ip:
                    nodes[row.name] = row.node_ip
                previous = known.get(row.name)
                known[row.name] = (row.state, row.restarts)
                if previous is not None and previous != known[row.name]:
                    _say(f"{row.name}: {row.state}, restarts {row.restarts}")
            ended = _run_ended(known, config)
            if ended is not None:
                return ended
        _print_lines(follower)
        if interrupt.signalled:
            return "interrupted", 0
        if set(launched.handles) <= follower.gone:
            return "roles were stopped from elsewhere", 0
        time.sleep(POLL_S)


def _run_ended(known: dict[str, tuple[str, int]], config: RunConfig) -> tuple[str, int] | None:
    """Why the run is over (from the roles' states), or None while it goes on."""
    state = {name: value[0] for name, value in known.items()}
    if state.get(cluster.REPLAY) == "failed":
        return "replay failed", 1
    if config.cluster.learner:
        if state.get(cluster.LEARNER) == "failed":
            return "learner failed", 1
        if state.get(cluster.LEARNER) == "finished":
            return "learner finished", 0
        return None
    actors = [s for name, s in state.items() if name.startswith("actor-")]
    if actors and all(s in ("finished", "failed") for s in actors):
        return ("actors finished", 0) if any(s == "finished" for s in actors) else ("every actor failed", 1)
    return None


@cluster_app.command("run")
def run(
    address: AddressOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    detach: Annotated[bool, typer.Option("--detach", help="place the roles and return; they keep running")] = False,
) -> None:
    """Place replay, `cluster.actors` actors and the learner on the Ray cluster and follow their output."""
    run_config = load_or_exit(config, overrides)
    _connect(address, run_config.cluster.name)
    interrupt = _Interrupt()
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launched = cluster.launch(run_config, _say, cancelled=lambda: interrupt.signalled)
        if launched.operator_keys is not None:
            keys = launched.operator_keys
            _say(
                "CurveZMQ keys were generated for this run; to query replay from here use "
                f"--set transport.server_public_key={keys / 'server.key'} "
                f"--set transport.client_secret_key={keys / (cluster.OPERATOR + '.key_secret')}"
            )
        if detach:
            _say(f"detached; `at2po cluster status --name {run_config.cluster.name}` shows the roles")
            return
        follower = cluster.LogFollower(launched.handles)
        reason, code = _follow(launched, follower, run_config, interrupt)
        _say(f"ending the run: {reason}")
        if reason != "roles were stopped from elsewhere":
            cluster.stop_roles(launched.handles, run_config.cluster.stop_grace_s, _say, lambda: _print_lines(follower))
        if launched.operator_keys is not None:
            shutil.rmtree(launched.operator_keys, ignore_errors=True)
        raise typer.Exit(code)
    except cluster.ClusterError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cluster.disconnect()


def _table(rows: list[cluster.RoleStatus]) -> str:
    header = ("role", "node", "state", "pid", "restarts", "last exit", "uptime s", "endpoints")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.name,
                row.node_ip or "-",
                row.state,
                str(row.pid) if row.pid is not None else "-",
                str(row.restarts),
                str(row.last_exit) if row.last_exit is not None else "-",
                f"{row.uptime_s:.0f}",
                " ".join(row.endpoints.values()) or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


@cluster_app.command("status")
def status(
    address: AddressOption = None,
    name: NameOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line, one per role")] = False,
) -> None:
    """Each role's node, state, process id, restarts and endpoints (exit 1 if no run has that name)."""
    run_name = _run_name(name, config, overrides)
    _connect(address, run_name)
    try:
        rows = cluster.statuses()
    finally:
        cluster.disconnect()
    if not rows:
        typer.echo(f"no run named {run_name!r} on this cluster", err=True)
        raise typer.Exit(1)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row.as_dict(), sort_keys=True))
    else:
        typer.echo(_table(rows))


@cluster_app.command("stop")
def stop(
    address: AddressOption = None,
    name: NameOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    grace_s: Annotated[
        float | None, typer.Option("--grace-s", help="SIGTERM-to-SIGKILL time per role (default: cluster.stop_grace_s)")
    ] = None,
) -> None:
    """Stop a run's roles (actors, learner, replay; SIGTERM first) and remove their Ray actors."""
    run_name = _run_name(name, config, overrides)
    settings = load_or_exit(config, overrides).cluster
    grace = grace_s if grace_s is not None else settings.stop_grace_s
    _connect(address, run_name)
    try:
        exits: dict[str, Any] = cluster.stop_roles(None, grace, _say)
    finally:
        cluster.disconnect()
    # The operator keys `run` wrote on this machine (if it ran here) served this run only.
    shutil.rmtree(Path(settings.node_dir).expanduser() / run_name / cluster.OPERATOR, ignore_errors=True)
    if not exits:
        typer.echo(f"no run named {run_name!r} on this cluster", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps({"stopped": exits}, sort_keys=True))


if __name__ == "__main__":
    cluster_app()
