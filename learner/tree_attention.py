"""Tree attention: every unique token of a packed tree goes through the model once, reusing its ancestors' K/V.

Why: a dense [L, L] tree mask makes attention cost O(L²) per packed tree (or copies of ancestors when the tree
is cut into segments), which ate what packing saved. Here the linear layers, norms, MLP and head see each unique
token once (as one flat sequence), and only attention is done per root→leaf stretch against the keys/values
already computed for its ancestors.

How: the batch is one flat row [1, T] (trees concatenated, nodes once, as `pack_trees(..., masks=False)` lays
them out) with path-consistent position ids, so rotary embeddings are those each path would see. The flat
tokens split into *runs*: maximal stretches in which every token's predecessor is the token before it
(`prev_index[i] == i - 1`). A run's context is the root→run path before it, i.e. tokens of earlier runs.
For each layer, `tree_attention` (registered in transformers' `AttentionInterface` as `ATTENTION_NAME`, swapped
in for the call by `use_tree_attention`) gathers each run's queries and its [context ; own] keys/values with
`index_select`, so the backward pass sums a shared prefix's K/V gradient over every run that read it; it runs
SDPA with the mask "key j ≤ context length + query i" and scatters the outputs back to flat order. Runs are
bucketed by length so that padding stays bounded (`TreePlan`).

Supported: decoder models whose attention modules call `AttentionInterface` and have no sliding window
(`TREE_MODEL_TYPES`: llama, qwen2, qwen3, mistral). `supports_tree_attention` says False for anything else, and
the learner then keeps the masked-segment layout (`learner.packed_layout = "segments"` behaviour).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "at2po_tree"
TREE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
PADDING_SLACK = 1.3  # a bucket's padded work may exceed its runs' own work by this factor
MAX_BUCKET_ROWS = 8192  # query rows (runs x longest run) per bucket, to bound the [N, H, Q, K] scores


@dataclass(frozen=True)
class RunBucket:
    """Runs attended together, padded to the longest query (q) and key (k) stretch among them."""

    query_index: Tensor  # long [n * q]: flat token in each padded query slot
    key_index: Tensor  # long [n * k]: flat token in each padded key slot (context first, then own tokens)
    mask: Tensor  # bool [n, 1, q, k]: True where query i may attend key j (j <= context length + i)
    n: int
    q: int
    k: int


@dataclass(frozen=True)
class TreePlan:
    """Where every run's queries and keys come from, and where each flat token's output lands."""

    buckets: tuple[RunBucket, ...]
    output_index: Tensor  # long [T]: row of each flat token in the concatenated padded bucket outputs
    num_tokens: int


def runs_and_contexts(prev_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Run starts, run ends and each run's context (flat indices of its path before it, root first)."""
    total = len(prev_index)
    starts_mask = np.ones(total, dtype=bool)
    starts_mask[1:] = prev_index[1:] != np.arange(total - 1)
    starts = np.flatnonzero(starts_mask)
    ends = np.append(starts[1:], total)
    run_of = np.repeat(np.arange(len(starts)), ends - starts)
    contexts: list[np.ndarray] = []
    for start in starts.tolist():
        parent = int(prev_index[start])
        if parent < 0:
            contexts.append(np.zeros(0, dtype=np.int64))
            continue
        if parent >= start:
            raise ValueError(f"token {start}'s predecessor {parent} is laid out after it")
        owner = int(run_of[parent])
        contexts.append(np.concatenate([contexts[owner], np.arange(starts[owner], parent + 1, dtype=np.int64)]))
    return starts, ends, contexts


def _bucket_runs(q_len: np.ndarray, k_len: np.ndarray) -> list[list[int]]:
    """Runs grouped longest query first; a run joins the open bucket while padding stays within PADDING_SLACK."""
    order = sorted(range(len(q_len)), key=lambda r: (-int(q_len[r]), -int(k_len[r]), r))
    buckets: list[list[int]] = []
    current: list[int] = []
    work = q_max = k_max = 0
    for run in order:
        q, k = int(q_len[run]), int(k_len[run])
        if current:
            n, new_q, new_k = len(current) + 1, max(q_max, q), max(k_max, k)
            if n * new_q * new_k <= PADDING_SLACK * (work + q * k) and n * new_q <= MAX_BUCKET_ROWS:
                current.append(run)
                work, q_max, k_max = work + q * k, new_q, new_k
                continue
            buckets.append(current)
        current, work, q_max, k_max = [run], q * k, q, k
    if current:
        buckets.append(current)
    return buckets


def build_tree_plan(prev_index: Tensor, device: torch.device | str) -> TreePlan:
    """The runs of a flat tree layout (from its `prev_index`), bucketed, as index tensors on `device`."""
    prev = prev_index.cpu().numpy().astype(np.int64)
    total = len(prev)
    starts, ends, contexts = runs_and_contexts(prev)
    q_len = ends - starts
    k_len = q_len + np.array([len(c) for c in contexts], dtype=np.int64)
    output_index = np.zeros(total, dtype=np.int64)
    buckets: list[RunBucket] = []
    offset = 0
    for members in _bucket_runs(q_len, k_len):
        n, q, k = len(members), int(q_len[members].max()), int(k_len[members].max())
        queries = np.empty((n, q), dtype=np.int64)
        keys = np.empty((n, k), dtype=np.int64)
        context_len = np.empty(n, dtype=np.int64)
        for row, run in enumerate(members):
            start, own = int(starts[run]), int(q_len[run])
            path = np.concatenate([contexts[run], np.arange(start, start + own, dtype=np.int64)])
            queries[row] = start  # padding slots read the run's first token; their outputs are dropped
            queries[row, :own] = np.arange(start, start + own)
            keys[row] = start
            keys[row, : len(path)] = path
            context_len[row] = len(contexts[run])
            output_index[start : start + own] = offset + row * q + np.arange(own)
        reach = torch.from_numpy(context_len).to(device)[:, None, None] + torch.arange(q, device=device)[None, :, None]
        allowed = torch.arange(k, device=device)[None, None, :] <= reach  # built where it is used
        buckets.append(
            RunBucket(
                query_index=torch.from_numpy(queries.reshape(-1)).to(device),
                key_index=torch.from_numpy(keys.reshape(-1)).to(device),
                mask=allowed[:, None],
                n=n,
                q=q,
                k=k,
            )
        )
        offset += n * q
    return TreePlan(tuple(buckets), torch.from_numpy(output_index).to(device), total)


def tree_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    tree_plan: TreePlan | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The `AttentionInterface` kernel: query [1, H, T, D], key/value [1, KVH, T, D] -> output [1, T, H, D]."""
    if tree_plan is None:
        raise ValueError("tree attention needs the batch's TreePlan (tree_plan=...)")
    if sliding_window is not None:
        raise ValueError("tree attention does not implement sliding-window attention")
    batch, heads, total, dim = query.shape
    kv_heads = key.shape[1]
    if batch != 1 or total != tree_plan.num_tokens:
        raise ValueError(f"tree attention expects one flat row of {tree_plan.num_tokens} tokens, got {query.shape}")
    flat_q = query[0].transpose(0, 1).reshape(total, heads * dim)
    flat_k = key[0].transpose(0, 1).reshape(total, kv_heads * dim)
    flat_v = value[0].transpose(0, 1).reshape(total, kv_heads * dim)
    outputs = []
    for bucket in tree_plan.buckets:
        q = flat_q.index_select(0, bucket.query_index).view(bucket.n, bucket.q, heads, dim).transpose(1, 2)
        k = flat_k.index_select(0, bucket.key_index).view(bucket.n, bucket.k, kv_heads, dim).transpose(1, 2)
        v = flat_v.index_select(0, bucket.key_index).view(bucket.n, bucket.k, kv_heads, dim).transpose(1, 2)
        if kv_heads != heads:  # grouped-query attention: kv head j serves query heads j*r .. (j+1)*r - 1
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.mask, dropout_p=dropout, scale=scaling)
        outputs.append(out.transpose(1, 2).reshape(bucket.n * bucket.q, heads * dim))
    merged = torch.cat(outputs).index_select(0, tree_plan.output_index)
    return merged.view(1, total, heads, dim), None


AttentionInterface.register(ATTENTION_NAME, tree_attention)


def supports_tree_attention(model: nn.Module) -> bool:
    """True for the decoder families whose attention goes through `AttentionInterface` without a sliding window."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in TREE_MODEL_TYPES:
        return False
    if getattr(config, "use_sliding_window", False):
        return False
    if getattr(config, "model_type", None) == "mistral" and getattr(config, "sliding_window", None) is not None:
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return all(kind == "full_attention" for kind in layer_types)


@contextmanager
def use_tree_attention(model: nn.Module) -> Iterator[None]:
    """Swap the model's attention kernel for `tree_attention` for one forward (the autograd graph keeps it)."""
    config = model.config  # type: ignore[union-attr]
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
