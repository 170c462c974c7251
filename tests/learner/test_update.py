"""The learner's update step on a real DeepSpeed engine (CPU, gloo): splits, layouts, stale data, resume."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import LearnerConfig
from common.tree import FinishReason, TurnNode, TurnTree
from learner import checkpoint
from learner.diagnostics import turn_kl_entropy
from learner.engine import DistributedSpec, TrainEngine, deepspeed_config, load_train_model
from learner.launch import free_port
from learner.update import (
    PolicyUpdater,
    UpdateSettings,
    cut_micro_batches,
    deal_to_ranks,
    mini_batch_denominator,
    split_minibatches,
)
from tests.learner.trees import random_tree, save_tiny_policy, with_behaviour

DIST = DistributedSpec(master_port=free_port())


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("policy") / "model")


def groups_for(seed: int, n: int = 4, version: int = 0) -> list[list[TurnTree]]:
    rng = np.random.default_rng(seed)
    return [[random_tree(rng, f"t{seed}-{i}", f"task{i}", levels=2, version=version)] for i in range(n)]


def updater(policy_dir: Path, **overrides: object) -> PolicyUpdater:
    cfg = LearnerConfig(**{"lr": 1e-3, "torch_threads": 1, **overrides})  # type: ignore[arg-type]
    engine = TrainEngine(load_train_model(policy_dir), cfg, DIST)
    return PolicyUpdater(engine, UpdateSettings.from_config(cfg))


def params(up: PolicyUpdater) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in up.engine.module.state_dict().items()}


def assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_same_step(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two AdamW steps (lr 1e-3) from the same weights on the same gradient, up to float noise.

    Adam's first step is about lr·sign(g) per entry, so float noise in an entry whose gradient is ~0
    can move that one entry by a good part of lr. Allow that for at most 0.1% of the entries; a wrong
    loss weight or a lost micro-batch changes most entries.
    """
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert float((diffs > 1e-6).float().mean()) < 1e-3, f"{int((diffs > 1e-6).sum())} of {diffs.numel()} differ"
    assert float(diffs.max()) < 1e-3


def test_helpers() -> None:
    assert deal_to_ranks([5, 1, 4, 2], 2) == [[0, 1], [2, 3]]
    assert deal_to_ranks([3, 3], 3) == [[0], [1], []]
    assert cut_micro_batches([4, 4, 9, 1], [0, 1, 2, 3], 8) == [[0, 1], [2], [3]]
    assert [list(r) for r in split_minibatches(5, 2)] == [[0, 1], [2, 3, 4]]
    assert [list(r) for r in split_minibatches(2, 4)] == [[0], [1]]
    trees = [g[0] for g in groups_for(1, 3)]
    assert mini_batch_denominator(trees, "seq-mean-token-mean") == sum(len(t.leaves()) for t in trees)
    per_path = sum(sum(len(n.token_ids) for n in p[1:]) for t in trees for p in t.paths())
    assert mini_batch_denominator(trees, "token-mean") == per_path


def test_deepspeed_config_follows_the_learner_config() -> None:
    config = deepspeed_config(LearnerConfig(zero_stage=2, bf16=True, grad_clip=0.5))
    assert config["zero_optimization"] == {"stage": 2}
    assert config["bf16"] == {"enabled": True}
    assert config["gradient_clipping"] == 0.5
    assert "gradient_clipping" not in deepspeed_config(LearnerConfig(grad_clip=0))


def test_micro_batch_split_and_layout_do_not_change_the_step(policy_dir: Path) -> None:
    groups = groups_for(2)
    whole = updater(policy_dir, micro_batch_tokens=100_000)
    metrics = whole.update(groups, 0)
    one_by_one = updater(policy_dir, micro_batch_tokens=1)
    per_path = updater(policy_dir, packing=False, micro_batch_tokens=1)
    segments = updater(policy_dir, packed_layout="segments", segment_tokens=40)
    assert whole.tree_layout and not segments.tree_layout and not per_path.tree_layout
    split_norm = one_by_one.update(groups, 0)["grad_norm"]
    per_path_norm = per_path.update(groups, 0)["grad_norm"]
    segments_norm = segments.update(groups, 0)["grad_norm"]
    # Adam's first step hardly depends on the gradient's scale: the norms check the scale.
    assert split_norm == pytest.approx(metrics["grad_norm"], rel=1e-5)
    assert per_path_norm == pytest.approx(metrics["grad_norm"], rel=1e-5)
    assert segments_norm == pytest.approx(metrics["grad_norm"], rel=1e-5)
    assert_same_step(params(whole), params(one_by_one))
    assert_same_step(params(whole), params(per_path))
    assert_same_step(params(whole), params(segments))
    before = params(updater(policy_dir))
    assert any(not torch.equal(before[k], v) for k, v in params(whole).items())  # it did train
    for key in (
        "loss",
        "clip_fraction",
        "is_weight_mean",
        "is_weight_max",
        "is_masked_fraction",
        "kl_behav_k3",
        "kl_prox_behav_k3",
        "policy_entropy",
        "turn_kl_entropy",
        "reward_mean",
        "adv_mean",
        "grad_norm",
        "tokens_per_s",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["trees"] == 4 and metrics["optimizer_steps"] == 1
    assert 0 < metrics["turn_kl_entropy"] <= 1
    assert metrics["policy_entropy"] > 0


def test_zero_advantage_trees_are_skipped_without_changing_the_step(policy_dir: Path) -> None:
    groups = groups_for(11, n=3)
    flat = groups[0][0]
    nodes = [replace(n, reward=0.5) if n.reward is not None else n for n in flat.nodes.values()]
    groups[0] = [TurnTree.from_nodes(flat.tree_id, flat.task_id, flat.actor_id, nodes)]  # all leaves equal
    skipping = updater(policy_dir)
    full = updater(policy_dir, skip_zero_advantage=False)
    skipped = skipping.update(groups, 0)
    kept = full.update(groups, 0)
    assert skipped["trees_skipped"] == 1 and kept["trees_skipped"] == 0
    assert skipped["packed_tokens"] < kept["packed_tokens"]
    assert skipped["grad_norm"] == pytest.approx(kept["grad_norm"], rel=1e-5)
    assert skipped["loss"] == pytest.approx(kept["loss"], rel=1e-5, abs=1e-9)
    assert_same_step(params(skipping), params(full))


def test_stale_turns_beyond_the_cap_are_masked(policy_dir: Path) -> None:
    """Behaviour log-probs far below the learner's: pi_prox/pi_behav > cap on every turn, nothing trains."""
    groups = [[with_behaviour(t, logp=-40.0)] for g in groups_for(3) for t in g]
    up = updater(policy_dir, is_cap=5.0, is_mode="mask")
    before = params(up)
    metrics = up.update(groups, 0)
    assert metrics["is_masked_fraction"] == 1.0
    assert metrics["is_weight_max"] > 5.0
    assert_params_close(before, params(up), atol=0)
    truncating = updater(policy_dir, is_cap=5.0, is_mode="truncate")
    metrics = truncating.update(groups, 0)
    assert metrics["is_truncated_fraction"] == 1.0 and metrics["is_masked_fraction"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in params(truncating).items())


def test_loglinear_proximal_policy(policy_dir: Path) -> None:
    """Tokens from the learner's own version: alpha = 0, so pi_prox = pi_behav (weight 1, no forward pass)."""
    groups = groups_for(4, version=5)
    metrics = updater(policy_dir, prox_logp="loglinear").update(groups, 5)
    assert metrics["kl_prox_behav_k3"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["is_weight_mean"] == pytest.approx(1.0)
    stale = updater(policy_dir, prox_logp="loglinear").update(groups, 7)  # lag 2: alpha = 2/3
    assert stale["kl_prox_behav_k3"] > 0


def test_minibatches_take_several_optimizer_steps(policy_dir: Path) -> None:
    metrics = updater(policy_dir, minibatches=2, ppo_epochs=2).update(groups_for(5), 0)
    assert metrics["optimizer_steps"] == 4
    assert metrics["ratio_max"] >= metrics["ratio_min"]


def test_checkpoint_resume_gives_identical_next_step_weights(policy_dir: Path, tmp_path: Path) -> None:
    first = updater(policy_dir)
    first.update(groups_for(6), 0)
    first.update(groups_for(7), 1)
    path = checkpoint.prepare_dir(tmp_path, 2)
    first.engine.save(path / checkpoint.ENGINE_DIR, checkpoint.ENGINE_TAG)
    checkpoint.finish(path, checkpoint.LearnerState(version=2, step=2), b"")
    first.update(groups_for(8), 2)

    resumed = updater(policy_dir)
    latest = checkpoint.latest(tmp_path)
    assert latest is not None
    resumed.engine.load(latest / checkpoint.ENGINE_DIR, checkpoint.ENGINE_TAG)
    resumed.update(groups_for(8), 2)
    assert_params_close(params(first), params(resumed), atol=0)

    fresh = updater(policy_dir)  # without the optimizer state the step differs: the check can fail
    fresh.update(groups_for(8), 2)
    assert any(not torch.equal(params(first)[k], v) for k, v in params(fresh).items())


def test_turn_kl_entropy_by_hand() -> None:
    gen = dict(logprobs=[-1.0], versions=[0])
    nodes = [
        TurnNode(0, -1, 0, [1], [], [], [], FinishReason.PROMPT),
        TurnNode(1, 0, 1, [], [2], finish_reason=FinishReason.TOOL_CALL, **gen),  # type: ignore[arg-type]
        TurnNode(2, 1, 2, [3], [4], finish_reason=FinishReason.ANSWER, reward=1.0, is_leaf=True, **gen),  # type: ignore[arg-type]
        TurnNode(3, 0, 1, [], [5], finish_reason=FinishReason.ANSWER, reward=0.0, is_leaf=True, **gen),  # type: ignore[arg-type]
    ]
    tree = TurnTree.from_nodes("t", "task", "a", nodes)
    # Dense turn ids in packed DFS order: root 0, node 1 -> 1, node 2 -> 2, node 3 -> 3.
    values = turn_kl_entropy([tree], torch.tensor([0.0, 1.0, 3.0, 5.0]))
    p = torch.softmax(torch.tensor([0.25, 0.75], dtype=torch.float64), 0)
    expected = float(-(p * p.log()).sum()) / math.log(2)
    assert values == [pytest.approx(expected)]  # the one-turn path (node 3) has no turn distribution


def test_bf16_zero2_update_runs(policy_dir: Path) -> None:
    up = updater(policy_dir, zero_stage=2, bf16=True)
    before = params(up)
    metrics = up.update(groups_for(9), 0)
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert next(up.engine.module.parameters()).dtype == torch.bfloat16
    assert any(not torch.equal(before[k], v) for k, v in params(up).items())


def _rank_update(rank: int, policy_dir: str, port: int, zero_stage: int, out_dir: str, n_groups: int) -> None:
    torch.set_num_threads(1)
    cfg = LearnerConfig(lr=1e-3, zero_stage=zero_stage, micro_batch_tokens=60)
    dist = DistributedSpec(rank=rank, world_size=2, master_port=port)
    up = PolicyUpdater(TrainEngine(load_train_model(policy_dir), cfg, dist), UpdateSettings.from_config(cfg))
    metrics = up.update(groups_for(10, n=n_groups), 0)
    state = {k: v.detach().clone() for k, v in up.engine.module.state_dict().items()}
    torch.save({"params": state, "metrics": metrics}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize(("zero_stage", "n_groups"), [(0, 5), (2, 5), (0, 1)], ids=["zero0", "zero2", "one-rank-idle"])
def test_two_ranks_make_the_same_step_as_one(
    policy_dir: Path, tmp_path: Path, zero_stage: int, n_groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data parallel: each rank trains on its share; averaged gradients must equal the one-process step."""
    import torch.multiprocessing as mp

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # spawned ranks re-import this module
    mp.start_processes(
        _rank_update,
        args=(str(policy_dir), free_port(), zero_stage, str(tmp_path), n_groups),
        nprocs=2,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert_params_close(ranks[0]["params"], ranks[1]["params"], atol=0)
    single = updater(policy_dir, zero_stage=zero_stage, micro_batch_tokens=60)
    metrics = single.update(groups_for(10, n=n_groups), 0)
    assert_same_step(params(single), ranks[0]["params"])
    assert ranks[0]["metrics"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5)
    assert ranks[0]["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=1e-5, abs=1e-9)
    assert ranks[0]["metrics"]["loss_tokens"] == metrics["loss_tokens"]  # metrics are reduced over ranks
    assert ranks[0]["metrics"]["reward_mean"] == pytest.approx(metrics["reward_mean"])
