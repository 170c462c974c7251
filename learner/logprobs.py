"""Per-token log-probs of a `PackedBatch` under a transformers causal LM, in one forward pass.

Decided interface
-----------------
    token_logprobs(model, batch, temperature=1.0) -> Tensor[T]   (float32, differentiable)

Two layouts (`learner.packing`):

- Tree layout (`segment_attention` is None): one flat row [1, T], every unique token once, attention by
  `learner.tree_attention` (each root→leaf stretch against its ancestors' cached keys/values). Needs a model
  `supports_tree_attention` accepts; any other is refused (use the masked layout).
- Masked layouts (per-path, or packed segments): S rows, one per segment, padded to the longest segment L,
  with `batch.position_ids` and a custom 4-D attention mask [S, 1, L, L] built from `batch.segment_attention`
  (memory O(S·L²) rather than O(T²) for T tokens in all). The mask is ADDITIVE in the model's dtype (0 where
  allowed, the dtype's minimum elsewhere): transformers 5.23 passes any 4-D mask through unchanged
  (`masking_utils._preprocess_mask_arguments`), the `eager` kernel adds it to the scores and `sdpa` accepts a
  float mask too, so both work (a bool mask would break `eager`, which adds it). Flash-attention and flex
  kernels cannot take an arbitrary [L, L] mask, so they are refused: load the model with
  `attn_implementation="sdpa"` (default; on GPU it uses the memory-efficient kernel with a mask) or `"eager"`.
  Every row (padding included) attends at least to itself, so no softmax row is fully masked.

logp of token i = log_softmax(logits[prev_index[i]] / temperature)[input_ids[i]], 0 where prev_index = -1;
logits are upcast to float32 before the softmax. In the tree layout the head runs only on the tokens that
predict another (a 1-D `logits_to_keep`); the masked layouts compute every row's logits and gather them
(a per-row 2-D `logits_to_keep` needs transformers newer than the oldest one supported). Memory: the masks
are O(S·L²) (none in the tree layout), the logits O(T·V).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learner.packing import PackedBatch
from learner.tree_attention import TREE_MODEL_TYPES, build_tree_plan, supports_tree_attention, use_tree_attention

SUPPORTED_ATTENTION = ("eager", "sdpa")


def attention_bias(batch: PackedBatch, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The additive [S, 1, L, L] mask of the segment batch: 0 where allowed, dtype minimum elsewhere.

    Padding positions (beyond a segment's length) attend to themselves only, so no softmax row is empty.
    """
    allowed = batch.segment_attention.to(device).clone()
    longest = allowed.shape[-1]
    diagonal = torch.arange(longest, device=allowed.device)
    allowed[:, diagonal, diagonal] = True
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


def segment_index(batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """(segment, offset) of every flat token: where it sits in the padded [S, L] segment batch."""
    lengths = batch.segment_lengths
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    offset = torch.arange(batch.num_tokens) - batch.segment_starts[segment]
    return segment, offset


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(model.parameters()).dtype


def token_logprobs(model: nn.Module, batch: PackedBatch, temperature: float = 1.0) -> Tensor:
    """One forward over the packed tokens; returns the log-prob of every token given its own path."""
    return _forward(model, batch, temperature, with_entropy=False)[0]


def token_logprobs_and_entropy(model: nn.Module, batch: PackedBatch, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """As `token_logprobs`, plus the (detached) entropy of the tempered next-token distribution per token.

    entropy[i] = H(softmax(logits[prev_index[i]] / temperature)), 0 where prev_index = -1: the policy
    entropy the learner logs (AT²PO's claim is that it does not collapse early).
    """
    logp, entropy = _forward(model, batch, temperature, with_entropy=True)
    assert entropy is not None
    return logp, entropy


def _forward(
    model: nn.Module, batch: PackedBatch, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    total = batch.num_tokens
    if total == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return empty, (empty if with_entropy else None)
    prev = batch.prev_index.to(device)
    has_prev = prev >= 0
    if batch.segment_attention is None:
        rows = _tree_logits(model, batch, prev[has_prev], device)
    else:
        rows = _segment_logits(model, batch, prev[has_prev].cpu(), device)
    targets = batch.input_ids.to(device)[has_prev]
    return _pick(rows, targets, (has_prev.nonzero().squeeze(1),), total, temperature, with_entropy)


def _tree_logits(model: nn.Module, batch: PackedBatch, source: Tensor, device: torch.device) -> Tensor:
    """Logits at the `source` tokens of a tree layout: one flat row, tree attention, the head on `source` only."""
    if not supports_tree_attention(model):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"the tree layout needs a model tree attention supports ({', '.join(TREE_MODEL_TYPES)}, no sliding "
            f"window), not {kind!r}: pack with masks (learner.packed_layout = 'segments')"
        )
    plan = build_tree_plan(batch.prev_index, device)
    with use_tree_attention(model):
        out = model(
            input_ids=batch.input_ids.to(device)[None],
            position_ids=batch.position_ids.to(device)[None],
            use_cache=False,
            logits_to_keep=source,
            tree_plan=plan,
        )
    return out.logits[0]


def _segment_logits(model: nn.Module, batch: PackedBatch, source: Tensor, device: torch.device) -> Tensor:
    """Logits at the `source` tokens of a masked layout: one padded row per segment, its 4-D mask."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"token_logprobs needs an attention kernel that takes a custom 4-D mask ({SUPPORTED_ATTENTION}); "
            f"the model uses {impl!r}: load it with attn_implementation='sdpa'"
        )
    mask = attention_bias(batch, _model_dtype(model), device)
    segment, offset = segment_index(batch)
    shape = (mask.shape[0], mask.shape[-1])
    input_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    input_ids[segment, offset] = batch.input_ids.cpu()
    position_ids[segment, offset] = batch.position_ids.cpu()
    out = model(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=mask,
        use_cache=False,
    )
    return out.logits[segment[source].to(device), offset[source].to(device)]


def _pick(
    rows: Tensor, targets: Tensor, where: tuple[Tensor], total: int, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each target under its row's tempered softmax (float32), and the rows' entropies, scattered to T."""
    rows = rows.float()
    if temperature != 1.0:  # [rows, V] is the biggest tensor of the pass: skip a no-op division
        rows = rows / temperature
    log_probs = torch.log_softmax(rows, dim=-1)
    picked = log_probs.gather(1, targets[:, None]).squeeze(1)
    result = torch.zeros(total, dtype=picked.dtype, device=rows.device).index_put(where, picked)
    if not with_entropy:
        return result, None
    with torch.no_grad():
        row_entropy = -(log_probs.exp() * log_probs).sum(-1)
        entropy = torch.zeros(total, dtype=torch.float32, device=rows.device).index_put(where, row_entropy.float())
    return result, entropy
