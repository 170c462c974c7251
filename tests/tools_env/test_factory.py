"""A run's config builds its tasks and environment; oracle search paths find the gold passages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig, build_config
from common.tree import FinishReason
from tools_env.bm25_index import BM25Index
from tools_env.factory import TaskSplits, build_environment, prepare_tasks, training_tasks
from tools_env.rewards import REWARDS
from tools_env.task import Task


def world_config(directory: Path, **env: object) -> RunConfig:
    return build_config(
        {
            "tasks": {"data_dir": str(directory), "n_train": 60, "n_test": 20, "hops": [1, 2, 3]},
            "env": {"max_turns": 5, **env},
        }
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, TaskSplits]:
    config = world_config(tmp_path_factory.mktemp("world"))
    return config, prepare_tasks(config)


def test_config_reward_names_are_the_registered_rewards() -> None:
    from typing import get_args

    from common.config import RewardName

    assert set(get_args(RewardName)) == set(REWARDS)


def test_world_splits_are_generated_once_and_reused(world: tuple[RunConfig, TaskSplits]) -> None:
    config, splits = world
    assert len(splits.train) == 60 and len(splits.test) == 20
    assert splits.corpus_path is not None and splits.corpus_path.is_file()
    manifest = splits.corpus_path.parent / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = prepare_tasks(config)
    assert again == splits and manifest.stat().st_mtime_ns == stamp
    changed = prepare_tasks(config.model_copy(update={"tasks": config.tasks.model_copy(update={"n_test": 10})}))
    assert len(changed.test) == 10 and manifest.stat().st_mtime_ns != stamp


def test_train_hops_restricts_the_training_tasks_only(world: tuple[RunConfig, TaskSplits]) -> None:
    config, splits = world
    assert training_tasks(config, splits) == splits.train
    one_hop = config.model_copy(update={"tasks": config.tasks.model_copy(update={"train_hops": [1]})})
    chosen = training_tasks(one_hop, splits)
    assert chosen and all(task.metadata["hops"] == 1 for task in chosen)
    assert len(chosen) == sum(1 for task in splits.train if task.metadata["hops"] == 1) < len(splits.train)
    assert prepare_tasks(one_hop).test == splits.test  # held-out evaluation keeps every hop count
    four_hops = config.model_copy(update={"tasks": config.tasks.model_copy(update={"train_hops": [4]})})
    with pytest.raises(ConfigError, match=r"tasks\.train_hops"):
        training_tasks(four_hops, splits)


def test_oracle_queries_find_the_gold_passage_in_the_top_3(world: tuple[RunConfig, TaskSplits]) -> None:
    _, splits = world
    assert splits.corpus_path is not None
    index = BM25Index.open(splits.corpus_path)
    hops = [hop for task in (*splits.train, *splits.test) for hop in task.metadata["oracle"]]
    results = index.search_batch([hop["query"] for hop in hops], 3)
    found = [hop["passage_id"] in {r.passage.id for r in top} for hop, top in zip(hops, results, strict=True)]
    assert len(found) > 100
    assert sum(found) / len(found) >= 0.95


def play_oracle(config: RunConfig, splits: TaskSplits, task: Task) -> tuple[float, list[FinishReason]]:
    env = build_environment(config, splits.corpus_path)
    episode = env.start(task, seed=0)
    reasons = []
    for hop in task.metadata["oracle"]:
        turn = f"<think>Next I need {hop['relation']}.</think><search>{hop['query']}</search>"
        step = asyncio.run(episode.step(turn))
        assert step.observation is not None and hop["answer"] in step.observation
        reasons.append(step.finish_reason)
    answer = task.golden_answers[0]
    end = asyncio.run(episode.step(f"<think>Found it.</think><answer>\\boxed{{{answer}}}</answer>"))
    assert end.done and end.reward is not None
    reasons.append(end.finish_reason)
    return end.reward.score, reasons


def test_oracle_episode_on_the_default_environment_earns_full_reward(world: tuple[RunConfig, TaskSplits]) -> None:
    config, splits = world
    three_hop = next(task for task in splits.train if task.metadata["hops"] == 3)
    score, reasons = play_oracle(config, splits, three_hop)
    assert score == 1.0
    assert reasons == [FinishReason.TOOL_CALL] * 3 + [FinishReason.ANSWER]


def test_arithmetic_tasks_with_the_python_tool() -> None:
    config = build_config(
        {
            "tasks": {"source": "arithmetic", "n_train": 5, "n_test": 3},
            "env": {"tools": ["python"], "reward": "numeric_match"},
        }
    )
    splits = prepare_tasks(config)
    assert len(splits.train) == 5 and splits.corpus_path is None
    task = splits.train[0]
    env = build_environment(config)
    episode = env.start(task)
    step = asyncio.run(episode.step(f"<think>compute</think><python>{task.metadata['expression']}</python>"))
    assert step.observation is not None and task.golden_answers[0] in step.observation
    end = asyncio.run(episode.step(f"<think>done</think><answer>\\boxed{{{task.golden_answers[0]}}}</answer>"))
    assert end.reward is not None and end.reward.score == 1.0


def test_dataset_source_needs_a_path_and_search_needs_a_corpus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tasks\.path"):
        prepare_tasks(build_config({"tasks": {"source": "dataset"}}))
    with pytest.raises(ConfigError, match=r"search\.corpus"):
        build_environment(build_config({}), corpus_path=None)


def test_dataset_tasks_load_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(Task("a-1", "Who?", ("Ada",), "custom").to_json() + "\n", encoding="utf-8")
    splits = prepare_tasks(build_config({"tasks": {"source": "dataset", "path": str(path)}}))
    assert [task.task_id for task in splits.train] == ["a-1"] and splits.test == ()


def test_task_hops_reads_ints_and_digit_strings_only() -> None:
    def task(**metadata: object) -> Task:
        return Task("t", "q?", ("a",), "src", metadata)

    assert task(hops=2).hops == 2 and task(hops="3").hops == 3
    assert task().hops is None and task(hops=True).hops is None and task(hops="two").hops is None
