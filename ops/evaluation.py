"""Greedy evaluation of a policy directory on a task split: EM/F1 per data source and averaged.

Decided interface (`at2po eval` and the `at2po run` supervisor use it):
- `evaluate(config, model_dir, split="test", limit=None, concurrency=None) -> EvalReport` loads the
  model directory (the tiny policy, a warm-started one, or a learner checkpoint's `model/`) on the
  configured backend, builds the environment and tasks the config names, and runs one greedy
  (temperature 0, whatever `tree.temperature` says) trajectory per task. `limit` takes the first N
  tasks of the split in file order. `run_evaluation(tasks, env, backend, codec, ...)` is the same with
  the parts handed in (tests give it a scripted backend).
- One episode = the environment driven turn by turn through the actors' `GenerationScheduler`, with
  the chat codec's ids exactly as an actor builds them (prompt + turn ids + observation ids, never
  re-tokenised). Episodes run `concurrency` at a time (default `actor.max_batch`), so the scheduler
  batches their turns into one backend call. Per-turn budget: `tree.max_new_tokens` and
  `tree.max_context_tokens`; `tree.max_tree_tokens` (a training budget over a whole tree) is not
  applied.
- Scores are the environment's own: the answer the protocol extracts, SQuAD-normalised EM and token
  F1 (`tools_env.scoring`, via the reward's details), in percent (0-100). Turns are the policy turns
  of the episode, tool calls the calls the environment ran (calls over `env.max_tool_calls` are not
  run and not counted).
- The papers average differently (docs/algorithms.md, section 0): `em_weighted_by_size` is the mean
  over episodes, i.e. sources weighted by their number of tasks (AT²PO's "Avg."); `em_mean_of_sources`
  is the plain mean of the per-source EMs (Tree-GRPO's "Avg."). Same for F1. With one source the two
  are equal. Tasks whose metadata has `hops` are also grouped by hop count.
- `EvalReport.to_json()` holds the headline numbers at the top level (`em_weighted_by_size`, ...),
  `by_source`, `by_hops`, timing, the settings, and one record per episode.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actors.builders.common import Budget, Codec, derive_seed
from actors.generation import GenerationBackend, GenerationRequest, SamplingParams
from actors.scheduler import GenerationScheduler
from common.config import ConfigError, RunConfig
from common.tree import FinishReason
from tools_env.env import StepResult, ToolEnvironment
from tools_env.task import Task

GREEDY = SamplingParams(temperature=0.0, top_p=1.0)
SPLITS = ("test", "train")
AVERAGES = {
    "em_weighted_by_size": "mean over episodes = per-source EM weighted by the source's task count (AT2PO's Avg.)",
    "em_mean_of_sources": "plain mean of the per-source EMs, every source counts once (Tree-GRPO's Avg.)",
    "f1_weighted_by_size": "as em_weighted_by_size, for token F1",
    "f1_mean_of_sources": "as em_mean_of_sources, for token F1",
}
# The scheduler waits this long for more turns before a batch: a tool step of the other episodes takes
# a few milliseconds, and on CPU one bigger batch costs far less than two smaller ones.
GATHER_WINDOW_S = 0.02


@dataclass(frozen=True)
class EpisodeRecord:
    """One greedy trajectory: what the policy answered, how it scored, what it cost."""

    task_id: str
    data_source: str
    hops: int | None
    golden_answers: list[str]
    answer: str | None
    em: float  # percent: 0 or 100
    f1: float  # percent
    format_valid: bool
    reward: float
    turns: int
    tool_calls: int
    finish_reason: str
    generated_tokens: int
    response: str


@dataclass(frozen=True)
class GroupScores:
    """Scores of the episodes of one data source (or hop count)."""

    n: int
    em: float
    f1: float
    mean_turns: float
    mean_tool_calls: float
    format_valid_fraction: float

    @classmethod
    def of(cls, records: Sequence[EpisodeRecord]) -> GroupScores:
        n = len(records)
        return cls(
            n=n,
            em=_mean(r.em for r in records),
            f1=_mean(r.f1 for r in records),
            mean_turns=_mean(r.turns for r in records),
            mean_tool_calls=_mean(r.tool_calls for r in records),
            format_valid_fraction=_mean(float(r.format_valid) for r in records),
        )


@dataclass
class EvalReport:
    """Per-source and overall scores of one evaluation; both averages are named for what they are."""

    model_dir: str
    split: str
    n_episodes: int
    em_weighted_by_size: float
    em_mean_of_sources: float
    f1_weighted_by_size: float
    f1_mean_of_sources: float
    mean_turns: float
    mean_tool_calls: float
    format_valid_fraction: float
    mean_generated_tokens: float
    seconds: float
    episodes_per_s: float
    generated_tokens_per_s: float
    mean_batch_size: float
    by_source: dict[str, GroupScores]
    by_hops: dict[str, GroupScores]
    settings: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    episodes: list[EpisodeRecord] = field(default_factory=list)

    def to_dict(self, include_episodes: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["units"] = "em and f1 in percent (0-100)"
        data["averages"] = dict(AVERAGES)
        if not include_episodes:
            data.pop("episodes")
        return data

    def to_json(self, include_episodes: bool = True, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(include_episodes), indent=indent, ensure_ascii=False)


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0


def summarize(
    records: Sequence[EpisodeRecord],
    model_dir: str = "",
    split: str = "",
    seconds: float = 0.0,
    mean_batch_size: float = 0.0,
    settings: dict[str, Any] | None = None,
) -> EvalReport:
    """Aggregate episode records into a report (pure: the numbers depend only on the records)."""
    if not records:
        raise ValueError("no episodes to summarize")
    sources: dict[str, list[EpisodeRecord]] = {}
    hops: dict[int, list[EpisodeRecord]] = {}
    for record in records:
        sources.setdefault(record.data_source, []).append(record)
        if record.hops is not None:
            hops.setdefault(record.hops, []).append(record)
    by_source = {name: GroupScores.of(group) for name, group in sorted(sources.items())}
    overall = GroupScores.of(records)
    tokens = sum(r.generated_tokens for r in records)
    return EvalReport(
        model_dir=model_dir,
        split=split,
        n_episodes=len(records),
        em_weighted_by_size=overall.em,
        em_mean_of_sources=_mean(s.em for s in by_source.values()),
        f1_weighted_by_size=overall.f1,
        f1_mean_of_sources=_mean(s.f1 for s in by_source.values()),
        mean_turns=overall.mean_turns,
        mean_tool_calls=overall.mean_tool_calls,
        format_valid_fraction=overall.format_valid_fraction,
        mean_generated_tokens=tokens / len(records),
        seconds=seconds,
        episodes_per_s=len(records) / seconds if seconds > 0 else 0.0,
        generated_tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        mean_batch_size=mean_batch_size,
        by_source=by_source,
        by_hops={str(h): GroupScores.of(group) for h, group in sorted(hops.items())},
        settings=dict(settings or {}),
        episodes=list(records),
    )


def _room(budget: Budget, context_len: int) -> int:
    """Tokens the next turn may generate (the actors' rule: per-turn cap, then the context cap)."""
    wanted = budget.max_new_tokens
    if budget.max_context_tokens is not None:
        wanted = min(wanted, budget.max_context_tokens - context_len)
    return max(0, wanted)


async def run_episode(
    task: Task, env: ToolEnvironment, scheduler: GenerationScheduler, codec: Codec, budget: Budget, seed: int
) -> EpisodeRecord:
    """Drive one episode to its end with greedy turns; the environment scores it."""
    episode = env.start(task, seed)
    context = codec.prompt_ids(episode.prompt_messages, None)
    generated = 0
    step: StepResult
    while True:
        room = _room(budget, len(context))
        if room == 0:
            step = episode.finish(FinishReason.LENGTH)
            break
        generation = await scheduler.generate(
            GenerationRequest(
                context_ids=list(context),
                max_new_tokens=room,
                stop_strings=episode.stop_strings,
                seed=derive_seed(seed, episode.turns),
            ),
            GREEDY,
        )
        generated += len(generation.token_ids)
        step = await episode.step(generation.text, generation.finish)
        if step.done:
            break
        context.extend(generation.token_ids.tolist())
        context.extend(codec.observation_ids(step.observation or ""))
    reward = step.reward
    if reward is None:  # the environment scores every ended episode; guard the type
        raise RuntimeError(f"task {task.task_id}: the episode ended without a reward")
    return EpisodeRecord(
        task_id=task.task_id,
        data_source=task.data_source,
        hops=task.hops,
        golden_answers=list(task.golden_answers),
        answer=reward.answer,
        em=100.0 * reward.details.get("em", 0.0),
        f1=100.0 * reward.details.get("f1", 0.0),
        format_valid=reward.format_valid,
        reward=reward.score,
        turns=episode.turns,
        tool_calls=episode.tool_calls,
        finish_reason=step.finish_reason.value,
        generated_tokens=generated,
        response=episode.response_text,
    )


async def _run_all(
    tasks: Sequence[Task],
    env: ToolEnvironment,
    scheduler: GenerationScheduler,
    codec: Codec,
    budget: Budget,
    concurrency: int,
    seed: int,
    on_episode: Callable[[EpisodeRecord], None] | None,
) -> list[EpisodeRecord]:
    results: list[EpisodeRecord | None] = [None] * len(tasks)
    queue = iter(range(len(tasks)))

    async def worker() -> None:
        for index in queue:  # shared iterator: each index is taken by exactly one worker
            record = await run_episode(tasks[index], env, scheduler, codec, budget, derive_seed(seed, index))
            results[index] = record
            if on_episode is not None:
                on_episode(record)

    async with scheduler:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(tasks)))))
    return [record for record in results if record is not None]


def run_evaluation(
    tasks: Sequence[Task],
    env: ToolEnvironment,
    backend: GenerationBackend,
    codec: Codec,
    *,
    budget: Budget | None = None,
    concurrency: int = 64,
    max_batch: int = 64,
    seed: int = 0,
    model_dir: str = "",
    split: str = "",
    settings: dict[str, Any] | None = None,
    on_episode: Callable[[EpisodeRecord], None] | None = None,
) -> EvalReport:
    """One greedy episode per task, `concurrency` at a time, batched through one scheduler."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    budget = budget or Budget()
    scheduler = GenerationScheduler(backend, GREEDY, max_batch=max_batch, gather_window_s=GATHER_WINDOW_S)
    started = time.perf_counter()
    records = asyncio.run(_run_all(tasks, env, scheduler, codec, budget, concurrency, seed, on_episode))
    seconds = time.perf_counter() - started
    return summarize(
        records,
        model_dir=model_dir,
        split=split,
        seconds=seconds,
        mean_batch_size=scheduler.stats.mean_batch_size,
        settings={
            "temperature": GREEDY.temperature,
            "concurrency": concurrency,
            "max_batch": max_batch,
            "max_new_tokens": budget.max_new_tokens,
            "max_context_tokens": budget.max_context_tokens,
            **(settings or {}),
        },
    )


def select_tasks(config: RunConfig, split: str, limit: int | None) -> tuple[list[Task], Path | None]:
    """The first `limit` tasks of the split (all when None) and the corpus the search tool serves."""
    from tools_env.factory import prepare_tasks

    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise ConfigError("limit must be >= 1")
    splits = prepare_tasks(config)
    tasks = list(splits.test if split == "test" else splits.train)
    if not tasks:
        raise ConfigError(f"the {split} split has no tasks (for a dataset, set tasks.test_path)")
    return tasks[:limit], splits.corpus_path


def load_backend(config: RunConfig, model_dir: Path) -> tuple[GenerationBackend, Codec]:
    """The configured generation backend on `model_dir`, and its codec (as an actor builds them)."""
    from actors.chat import ChatCodec

    if config.actor.backend == "vllm":
        from actors.backend_vllm import VllmBackend

        backend = VllmBackend(
            model_dir,
            dtype=config.model.dtype,
            max_model_len=config.actor.vllm_max_model_len,
            kv_cache_gb=config.actor.vllm_kv_cache_gb,
            seed=config.actor.seed,
        )
        return backend, ChatCodec.from_dir(model_dir)
    import torch

    from actors.backend_torch import TorchBackend
    from actors.policy_model import load_policy

    if config.actor.torch_threads is not None:
        torch.set_num_threads(config.actor.torch_threads)
    policy = load_policy(model_dir, dtype=config.model.dtype)
    torch_backend = TorchBackend(
        policy.model, policy.tokenizer, max_batch=config.actor.max_batch, seed=config.actor.seed
    )
    return torch_backend, ChatCodec.from_policy(policy)


def evaluate(
    config: RunConfig,
    model_dir: str | Path,
    split: str = "test",
    limit: int | None = None,
    concurrency: int | None = None,
    on_episode: Callable[[EpisodeRecord], None] | None = None,
) -> EvalReport:
    """Greedy EM/F1 of the model directory on the config's `split` (see the module docstring)."""
    from actors.policy_model import resolve_model_dir
    from tools_env.factory import build_environment

    started = time.perf_counter()
    directory = resolve_model_dir(model_dir)
    tasks, corpus = select_tasks(config, split, limit)
    env = build_environment(config, corpus)
    backend, codec = load_backend(config, directory)
    load_seconds = time.perf_counter() - started
    tree = config.tree
    report = run_evaluation(
        tasks,
        env,
        backend,
        codec,
        budget=Budget(max_new_tokens=tree.max_new_tokens, max_context_tokens=tree.max_context_tokens),
        concurrency=concurrency or config.actor.max_batch,
        max_batch=config.actor.max_batch,
        seed=config.env.seed,
        model_dir=str(directory),
        split=split,
        settings={
            "backend": config.actor.backend,
            "protocol": config.env.protocol,
            "reward": config.env.reward,
            "max_turns": config.env.max_turns,
            "max_tool_calls": config.env.max_tool_calls,
            "tasks_source": config.tasks.source,
            "limit": limit,
        },
        on_episode=on_episode,
    )
    report.load_seconds = load_seconds
    return report
