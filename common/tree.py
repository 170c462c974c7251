"""The turn-tree data model shared by actors, replay and learner.

A tree is one task (prompt) explored by one actor. A node is one turn: first the observation tokens
the previous turn's tool call produced (mask 0), then the tokens the policy generated (mask 1),
ending in a tool call or a final answer. The root holds the prompt tokens in `obs_ids` and usually
generates nothing (finish reason `prompt`); its children are the first turns. A root-to-leaf path is
one trajectory; leaves carry the reward.

Token arrays are numpy arrays so that the learner can turn them into tensors without copying and
the Arrow codec can build columns from them directly. Everything here is torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

TokenArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]
VersionArray = npt.NDArray[np.int32]

ROOT_PARENT = -1
# Sampled log-probs may round a hair above zero in low precision; anything beyond this is corrupt.
LOGPROB_TOLERANCE = 1e-3


class InvalidTreeError(ValueError):
    """A node or tree breaks the data model's invariants (lengths, parents, roots, leaves)."""


class FinishReason(StrEnum):
    """Why a turn ended; `prompt` marks a root that only holds the prompt."""

    PROMPT = "prompt"
    TOOL_CALL = "tool_call"
    ANSWER = "answer"
    EOS = "eos"
    LENGTH = "length"
    TOOL_ERROR = "tool_error"
    TURN_LIMIT = "turn_limit"


def _as_array(values: object, dtype: type[np.generic]) -> npt.NDArray:
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise InvalidTreeError(f"expected a 1-D array, got shape {array.shape}")
    return array


@dataclass(eq=False)
class TurnNode:
    """One turn of a tree, token-aligned: every generated token has a log-prob and a policy version."""

    node_id: int
    parent_id: int
    depth: int
    obs_ids: TokenArray
    token_ids: TokenArray
    logprobs: FloatArray
    versions: VersionArray
    finish_reason: FinishReason
    entropy: float = math.nan
    topk_logprobs: FloatArray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    tool_call: str | None = None
    reward: float | None = None
    is_leaf: bool = False

    def __post_init__(self) -> None:
        self.obs_ids = _as_array(self.obs_ids, np.int32)
        self.token_ids = _as_array(self.token_ids, np.int32)
        self.logprobs = _as_array(self.logprobs, np.float32)
        self.versions = _as_array(self.versions, np.int32)
        topk = np.asarray(self.topk_logprobs, dtype=np.float32)
        if topk.size == 0:
            topk = topk.reshape(0, 0)
        self.topk_logprobs = topk
        self.finish_reason = FinishReason(self.finish_reason)
        # Stored as float32 on the wire; keep the same precision here so a round trip is exact.
        self.entropy = float(np.float32(self.entropy))
        self.validate()

    def validate(self) -> None:
        """Check this node's own invariants; tree-level ones are in TurnTree.validate."""
        where = f"node {self.node_id}"
        if self.node_id < 0:
            raise InvalidTreeError(f"{where}: node_id must be >= 0")
        if self.parent_id == ROOT_PARENT:
            if self.depth != 0:
                raise InvalidTreeError(f"{where}: a root (parent -1) must have depth 0, has {self.depth}")
        elif self.parent_id < 0:
            raise InvalidTreeError(f"{where}: parent_id {self.parent_id} is neither -1 nor a node id")
        elif self.depth < 1:
            raise InvalidTreeError(f"{where}: a non-root node must have depth >= 1, has {self.depth}")
        if self.parent_id == self.node_id:
            raise InvalidTreeError(f"{where}: is its own parent")
        n = len(self.token_ids)
        if len(self.logprobs) != n or len(self.versions) != n:
            raise InvalidTreeError(
                f"{where}: token_ids ({n}), logprobs ({len(self.logprobs)}) and versions "
                f"({len(self.versions)}) must have equal lengths"
            )
        if n and not np.all(np.isfinite(self.logprobs)):
            raise InvalidTreeError(f"{where}: logprobs must be finite")
        if n and float(self.logprobs.max()) > LOGPROB_TOLERANCE:
            raise InvalidTreeError(f"{where}: logprobs must be <= 0, max is {float(self.logprobs.max())}")
        if n and int(self.versions.min()) < 0:
            raise InvalidTreeError(f"{where}: policy versions must be >= 0")
        if (self.obs_ids.size and int(self.obs_ids.min()) < 0) or (n and int(self.token_ids.min()) < 0):
            raise InvalidTreeError(f"{where}: token ids must be >= 0")
        if self.topk_logprobs.ndim != 2:
            raise InvalidTreeError(f"{where}: topk_logprobs must be 2-D (tokens x k)")
        if self.topk_logprobs.shape[0] > n:
            raise InvalidTreeError(
                f"{where}: topk_logprobs covers {self.topk_logprobs.shape[0]} tokens but only {n} were generated"
            )
        if self.reward is not None:
            if not math.isfinite(self.reward):
                raise InvalidTreeError(f"{where}: reward must be finite")
            if not self.is_leaf:
                raise InvalidTreeError(f"{where}: only leaves carry a reward")
        if self.is_leaf and self.parent_id == ROOT_PARENT:
            raise InvalidTreeError(f"{where}: the root cannot be a leaf")

    @property
    def min_version(self) -> int | None:
        return int(self.versions.min()) if len(self.versions) else None

    def same_tokens(self, other: TurnNode) -> bool:
        """True when two rows describe the same turn (a later message may only add the reward)."""
        return (
            self.parent_id == other.parent_id
            and self.depth == other.depth
            and np.array_equal(self.obs_ids, other.obs_ids)
            and np.array_equal(self.token_ids, other.token_ids)
            and np.array_equal(self.logprobs, other.logprobs)
            and np.array_equal(self.versions, other.versions)
        )

    def equals(self, other: TurnNode) -> bool:
        """Field-by-field equality (NaN entropy equals NaN)."""
        return (
            self.node_id == other.node_id
            and self.same_tokens(other)
            and self.finish_reason == other.finish_reason
            and (self.entropy == other.entropy or (math.isnan(self.entropy) and math.isnan(other.entropy)))
            and self.topk_logprobs.shape == other.topk_logprobs.shape
            and np.array_equal(self.topk_logprobs, other.topk_logprobs)
            and self.tool_call == other.tool_call
            and self.reward == other.reward
            and self.is_leaf == other.is_leaf
        )


@dataclass(eq=False)
class TurnTree:
    """A task explored by one actor: nodes keyed by id, exactly one root."""

    tree_id: str
    task_id: str
    actor_id: str
    nodes: dict[int, TurnNode] = field(default_factory=dict)

    @classmethod
    def from_nodes(cls, tree_id: str, task_id: str, actor_id: str, nodes: Iterable[TurnNode]) -> TurnTree:
        tree = cls(tree_id=tree_id, task_id=task_id, actor_id=actor_id)
        for node in nodes:
            if node.node_id in tree.nodes:
                raise InvalidTreeError(f"tree {tree_id}: node id {node.node_id} appears twice")
            tree.nodes[node.node_id] = node
        return tree

    @property
    def root(self) -> TurnNode:
        roots = [n for n in self.nodes.values() if n.parent_id == ROOT_PARENT]
        if len(roots) != 1:
            raise InvalidTreeError(f"tree {self.tree_id}: expected one root, found {len(roots)}")
        return roots[0]

    def children(self) -> dict[int, list[int]]:
        """Child ids of every node, in node-id order."""
        kids: dict[int, list[int]] = {node_id: [] for node_id in self.nodes}
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            if node.parent_id != ROOT_PARENT and node.parent_id in kids:
                kids[node.parent_id].append(node.node_id)
        return kids

    def leaves(self) -> list[TurnNode]:
        kids = self.children()
        return [self.nodes[i] for i in sorted(self.nodes) if not kids[i]]

    def path_to(self, node_id: int) -> list[TurnNode]:
        """Nodes from the root down to `node_id` (one trajectory when it is a leaf)."""
        path: list[TurnNode] = []
        current: int = node_id
        while current != ROOT_PARENT:
            node = self.nodes[current]
            path.append(node)
            current = node.parent_id
            if len(path) > len(self.nodes):
                raise InvalidTreeError(f"tree {self.tree_id}: cycle through node {node_id}")
        return path[::-1]

    def paths(self) -> Iterator[list[TurnNode]]:
        for leaf in self.leaves():
            yield self.path_to(leaf.node_id)

    @property
    def min_version(self) -> int | None:
        versions = [v for n in self.nodes.values() if (v := n.min_version) is not None]
        return min(versions) if versions else None

    def validate(self, complete: bool = True) -> None:
        """Check the tree's structure; `complete` also demands rewarded leaves and correct leaf flags."""
        shapes = {
            node_id: NodeShape(node.parent_id, node.depth, node.is_leaf, node.reward is not None)
            for node_id, node in self.nodes.items()
        }
        validate_structure(self.tree_id, shapes, complete)


@dataclass(frozen=True)
class NodeShape:
    """The structural part of a node, enough to check a tree without its tokens (replay uses this)."""

    parent_id: int
    depth: int
    is_leaf: bool
    has_reward: bool


def validate_structure(tree_id: str, shapes: dict[int, NodeShape], complete: bool = True) -> None:
    """One root, every parent present one level up, and (when complete) rewarded leaves exactly at the ends.

    Depth = parent depth + 1 for every node also rules out cycles.
    """
    if not shapes:
        raise InvalidTreeError(f"tree {tree_id}: has no nodes")
    roots = [node_id for node_id, shape in shapes.items() if shape.parent_id == ROOT_PARENT]
    if len(roots) != 1:
        raise InvalidTreeError(f"tree {tree_id}: expected one root, found {len(roots)}")
    has_children: set[int] = set()
    for node_id, shape in shapes.items():
        if shape.parent_id == ROOT_PARENT:
            continue
        parent = shapes.get(shape.parent_id)
        if parent is None:
            raise InvalidTreeError(f"tree {tree_id}: node {node_id} has parent {shape.parent_id}, which does not exist")
        if shape.depth != parent.depth + 1:
            raise InvalidTreeError(f"tree {tree_id}: node {node_id} has depth {shape.depth}, its parent {parent.depth}")
        has_children.add(shape.parent_id)
    if not complete:
        return
    if roots[0] not in has_children:
        raise InvalidTreeError(f"tree {tree_id}: a complete tree needs at least one turn")
    for node_id, shape in shapes.items():
        if node_id in has_children and shape.is_leaf:
            raise InvalidTreeError(f"tree {tree_id}: node {node_id} is flagged leaf but has children")
        if node_id not in has_children and not shape.is_leaf:
            raise InvalidTreeError(f"tree {tree_id}: node {node_id} has no children but is not a leaf")
        if node_id not in has_children and not shape.has_reward:
            raise InvalidTreeError(f"tree {tree_id}: leaf {node_id} has no reward")
