"""`at2po bench rollout`: tokens per leaf of each tree builder at equal leaves, and the backend's speed.

Decided interface: the tiny policy (`at2po model init-tiny` defaults, built in a temporary folder
unless `--model-dir` is given) runs on the synthetic world (search tool over a local BM25 index,
ARPO/AT²PO protocol) for `prompts` training tasks. At the same number of leaves per prompt (22, the
paper's AT²PO setting), each builder's generated tokens per leaf are measured on the same tasks
with the same seeds:
- `chain`: 22 independent chains (GRPO's group);
- `tree-grpo`: M=2 trees of N=5 expansions over L=2 rounds (2 × (1 + 2·5) = 22 leaves);
- `at2po`: M=10, L=2, K=6 (10 + 2·6 = 22 leaves).
`at2po_vs_chain` is at2po's tokens per leaf over chain's (the papers claim about 16/22 = 0.73);
`tree_grpo_vs_chain` likewise. `backend_speedup` is the torch backend's generated tokens/s in one
batch over transformers' `generate` called request by request on the same contexts, in the same run.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from common.config import build_config
from common.log import configure_logging

LEAVES = 22
BUILDERS: dict[str, dict[str, Any]] = {
    "chain": {"chains": LEAVES},
    "tree-grpo": {"trees": 2, "expansions": 5, "rounds": 2},
    "at2po": {"initial_chains": 10, "rounds": 2, "expansions": 6},
}


async def grow_trees(
    builder: Any, tasks: list[Any], env: Any, backend: Any, codec: Any, max_new_tokens: int
) -> list[Any]:
    """Every task's trees from `builder`, all concurrently (their turns meet in one scheduler's batches).

    Shared with `at2po bench learner`, which trains on the trees; seeds are 1000·task index + copy.
    """
    from actors.builders.common import Budget, TreeJob
    from actors.generation import SamplingParams
    from actors.scheduler import GenerationScheduler

    sampling = SamplingParams(temperature=1.0)
    scheduler = GenerationScheduler(backend, sampling, max_batch=64)
    budget = Budget(max_new_tokens=max_new_tokens)
    try:
        return list(
            await asyncio.gather(
                *(
                    builder.build(
                        TreeJob(task, env, scheduler, codec, sampling, seed=1000 * index + copy, budget=budget)
                    )
                    for index, task in enumerate(tasks)
                    for copy in range(builder.trees_per_task)
                )
            )
        )
    finally:
        scheduler.close()


async def _measure_builder(
    name: str, options: dict[str, Any], tasks: list[Any], env: Any, backend: Any, codec: Any, max_new_tokens: int
) -> dict[str, Any]:
    from actors.builders.registry import make_builder

    started = time.perf_counter()
    builds = await grow_trees(make_builder(name, **options), tasks, env, backend, codec, max_new_tokens)
    tokens = sum(b.generated_tokens for b in builds)
    leaves = sum(b.leaves for b in builds)
    return {
        "tokens_per_leaf": round(tokens / max(1, leaves), 2),
        "leaves_per_prompt": round(leaves / len(tasks), 2),
        "generated_tokens": tokens,
        "wall_s": round(time.perf_counter() - started, 2),
    }


@dataclass(frozen=True)
class RolloutWorld:
    """The tiny policy on the synthetic world: what a builder needs to grow trees."""

    tasks: list[Any]
    env: Any
    policy: Any
    codec: Any
    backend: Any


def open_world(scratch: Path, prompts: int, seed: int, model_dir: Path | None) -> RolloutWorld:
    """The synthetic world under `scratch`, and the policy (a fresh tiny one there unless `model_dir`)."""
    from actors.backend_torch import TorchBackend
    from actors.chat import ChatCodec
    from actors.policy_model import load_policy
    from actors.tiny_model import init_tiny_model
    from tools_env.factory import build_environment, prepare_tasks

    if model_dir is None:
        model_dir = init_tiny_model(scratch / "model")
    config = build_config(
        {
            "tasks": {"data_dir": str(scratch / "world"), "n_train": max(prompts, 10), "n_test": 5},
            "env": {"max_turns": 4},
        }
    )
    splits = prepare_tasks(config)
    env = build_environment(config, splits.corpus_path)
    policy = load_policy(model_dir)
    codec = ChatCodec.from_policy(policy)
    backend = TorchBackend(policy.model, policy.tokenizer, max_batch=64, seed=seed)
    return RolloutWorld(list(splits.train[:prompts]), env, policy, codec, backend)


def run_rollout_bench(prompts: int, max_new_tokens: int, seed: int, model_dir: Path | None) -> dict[str, Any]:
    from actors.backend_torch import measure_backend_speedup

    with tempfile.TemporaryDirectory(prefix="at2po-bench-rollout-") as scratch:
        world = open_world(Path(scratch), prompts, seed, model_dir)
        figures: dict[str, Any] = {
            "prompts": prompts,
            "leaves_per_prompt_target": LEAVES,
            "max_new_tokens": max_new_tokens,
        }
        for name, options in BUILDERS.items():
            figures[name] = asyncio.run(
                _measure_builder(name, options, world.tasks, world.env, world.backend, world.codec, max_new_tokens)
            )
        speed = measure_backend_speedup(world.policy.model, world.policy.tokenizer, seed=seed)
    chain = figures["chain"]["tokens_per_leaf"]
    figures["chain_tokens_per_leaf"] = chain
    figures["tree_grpo_tokens_per_leaf"] = figures["tree-grpo"]["tokens_per_leaf"]
    figures["at2po_tokens_per_leaf"] = figures["at2po"]["tokens_per_leaf"]
    figures["tree_grpo_vs_chain"] = round(figures["tree_grpo_tokens_per_leaf"] / chain, 3)
    figures["at2po_vs_chain"] = round(figures["at2po_tokens_per_leaf"] / chain, 3)
    figures["backend_tokens_per_s"] = round(speed["backend_tokens_per_s"], 1)
    figures["hf_generate_tokens_per_s"] = round(speed["hf_tokens_per_s"], 1)
    figures["backend_speedup"] = round(speed["speedup"], 2)
    return figures


def bench_rollout_command(
    prompts: Annotated[int, typer.Option(help="training tasks rolled out by each builder")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens generated per turn")] = 64,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    model_dir: Annotated[Path | None, typer.Option(help="policy directory (default: a fresh tiny model)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON object")] = False,
) -> None:
    """Tree builders at equal leaves per prompt (tokens per leaf) and the torch backend's speedup."""
    configure_logging("warning" if as_json else "info", role="bench")
    figures = run_rollout_bench(prompts, max_new_tokens, seed, model_dir)
    typer.echo(json.dumps(figures, indent=None if as_json else 2))
