"""`at2po learner run`: the learner role (one or `learner.processes` data-parallel ranks)."""

from __future__ import annotations

import json
import threading
from typing import Annotated

import typer

from common.config import ConfigError
from common.log import configure_logging, get_logger
from ops.replay_cmd import ConfigOption, SetOption, load_or_exit

learner_app = typer.Typer(help="The learner: turn-wise credit, ATPO updates with DeepSpeed, weight broadcast.")
log = get_logger("ops.learner")


@learner_app.callback()
def _group() -> None:
    """Learner."""


@learner_app.command("run")
def run(
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest complete checkpoint")] = False,
) -> None:
    """Train until SIGTERM/SIGINT or `learner.max_steps`; checkpoints on the way out (exit 0)."""
    run_config = load_or_exit(config, overrides)
    configure_logging(run_config.logging.level, run_config.logging.json_logs, role="learner")
    from learner.launch import install_stop_handlers, run_learner
    from learner.loop import connection_errors, describe

    stop = threading.Event()
    if run_config.learner.processes == 1:
        install_stop_handlers(stop)
    try:
        summary = run_learner(run_config, resume=resume, stop=stop)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as error:
        typer.echo(f"learner cannot start: {error}", err=True)
        raise typer.Exit(2) from None
    except connection_errors() as error:
        typer.echo(f"learner stopped: {error}", err=True)
        raise typer.Exit(3) from None
    typer.echo(json.dumps(describe(summary)))
