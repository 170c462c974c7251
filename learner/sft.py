"""Supervised fine-tuning (the warm start) on pre-tokenised sequences, with the learner's DeepSpeed engine.

Decided here:
- Input: sequences as (input_ids, loss_mask) pairs; token i is trained when loss_mask[i] = 1 (the
  policy's own turns), predicted from the positions before it. Observation and prompt tokens (mask 0)
  are context only.
- Loss: token-mean cross-entropy over the trained tokens of one optimizer step. A step takes sequences
  (shuffled each epoch with the seed) until they hold at least `batch_tokens` tokens; it is cut into
  micro-batches of at most `micro_batch_tokens` padded tokens (rows sorted by length, right padding, an
  attention mask), each micro-batch's summed loss divided by the step's trained-token count, so the
  accumulated gradient is that of the whole step whatever the cut (tested).
- The engine is `TrainEngine` with a copy of `LearnerConfig` whose lr is the warm start's; one process
  (rank 0 of a world of 1): the warm start is small and runs before the RL processes start.
- Only the trained positions go through the output layer: the decoder's hidden states are gathered at
  the positions that predict a trained token, and the vocabulary projection runs on those rows only
  (observations dominate a demonstration, so this is most of the output layer's cost saved). Models
  whose logits are more than that projection (soft-capping, a logit scale) take the plain forward.
- Learning rate: `sft.lr_schedule = "cosine"` warms up linearly over `warmup_fraction` of all steps, then
  decays along a cosine to `min_lr_ratio` x lr at the last step (every epoch's steps are planned first, so
  the total is exact); "constant" keeps lr throughout. A constant 2e-3 left the tiny policy wherever its
  last noisy steps put it (held-out loss 0.43 against a train loss of 0.23).
- Held-out loss (same token mean, no gradient) is measured before and after training.
- The result is saved as a Hugging Face model directory with the source directory's tokenizer, chat
  template and generation config (what `at2po actor run --set model.dir=...` and the learner load). It is
  written to a temporary directory and renamed into place, so a model directory with config.json is
  always complete (the supervisor reuses one that exists).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import LearnerConfig, SftConfig
from common.log import get_logger
from learner.checkpoint import export_model
from learner.engine import DistributedSpec, TrainEngine, load_train_model

log = get_logger("learner.sft")

SftSequence = tuple[Sequence[int], Sequence[int]]
# Config attributes under which a model transforms its logits beyond the output projection.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class SftSettings:
    epochs: int = 3
    micro_batch_tokens: int = 8192
    batch_tokens: int = 16384
    seed: int = 0
    log_every: int = 10
    lr: float = 2e-3
    lr_schedule: str = "constant"
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0

    @classmethod
    def from_config(cls, sft: SftConfig) -> SftSettings:
        return cls(
            sft.epochs,
            sft.micro_batch_tokens,
            sft.batch_tokens,
            sft.seed,
            lr=sft.lr,
            lr_schedule=sft.lr_schedule,
            warmup_fraction=sft.warmup_fraction,
            min_lr_ratio=sft.min_lr_ratio,
        )

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of `total`."""
        if self.lr_schedule == "constant" or total <= 1:
            return self.lr
        warmup = int(self.warmup_fraction * total)
        if step < warmup:
            return self.lr * (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - 1 - warmup)
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class SftResult:
    """What the warm start did; losses are token means over trained tokens (nats)."""

    step_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    heldout_loss_before: float | None = None
    heldout_loss_after: float | None = None
    trained_tokens: int = 0
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.step_losses)


def check_sequences(sequences: Sequence[SftSequence]) -> None:
    for index, (ids, mask) in enumerate(sequences):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {index}: {len(ids)} ids but {len(mask)} mask entries")
        if any(m not in (0, 1) for m in mask):
            raise ValueError(f"sequence {index}: loss mask entries must be 0 or 1")


def trained_count(sequence: SftSequence) -> int:
    """Tokens that carry loss: mask 1 and a position before them (the first token is never predicted)."""
    return int(sum(sequence[1][1:]))


def plan_steps(lengths: Sequence[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """One epoch: a shuffled order cut into steps of at least `batch_tokens` tokens (the last may hold fewer)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    steps: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index in order:
        current.append(index)
        tokens += lengths[index]
        if tokens >= batch_tokens:
            steps.append(current)
            current, tokens = [], 0
    if current:
        steps.append(current)
    return steps


def cut_micro_batches(indices: Sequence[int], lengths: Sequence[int], micro_batch_tokens: int) -> list[list[int]]:
    """Rows sorted longest first, grouped while rows x longest <= `micro_batch_tokens` (a longer row goes alone)."""
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    micros: list[list[int]] = []
    current: list[int] = []
    for index in ordered:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * longest > micro_batch_tokens:
            micros.append(current)
            current = []
        current.append(index)
    if current:
        micros.append(current)
    return micros


def _plain_projection(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def micro_batch_loss(model: nn.Module, rows: Sequence[SftSequence]) -> tuple[Tensor, int]:
    """Summed cross-entropy of the trained tokens of `rows` (right-padded into one forward) and their count."""
    device = next(model.parameters()).device
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    trained = torch.zeros((len(rows), longest), dtype=torch.bool)
    for row, (ids, mask) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention[row, : len(ids)] = 1
        trained[row, : len(mask)] = torch.as_tensor(list(mask), dtype=torch.bool)
    trained[:, 0] = False
    row_index, target_pos = trained.nonzero(as_tuple=True)
    targets = input_ids[row_index, target_pos].to(device)
    source_pos = target_pos - 1
    if len(targets) == 0:
        zero = sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), torch.zeros((), device=device))
        return zero, 0
    ids, attn = input_ids.to(device), attention.to(device)
    if _plain_projection(model):
        hidden = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[row_index.to(device), source_pos.to(device)])
    else:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        logits = logits[row_index.to(device), source_pos.to(device)]
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, len(targets)


@torch.no_grad()
def evaluate_loss(model: nn.Module, sequences: Sequence[SftSequence], micro_batch_tokens: int) -> float | None:
    """Token-mean cross-entropy over the trained tokens of `sequences` (None when they have none)."""
    if not sequences:
        return None
    was_training = model.training
    model.eval()
    lengths = [len(ids) for ids, _ in sequences]
    total, count = 0.0, 0
    try:
        for micro in cut_micro_batches(range(len(sequences)), lengths, micro_batch_tokens):
            loss, n = micro_batch_loss(model, [sequences[i] for i in micro])
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    return total / count if count else None


def train_steps(
    engine: TrainEngine,
    sequences: Sequence[SftSequence],
    settings: SftSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[list[float], list[float]]:
    """Every epoch's optimizer steps; returns the per-step losses (token means) and gradient norms."""
    lengths = [len(ids) for ids, _ in sequences]
    rng = random.Random(settings.seed)
    losses: list[float] = []
    norms: list[float] = []
    engine.train()
    planned = [step for _epoch in range(settings.epochs) for step in plan_steps(lengths, settings.batch_tokens, rng)]
    planned = [step for step in planned if any(trained_count(sequences[i]) for i in step)]
    for number, step in enumerate(planned):
        denominator = sum(trained_count(sequences[i]) for i in step)
        micros = cut_micro_batches(step, lengths, settings.micro_batch_tokens)
        step_loss = 0.0
        for k, micro in enumerate(micros):
            loss, _ = micro_batch_loss(engine.module, [sequences[i] for i in micro])
            scaled = loss / denominator
            engine.backward(scaled * engine.loss_scale, boundary=k == len(micros) - 1)
            step_loss += float(scaled.detach())
        engine.set_lr(settings.lr_at(number, len(planned)))
        norms.append(engine.step())
        losses.append(step_loss)
        if on_step is not None:
            on_step(len(losses), step_loss)
    return losses, norms


def save_model_dir(module: nn.Module, source_dir: Path, out_dir: Path) -> Path:
    """Write the model directory next to `out_dir` and rename it into place (replacing an older one)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    export_model(module, Path(source_dir), staging)
    generation = Path(source_dir) / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, staging / generation.name)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def run_sft(
    model_dir: str | Path,
    train: Sequence[SftSequence],
    heldout: Sequence[SftSequence],
    sft: SftConfig,
    learner: LearnerConfig,
    out_dir: str | Path | None,
    dist: DistributedSpec | None = None,
) -> SftResult:
    """Fine-tune the model in `model_dir` on `train`, measure `heldout` before and after, save to `out_dir`."""
    from learner.launch import free_port

    check_sequences(train)
    check_sequences(heldout)
    if not any(trained_count(s) for s in train):
        raise ValueError("no trained tokens: every training sequence has an all-zero loss mask")
    started = time.perf_counter()
    if learner.torch_threads is not None:
        torch.set_num_threads(learner.torch_threads)
    torch.manual_seed(sft.seed)
    settings = SftSettings.from_config(sft)
    cfg = learner.model_copy(update={"lr": sft.lr})
    engine = TrainEngine(
        load_train_model(model_dir, cfg.bf16), cfg, dist or DistributedSpec(master_port=cfg.master_port or free_port())
    )
    result = SftResult(trained_tokens=sum(trained_count(s) for s in train) * settings.epochs)
    result.heldout_loss_before = evaluate_loss(engine.module, heldout, settings.micro_batch_tokens)
    log.info("sft_started", sequences=len(train), heldout=len(heldout), heldout_loss=result.heldout_loss_before)

    def report(step: int, loss: float) -> None:
        if step % settings.log_every == 0:
            log.info("sft_step", step=step, loss=round(loss, 4), seconds=round(time.perf_counter() - started, 1))

    result.step_losses, result.grad_norms = train_steps(engine, train, settings, report)
    result.heldout_loss_after = evaluate_loss(engine.module, heldout, settings.micro_batch_tokens)
    if out_dir is not None:
        save_model_dir(engine.module, Path(model_dir), Path(out_dir))
    result.seconds = time.perf_counter() - started
    final = result.step_losses[-1] if result.step_losses else math.nan
    log.info(
        "sft_done", steps=result.steps, train_loss=final, heldout_loss=result.heldout_loss_after, seconds=result.seconds
    )
    return result
