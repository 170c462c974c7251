"""`at2po eval`: scores from scripted policies with known answers, both averages, counts, and the CLI.

A scripted backend (character-level codec: token id = code point) answers each question as its script
says: `searches` search turns, then `<answer> \\boxed{answer} </answer>`. It runs in the real arpo
environment with a fixed-passage search tool, so EM/F1, turns and tool calls are the environment's.
The last tests run the real tiny policy end to end through the CLI.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actors.builders.common import Budget
from actors.generation import Generation, GenerationRequest, SamplingParams
from common.config import build_config
from common.metrics import Counters
from ops.eval_cmd import eval_app, report_table
from ops.evaluation import EpisodeRecord, evaluate, run_evaluation, summarize
from tools_env.env import EpisodeLimits, ToolEnvironment
from tools_env.protocols import get_protocol
from tools_env.rewards import get_reward
from tools_env.task import Task
from tools_env.tools import ToolOutcome

ASSISTANT = "<|assistant|>"


class CharCodec:
    """One token per character; the prompt is the messages as `<|role|>content` lines, then the assistant mark."""

    def prompt_ids(self, messages: list[dict[Any, Any]], tool_schemas: list[dict[Any, Any]] | None) -> list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + ASSISTANT
        return [ord(c) for c in text]

    def observation_ids(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(int(i)) for i in ids)


@dataclass(frozen=True)
class Script:
    searches: int
    answer: str


class ScriptedBackend:
    """Finds the task's question in the context and plays its script; records batches and samplings."""

    def __init__(self, scripts: Mapping[str, Script]) -> None:
        self.scripts = dict(scripts)
        self.batch_sizes: list[int] = []
        self.samplings: list[SamplingParams] = []
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return 0

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({0})

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        raise NotImplementedError("not used by evaluation")

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        with self._lock:
            self.batch_sizes.append(len(requests))
            self.samplings.append(sampling)
        return [self._one(request) for request in requests]

    def _one(self, request: GenerationRequest) -> Generation:
        context = "".join(chr(int(i)) for i in request.context_ids)
        prompt, _, generated = context.rpartition(ASSISTANT)
        script = next(s for question, s in self.scripts.items() if f"<|user|>{question}\n" in prompt)
        if generated.count("</search>") < script.searches:
            text = "<think>look it up</think><search>who</search>"
        else:
            text = f"<think>done</think><answer> \\boxed{{{script.answer}}} </answer>"
        finish = "stop" if len(text) <= request.max_new_tokens else "length"
        text = text[: request.max_new_tokens]
        ids = np.array([ord(c) for c in text], dtype=np.int32)
        return Generation(ids, np.zeros(len(ids), np.float32), np.zeros(len(ids), np.int32), finish, text)


class FixedSearch:
    name = "search"

    def schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": "search", "description": "d", "parameters": {}}}

    async def execute(self, arguments: Mapping[str, Any]) -> ToolOutcome:
        return ToolOutcome("Page 1: nothing useful.", latency_s=0.0)


def make_env(max_turns: int = 5, max_tool_calls: int = 3) -> ToolEnvironment:
    return ToolEnvironment(
        get_protocol("arpo"),
        [FixedSearch()],
        get_reward("at2po_code"),
        EpisodeLimits(max_turns=max_turns, max_tool_calls=max_tool_calls),
        counters=Counters(),
    )


def task(i: int, gold: str, source: str = "world", hops: int | None = None) -> Task:
    metadata = {} if hops is None else {"hops": hops}
    return Task(f"t{i}", f"Question number {i}?", (gold,), source, metadata)


def run(
    tasks: Sequence[Task],
    scripts: Mapping[str, Script],
    concurrency: int = 8,
    env: ToolEnvironment | None = None,
    budget: Budget | None = None,
) -> tuple[Any, ScriptedBackend]:
    backend = ScriptedBackend(scripts)
    report = run_evaluation(
        tasks, env or make_env(), backend, CharCodec(), budget=budget or Budget(256), concurrency=concurrency
    )
    return report, backend


def scripts_for(tasks: Sequence[Task], answers: Sequence[str], searches: int | Sequence[int] = 1) -> dict[str, Script]:
    counts = [searches] * len(tasks) if isinstance(searches, int) else list(searches)
    return {t.question: Script(n, a) for t, a, n in zip(tasks, answers, counts, strict=True)}


# ------------------------------------------------------------------------------------- scores


def test_gold_answers_score_em_100_and_f1_100() -> None:
    tasks = [task(i, f"Quenmoor {i}") for i in range(4)]
    report, backend = run(tasks, scripts_for(tasks, [t.golden_answers[0] for t in tasks]))
    assert report.n_episodes == 4
    assert report.em_weighted_by_size == report.em_mean_of_sources == 100.0
    assert report.f1_weighted_by_size == report.f1_mean_of_sources == 100.0
    assert report.format_valid_fraction == 1.0
    assert [e.answer for e in report.episodes] == [t.golden_answers[0] for t in tasks]
    assert all(e.reward == 1.0 and e.finish_reason == "answer" for e in report.episodes)
    assert all(s.temperature == 0.0 for s in backend.samplings)  # greedy


def test_wrong_answers_score_0() -> None:
    tasks = [task(i, "Quenmoor") for i in range(3)]
    report, _ = run(tasks, scripts_for(tasks, ["Lerlon"] * 3))
    assert report.em_weighted_by_size == 0.0
    assert report.f1_weighted_by_size == 0.0
    assert report.format_valid_fraction == 1.0
    assert all(e.em == 0.0 and e.answer == "Lerlon" for e in report.episodes)


def test_partial_answer_gets_squad_f1_and_normalised_em() -> None:
    tasks = [task(0, "Quen moor river"), task(1, "The Quenmoor")]
    report, _ = run(tasks, scripts_for(tasks, ["Quen moor", "quenmoor."]))
    partial, normalised = report.episodes
    # 2 shared tokens: precision 2/2, recall 2/3 -> F1 = 0.8
    assert partial.em == 0.0
    assert partial.f1 == pytest.approx(80.0)
    assert normalised.em == 100.0 and normalised.f1 == 100.0  # article, case and punctuation dropped
    assert report.f1_weighted_by_size == pytest.approx(90.0)


def test_the_two_averages_differ_on_unequal_source_sizes() -> None:
    tasks = [
        task(0, "Alpha", "big", hops=1),
        task(1, "Beta", "big", hops=1),
        task(2, "Gamma", "big", hops=2),
        task(3, "Delta", "small", hops=2),
    ]
    report, _ = run(tasks, scripts_for(tasks, ["Alpha", "Beta", "wrong", "Delta"]))
    assert report.by_source["big"].n == 3
    assert report.by_source["big"].em == pytest.approx(200 / 3)
    assert report.by_source["small"].em == 100.0
    # AT²PO: every episode counts once -> 3 of 4 correct.
    assert report.em_weighted_by_size == pytest.approx(75.0)
    # Tree-GRPO: every source counts once -> (66.67 + 100) / 2.
    assert report.em_mean_of_sources == pytest.approx((200 / 3 + 100) / 2)
    assert report.f1_mean_of_sources == pytest.approx((200 / 3 + 100) / 2)
    assert report.by_hops["1"].em == 100.0
    assert report.by_hops["2"].em == 50.0
    assert report.by_hops["2"].n == 2


def test_turns_and_tool_calls_are_counted_per_episode() -> None:
    env = make_env(max_turns=6, max_tool_calls=2)
    tasks = [task(i, "Quenmoor") for i in range(3)]
    report, _ = run(tasks, scripts_for(tasks, ["Quenmoor"] * 3, searches=[0, 1, 3]), env=env)
    assert [e.turns for e in report.episodes] == [1, 2, 4]
    # The third search is over the limit: it is not run, so it is not a tool call.
    assert [e.tool_calls for e in report.episodes] == [0, 1, 2]
    assert report.mean_turns == pytest.approx(7 / 3)
    assert report.mean_tool_calls == pytest.approx(1.0)
    assert report.em_weighted_by_size == 100.0


def test_an_episode_cut_by_the_turn_limit_scores_zero() -> None:
    env = make_env(max_turns=2, max_tool_calls=3)
    tasks = [task(0, "Quenmoor")]
    report, _ = run(tasks, scripts_for(tasks, ["Quenmoor"], searches=5), env=env)
    (episode,) = report.episodes
    assert episode.turns == 2
    assert episode.finish_reason == "turn_limit"
    assert episode.answer is None and episode.em == 0.0
    assert not episode.format_valid
    assert report.format_valid_fraction == 0.0


def test_a_context_budget_with_no_room_ends_the_episode_unscored() -> None:
    tasks = [task(0, "Quenmoor")]
    report, backend = run(tasks, scripts_for(tasks, ["Quenmoor"]), budget=Budget(64, max_context_tokens=1))
    (episode,) = report.episodes
    assert (episode.turns, episode.generated_tokens, episode.finish_reason, episode.em) == (0, 0, "length", 0.0)
    assert backend.batch_sizes == []


def test_concurrent_episodes_share_backend_batches_and_keep_task_order() -> None:
    tasks = [task(i, f"gold {i}") for i in range(8)]
    scripts = scripts_for(tasks, [f"gold {i}" for i in range(8)])
    together, backend = run(tasks, scripts, concurrency=8)
    assert max(backend.batch_sizes) > 1
    assert sum(backend.batch_sizes) == 16  # 8 episodes x 2 turns
    assert [e.task_id for e in together.episodes] == [t.task_id for t in tasks]
    one_by_one, serial = run(tasks, scripts, concurrency=1)
    assert set(serial.batch_sizes) == {1}
    assert [e.em for e in one_by_one.episodes] == [e.em for e in together.episodes]


def test_run_evaluation_rejects_no_tasks_and_bad_concurrency() -> None:
    with pytest.raises(ValueError, match="no tasks"):
        run_evaluation([], make_env(), ScriptedBackend({}), CharCodec())
    with pytest.raises(ValueError, match="concurrency"):
        run_evaluation([task(0, "x")], make_env(), ScriptedBackend({}), CharCodec(), concurrency=0)


# ------------------------------------------------------------------------------ aggregation, JSON


def record(source: str, em: float, f1: float, turns: int = 2, tool_calls: int = 1, valid: bool = True) -> EpisodeRecord:
    return EpisodeRecord(
        task_id=f"{source}-{em}-{f1}",
        data_source=source,
        hops=None,
        golden_answers=["x"],
        answer="x",
        em=em,
        f1=f1,
        format_valid=valid,
        reward=0.0,
        turns=turns,
        tool_calls=tool_calls,
        finish_reason="answer",
        generated_tokens=10,
        response="",
    )


def test_summarize_hand_computed() -> None:
    records = [record("nq", 100, 100, turns=1, tool_calls=0)] + [
        record("hotpot", 0, 50, turns=3, tool_calls=2, valid=False) for _ in range(3)
    ]
    report = summarize(records, seconds=2.0)
    assert report.em_weighted_by_size == pytest.approx(25.0)  # 1 of 4
    assert report.em_mean_of_sources == pytest.approx(50.0)  # (100 + 0) / 2
    assert report.f1_weighted_by_size == pytest.approx(62.5)  # (100 + 3 * 50) / 4
    assert report.f1_mean_of_sources == pytest.approx(75.0)  # (100 + 50) / 2
    assert report.mean_turns == pytest.approx(2.5)
    assert report.mean_tool_calls == pytest.approx(1.5)
    assert report.format_valid_fraction == pytest.approx(0.25)
    assert report.episodes_per_s == pytest.approx(2.0)
    assert report.by_hops == {}
    assert list(report.by_source) == ["hotpot", "nq"]
    with pytest.raises(ValueError):
        summarize([])


def test_json_names_both_averages_and_holds_the_episodes() -> None:
    report = summarize([record("a", 100, 100), record("b", 0, 0), record("b", 0, 0)])
    data = json.loads(report.to_json())
    assert data["em_weighted_by_size"] == pytest.approx(100 / 3)
    assert data["em_mean_of_sources"] == pytest.approx(50.0)
    assert "AT2PO" in data["averages"]["em_weighted_by_size"]
    assert "Tree-GRPO" in data["averages"]["em_mean_of_sources"]
    assert data["by_source"]["b"]["n"] == 2
    assert len(data["episodes"]) == 3
    assert "episodes" not in json.loads(report.to_json(include_episodes=False))


def test_table_labels_sources_and_both_averages() -> None:
    report = summarize([record("a", 100, 100), record("b", 0, 0), record("b", 0, 0)])
    console = Console(record=True, width=200)
    console.print(report_table(report))
    text = console.export_text()
    assert "source a" in text and "source b" in text
    assert "weighted by size (AT²PO)" in text and "33.33" in text
    assert "mean of sources (Tree-GRPO)" in text and "50.00" in text


# ------------------------------------------------------------------------- the real tiny policy


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from actors.tiny_model import TinyModelSpec, init_tiny_model, world_training_texts

    texts = world_training_texts(seed=0, n_tasks=200, n_arithmetic=100, max_passages=800)
    return init_tiny_model(tmp_path_factory.mktemp("eval_tiny") / "model", TinyModelSpec(), texts)


@pytest.fixture(scope="module")
def world_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    world = tmp_path_factory.mktemp("eval_world") / "world"
    return [f"tasks.data_dir={json.dumps(str(world))}", "tasks.n_train=10", "tasks.n_test=6", "tree.max_new_tokens=12"]


def root_app() -> typer.Typer:
    """A root like ops/cli.py's, so `eval` is tested the way it is registered."""
    root = typer.Typer()

    @root.callback()
    def _root() -> None:
        """Root."""

    root.add_typer(eval_app, name="eval")
    return root


def test_eval_is_one_command_under_the_root() -> None:
    result = CliRunner().invoke(root_app(), ["eval", "--help"])
    assert result.exit_code == 0, result.output
    assert "--model" in result.output and "--limit" in result.output


def test_cli_missing_model_dir_exits_2(tmp_path: Path, world_overrides: list[str]) -> None:
    args = ["eval", "--model", str(tmp_path / "nope"), "--limit", "1"]
    for override in world_overrides:
        args += ["--set", override]
    result = CliRunner().invoke(root_app(), args)
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_cli_runs_the_tiny_policy_and_writes_json(
    tmp_path: Path, tiny_model_dir: Path, world_overrides: list[str]
) -> None:
    out = tmp_path / "eval" / "report.json"
    args = ["eval", "--model", str(tiny_model_dir), "--limit", "3", "--out", str(out), "--json"]
    for override in [*world_overrides, "tree.temperature=1.0"]:
        args += ["--set", override]
    result = CliRunner().invoke(root_app(), args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads(out.read_text(encoding="utf-8"))
    assert printed["n_episodes"] == written["n_episodes"] == 3
    assert "episodes" not in printed
    assert len(written["episodes"]) == 3
    assert written["settings"]["temperature"] == 0.0
    assert 0.0 <= written["em_weighted_by_size"] <= 100.0
    assert written["by_source"]["synthetic_world"]["n"] == 3
    assert sum(group["n"] for group in written["by_hops"].values()) == 3
    for episode in written["episodes"]:
        assert 1 <= episode["turns"] <= 4
        assert 0 < episode["generated_tokens"] <= 12 * episode["turns"]


def test_tiny_policy_is_greedy_whatever_the_seeds(tiny_model_dir: Path, world_overrides: list[str]) -> None:
    # Sampling at temperature 1 would give other tokens for other seeds; greedy gives the same.
    first = evaluate(build_config({}, [*world_overrides, "env.seed=1"]), tiny_model_dir, limit=2, concurrency=1)
    second = evaluate(
        build_config({}, [*world_overrides, "env.seed=2", "actor.seed=5"]), tiny_model_dir, limit=2, concurrency=1
    )
    assert [e.response for e in first.episodes] == [e.response for e in second.episodes]
    assert first.split == "test" and first.n_episodes == 2


def test_evaluate_rejects_an_unknown_split(tiny_model_dir: Path, world_overrides: list[str]) -> None:
    with pytest.raises(ValueError, match="split"):
        evaluate(build_config({}, world_overrides), tiny_model_dir, split="dev")
