"""Sampled trees survive the byte framing, and task groups are assembled (and released) as documented."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from common.replay_client import SampledTree
from common.subtree import SubtreeHeader, encode_subtree
from common.tree import FinishReason, TurnNode
from common.wire import SampledTreeInfo
from learner.sampling import FramingError, GroupAssembler, TreeItem, decode_sampled, encode_sampled


def sampled(tree_id: str, task_id: str, reward: float = 1.0, staleness: int | None = 0) -> SampledTree:
    nodes = [
        TurnNode(0, -1, 0, [1, 2, 3], [], [], [], FinishReason.PROMPT),
        TurnNode(1, 0, 1, [], [4, 5], [-0.5, -0.25], [0, 0], FinishReason.ANSWER, reward=reward, is_leaf=True),
    ]
    message = encode_subtree(SubtreeHeader(tree_id, task_id, "a", 0, True), nodes)
    info = SampledTreeInfo(
        tree_id=tree_id,
        task_id=task_id,
        actor_id="a",
        n_messages=1,
        min_version=0,
        max_version=0,
        staleness=staleness,
        times_sampled=1,
    )
    return SampledTree(info=info, messages=[message])


def test_framing_round_trip() -> None:
    trees = [sampled("t1", "x"), sampled("t2", "y", staleness=None), sampled("t3", "x", reward=0.0)]
    data = encode_sampled(trees)
    back = decode_sampled(data)
    assert [t.info for t in back] == [t.info for t in trees]
    assert [t.messages for t in back] == [t.messages for t in trees]
    assert back[2].assemble().leaves()[0].reward == 0.0
    assert decode_sampled(encode_sampled([])) == []


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d[:4], "at least"),
        (lambda d: struct.pack(">Q", 10**6) + d[8:], "runs past"),
        (lambda d: d + b"x", "trailing"),
        (lambda d: d[:-3], "runs past"),
    ],
)
def test_framing_rejects_bad_bytes(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    data = encode_sampled([sampled("t1", "x")])
    with pytest.raises(FramingError, match=match):
        decode_sampled(mutate(data))


def test_framing_rejects_other_versions_and_bad_headers() -> None:
    head = json.dumps({"version": 99, "trees": []}).encode()
    with pytest.raises(FramingError, match="framing version"):
        decode_sampled(struct.pack(">Q", len(head)) + head)
    head = json.dumps({"version": 1, "trees": [{"sizes": [1]}]}).encode()
    with pytest.raises(FramingError, match="bad framed-trees header"):
        decode_sampled(struct.pack(">Q", len(head)) + head + b"x")


def items(*pairs: tuple[str, str]) -> list[TreeItem]:
    return [TreeItem.decode(sampled(tree_id, task_id)) for tree_id, task_id in pairs]


def test_single_tree_groups_are_released_at_once() -> None:
    assembler = GroupAssembler(group_size=1, wait_steps=2)
    assembler.add(items(("a", "x"), ("b", "y"), ("c", "x")))
    groups = assembler.take()
    assert [[i.tree.tree_id for i in g] for g in groups] == [["a"], ["c"], ["b"]]
    assert assembler.held_trees == 0


def test_groups_wait_for_their_members_then_stragglers_go_alone() -> None:
    assembler = GroupAssembler(group_size=2, wait_steps=1)
    assembler.add(items(("a", "x"), ("b", "y")))
    assert assembler.take() == []  # both wait (age 0 -> 1)
    assert {t.info.tree_id for t in assembler.held()} == {"a", "b"}
    assembler.add(items(("c", "x")))
    groups = assembler.take()  # x is complete; y has waited its one step and goes alone
    assert sorted([i.tree.tree_id for i in g] for g in groups) == [["a", "c"], ["b"]]
    assert assembler.groups_incomplete == 1
    assert assembler.held_trees == 0


def test_a_task_with_more_trees_than_the_group_size_makes_several_groups() -> None:
    assembler = GroupAssembler(group_size=2, wait_steps=5)
    assembler.add(items(("a", "x"), ("b", "x"), ("c", "x")))
    groups = assembler.take()
    assert [[i.tree.tree_id for i in g] for g in groups] == [["a", "b"]]
    assert [t.info.tree_id for t in assembler.held()] == ["c"]


def test_a_redelivered_tree_is_dropped_but_a_resample_is_kept() -> None:
    assembler = GroupAssembler(group_size=1, wait_steps=0)
    first = sampled("a", "x")
    again = sampled("a", "x")  # replay handed it out again after a crash: same times_sampled
    base = sampled("a", "x")  # a deliberate second sample (uniform sampling) counts one more
    resampled = SampledTree(info=base.info.model_copy(update={"times_sampled": 2}), messages=base.messages)
    assembler.add([TreeItem.decode(first), TreeItem.decode(again), TreeItem.decode(resampled)])
    assert [[i.sampled.info.times_sampled for i in g] for g in assembler.take()] == [[1], [2]]
    assert assembler.redelivered_dropped == 1


def test_assembler_validates_arguments() -> None:
    with pytest.raises(ValueError):
        GroupAssembler(group_size=0, wait_steps=0)
    with pytest.raises(ValueError):
        GroupAssembler(group_size=1, wait_steps=-1)


def test_tree_item_staleness_comes_from_replay() -> None:
    assert TreeItem.decode(sampled("a", "x", staleness=3)).staleness == 3
    assert np.array_equal(TreeItem.decode(sampled("a", "x")).tree.nodes[1].token_ids, [4, 5])
