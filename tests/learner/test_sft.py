"""The warm start's trainer: step planning, masked loss, cut-invariant steps, and loss going down.

Synthetic sequences from a tiny policy: a "prompt" of random ids (mask 0) followed by a fixed "answer" pattern
(mask 1) that depends on the prompt's first token, so the loss on held-out sequences can only fall by learning.
The last tests run the whole warm start (`at2po sft run`) on demonstrations made from the synthetic world.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from typer.testing import CliRunner

from common.config import LearnerConfig, SftConfig
from learner.engine import DistributedSpec, TrainEngine, load_train_model
from learner.launch import free_port
from learner.sft import (
    SftSequence,
    SftSettings,
    check_sequences,
    cut_micro_batches,
    evaluate_loss,
    micro_batch_loss,
    plan_steps,
    run_sft,
    save_model_dir,
    train_steps,
)
from tests.learner.trees import VOCAB, save_tiny_policy

DIST = DistributedSpec(master_port=free_port())


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("sft_policy") / "model")


def sequences(n: int, seed: int) -> list[SftSequence]:
    """Prompt of random ids (not trained), then an answer of 6 ids determined by the prompt's first id (trained)."""
    rng = random.Random(seed)
    out: list[SftSequence] = []
    for _ in range(n):
        prompt = [rng.randrange(4, VOCAB) for _ in range(rng.randint(5, 30))]
        key = prompt[0] % 4
        answer = [(key * 7 + k) % VOCAB + 1 for k in range(6)]
        out.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return out


def engine_for(policy_dir: Path, lr: float = 1e-3) -> TrainEngine:
    cfg = LearnerConfig(lr=lr, torch_threads=1, grad_clip=0.0)
    return TrainEngine(load_train_model(policy_dir), cfg, DIST)


def test_plan_steps_visits_every_sequence_once_per_epoch() -> None:
    lengths = [10, 3, 7, 20, 1, 5, 9]
    steps = plan_steps(lengths, batch_tokens=15, rng=random.Random(0))
    assert sorted(i for step in steps for i in step) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in step) >= 15 for step in steps[:-1])
    assert steps != plan_steps(lengths, batch_tokens=15, rng=random.Random(1))


def test_micro_batches_respect_the_padded_token_budget() -> None:
    lengths = [10, 3, 7, 20, 1, 5, 9]
    micros = cut_micro_batches(range(len(lengths)), lengths, micro_batch_tokens=20)
    assert sorted(i for micro in micros for i in micro) == list(range(len(lengths)))
    for micro in micros:
        assert len(micro) == 1 or len(micro) * max(lengths[i] for i in micro) <= 20


def test_bad_sequences_are_refused(policy_dir: Path) -> None:
    with pytest.raises(ValueError, match="2 ids but 3 mask"):
        check_sequences([([1, 2], [0, 1, 1])])
    with pytest.raises(ValueError, match="0 or 1"):
        check_sequences([([1, 2], [0, 2])])
    with pytest.raises(ValueError, match="no trained tokens"):
        run_sft(policy_dir, [([1, 2, 3], [0, 0, 0])], [], SftConfig(), LearnerConfig(torch_threads=1), None, DIST)


def test_loss_is_cross_entropy_of_the_masked_tokens_only(policy_dir: Path) -> None:
    model = load_train_model(policy_dir)
    rows = sequences(3, seed=4)
    loss, count = micro_batch_loss(model, rows)
    expected, expected_count = torch.zeros(()), 0
    for ids, mask in rows:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        for position in range(1, len(ids)):
            if mask[position]:
                expected = expected + F.cross_entropy(
                    logits[position - 1], torch.tensor(ids[position]), reduction="sum"
                )
                expected_count += 1
    assert count == expected_count == sum(sum(mask[1:]) for _, mask in rows)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    # the targets under mask 0 do not matter
    changed = [([*ids[:-7], (ids[-7] + 1) % VOCAB, *ids[-6:]], mask) for ids, mask in rows]
    assert [m[-7] for _, m in rows] == [0, 0, 0]
    other, _ = micro_batch_loss(model, changed)
    assert (
        abs(float(other.detach()) - float(loss.detach())) > 0
    )  # context changed, so the trained tokens' loss moves ...
    no_train = [(ids, [0] * len(ids)) for ids, _ in rows]
    zero, n = micro_batch_loss(model, no_train)
    assert n == 0 and float(zero.detach()) == 0.0  # ... but with nothing trained there is no loss at all
    zero.backward()  # and the zero still reaches every parameter, so a rank with nothing to train can step


def test_gathered_projection_equals_the_full_forward(policy_dir: Path) -> None:
    model = load_train_model(policy_dir)
    rows = sequences(5, seed=9)
    gathered, _ = micro_batch_loss(model, rows)
    model.config.logit_scale = 2.0  # a logit transform: the plain forward is taken instead
    try:
        full, _ = micro_batch_loss(model, rows)
    finally:
        del model.config.logit_scale
    torch.testing.assert_close(gathered, full, rtol=1e-5, atol=1e-4)


def step_gradients(
    policy_dir: Path, micro_batch_tokens: int, rows: list[SftSequence]
) -> tuple[dict[str, Tensor], float]:
    """The accumulated gradient that one optimizer step of `train_steps` applies, and the step's loss."""
    engine = engine_for(policy_dir)
    grads: dict[str, Tensor] = {}
    optimizer_step = engine.step

    def recording_step() -> float:
        for name, param in engine.module.named_parameters():
            assert param.grad is not None, name
            grads[name] = param.grad.detach().clone()
        return optimizer_step()

    engine.step = recording_step  # type: ignore[method-assign]
    settings = SftSettings(epochs=1, micro_batch_tokens=micro_batch_tokens, batch_tokens=10**9, seed=0)
    losses, _ = train_steps(engine, rows, settings)
    assert len(losses) == 1
    return grads, losses[0]


def test_a_step_is_the_same_whatever_the_micro_batch_cut(policy_dir: Path) -> None:
    rows = sequences(12, seed=2)
    whole, whole_loss = step_gradients(policy_dir, micro_batch_tokens=10**6, rows=rows)
    cut, cut_loss = step_gradients(policy_dir, micro_batch_tokens=40, rows=rows)
    assert len(cut_micro_batches(range(12), [len(ids) for ids, _ in rows], 40)) > 3
    assert cut_loss == pytest.approx(whole_loss, rel=1e-5)
    assert max(float(g.abs().max()) for g in whole.values()) > 1e-3  # a wrong denominator shows far above atol
    for name in whole:
        torch.testing.assert_close(whole[name], cut[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_training_lowers_held_out_loss_and_saves_a_loadable_model(policy_dir: Path, tmp_path: Path) -> None:
    train, heldout = sequences(160, seed=0), sequences(24, seed=1)
    sft = SftConfig(epochs=6, lr=3e-3, batch_tokens=400, micro_batch_tokens=2000, seed=0)
    (policy_dir / "tokenizer_config.json").write_text("{}", encoding="utf-8")  # stands for the tokenizer files
    result = run_sft(policy_dir, train, heldout, sft, LearnerConfig(torch_threads=1), tmp_path / "warm", DIST)
    assert result.heldout_loss_before is not None and result.heldout_loss_after is not None
    assert result.heldout_loss_after < 0.5 * result.heldout_loss_before
    assert np.mean(result.step_losses[-5:]) < np.mean(result.step_losses[:5])
    assert result.trained_tokens == 6 * sum(sum(m[1:]) for _, m in train)
    assert result.steps == len(result.grad_norms) > 6
    saved = load_train_model(tmp_path / "warm")
    assert (tmp_path / "warm" / "tokenizer_config.json").is_file()
    assert evaluate_loss(saved, heldout, 2000) == pytest.approx(result.heldout_loss_after, rel=1e-4)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_saving_replaces_an_older_model_directory(policy_dir: Path, tmp_path: Path) -> None:
    model = load_train_model(policy_dir)
    target = tmp_path / "out"
    save_model_dir(model, policy_dir, target)
    (target / "stale.txt").write_text("old", encoding="utf-8")
    save_model_dir(model, policy_dir, target)
    assert (target / "config.json").is_file() and not (target / "stale.txt").exists()


# ------------------------------------------------------------------ the warm start on the synthetic world


@pytest.mark.slow
def test_warm_start_lowers_loss_on_held_out_demonstrations(tmp_path: Path) -> None:
    """`at2po sft run` end to end: demonstrations made, tokenised, trained on; held-out loss falls."""
    from actors.tiny_model import TinyModelSpec, init_tiny_model, world_training_texts
    from ops.sft_cmd import sft_app

    texts = world_training_texts(seed=0, n_tasks=100, n_arithmetic=20, max_passages=300)
    model_dir = init_tiny_model(tmp_path / "tiny", TinyModelSpec(), texts)
    overrides = [
        f"tasks.data_dir={json.dumps(str(tmp_path / 'world'))}",
        "tasks.n_train=30",
        "tasks.n_test=2",
        f"model.dir={json.dumps(str(model_dir))}",
        "sft.n_demos=30",
        "sft.demo_worlds=2",
        "sft.epochs=3",
        "sft.batch_tokens=4096",
        "sft.holdout_fraction=0.2",
        "learner.torch_threads=2",
    ]
    args = ["run", "--out", str(tmp_path / "warm")]
    for override in overrides:
        args += ["--set", override]
    result = CliRunner().invoke(sft_app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n_demos"] == 30 and summary["n_heldout"] > 0 and summary["n_train"] + summary["n_heldout"] == 30
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] - 1.0
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert Path(summary["demos"]) == tmp_path / "warm-demos.jsonl"
    assert (tmp_path / "warm" / "config.json").is_file() and (tmp_path / "warm" / "tokenizer.json").is_file()


def test_the_cosine_schedule_warms_up_peaks_and_decays_to_its_floor() -> None:
    settings = SftSettings(lr=1e-3, lr_schedule="cosine", warmup_fraction=0.1, min_lr_ratio=0.1)
    rates = [settings.lr_at(step, 100) for step in range(100)]
    assert rates[0] == pytest.approx(1e-3 / 11) and rates[9] == pytest.approx(1e-3 * 10 / 11)
    assert max(rates) == pytest.approx(1e-3) == rates[10]
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[-1] == pytest.approx(1e-4)
    assert rates[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    constant = SftSettings(lr=1e-3, lr_schedule="constant", warmup_fraction=0.1)
    assert {constant.lr_at(step, 100) for step in range(100)} == {1e-3}


def test_train_steps_sets_each_steps_learning_rate_on_the_optimizer(policy_dir: Path) -> None:
    engine = engine_for(policy_dir)
    applied: list[float] = []
    optimizer_step = engine.step

    def recording_step() -> float:
        applied.append(engine.engine.optimizer.param_groups[0]["lr"])
        return optimizer_step()

    engine.step = recording_step  # type: ignore[method-assign]
    settings = SftSettings(epochs=2, micro_batch_tokens=2000, batch_tokens=100, lr=2e-3, lr_schedule="cosine")
    losses, _ = train_steps(engine, sequences(40, seed=3), settings)
    assert len(applied) == len(losses) > 4
    assert applied == [pytest.approx(settings.lr_at(i, len(losses))) for i in range(len(losses))]
    assert applied[-1] == pytest.approx(0.0, abs=1e-12) and applied[0] == pytest.approx(2e-3)
