"""`at2po bench learner` on a tiny budget: every figure present and consistent (never a speed assertion)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actors.tiny_model import TinyModelSpec, init_tiny_model, world_training_texts
from common.tree import TurnTree
from ops.bench_learner import JITTER, LearnerBenchSettings, jitter_flat_rewards, run_learner_bench
from ops.cli import app
from tests.learner.trees import random_tree

FIGURES = {
    "trees",
    "path_tokens",
    "unique_tokens",
    "path_over_unique",
    "packed_update_s",
    "per_path_update_s",
    "packed_tokens_per_s",
    "per_path_tokens_per_s",
    "packed_speedup",
    "target_speedup",
    "meets_target",
    "weight_bytes",
    "weight_sync_mb_s",
    "weight_fetch_mb_s",
    "raw_zmq_mb_s",
    "weight_sync_vs_raw",
    "weight_fetch_vs_raw",
    "weight_announce_ms",
    "weight_serialise_ms",
    "loss_packed",
    "loss_per_path",
    "settings",
}
TINY = {"trees": 2, "repeats": 1, "max_new_tokens": 8, "initial_chains": 2, "rounds": 1, "expansions": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = world_training_texts(seed=0, n_tasks=200, n_arithmetic=100, max_passages=800)
    return init_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TinyModelSpec(), texts)


def _flat(tree: TurnTree, reward: float) -> TurnTree:
    nodes = [replace(n, reward=reward) if n.reward is not None else n for n in tree.nodes.values()]
    return TurnTree.from_nodes(tree.tree_id, tree.task_id, tree.actor_id, nodes)


def test_jitter_only_touches_trees_whose_leaves_score_the_same() -> None:
    rng = np.random.default_rng(0)
    varied = random_tree(rng, "varied", levels=2)
    flat = _flat(random_tree(rng, "flat", levels=2), -1.0)
    out, jittered = jitter_flat_rewards([varied, flat], seed=0)
    assert jittered == 1 and out[0] is varied
    rewards = [leaf.reward for leaf in out[1].leaves()]
    assert len(set(rewards)) == len(rewards) and all(abs(r + 1.0) <= JITTER for r in rewards if r is not None)
    assert [n.token_ids.tolist() for n in out[1].nodes.values()] == [n.token_ids.tolist() for n in flat.nodes.values()]
    again, _ = jitter_flat_rewards([varied, flat], seed=0)
    assert [leaf.reward for leaf in again[1].leaves()] == rewards  # deterministic


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="repeats"):
        LearnerBenchSettings(repeats=0)
    with pytest.raises(ValueError, match="chunk_kb"):
        LearnerBenchSettings(chunk_kb=1)


@pytest.mark.slow
def test_bench_figures_are_complete_and_consistent(model_dir: Path, tmp_path: Path) -> None:
    settings = LearnerBenchSettings(**TINY, sync_repeats=2, chunk_kb=256)  # type: ignore[arg-type]
    figures = run_learner_bench(settings, work_dir=tmp_path, model_dir=model_dir)
    assert set(figures) >= FIGURES
    json.dumps(figures)  # serialisable as printed
    assert figures["trees"] == 2
    assert figures["path_tokens"] >= figures["unique_tokens"] > 0
    assert math.isclose(figures["path_over_unique"], figures["path_tokens"] / figures["unique_tokens"], rel_tol=1e-3)
    assert math.isclose(figures["target_speedup"], 0.8 * figures["path_over_unique"], rel_tol=1e-3)
    packed_s, per_path_s = figures["packed_update_s"], figures["per_path_update_s"]
    assert packed_s > 0 and per_path_s > 0
    assert math.isclose(figures["packed_speedup"], per_path_s / packed_s, rel_tol=5e-3)
    ratio = figures["packed_tokens_per_s"] / figures["per_path_tokens_per_s"]
    assert math.isclose(figures["packed_speedup"], ratio, rel_tol=5e-3)
    assert figures["meets_target"] is (figures["packed_speedup"] >= figures["target_speedup"])
    # Same weights, same trees: the two layouts compute the same (non-zero) loss.
    assert figures["loss_packed"] != 0.0
    assert math.isclose(figures["loss_packed"], figures["loss_per_path"], rel_tol=1e-2, abs_tol=1e-6)
    assert figures["weight_bytes"] > 0
    for key in ("weight_sync_mb_s", "weight_fetch_mb_s", "raw_zmq_mb_s", "weight_sync_vs_raw", "weight_fetch_vs_raw"):
        assert figures[key] > 0, key
    assert math.isclose(
        figures["weight_sync_vs_raw"], figures["weight_sync_mb_s"] / figures["raw_zmq_mb_s"], rel_tol=0.05
    )
    used = figures["settings"]
    assert used["initial_chains"] == 2 and used["rounds"] == 1 and used["expansions"] == 1
    assert used["rewards"] in ("env", "env+jitter")
    assert used["weight_chunks"] == math.ceil(figures["weight_bytes"] / (256 * 1024))


@pytest.mark.slow
def test_cli_prints_only_the_json_object(model_dir: Path, tmp_path: Path) -> None:
    options = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]
    args = ["bench", "learner", "--json", "--sync-repeats=1", f"--model-dir={model_dir}", f"--work-dir={tmp_path}"]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert set(figures) >= FIGURES
