"""Warm-start demonstrations: oracle episodes played in the real environment, imperfect ones, JSONL I/O, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.config import ConfigError, RunConfig, build_config
from ops.cli import app
from ops.demos import (
    DEMO_WORLD_STRIDE,
    MISTAKES,
    DemoFormatError,
    Demonstration,
    DemoStats,
    demo_world_configs,
    make_demonstrations,
    oracle_hops,
    read_demos,
    split_count,
    write_demos,
)
from tools_env.factory import prepare_tasks
from tools_env.scoring import exact_match
from tools_env.task import Task


@pytest.fixture(scope="module")
def world_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    world = tmp_path_factory.mktemp("demo_world") / "world"
    return [f"tasks.data_dir={json.dumps(str(world))}", "tasks.n_train=40", "tasks.n_test=4"]


def config_with(overrides: list[str], *extra: str) -> RunConfig:
    return build_config({}, [*overrides, "sft.demo_worlds=3", *extra])


def training_tasks(config: RunConfig) -> dict[str, Task]:
    """Every task of every demonstration world's training split, by id."""
    return {task.task_id: task for world in demo_world_configs(config) for task in prepare_tasks(world).train}


@pytest.fixture(scope="module")
def made(world_overrides: list[str]) -> tuple[list[Demonstration], DemoStats, RunConfig]:
    config = config_with(world_overrides, "sft.imperfect_fraction=0.5", "sft.seed=3")
    stats = DemoStats()
    return make_demonstrations(config, 24, stats), stats, config


def test_perfect_demos_follow_the_oracle_path_and_score_correct(
    made: tuple[list[Demonstration], DemoStats, RunConfig],
) -> None:
    demos, _, config = made
    tasks = training_tasks(config)
    perfect = [demo for demo in demos if demo.perfect]
    assert perfect
    for demo in perfect:
        task = tasks[demo.task_id]
        hops = oracle_hops(task)
        assistant = [m["content"] for m in demo.messages if m["role"] == "assistant"]
        observations = [m["content"] for m in demo.messages if m["role"] == "tool"]
        assert demo.source == "oracle"
        assert len(assistant) == len(hops) + 1 and len(observations) == len(hops)
        for hop, turn, observation in zip(hops, assistant, observations, strict=False):
            assert f"<search> {hop.query} </search>" in turn
            assert hop.answer in observation  # the evidence for each hop was really retrieved
        assert assistant[-1].endswith("</answer>") and task.golden_answers[0] in assistant[-1]
        assert demo.reward == pytest.approx(1.0)


def test_imperfect_demos_make_one_named_mistake_and_are_not_correct(
    made: tuple[list[Demonstration], DemoStats, RunConfig],
) -> None:
    demos, stats, config = made
    tasks = training_tasks(config)
    imperfect = [demo for demo in demos if not demo.perfect]
    assert len(imperfect) == round(24 * 0.5) == stats.imperfect
    assert stats.made == 24
    for demo in imperfect:
        mistake = demo.source.split(":", 1)[1]
        assert mistake in MISTAKES
        final = demo.messages[-1]["content"]
        answer = final.split("\\boxed{", 1)[1].split("}", 1)[0]
        assert not exact_match(answer, tasks[demo.task_id].golden_answers)
        assert demo.reward is not None and demo.reward < 1.0


def test_prompt_messages_are_the_environments(made: tuple[list[Demonstration], DemoStats, RunConfig]) -> None:
    demos, _, config = made
    tasks = training_tasks(config)
    for demo in demos[:3]:
        roles = [m["role"] for m in demo.messages]
        first_assistant = roles.index("assistant")
        assert set(roles[:first_assistant]) <= {"system", "user"}
        assert tasks[demo.task_id].question in demo.messages[first_assistant - 1]["content"]


def test_demos_are_deterministic_for_a_seed_and_change_with_it(world_overrides: list[str]) -> None:
    first = make_demonstrations(config_with(world_overrides, "sft.seed=5"), 8)
    again = make_demonstrations(config_with(world_overrides, "sft.seed=5"), 8)
    other = make_demonstrations(config_with(world_overrides, "sft.seed=6"), 8)
    assert [d.to_json() for d in first] == [d.to_json() for d in again]
    assert [d.to_json() for d in first] != [d.to_json() for d in other]


def test_no_imperfect_demos_when_the_fraction_is_zero(world_overrides: list[str]) -> None:
    demos = make_demonstrations(config_with(world_overrides, "sft.imperfect_fraction=0"), 6)
    assert all(demo.perfect for demo in demos)


def test_tool_call_protocol_writes_json_tool_calls(world_overrides: list[str]) -> None:
    demos = make_demonstrations(config_with(world_overrides, "env.protocol=tool_call"), 3)
    turns = [
        m["content"] for d in demos for m in d.messages if m["role"] == "assistant" and "<tool_call>" in m["content"]
    ]
    assert turns
    body = turns[0].split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
    parsed = json.loads(body)
    assert parsed["name"] == "search" and parsed["arguments"]["query"]


def test_a_config_without_the_search_tool_is_refused(world_overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match="search tool"):
        make_demonstrations(config_with(world_overrides, 'env.tools=["python"]'), 2)


def test_jsonl_round_trip(made: tuple[list[Demonstration], DemoStats, RunConfig], tmp_path: Path) -> None:
    demos = made[0]
    path = tmp_path / "d" / "demos.jsonl"
    assert write_demos(path, demos) == len(demos)
    assert read_demos(path) == demos
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "assistant", "content": "x"}], "prompt messages"),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], "assistant turn"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"}],
            "last message",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b"},
            ],
            "alternate",
        ),
        ([{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}], "role must be"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "role must be"),
        ([], "non-empty"),
    ],
)
def test_bad_records_are_refused_with_the_line(tmp_path: Path, messages: list[dict[str, object]], message: str) -> None:
    good = {
        "task_id": "t",
        "source": "s",
        "perfect": True,
        "reward": 1.0,
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    bad = {**good, "messages": messages}
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DemoFormatError, match=f"demos.jsonl:3: .*{message}"):
        read_demos(path)


def test_a_line_that_is_not_json_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "demos.jsonl"
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DemoFormatError, match=r"demos\.jsonl:1"):
        read_demos(path)


def test_cli_writes_demos_and_prints_counts(world_overrides: list[str], tmp_path: Path) -> None:
    out = tmp_path / "demos.jsonl"
    args = ["sft", "demos", "--out", str(out), "--n", "5"]
    for override in [*world_overrides, "sft.imperfect_fraction=0.4"]:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n_demos"] == 5 and summary["n_imperfect"] == 2 and summary["out"] == str(out)
    assert len(read_demos(out)) == 5


def test_cli_bad_config_exits_2(world_overrides: list[str], tmp_path: Path) -> None:
    args = ["sft", "demos", "--out", str(tmp_path / "d.jsonl")]
    for override in [*world_overrides, 'env.tools=["python"]']:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "search tool" in result.output


def test_demos_come_from_several_worlds_with_their_own_names(
    made: tuple[list[Demonstration], DemoStats, RunConfig],
) -> None:
    demos, _, config = made
    worlds = demo_world_configs(config)
    assert [w.tasks.train_seed for w in worlds] == [DEMO_WORLD_STRIDE, 2 * DEMO_WORLD_STRIDE, 3 * DEMO_WORLD_STRIDE]
    assert all(w.tasks.test_seed == config.tasks.test_seed for w in worlds)
    by_world = [{t.task_id for t in prepare_tasks(w).train} for w in worlds]
    assert [sum(d.task_id in ids for d in demos) for ids in by_world] == split_count(24, 3) == [8, 8, 8]
    answers = [{t.golden_answers[0] for t in prepare_tasks(w).train} for w in worlds]
    held_out = {t.golden_answers[0] for t in prepare_tasks(config).test}
    entity = [{a for a in names if not a.isdigit()} for names in answers]
    rl_world = {t.golden_answers[0] for t in prepare_tasks(config).train}
    assert not entity[0] & entity[1] and not entity[1] & entity[2]  # fresh names in each world
    assert not (entity[0] | entity[1] | entity[2]) & held_out  # and none of them is a held-out answer
    assert not (entity[0] | entity[1] | entity[2]) & {a for a in rl_world if not a.isdigit()}  # nor RL's


def test_the_training_world_is_the_first_demonstration_world_only_when_asked(world_overrides: list[str]) -> None:
    config = config_with(world_overrides, "sft.demos_from_train_world=true")
    worlds = demo_world_configs(config)
    assert worlds[0] == config
    assert [w.tasks.train_seed for w in worlds] == [0, DEMO_WORLD_STRIDE, 2 * DEMO_WORLD_STRIDE]
    assert len(demo_world_configs(config_with(world_overrides, "sft.demo_worlds=1"))) == 1
    assert demo_world_configs(config_with(world_overrides, "sft.demo_worlds=1"))[0].tasks.train_seed != 0


def test_imperfect_demos_make_only_the_configured_mistakes(world_overrides: list[str]) -> None:
    config = config_with(world_overrides, "sft.imperfect_fraction=1", 'sft.mistakes=["early_answer"]')
    demos = make_demonstrations(config, 6)
    assert {demo.source for demo in demos} == {"oracle:early_answer"}
    with pytest.raises(ConfigError, match=r"sft\.mistakes"):
        config_with(world_overrides, "sft.mistakes=[]")
    with pytest.raises(ConfigError, match=r"sft\.mistakes"):
        config_with(world_overrides, 'sft.mistakes=["typo"]')


def test_other_sources_use_only_the_training_split(world_overrides: list[str]) -> None:
    arithmetic = build_config({}, ["tasks.source=arithmetic", "sft.demo_worlds=5"])
    assert demo_world_configs(arithmetic) == [arithmetic]


def test_the_test_world_is_never_a_demonstration_world(world_overrides: list[str]) -> None:
    config = config_with(world_overrides, f"tasks.test_seed={DEMO_WORLD_STRIDE}", "sft.demo_worlds=3")
    seeds = [w.tasks.train_seed for w in demo_world_configs(config)]
    assert DEMO_WORLD_STRIDE not in seeds and len(set(seeds)) == 3


def test_split_count() -> None:
    assert split_count(10, 3) == [4, 3, 3]
    assert split_count(2, 4) == [1, 1, 0, 0]
