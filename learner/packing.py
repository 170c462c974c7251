"""Tree packing: lay turn trees out for one forward pass, each shared prefix computed once (DESIGN §5).

Decided interface
-----------------
    pack_trees(trees, credits, aggregation="seq-mean-token-mean", denominator=None) -> PackedBatch
    per_path_batch(trees, credits, aggregation="seq-mean-token-mean", denominator=None) -> PackedBatch
    per_path_gather(trees) -> Tensor            # packed index of every token of the per-path layout
    path_tokens(tree) -> int, unique_tokens(tree) -> int

`credits` is aligned with `trees` (`TreeCredit` from `learner.credit`). `pack_trees` lays every tree out
ONCE as its unique nodes in depth-first order (children by node id), a node's tokens being its `obs_ids`
(loss mask 0) then its `token_ids` (loss mask 1, except on the root, which has no advantage). Trees are
concatenated block-diagonally. `per_path_batch` is the reference layout: one row per root→leaf path
(trees in order, paths in `tree.paths()` order), rows concatenated, block-diagonal causal attention.
Both give a `PackedBatch` of 1-D tensors over T tokens:

- `position_ids`: a token's index along its root→token path (what the model would see on that path);
- segments: attention never crosses trees (packed) or paths (per-path), so the batch is cut into
  segments at each root copy (`segment_starts`), each with its own [L, L] bool mask
  (`segment_attention`, padded to the longest L): i attends j iff j is on the root→i path at or before
  i. `attention` gives the dense [T, T] view for tests. The tree layout (`pack_trees(..., masks=False)`)
  builds no masks (None): the attention is implied by `prev_index`, which `learner.tree_attention` reads;
- `prev_index`: the token predicting i (its predecessor on the path), -1 for the first prompt token;
- `behav_version`: the policy version that generated each token (-1 off the generated tokens);
- `turn_index`: a dense id per (tree, node), the same in both layouts, unique across the batch;
- `seq_index`: global path id (0..G-1, trees in order) when the token lies on exactly one path, else -1;
- `adv_pos`/`adv_neg` (float64): Σ over the paths p through the token of w_p·max(A_{p,t}, 0) and
  w_p·min(A_{p,t}, 0), with w_p = 1/(G·|y_p|) (`seq-mean-token-mean`, |y_p| = loss tokens of path p) or
  1/Σ_p|y_p| (`token-mean`, loss tokens counted per path, as the per-path layout counts them).
  `denominator` overrides G or Σ_p|y_p| when one optimiser batch is split into several packs.

Because the clipped surrogates of `learner.losses` are linear in (adv_pos, adv_neg) for a fixed token,
the packed loss and its gradients equal the per-path ones (tests/learner/test_packing.py checks this).

Memory: O(S·L²) for S segments of at most L tokens (a packed tree of 8k tokens is 64 MiB as bool); O(T)
for the tree layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from common.tree import ROOT_PARENT, TurnNode, TurnTree
from learner.credit import TreeCredit

Aggregation = Literal["seq-mean-token-mean", "token-mean"]


@dataclass(frozen=True)
class PackedBatch:
    """Flat per-token tensors of one forward pass; see the module docstring for each field."""

    input_ids: Tensor  # long [T]
    position_ids: Tensor  # long [T]
    segment_starts: Tensor  # long [S], first token of each segment (a tree packed, or one path per-path)
    segment_attention: Tensor | None  # bool [S, L, L], L = longest segment; None = tree layout (see below)
    prev_index: Tensor  # long [T]
    loss_mask: Tensor  # bool [T]
    behav_logp: Tensor  # float32 [T], 0 where not generated
    behav_version: Tensor  # long [T], policy version that generated the token, -1 where not generated
    turn_index: Tensor  # long [T]
    seq_index: Tensor  # long [T]
    adv_pos: Tensor  # float64 [T]
    adv_neg: Tensor  # float64 [T]
    n_trajectories: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def segment_lengths(self) -> Tensor:
        ends = torch.cat([self.segment_starts[1:], torch.tensor([self.num_tokens], dtype=torch.long)])
        return ends - self.segment_starts

    @property
    def attention(self) -> Tensor:
        """The dense [T, T] view (block-diagonal over segments): for tests and small batches only."""
        dense = torch.zeros((self.num_tokens, self.num_tokens), dtype=torch.bool)
        if self.segment_attention is None:  # tree layout: a token sees its chain of predecessors
            prev = self.prev_index.tolist()
            for i in range(self.num_tokens):
                j = i
                while j >= 0:
                    dense[i, j] = True
                    j = prev[j]
            return dense
        for s, (start, length) in enumerate(
            zip(self.segment_starts.tolist(), self.segment_lengths.tolist(), strict=True)
        ):
            dense[start : start + length, start : start + length] = self.segment_attention[s, :length, :length]
        return dense

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on `device` (masses keep float64; the loss casts them)."""
        moved: dict[str, Tensor | None] = {
            name: getattr(self, name).to(device)
            for name in (
                "input_ids",
                "position_ids",
                "segment_starts",
                "prev_index",
                "loss_mask",
                "behav_logp",
                "behav_version",
                "turn_index",
                "seq_index",
                "adv_pos",
                "adv_neg",
            )
        }
        masks = self.segment_attention
        moved["segment_attention"] = masks.to(device) if masks is not None else None
        return replace(self, **moved)


@dataclass(frozen=True)
class _Instance:
    """One copy of a node in a layout: unique in the packed layout, once per path in the per-path one."""

    node: TurnNode
    parent: int  # index of the parent instance, -1 for a root copy
    turn: int  # dense (tree, node) id shared by all copies
    paths: tuple[int, ...]  # global ids of the paths through this copy
    is_root: bool


def path_tokens(tree: TurnTree) -> int:
    """Tokens a per-path layout feeds the model: Σ over root→leaf paths of the path length."""
    return sum(len(n.obs_ids) + len(n.token_ids) for path in tree.paths() for n in path)


def unique_tokens(tree: TurnTree) -> int:
    """Tokens the packed layout feeds the model: every node once."""
    return sum(len(n.obs_ids) + len(n.token_ids) for n in tree.nodes.values())


def _dfs(tree: TurnTree) -> list[TurnNode]:
    """Nodes depth-first from the root, children by node id (iterative: deep trees must not recurse)."""
    kids = tree.children()
    order: list[TurnNode] = []
    stack = [tree.root.node_id]
    while stack:
        node_id = stack.pop()
        order.append(tree.nodes[node_id])
        stack.extend(reversed(kids[node_id]))
    return order


def turn_ids(trees: Sequence[TurnTree]) -> list[dict[int, int]]:
    """Dense turn id per (tree, node) in packed DFS order, so both layouts agree on it."""
    out: list[dict[int, int]] = []
    counter = 0
    for tree in trees:
        ids: dict[int, int] = {}
        for node in _dfs(tree):
            ids[node.node_id] = counter
            counter += 1
        out.append(ids)
    return out


def _path_ids(trees: Sequence[TurnTree]) -> list[dict[int, int]]:
    """Global path id per (tree, leaf id): trees in order, paths in `tree.paths()` order."""
    out: list[dict[int, int]] = []
    counter = 0
    for tree in trees:
        ids: dict[int, int] = {}
        for path in tree.paths():
            ids[path[-1].node_id] = counter
            counter += 1
        out.append(ids)
    return out


def _subtree_sizes(tree: TurnTree, kids: dict[int, list[int]]) -> dict[int, int]:
    size: dict[int, int] = {}
    for node in reversed(_dfs(tree)):  # children before parents
        own = len(node.obs_ids) + len(node.token_ids)
        size[node.node_id] = own + sum(size[c] for c in kids[node.node_id])
    return size


def tree_segments(tree: TurnTree, segment_tokens: int | None = None) -> list[list[int]]:
    """Node ids of each segment (ancestors first, then subtrees depth-first); together they cover every leaf once.

    None = the whole tree as one segment. Otherwise a subtree goes into one segment with a copy of its
    ancestor chain when chain + subtree fit in `segment_tokens`; sibling subtrees that fit together share
    a segment; a subtree too big is split among its children (the chain grows by one node). A single
    root→leaf path longer than the budget still makes one segment.
    """
    order = [n.node_id for n in _dfs(tree)]
    if segment_tokens is None:
        return [order]
    kids = tree.children()
    size = _subtree_sizes(tree, kids)
    tokens = {i: len(n.obs_ids) + len(n.token_ids) for i, n in tree.nodes.items()}

    def subtree(node_id: int) -> list[int]:
        out, stack = [], [node_id]
        while stack:
            current = stack.pop()
            out.append(current)
            stack.extend(reversed(kids[current]))
        return out

    segments: list[list[int]] = []

    def place(node_id: int, chain: list[int], chain_tokens: int) -> None:
        if chain_tokens + size[node_id] <= segment_tokens or not kids[node_id]:
            segments.append(chain + subtree(node_id))
            return
        base, base_tokens = [*chain, node_id], chain_tokens + tokens[node_id]
        group: list[int] = []
        group_tokens = 0

        def flush() -> None:
            nonlocal group, group_tokens
            if group:
                segments.append(base + [i for child in group for i in subtree(child)])
            group, group_tokens = [], 0

        for child in kids[node_id]:
            if base_tokens + size[child] > segment_tokens:
                flush()
                place(child, base, base_tokens)
            elif base_tokens + group_tokens + size[child] <= segment_tokens:
                group.append(child)
                group_tokens += size[child]
            else:
                flush()
                group, group_tokens = [child], size[child]
        flush()

    place(tree.root.node_id, [], 0)
    return segments


def _packed_instances(trees: Sequence[TurnTree], segment_tokens: int | None = None) -> list[_Instance]:
    turns, path_ids = turn_ids(trees), _path_ids(trees)
    instances: list[_Instance] = []
    for k, tree in enumerate(trees):
        leaf_path = {path[-1].node_id: path for path in tree.paths()}
        for segment in tree_segments(tree, segment_tokens):
            members = set(segment)
            through: dict[int, list[int]] = {i: [] for i in segment}
            for leaf_id, path in leaf_path.items():
                if leaf_id in members:
                    for node in path:
                        through[node.node_id].append(path_ids[k][leaf_id])
            where: dict[int, int] = {}
            for node_id in segment:
                node = tree.nodes[node_id]
                parent = -1 if node.parent_id == ROOT_PARENT else where[node.parent_id]
                where[node_id] = len(instances)
                instances.append(
                    _Instance(node, parent, turns[k][node_id], tuple(through[node_id]), node.parent_id == ROOT_PARENT)
                )
    return instances


def _per_path_instances(trees: Sequence[TurnTree]) -> list[_Instance]:
    turns, path_ids = turn_ids(trees), _path_ids(trees)
    instances: list[_Instance] = []
    for k, tree in enumerate(trees):
        for path in tree.paths():
            pid = path_ids[k][path[-1].node_id]
            for depth, node in enumerate(path):
                parent = -1 if depth == 0 else len(instances) - 1
                instances.append(_Instance(node, parent, turns[k][node.node_id], (pid,), depth == 0))
    return instances


def _path_weights(
    trees: Sequence[TurnTree], credits: Sequence[TreeCredit], aggregation: Aggregation, denominator: float | None
) -> tuple[list[dict[int, float]], int]:
    """w_p per path (keyed like the credits: tree index, leaf id) and G."""
    if len(trees) != len(credits):
        raise ValueError(f"got {len(trees)} trees but {len(credits)} credits")
    if aggregation not in ("seq-mean-token-mean", "token-mean"):
        raise ValueError(f"unknown aggregation {aggregation!r}")
    lengths: list[dict[int, int]] = []
    for tree, credit in zip(trees, credits, strict=True):
        if credit.tree_id != tree.tree_id:
            raise ValueError(f"credit for tree {credit.tree_id!r} given with tree {tree.tree_id!r}")
        per_leaf: dict[int, int] = {}
        for path in tree.paths():
            leaf = path[-1].node_id
            advantages = credit.path_advantages.get(leaf)
            if advantages is None:
                raise ValueError(f"tree {tree.tree_id}: no credit for the path to leaf {leaf}")
            missing = [n.node_id for n in path[1:] if n.node_id not in advantages]
            if missing:
                raise ValueError(f"tree {tree.tree_id}: path to leaf {leaf} has no advantage for nodes {missing}")
            per_leaf[leaf] = sum(len(n.token_ids) for n in path[1:])
        lengths.append(per_leaf)
    g = sum(len(per_leaf) for per_leaf in lengths)
    weights: list[dict[int, float]] = []
    if aggregation == "token-mean":
        total = float(sum(sum(p.values()) for p in lengths)) if denominator is None else float(denominator)
        for per_leaf in lengths:
            weights.append({leaf: (1.0 / total if n else 0.0) for leaf, n in per_leaf.items()})
    else:
        groups = float(g) if denominator is None else float(denominator)
        for per_leaf in lengths:
            weights.append({leaf: (1.0 / (groups * n) if n else 0.0) for leaf, n in per_leaf.items()})
    return weights, g


def _build(
    trees: Sequence[TurnTree],
    credits: Sequence[TreeCredit],
    instances: list[_Instance],
    aggregation: Aggregation,
    denominator: float | None,
    masks: bool = True,
) -> PackedBatch:
    """Lay the instances out contiguously; attention/positions follow each instance's ancestor chain."""
    weights, g = _path_weights(trees, credits, aggregation, denominator)
    # Global path id -> (weight, advantages by node id).
    path_info: list[tuple[float, dict[int, float]]] = []
    for k, tree in enumerate(trees):
        for path in tree.paths():
            leaf = path[-1].node_id
            path_info.append((weights[k][leaf], credits[k].path_advantages[leaf]))

    sizes = [len(inst.node.obs_ids) + len(inst.node.token_ids) for inst in instances]
    total = int(sum(sizes))
    input_ids = np.zeros(total, dtype=np.int64)
    positions = np.zeros(total, dtype=np.int64)
    prev = np.full(total, -1, dtype=np.int64)
    loss_mask = np.zeros(total, dtype=bool)
    behav = np.zeros(total, dtype=np.float32)
    behav_version = np.full(total, -1, dtype=np.int64)
    turn = np.zeros(total, dtype=np.int64)
    seq = np.full(total, -1, dtype=np.int64)
    adv_pos = np.zeros(total, dtype=np.float64)
    adv_neg = np.zeros(total, dtype=np.float64)
    # Segments: a new one starts at every root copy (a tree when packed, a path per-path); attention
    # never crosses segments, so each keeps its own [L, L] mask instead of one [T, T].
    starts: list[int] = []
    cursor = 0
    for inst, size in zip(instances, sizes, strict=True):
        if inst.parent < 0:
            starts.append(cursor)
        cursor += size
    bounds = [*starts, total]
    longest = max((b - a for a, b in pairwise(bounds)), default=0)
    attention = np.zeros((len(starts), longest, longest) if masks else (0, 0, 0), dtype=bool)
    segment = -1
    contexts: list[np.ndarray] = []  # per instance: token indices on its root→end path
    cursor = 0
    for inst, size in zip(instances, sizes, strict=True):
        if inst.parent < 0:
            segment += 1
        base = starts[segment] if starts else 0
        node = inst.node
        context = contexts[inst.parent] if inst.parent >= 0 else np.zeros(0, dtype=np.int64)
        own = np.arange(cursor, cursor + size, dtype=np.int64)
        contexts.append(np.concatenate([context, own]))
        n_obs = len(node.obs_ids)
        input_ids[own] = np.concatenate([node.obs_ids, node.token_ids])
        positions[own] = len(context) + np.arange(size)
        if size:
            prev[cursor] = context[-1] if len(context) else -1
            prev[cursor + 1 : cursor + size] = own[:-1]
        if size and masks:
            local_own, local_context = own - base, context - base
            attention[segment][np.ix_(local_own, local_context)] = True
            attention[segment][local_own[0] : local_own[0] + size, local_own[0] : local_own[0] + size] = np.tril(
                np.ones((size, size), dtype=bool)
            )
        gen = slice(cursor + n_obs, cursor + size)
        behav[gen] = node.logprobs
        behav_version[gen] = node.versions
        turn[own] = inst.turn
        if len(inst.paths) == 1:
            seq[own] = inst.paths[0]
        if not inst.is_root and len(node.token_ids):
            loss_mask[gen] = True
            pos_mass = neg_mass = 0.0
            for pid in inst.paths:
                w, advantages = path_info[pid]
                a = float(advantages[node.node_id])
                pos_mass += w * max(a, 0.0)
                neg_mass += w * min(a, 0.0)
            adv_pos[gen] = pos_mass
            adv_neg[gen] = neg_mass
        cursor += size
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(positions),
        segment_starts=torch.tensor(starts, dtype=torch.long),
        segment_attention=torch.from_numpy(attention) if masks else None,
        prev_index=torch.from_numpy(prev),
        loss_mask=torch.from_numpy(loss_mask),
        behav_logp=torch.from_numpy(behav),
        behav_version=torch.from_numpy(behav_version),
        turn_index=torch.from_numpy(turn),
        seq_index=torch.from_numpy(seq),
        adv_pos=torch.from_numpy(adv_pos),
        adv_neg=torch.from_numpy(adv_neg),
        n_trajectories=g,
    )


def pack_trees(
    trees: Sequence[TurnTree],
    credits: Sequence[TreeCredit],
    aggregation: Aggregation = "seq-mean-token-mean",
    denominator: float | None = None,
    segment_tokens: int | None = None,
    masks: bool = True,
) -> PackedBatch:
    """Every tree once, as its unique nodes depth-first; a shared token carries the masses of all its paths.

    `segment_tokens` bounds a segment's length (see `tree_segments`): attention costs O(L²) per segment
    with a dense mask, so a big tree is cut into subtrees that each carry a copy of their ancestors. A
    copy carries the masses of the paths whose leaf is in its segment, so loss and gradients are unchanged.
    `masks=False` gives the tree layout: no dense masks (`segment_attention` is None), for the tree-attention
    kernel (`learner.tree_attention`), which reads the structure from `prev_index`; use it without segments.
    """
    if not masks and segment_tokens is not None:
        raise ValueError("the tree layout (masks=False) keeps every tree whole: leave segment_tokens unset")
    return _build(trees, credits, _packed_instances(trees, segment_tokens), aggregation, denominator, masks)


def per_path_batch(
    trees: Sequence[TurnTree],
    credits: Sequence[TreeCredit],
    aggregation: Aggregation = "seq-mean-token-mean",
    denominator: float | None = None,
) -> PackedBatch:
    """The reference layout: one causal row per root→leaf path, rows concatenated."""
    return _build(trees, credits, _per_path_instances(trees), aggregation, denominator)


def per_path_gather(trees: Sequence[TurnTree]) -> Tensor:
    """For each token of `per_path_batch`, its index in `pack_trees` (so per_path = packed[gather])."""
    packed = _packed_instances(trees)
    starts: dict[int, int] = {}
    cursor = 0
    for inst in packed:
        starts[inst.turn] = cursor
        cursor += len(inst.node.obs_ids) + len(inst.node.token_ids)
    pieces = [
        np.arange(starts[inst.turn], starts[inst.turn] + len(inst.node.obs_ids) + len(inst.node.token_ids))
        for inst in _per_path_instances(trees)
    ]
    return torch.from_numpy(np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64))
