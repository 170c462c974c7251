"""The turn-tree data model: node invariants, tree structure, traversal."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.tree import (
    LOGPROB_TOLERANCE,
    ROOT_PARENT,
    FinishReason,
    InvalidTreeError,
    NodeShape,
    TurnNode,
    TurnTree,
    validate_structure,
)


def node(node_id: int = 1, parent_id: int = 0, depth: int = 1, **overrides: Any) -> TurnNode:
    """A valid generated turn with three tokens, unless `overrides` say otherwise."""
    fields: dict[str, Any] = {
        "node_id": node_id,
        "parent_id": parent_id,
        "depth": depth,
        "obs_ids": [7, 8],
        "token_ids": [1, 2, 3],
        "logprobs": [-0.5, -1.0, 0.0],
        "versions": [3, 3, 4],
        "finish_reason": FinishReason.TOOL_CALL,
    }
    fields.update(overrides)
    return TurnNode(**fields)


def root(node_id: int = 0, **overrides: Any) -> TurnNode:
    fields: dict[str, Any] = {
        "obs_ids": [10, 11, 12],
        "token_ids": [],
        "logprobs": [],
        "versions": [],
        "finish_reason": FinishReason.PROMPT,
    }
    fields.update(overrides)
    return node(node_id, ROOT_PARENT, 0, **fields)


def leaf(node_id: int, parent_id: int, depth: int, reward: float | None = 1.0, **overrides: Any) -> TurnNode:
    return node(node_id, parent_id, depth, finish_reason=FinishReason.ANSWER, reward=reward, is_leaf=True, **overrides)


def sample_tree() -> TurnTree:
    r"""
            0 (root)
           / \
          1   2 (leaf, reward 0)
         / \
        3   4   (leaves, rewards 1 and 0.5)
    """
    return TurnTree.from_nodes(
        "tree-1",
        "task-1",
        "actor-1",
        [
            root(),
            node(1, 0, 1, versions=[5, 5, 6]),
            leaf(2, 0, 1, reward=0.0, versions=[2, 9, 9]),
            leaf(4, 1, 2, reward=0.5),
            leaf(3, 1, 2, reward=1.0),
        ],
    )


# ----------------------------------------------------------------------------------------- nodes


def test_node_coerces_arrays_to_the_model_dtypes() -> None:
    n = node(obs_ids=(1, 2), token_ids=np.array([4, 5, 6], dtype=np.int64), logprobs=[-1, -2, -3])
    assert n.obs_ids.dtype == np.int32
    assert n.token_ids.dtype == np.int32
    assert n.logprobs.dtype == np.float32
    assert n.versions.dtype == np.int32
    assert n.token_ids.tolist() == [4, 5, 6]
    assert n.topk_logprobs.shape == (0, 0)
    assert n.topk_logprobs.dtype == np.float32
    assert n.finish_reason is FinishReason.TOOL_CALL
    assert math.isnan(n.entropy)


def test_finish_reason_given_as_text_becomes_the_enum() -> None:
    assert node(finish_reason="length").finish_reason is FinishReason.LENGTH
    with pytest.raises(ValueError):
        node(finish_reason="gave_up")


def test_a_node_with_no_generated_tokens_is_valid() -> None:
    n = node(token_ids=[], logprobs=[], versions=[])
    assert n.min_version is None
    assert len(n.token_ids) == 0


def test_empty_topk_of_any_shape_is_normalised() -> None:
    assert node(topk_logprobs=np.zeros((3, 0))).topk_logprobs.shape == (0, 0)
    assert node(topk_logprobs=[]).topk_logprobs.shape == (0, 0)
    topk = node(topk_logprobs=[[-0.1, -2.0], [-0.3, -1.0]]).topk_logprobs
    assert topk.shape == (2, 2)
    assert topk.dtype == np.float32


def test_logprobs_slightly_above_zero_are_tolerated() -> None:
    node(logprobs=[-1.0, LOGPROB_TOLERANCE / 2, 0.0])


BAD_NODES: dict[str, tuple[dict[str, Any], str]] = {
    "negative node id": ({"node_id": -1, "parent_id": 0}, "node_id"),
    "root with depth 1": ({"parent_id": ROOT_PARENT, "depth": 1}, "depth 0"),
    "parent below -1": ({"parent_id": -2}, "parent_id"),
    "non-root at depth 0": ({"depth": 0}, "depth >= 1"),
    "non-root at negative depth": ({"depth": -3}, "depth >= 1"),
    "own parent": ({"node_id": 4, "parent_id": 4}, "own parent"),
    "logprobs shorter": ({"logprobs": [-1.0, -1.0]}, "equal lengths"),
    "logprobs longer": ({"logprobs": [-1.0, -1.0, -1.0, -1.0]}, "equal lengths"),
    "versions shorter": ({"versions": [1]}, "equal lengths"),
    "versions without tokens": ({"token_ids": [], "logprobs": [], "versions": [1]}, "equal lengths"),
    "positive logprob": ({"logprobs": [-1.0, 0.5, -1.0]}, "<= 0"),
    "logprob just beyond tolerance": ({"logprobs": [-1.0, 2 * LOGPROB_TOLERANCE, -1.0]}, "<= 0"),
    "nan logprob": ({"logprobs": [-1.0, math.nan, -1.0]}, "finite"),
    "-inf logprob": ({"logprobs": [-math.inf, -1.0, -1.0]}, "finite"),
    "negative version": ({"versions": [0, -1, 0]}, "versions"),
    "negative token id": ({"token_ids": [1, -2, 3]}, "token ids"),
    "negative obs id": ({"obs_ids": [-1]}, "token ids"),
    "1-D topk": ({"topk_logprobs": [-0.1, -0.2]}, "2-D"),
    "3-D topk": ({"topk_logprobs": np.full((1, 2, 2), -1.0)}, "2-D"),
    "topk for more tokens than generated": ({"topk_logprobs": np.full((4, 2), -1.0)}, "covers 4 tokens"),
    "reward on a non-leaf": ({"reward": 1.0}, "only leaves"),
    "nan reward": ({"reward": math.nan, "is_leaf": True}, "finite"),
    "infinite reward": ({"reward": math.inf, "is_leaf": True}, "finite"),
    "root flagged leaf": ({"parent_id": ROOT_PARENT, "depth": 0, "is_leaf": True}, "root cannot be a leaf"),
}


@pytest.mark.parametrize("case", sorted(BAD_NODES))
def test_invalid_nodes_are_refused(case: str) -> None:
    overrides, fragment = BAD_NODES[case]
    fields: dict[str, Any] = {"node_id": 5, "parent_id": 1, "depth": 2, **overrides}
    with pytest.raises(InvalidTreeError, match=r"^node ") as info:
        node(**fields)
    assert fragment in str(info.value)
    assert f"node {fields['node_id']}" in str(info.value)


def test_multi_dimensional_token_arrays_are_refused() -> None:
    with pytest.raises(InvalidTreeError, match="1-D"):
        node(token_ids=[[1, 2, 3]])
    with pytest.raises(InvalidTreeError, match="1-D"):
        node(obs_ids=5)


def test_validate_catches_a_node_mutated_after_construction() -> None:
    n = node()
    n.logprobs = np.array([-1.0], dtype=np.float32)
    with pytest.raises(InvalidTreeError, match="equal lengths"):
        n.validate()


def test_min_version_is_the_smallest_generating_version() -> None:
    assert node(versions=[7, 3, 9]).min_version == 3
    assert root().min_version is None


def test_equals_and_same_tokens() -> None:
    a = node(entropy=math.nan, topk_logprobs=[[-0.1], [-0.2]], tool_call="search(x)")
    b = node(entropy=math.nan, topk_logprobs=[[-0.1], [-0.2]], tool_call="search(x)")
    assert a.equals(b)
    assert b.equals(a)
    assert a.same_tokens(b)
    # Only completion fields differ: same tokens, not equal.
    completed = node(topk_logprobs=[[-0.1], [-0.2]], tool_call="search(x)", reward=1.0, is_leaf=True)
    assert a.same_tokens(completed)
    assert not a.equals(completed)


@pytest.mark.parametrize(
    ("changes", "same_tokens"),
    [
        ({"node_id": 9}, True),
        ({"parent_id": 2}, False),
        ({"depth": 3, "parent_id": 2}, False),
        ({"obs_ids": [7, 9]}, False),
        ({"token_ids": [1, 2, 4]}, False),
        ({"logprobs": [-0.5, -1.0, -0.1]}, False),
        ({"versions": [3, 4, 4]}, False),
        ({"finish_reason": FinishReason.EOS}, True),
        ({"entropy": 0.25}, True),
        ({"topk_logprobs": [[-0.1]]}, True),
        ({"topk_logprobs": [[-0.1], [-0.3]]}, True),
        ({"tool_call": "search(y)"}, True),
        ({"tool_call": None}, True),
        ({"is_leaf": True}, True),
    ],
)
def test_equals_notices_every_field(changes: dict[str, Any], same_tokens: bool) -> None:
    base: dict[str, Any] = {"topk_logprobs": [[-0.1], [-0.2]], "tool_call": "search(x)"}
    a = node(**base)
    b = node(**{**base, **changes})
    assert not a.equals(b)
    assert not b.equals(a)
    assert a.same_tokens(b) is same_tokens


# ----------------------------------------------------------------------------------------- trees


def test_sample_tree_is_valid_and_navigable() -> None:
    tree = sample_tree()
    tree.validate(complete=True)
    tree.validate(complete=False)
    assert tree.root.node_id == 0
    assert tree.children() == {0: [1, 2], 1: [3, 4], 2: [], 3: [], 4: []}
    assert [n.node_id for n in tree.leaves()] == [2, 3, 4]
    assert [n.node_id for n in tree.path_to(4)] == [0, 1, 4]
    assert [n.node_id for n in tree.path_to(0)] == [0]
    assert [[n.node_id for n in path] for path in tree.paths()] == [[0, 2], [0, 1, 3], [0, 1, 4]]
    assert tree.min_version == 2


def test_min_version_of_a_tree_without_generated_tokens_is_none() -> None:
    tree = TurnTree.from_nodes("t", "k", "a", [root(), leaf(1, 0, 1, token_ids=[], logprobs=[], versions=[])])
    assert tree.min_version is None
    tree.validate()


def test_from_nodes_refuses_duplicate_ids() -> None:
    with pytest.raises(InvalidTreeError, match="node id 1 appears twice"):
        TurnTree.from_nodes("t", "k", "a", [root(), leaf(1, 0, 1), leaf(1, 0, 1)])


def test_root_property_needs_exactly_one_root() -> None:
    with pytest.raises(InvalidTreeError, match="found 2"):
        _ = TurnTree.from_nodes("t", "k", "a", [root(0), root(1)]).root
    with pytest.raises(InvalidTreeError, match="found 0"):
        _ = TurnTree.from_nodes("t", "k", "a", [leaf(1, 5, 1)]).root


def test_path_to_detects_a_cycle() -> None:
    # Each node is fine on its own; together they loop (validate_structure rejects this via depths).
    tree = TurnTree.from_nodes("t", "k", "a", [root(), node(1, 2, 1), node(2, 1, 1)])
    with pytest.raises(InvalidTreeError, match="cycle"):
        tree.path_to(1)
    with pytest.raises(InvalidTreeError, match="depth"):
        tree.validate(complete=False)


def _tree_without(tree: TurnTree, *node_ids: int) -> TurnTree:
    return TurnTree.from_nodes(
        tree.tree_id, tree.task_id, tree.actor_id, [n for i, n in tree.nodes.items() if i not in node_ids]
    )


def _replace(tree: TurnTree, *nodes: TurnNode) -> TurnTree:
    replaced = dict(tree.nodes)
    for n in nodes:
        replaced[n.node_id] = n
    return TurnTree.from_nodes(tree.tree_id, tree.task_id, tree.actor_id, replaced.values())


STRUCTURE_ERRORS: dict[str, tuple[Any, str, bool]] = {
    # name: (tree factory, message fragment, also wrong when incomplete)
    "no nodes": (lambda: TurnTree("t", "k", "a"), "no nodes", True),
    "two roots": (lambda: _replace(sample_tree(), root(7)), "found 2", True),
    "no root": (lambda: _tree_without(sample_tree(), 0), "found 0", True),
    "missing parent": (lambda: _replace(sample_tree(), leaf(5, 6, 2)), "parent 6, which does not exist", True),
    "depth too deep": (lambda: _replace(sample_tree(), leaf(5, 1, 3)), "node 5 has depth 3", True),
    "depth too shallow": (lambda: _replace(sample_tree(), leaf(3, 1, 1)), "node 3 has depth 1", True),
    "leaf flag on a parent": (lambda: _replace(sample_tree(), node(1, 0, 1, is_leaf=True)), "flagged leaf", False),
    "childless non-leaf": (lambda: _replace(sample_tree(), node(2, 0, 1)), "not a leaf", False),
    "leaf without reward": (lambda: _replace(sample_tree(), leaf(3, 1, 2, reward=None)), "no reward", False),
    "root only": (lambda: TurnTree.from_nodes("t", "k", "a", [root()]), "at least one turn", False),
}


@pytest.mark.parametrize("case", sorted(STRUCTURE_ERRORS))
def test_tree_structure_errors(case: str) -> None:
    factory, fragment, when_incomplete = STRUCTURE_ERRORS[case]
    tree = factory()
    with pytest.raises(InvalidTreeError, match=r"^tree t") as info:
        tree.validate(complete=True)
    assert fragment in str(info.value)
    if when_incomplete:
        with pytest.raises(InvalidTreeError):
            tree.validate(complete=False)
    else:
        tree.validate(complete=False)


def test_validate_structure_on_shapes_alone() -> None:
    shapes = {
        0: NodeShape(ROOT_PARENT, 0, is_leaf=False, has_reward=False),
        1: NodeShape(0, 1, is_leaf=False, has_reward=False),
        2: NodeShape(1, 2, is_leaf=True, has_reward=True),
    }
    validate_structure("s", shapes)
    growing = {**shapes, 2: NodeShape(1, 2, is_leaf=False, has_reward=False)}
    validate_structure("s", growing, complete=False)
    with pytest.raises(InvalidTreeError, match="has no children but is not a leaf"):
        validate_structure("s", growing)
    # A cycle hanging off a proper root can only be caught through the depths.
    cyclic = {**shapes, 3: NodeShape(4, 2, True, True), 4: NodeShape(3, 2, True, True)}
    with pytest.raises(InvalidTreeError, match="depth"):
        validate_structure("s", cyclic, complete=False)


@st.composite
def random_trees(draw: st.DrawFn) -> TurnTree:
    n = draw(st.integers(1, 15))
    parents = [ROOT_PARENT] + [draw(st.integers(0, i - 1)) for i in range(1, n + 1)]
    ids = draw(st.lists(st.integers(0, 10_000), min_size=n + 1, max_size=n + 1, unique=True))
    depth = [0]
    for i in range(1, n + 1):
        depth.append(depth[parents[i]] + 1)
    has_children = set(parents[1:])
    nodes = []
    for i in range(n + 1):
        if i == 0:
            nodes.append(root(ids[0]))
        elif i in has_children:
            nodes.append(node(ids[i], ids[parents[i]], depth[i], versions=[i, i, i]))
        else:
            nodes.append(leaf(ids[i], ids[parents[i]], depth[i], reward=float(i), versions=[i, i, i]))
    random.Random(draw(st.integers(0, 2**32))).shuffle(nodes)
    return TurnTree.from_nodes("t", "k", "a", nodes)


@settings(max_examples=150, deadline=None)
@given(random_trees())
def test_random_trees_paths_and_leaves(tree: TurnTree) -> None:
    tree.validate(complete=True)
    kids = tree.children()
    assert sum(len(c) for c in kids.values()) == len(tree.nodes) - 1
    leaves = tree.leaves()
    assert all(n.is_leaf and n.reward is not None for n in leaves)
    assert {n.node_id for n in leaves} == {i for i, n in tree.nodes.items() if n.is_leaf}
    paths = list(tree.paths())
    assert len(paths) == len(leaves)
    for path, end in zip(paths, leaves, strict=True):
        assert path[0] is tree.root
        assert path[-1] is end
        assert [n.depth for n in path] == list(range(len(path)))
        for parent, child in itertools.pairwise(path):
            assert child.parent_id == parent.node_id
    assert tree.min_version == 1
    # Dropping any non-root node's parent link breaks validation.
    victim = next(n for n in tree.nodes.values() if n.parent_id != ROOT_PARENT)
    broken = _replace(tree, leaf(victim.node_id, 10_001, victim.depth))
    with pytest.raises(InvalidTreeError, match="does not exist"):
        broken.validate(complete=False)
