"""The embedded default's settings (`ops.run_cmd.EMBEDDED_OVERRIDES`)."""

from __future__ import annotations

import re
from pathlib import Path

from actors.tiny_model import world_training_texts
from common.config import load_config
from ops.run_cmd import EMBEDDED_OVERRIDES, embedded_overrides
from tools_env.world import build_dataset


def _name_overlap(texts: list[str], train_seed: int, test_seed: int) -> float:
    """Share of the generated entity names of two task worlds that occur as words in `texts`."""
    words = set(re.findall(r"[A-Za-z]+", "\n".join(texts)))
    dataset = build_dataset(train_seed, test_seed, n_train=200, n_test=50)
    names = {
        word
        for task in (*dataset.train, *dataset.test)
        if task.metadata.get("answer_type") == "entity"
        for answer in task.golden_answers
        for word in answer.split()
        if word[0].isupper() and len(word) > 3
    }
    assert len(names) > 100
    return len(names & words) / len(names)


def test_embedded_task_worlds_are_not_the_tokenizers_worlds() -> None:
    """RL and the held-out evaluation use worlds whose names the tiny tokenizer never saw (so none is one token)."""
    config = load_config(None, EMBEDDED_OVERRIDES)
    texts = world_training_texts(seed=0, n_tasks=200, max_passages=800)
    # Shared words such as "Institute" or "River" remain; the generated names do not.
    assert _name_overlap(texts, config.tasks.train_seed, config.tasks.test_seed) < 0.2
    assert _name_overlap(texts, 0, 1) > 0.5  # the default worlds are the tokenizer's own


def test_embedded_overrides_apply_only_without_a_config_file(tmp_path: Path) -> None:
    assert embedded_overrides(None) == EMBEDDED_OVERRIDES
    assert embedded_overrides(tmp_path / "run.toml") == ()


def test_embedded_demonstration_worlds_are_neither_task_nor_tokenizer_worlds() -> None:
    """The warm start's worlds are fresh-named: not RL's training world, not the held-out one, not the tokenizer's."""
    from ops.demos import demo_world_configs

    config = load_config(None, EMBEDDED_OVERRIDES)
    seeds = [world.tasks.train_seed for world in demo_world_configs(config)]
    assert len(seeds) == len(set(seeds)) == config.sft.demo_worlds
    assert not set(seeds) & {0, 1, config.tasks.train_seed, config.tasks.test_seed}
    assert len({world.tasks.data_dir for world in demo_world_configs(config)}) == len(seeds)
