"""The `at2po` command line: one typer app; each role registers its sub-commands here."""

from __future__ import annotations

import typer

from ops.actor_cmd import actor_app
from ops.bench_cmd import bench_app
from ops.cluster_cmd import cluster_app
from ops.config_cmd import config_app
from ops.eval_cmd import eval_app
from ops.experiment_cmd import experiment_app
from ops.keys_cmd import keys_app
from ops.learner_cmd import learner_app
from ops.model_cmd import model_app
from ops.replay_cmd import replay_app
from ops.retriever_cmd import retriever_app
from ops.run_cmd import report_command, run_command
from ops.sft_cmd import sft_app
from ops.world_cmd import world_app

app = typer.Typer(
    name="at2po",
    help="Train multi-turn tool-using LLM agents with AT2PO as an asynchronous actor-learner system.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(replay_app, name="replay")
app.add_typer(bench_app, name="bench")
app.add_typer(config_app, name="config")
app.add_typer(retriever_app, name="retriever")
app.add_typer(world_app, name="world")
app.add_typer(model_app, name="model")
app.add_typer(actor_app, name="actor")
app.add_typer(learner_app, name="learner")
app.command("run")(run_command)
app.command("report")(report_command)
app.add_typer(experiment_app, name="experiment")
app.add_typer(cluster_app, name="cluster")
app.add_typer(eval_app, name="eval")
app.add_typer(sft_app, name="sft")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
