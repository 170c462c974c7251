"""One learner update: credit → packed micro-batches → proximal log-probs → clipped, corrected loss → step.

Decided here:
- Every rank receives the whole batch (the same task groups in the same order) and computes the credit
  itself; trees are then dealt to ranks by a deterministic greedy balance of their packed token counts,
  and each rank cuts its trees into micro-batches of at most `micro_batch_tokens` (a tree is never split).
- Aggregation denominators are global: G (seq-mean-token-mean) or the per-path loss-token count
  (token-mean) of the whole mini-batch over all ranks, so the sum of every micro-batch loss on every rank
  is the loss of the mini-batch, whatever the split. Each rank's loss is multiplied by the world size
  because DeepSpeed averages gradients over ranks.
- A rank with no tree in a mini-batch still takes part in the collective step with a zero loss.
- Packed trees use the tree layout (`learner.tree_attention`: each tree one flat row, every unique token
  computed once) when `packed_layout = "tree"` and the policy (and reference) model supports it; otherwise
  masked segments of `segment_tokens`. Both give the per-path loss and gradients.
- Trees whose advantages are all 0 (every leaf of the group scored the same) are not forwarded when
  there is no KL term (`skip_zero_advantage`): they add nothing to the loss or its gradient, but still
  count in the denominators, so the step is unchanged. Their tokens are missing from the metrics.
- Proximal log-probs (`recompute`) come from a no-grad forward of every micro-batch with the weights
  before the update, done once per sampled batch before its first optimizer step (AReaL). `loglinear`
  skips that pass: log π_prox ≈ log π_behav + α·(log π_θ − log π_behav) with
  α = (v_prox − v_behav)/(v_prox + 1 − v_behav) per token, using the detached current log-probs.
- Metrics are token-weighted means over the loss tokens of all ranks (max/min for the extremes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from common.config import LearnerConfig
from common.tree import TurnTree
from learner.credit import CREDIT_METHODS, TreeCredit, compute_credit, credit_stats
from learner.diagnostics import turn_kl_entropy, turn_kl_masses
from learner.engine import TrainEngine
from learner.logprobs import token_logprobs, token_logprobs_and_entropy
from learner.losses import PolicyLoss, PolicyLossInput, get_policy_loss
from learner.packing import PackedBatch, pack_trees, path_tokens, per_path_batch, unique_tokens
from learner.tree_attention import supports_tree_attention


@dataclass(frozen=True)
class UpdateSettings:
    """What one update needs from the config, resolved once (loss config object, credit options)."""

    credit: str
    credit_options: dict[str, Any]
    loss: PolicyLoss
    loss_config: Any
    aggregation: str = "seq-mean-token-mean"
    micro_batch_tokens: int = 4096
    minibatches: int = 1
    ppo_epochs: int = 1
    packing: bool = True
    packed_layout: str = "tree"
    segment_tokens: int | None = None
    prox_logp: str = "recompute"
    temperature: float = 1.0
    skip_zero_advantage: bool = True

    @classmethod
    def from_config(cls, cfg: LearnerConfig, temperature: float = 1.0) -> UpdateSettings:
        if cfg.credit not in CREDIT_METHODS:
            raise ValueError(f"unknown credit method {cfg.credit!r}; known: {', '.join(sorted(CREDIT_METHODS))}")
        options: dict[str, Any] = {}
        if cfg.credit_std is not None:
            options["std"] = cfg.credit_std
        if cfg.credit == "at2po":
            options |= {"weights": cfg.at2po_weights, "advantage": cfg.at2po_advantage}
        elif cfg.credit == "tree-grpo":
            options["mode"] = cfg.tree_grpo_mode
        loss = get_policy_loss(cfg.loss)
        overrides: dict[str, Any] = {"is_cap": cfg.is_cap or None, "is_mode": cfg.is_mode, "kl_coef": cfg.kl_coef}
        if cfg.eps_low is not None:
            overrides["eps_low"] = cfg.eps_low
        if cfg.eps_high is not None:
            overrides["eps_high"] = cfg.eps_high
        if cfg.dual_clip is not None:
            overrides["dual_clip"] = cfg.dual_clip or None
        known = {f.name for f in fields(loss.config_cls)}
        loss_config = loss.config_cls(**{k: v for k, v in overrides.items() if k in known})
        if cfg.loss == "gspo" and cfg.packing:
            raise ValueError("loss 'gspo' needs one row per trajectory: set learner.packing = false")
        return cls(
            credit=cfg.credit,
            credit_options=options,
            loss=loss,
            loss_config=loss_config,
            aggregation=cfg.aggregation,
            micro_batch_tokens=cfg.micro_batch_tokens,
            minibatches=cfg.minibatches,
            ppo_epochs=cfg.ppo_epochs,
            packing=cfg.packing,
            packed_layout=cfg.packed_layout,
            segment_tokens=cfg.segment_tokens or None,
            prox_logp=cfg.prox_logp,
            skip_zero_advantage=cfg.skip_zero_advantage,
            temperature=temperature if temperature > 0 else 1.0,
        )


@dataclass
class _Micro:
    trees: list[TurnTree]
    batch: PackedBatch
    prox_logp: Tensor | None = None
    ref_logp: Tensor | None = None


_SUMMED_ELSEWHERE = ("loss", "policy_loss", "num_tokens", "num_units", "is_masked_units")


@dataclass
class _MetricSums:
    """Token-weighted sums of the loss metrics, plus extremes, reduced over ranks at the end."""

    weighted: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)
    minima: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0

    def add(self, metrics: dict[str, float], tokens: float) -> None:
        self.tokens += tokens
        for key, value in metrics.items():
            if key.endswith("_max"):
                self.maxima[key] = max(self.maxima.get(key, -math.inf), value)
            elif key.endswith("_min"):
                self.minima[key] = min(self.minima.get(key, math.inf), value)
            elif key not in _SUMMED_ELSEWHERE:
                self.weighted[key] = self.weighted.get(key, 0.0) + value * tokens


def group_credit(groups: Sequence[Sequence[TurnTree]], method: str, options: dict[str, Any]) -> list[TreeCredit]:
    """Credit of every tree, each task group on its own, flattened in group order."""
    return [credit for group in groups for credit in compute_credit(method, list(group), **options)]


def mini_batch_denominator(trees: Sequence[TurnTree], aggregation: str) -> float:
    """G (trajectories) or Σ_p |y_p| (per-path loss tokens) of a whole mini-batch."""
    if aggregation == "token-mean":
        return float(sum(sum(len(n.token_ids) for n in path[1:]) for tree in trees for path in tree.paths()))
    return float(sum(len(tree.leaves()) for tree in trees))


def deal_to_ranks(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Deterministic greedy balance: largest first onto the least-loaded rank; indices keep batch order."""
    loads = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += sizes[index]
        owned[rank].append(index)
    return [sorted(indices) for indices in owned]


def cut_micro_batches(sizes: Sequence[int], indices: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive trees up to max_tokens per micro-batch; a larger tree goes alone."""
    out: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index in indices:
        if current and total + sizes[index] > max_tokens:
            out.append(current)
            current, total = [], 0
        current.append(index)
        total += sizes[index]
    if current:
        out.append(current)
    return out


def split_minibatches(n_groups: int, k: int) -> list[range]:
    k = max(1, min(k, n_groups))
    bounds = [round(i * n_groups / k) for i in range(k + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(k)]


class PolicyUpdater:
    """Runs updates on a `TrainEngine`; `ref_model` (frozen) is needed only when the loss has kl_coef > 0."""

    def __init__(self, engine: TrainEngine, settings: UpdateSettings, ref_model: nn.Module | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.ref_model = ref_model
        self.trees_skipped = 0
        if getattr(settings.loss_config, "kl_coef", 0.0) > 0 and ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        models = [engine.module] + ([ref_model] if ref_model is not None else [])
        self.tree_layout = (
            settings.packing and settings.packed_layout == "tree" and all(supports_tree_attention(m) for m in models)
        )
        self.metric_names = self._probe_metric_names()

    def _probe_metric_names(self) -> list[str]:
        """The loss's metric names, from a 2-token input: every rank reduces the same vector, even a rank
        that had no tree to train in a batch (a mismatch would break the collective)."""
        zeros = torch.zeros(2)
        probe = PolicyLossInput(
            logp=zeros,
            prox_logp=zeros,
            behav_logp=zeros,
            adv_pos=zeros.double(),
            adv_neg=zeros.double(),
            loss_mask=torch.ones(2, dtype=torch.bool),
            turn_index=torch.zeros(2, dtype=torch.long),
            seq_index=torch.zeros(2, dtype=torch.long),
            ref_logp=zeros if self.ref_model is not None else None,
        )
        return sorted(self.settings.loss(probe, self.settings.loss_config).metrics)

    @property
    def rank(self) -> int:
        return self.engine.dist.rank

    @property
    def world_size(self) -> int:
        return self.engine.dist.world_size

    def _layout(self, trees: list[TurnTree], credits: list[TreeCredit], denominator: float) -> PackedBatch:
        aggregation = self.settings.aggregation
        if self.tree_layout:
            return pack_trees(trees, credits, aggregation, denominator, masks=False)  # type: ignore[arg-type]
        if self.settings.packing:
            return pack_trees(trees, credits, aggregation, denominator, self.settings.segment_tokens)  # type: ignore[arg-type]
        return per_path_batch(trees, credits, aggregation, denominator)  # type: ignore[arg-type]

    def _skippable(self, credit: TreeCredit) -> bool:
        """A tree whose every advantage is 0 adds nothing to the loss or its gradient (without a KL term)."""
        if not self.settings.skip_zero_advantage or getattr(self.settings.loss_config, "kl_coef", 0.0) > 0:
            return False
        return all(value == 0.0 for value in credit.values())

    def _plan(self, groups: Sequence[Sequence[TurnTree]], credits: list[TreeCredit]) -> list[list[_Micro]]:
        """Per mini-batch, this rank's micro-batches."""
        offsets = [0]
        for group in groups:
            offsets.append(offsets[-1] + len(group))
        flat = [tree for group in groups for tree in group]
        plan: list[list[_Micro]] = []
        for groups_range in split_minibatches(len(groups), self.settings.minibatches):
            lo, hi = offsets[groups_range.start], offsets[groups_range.stop]
            trees, tree_credits = flat[lo:hi], credits[lo:hi]
            denominator = mini_batch_denominator(trees, self.settings.aggregation)
            size_of = unique_tokens if self.settings.packing else path_tokens
            sizes = [size_of(t) for t in trees]
            trained = [i for i in range(len(trees)) if not self._skippable(tree_credits[i])]
            self.trees_skipped += len(trees) - len(trained)
            dealt = deal_to_ranks([sizes[i] for i in trained], self.world_size)[self.rank]
            mine = [trained[j] for j in dealt]
            micros = []
            for chunk in cut_micro_batches(sizes, mine, self.settings.micro_batch_tokens):
                chunk_trees = [trees[i] for i in chunk]
                batch = self._layout(chunk_trees, [tree_credits[i] for i in chunk], denominator)
                micros.append(_Micro(chunk_trees, batch))
            plan.append(micros)
        return plan

    @torch.no_grad()
    def _fill_reference_logps(self, plan: list[list[_Micro]]) -> None:
        module = self.engine.module
        for micros in plan:
            for micro in micros:
                if self.settings.prox_logp == "recompute":
                    micro.prox_logp = token_logprobs(module, micro.batch, self.settings.temperature).float()
                if self.ref_model is not None:
                    micro.ref_logp = token_logprobs(self.ref_model, micro.batch, self.settings.temperature).float()

    def _prox(self, micro: _Micro, logp: Tensor, learner_version: int) -> Tensor:
        if micro.prox_logp is not None:
            return micro.prox_logp
        behav = micro.batch.behav_logp.to(logp.device)
        v_behav = micro.batch.behav_version.to(logp.device).double()
        lag = (learner_version - v_behav).clamp(min=0.0)
        alpha = (lag / (lag + 1.0)).to(logp.dtype)
        return behav + alpha * (logp.detach() - behav)

    def update(self, groups: Sequence[Sequence[TurnTree]], learner_version: int) -> dict[str, float]:
        """Train on one sampled batch (task groups, the same on every rank); returns the batch's metrics."""
        started = time.perf_counter()
        settings = self.settings
        self.trees_skipped = 0
        credits = group_credit(groups, settings.credit, settings.credit_options)
        plan = self._plan(groups, credits)
        self.engine.train()
        self._fill_reference_logps(plan)
        sums = _MetricSums()
        entropy_sum = 0.0
        turn_entropies: list[float] = []
        loss_total = 0.0
        grad_norms: list[float] = []
        local_tokens = 0
        module = self.engine.module
        for epoch in range(settings.ppo_epochs):
            for micros in plan:
                if not micros:
                    dummy = sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros(()))
                    self.engine.backward(dummy, boundary=True)
                for k, micro in enumerate(micros):
                    batch = micro.batch
                    logp, entropy = token_logprobs_and_entropy(module, batch, settings.temperature)
                    device = logp.device
                    mask = batch.loss_mask.to(device)
                    inp = PolicyLossInput(
                        logp=logp,
                        prox_logp=self._prox(micro, logp, learner_version),
                        behav_logp=batch.behav_logp.to(device),
                        adv_pos=batch.adv_pos.to(device),
                        adv_neg=batch.adv_neg.to(device),
                        loss_mask=mask,
                        turn_index=batch.turn_index.to(device),
                        seq_index=batch.seq_index.to(device),
                        ref_logp=micro.ref_logp,
                    )
                    out = settings.loss(inp, settings.loss_config)
                    self.engine.backward(out.loss * self.engine.loss_scale, boundary=k == len(micros) - 1)
                    loss_total += float(out.loss.detach())
                    n_loss = float(mask.sum())
                    if epoch == 0:
                        local_tokens += batch.num_tokens
                        sums.add(out.metrics, n_loss)
                        entropy_sum += float(entropy[mask].sum())
                        d = (logp.detach() - inp.behav_logp).double()
                        kl_tok = torch.where(mask, torch.expm1(d) - d, torch.zeros_like(d))
                        n_turns = int(batch.turn_index.max()) + 1 if batch.num_tokens else 0
                        masses = turn_kl_masses(kl_tok, batch.turn_index.to(device), mask, n_turns)
                        turn_entropies += turn_kl_entropy(micro.trees, masses)
                grad_norms.append(self.engine.step())
        elapsed = time.perf_counter() - started
        metrics = self._reduce(sums, entropy_sum, turn_entropies, loss_total, local_tokens)
        flat = [tree for group in groups for tree in group]
        metrics.update(self._batch_stats(flat, credits))
        metrics["grad_norm"] = grad_norms[-1] if grad_norms else math.nan
        metrics["optimizer_steps"] = float(len(grad_norms))
        metrics["trees_skipped"] = float(self.trees_skipped)
        metrics["update_seconds"] = elapsed
        metrics["tokens_per_s"] = metrics["packed_tokens"] / elapsed if elapsed > 0 else 0.0
        return metrics

    def _reduce(
        self, sums: _MetricSums, entropy_sum: float, turn_entropies: list[float], loss: float, tokens: int
    ) -> dict[str, float]:
        names = self.metric_names
        max_keys = [k for k in names if k.endswith("_max")]
        min_keys = [k for k in names if k.endswith("_min")]
        keys = [k for k in names if k not in max_keys and k not in min_keys and k not in _SUMMED_ELSEWHERE]
        vector = torch.tensor(
            [sums.tokens, entropy_sum, sum(turn_entropies), float(len(turn_entropies)), loss, float(tokens)]
            + [sums.weighted.get(k, 0.0) for k in keys],
            dtype=torch.float64,
        )
        extremes = torch.tensor(
            [sums.maxima.get(k, -math.inf) for k in max_keys] + [-sums.minima.get(k, math.inf) for k in min_keys],
            dtype=torch.float64,
        )
        if self.world_size > 1:
            torch_dist.all_reduce(vector)
            if extremes.numel():
                torch_dist.all_reduce(extremes, op=torch_dist.ReduceOp.MAX)
        total, ent, turn_sum, turn_n, loss_sum, packed = (float(v) for v in vector[:6])
        out = {k: float(v) / total if total else 0.0 for k, v in zip(keys, vector[6:].tolist(), strict=True)}
        for i, key in enumerate(max_keys):
            value = float(extremes[i])
            out[key] = value if math.isfinite(value) else math.nan
        for i, key in enumerate(min_keys):
            value = -float(extremes[len(max_keys) + i])
            out[key] = value if math.isfinite(value) else math.nan
        out["loss"] = loss_sum
        out["loss_tokens"] = total
        out["packed_tokens"] = packed
        out["policy_entropy"] = ent / total if total else 0.0
        out["turn_kl_entropy"] = turn_sum / turn_n if turn_n else math.nan
        return out

    @staticmethod
    def _batch_stats(trees: list[TurnTree], credits: list[TreeCredit]) -> dict[str, float]:
        rewards = [float(leaf.reward) for tree in trees for leaf in tree.leaves() if leaf.reward is not None]
        reward_t = torch.tensor(rewards, dtype=torch.float64) if rewards else torch.zeros(1, dtype=torch.float64)
        stats: dict[str, float] = {
            "trees": float(len(trees)),
            "trajectories": float(len(rewards)),
            "reward_mean": float(reward_t.mean()),
            "reward_std": float(reward_t.std(unbiased=False)),
            "reward_min": float(reward_t.min()),
            "reward_max": float(reward_t.max()),
        }
        if any(credit.path_advantages for credit in credits):
            stats.update({k: float(v) for k, v in credit_stats(credits).as_dict(prefix="adv_").items()})
        return stats
