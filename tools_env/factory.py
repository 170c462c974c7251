"""Build what a run's config names: its task splits (and corpus) and its tool environment.

Decided here:
- `prepare_tasks(config)` returns `TaskSplits` (train and test tasks, and the corpus the search
  tool serves, if any). The synthetic world is generated into `tasks.data_dir` once and reused
  while its manifest matches the config (seeds, sizes, hops); several processes starting together
  take a file lock, so exactly one generates it. Arithmetic tasks are generated in memory.
  Datasets are read with `tools_env.datasets.load_tasks`.
- `training_tasks(config, splits)` is what actors train on: the train split, restricted to
  `tasks.train_hops` when set (by `Task.hops`; tasks without a hop count are kept out then); a
  restriction that leaves nothing is a ConfigError naming the key.
- `build_environment(config, corpus)` assembles protocol, tools, reward and limits. The search
  tool uses a local BM25 index over `search.corpus` (else the task corpus), or the HTTP retriever
  at `search.url`.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig, TasksConfig
from common.metrics import Counters
from tools_env.arithmetic import generate_arithmetic_tasks
from tools_env.bm25_index import BM25Index
from tools_env.datasets import load_tasks
from tools_env.env import EpisodeLimits, ToolEnvironment
from tools_env.protocols import get_protocol
from tools_env.retriever_client import LocalRetriever, Retriever, RetrieverClient
from tools_env.rewards import get_reward
from tools_env.sandbox import PythonSandbox
from tools_env.sandbox_limits import SandboxLimits
from tools_env.task import Task
from tools_env.tools import PythonTool, SearchTool, Tool
from tools_env.world import build_dataset, write_dataset
from tools_env.world_config import WorldConfig


@dataclass(frozen=True)
class TaskSplits:
    train: tuple[Task, ...]
    test: tuple[Task, ...]
    corpus_path: Path | None


def world_config_of(tasks: TasksConfig) -> WorldConfig:
    hops = tuple(tasks.hops)
    return WorldConfig.preset(tasks.world_size, hops=hops, hop_weights=tuple(1.0 for _ in hops))


def _wanted_manifest(tasks: TasksConfig) -> dict[str, Any]:
    config = world_config_of(tasks).to_dict()
    config.pop("seed", None)
    return {
        "train_seed": tasks.train_seed,
        "test_seed": tasks.test_seed,
        "config": config,
        "counts_train": tasks.n_train,
        "counts_test": tasks.n_test,
    }


def _manifest_matches(directory: Path, tasks: TasksConfig) -> bool:
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    wanted = _wanted_manifest(tasks)
    counts = manifest.get("counts", {})
    return (
        manifest.get("train_seed") == wanted["train_seed"]
        and manifest.get("test_seed") == wanted["test_seed"]
        and manifest.get("config") == wanted["config"]
        and counts.get("train") == wanted["counts_train"]
        and counts.get("test") == wanted["counts_test"]
        and all((directory / name).is_file() for name in ("corpus.jsonl", "train.jsonl", "test.jsonl"))
    )


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_world(tasks: TasksConfig) -> Path:
    """The synthetic world's directory, generated first if it is missing or was made for another config."""
    directory = Path(tasks.data_dir)
    if _manifest_matches(directory, tasks):
        return directory
    with _directory_lock(directory):
        if not _manifest_matches(directory, tasks):
            dataset = build_dataset(
                train_seed=tasks.train_seed,
                test_seed=tasks.test_seed,
                n_train=tasks.n_train,
                n_test=tasks.n_test,
                config=world_config_of(tasks),
            )
            write_dataset(dataset, directory)
    return directory


def prepare_tasks(config: RunConfig) -> TaskSplits:
    tasks = config.tasks
    if tasks.source == "synthetic_world":
        if tasks.train_seed == tasks.test_seed:
            raise ConfigError("tasks.train_seed and tasks.test_seed must differ (the split is by world)")
        try:
            directory = ensure_world(tasks)
        except ValueError as error:
            raise ConfigError(f"tasks: {error}") from None
        return TaskSplits(
            train=tuple(load_tasks(directory / "train.jsonl")),
            test=tuple(load_tasks(directory / "test.jsonl")),
            corpus_path=directory / "corpus.jsonl",
        )
    if tasks.source == "arithmetic":
        return TaskSplits(
            train=tuple(generate_arithmetic_tasks(tasks.n_train, tasks.train_seed)),
            test=tuple(generate_arithmetic_tasks(tasks.n_test, tasks.test_seed)),
            corpus_path=None,
        )
    if tasks.path is None:
        raise ConfigError("tasks.path: a dataset file is required when tasks.source = 'dataset'")
    return TaskSplits(
        train=tuple(load_tasks(tasks.path)),
        test=tuple(load_tasks(tasks.test_path)) if tasks.test_path else (),
        corpus_path=Path(config.search.corpus) if config.search.corpus else None,
    )


def training_tasks(config: RunConfig, splits: TaskSplits) -> tuple[Task, ...]:
    """The tasks actors grow trees for: the train split, or its tasks of `tasks.train_hops` hop counts."""
    wanted = config.tasks.train_hops
    if wanted is None:
        return splits.train
    chosen = tuple(task for task in splits.train if task.hops in wanted)
    if not chosen:
        raise ConfigError(f"tasks.train_hops = {wanted}: no training task has these hop counts")
    return chosen


def build_retriever(config: RunConfig, corpus_path: Path | None) -> Retriever:
    search = config.search
    if search.backend == "http":
        return RetrieverClient(search.url, timeout_s=search.timeout_s, retries=search.retries, topk_default=search.topk)
    corpus = Path(search.corpus) if search.corpus else corpus_path
    if corpus is None:
        raise ConfigError("search.corpus: the search tool needs a corpus (or search.backend = 'http')")
    index = BM25Index.open(corpus, cache_dir=search.index_dir, backend=search.bm25_backend)
    return LocalRetriever(index, topk_default=search.topk)


def build_environment(
    config: RunConfig, corpus_path: Path | None = None, counters: Counters | None = None
) -> ToolEnvironment:
    counters = counters if counters is not None else Counters()
    env = config.env
    try:
        protocol = get_protocol(env.protocol)
        reward = get_reward(env.reward)
    except ValueError as error:
        raise ConfigError(f"env: {error}") from None
    tools: list[Tool] = []
    for name in env.tools:
        if name == "search":
            tools.append(
                SearchTool(
                    build_retriever(config, corpus_path),
                    topk=config.search.topk,
                    result_style=config.search.result_style,
                    counters=counters,
                )
            )
        else:
            box = config.sandbox
            limits = SandboxLimits(
                wall_s=box.wall_s,
                cpu_s=box.cpu_s,
                memory_mb=box.memory_mb,
                max_processes=box.max_processes,
                max_open_files=box.max_open_files,
                max_output_chars=box.max_output_chars,
            )
            tools.append(PythonTool(PythonSandbox(limits), counters=counters))
    limits = EpisodeLimits(
        max_turns=env.max_turns, max_tool_calls=env.max_tool_calls, max_observation_chars=env.max_observation_chars
    )
    return ToolEnvironment(protocol, tools, reward, limits, counters=counters)
