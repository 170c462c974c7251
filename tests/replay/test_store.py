"""The LMDB tree store's contract (replay/store.py, DESIGN.md section 4).

Ingestion is idempotent per (tree_id, seq) and validates each tree as a whole once complete; the
ready queue hands completed trees out in completion order (fifo) or uniformly under a
max-times-sampled bound; trees beyond the staleness bound are never handed out and are counted;
admission bounds the trees started per learner version and survives restarts; capacity evicts only
consumed trees; abandoned trees expire after their lease; and every index is rebuilt from disk.

Helpers come from the `kit` fixture (tests/replay/conftest.py). Time is a fake clock.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from common.store_reader import StoreReader, StoreReferenceError
from common.subtree import assemble_tree
from common.tree import TurnTree
from common.wire import ErrorCode, SampledTreeInfo, StoreReference
from replay.store import (
    _COUNTERS_KEY,
    SUBTREES_DB,
    ReadPin,
    SampleDecision,
    SampleRequestError,
    StoreError,
    TreeState,
    TreeStore,
    parse_tree_id,
)
from tests.support import read_by_reference_in_child


def assert_same_tree(got: TurnTree, want: TurnTree) -> None:
    """Same nodes, tokens and rewards (entropy travels as float32, so it is compared approximately)."""
    assert (got.tree_id, got.task_id, got.actor_id) == (want.tree_id, want.task_id, want.actor_id)
    assert sorted(got.nodes) == sorted(want.nodes)
    for node_id, node in want.nodes.items():
        other = got.nodes[node_id]
        assert other.same_tokens(node), f"node {node_id} differs"
        assert (other.reward, other.is_leaf, other.finish_reason, other.tool_call) == (
            node.reward,
            node.is_leaf,
            node.finish_reason,
            node.tool_call,
        )
        assert other.entropy == pytest.approx(node.entropy, rel=1e-6, nan_ok=True)


def errors(outcomes: list[Any]) -> list[ErrorCode | None]:
    return [o.error for o in outcomes]


# ============================================================================ idempotent ingestion


def test_duplicate_in_one_batch_is_acked_and_stored_once(kit: SimpleNamespace) -> None:
    store = kit.open()
    assert kit.lease(store, 1) == ["0"]
    m0, m1, m2 = kit.messages("0")
    outcomes = kit.ingest(store, [m0, m0, m1, m2, m1, m2])
    assert all(o.ok for o in outcomes)
    assert [o.duplicate for o in outcomes] == [False, True, False, False, True, True]
    assert [(o.tree_id, o.seq) for o in outcomes] == [("0", 0), ("0", 0), ("0", 1), ("0", 2), ("0", 1), ("0", 2)]
    stats = store.stats()
    total = len(m0) + len(m1) + len(m2)
    assert stats["subtrees_stored"] == 3
    assert stats["duplicates"] == 3
    assert stats["live_bytes"] == stats["bytes_stored_total"] == total
    assert (stats["inserts"], stats["ready"], stats["growing"]) == (1, 1, 0)
    assert kit.disk_subtrees(store, "0") == 3
    decision = store.sample("r", 1, 0)
    assert decision.ready
    [tree] = decision.trees
    assert tree.record.n_messages == 3 and tree.record.nbytes == total
    assert tree.messages == [m0, m1, m2]
    assert_same_tree(assemble_tree(tree.messages), kit.make_tree("0"))


def test_duplicate_in_later_batches_while_growing_ready_and_consumed(kit: SimpleNamespace) -> None:
    store = kit.open()
    kit.lease(store, 1)
    m0, m1, m2 = kit.messages("0")
    [first] = kit.ingest(store, [m0])
    assert first.ok and not first.duplicate
    [again] = kit.ingest(store, [m0])
    assert again.ok and again.duplicate
    kit.ingest_ok(store, [m1, m2])
    assert store.stats()["ready"] == 1
    # Complete (ready): every seq is a duplicate, nothing changes.
    for outcomes in (kit.ingest(store, [m]) for m in (m0, m1, m2)):
        assert outcomes[0].ok and outcomes[0].duplicate
    assert store.stats()["ready"] == 1 and store.stats()["inserts"] == 1
    # Consumed: still duplicates, not TREE_COMPLETE.
    assert store.sample("r", 1, 0).ready
    for m in (m2, m0):
        [outcome] = kit.ingest(store, [m])
        assert outcome.ok and outcome.duplicate
    stats = store.stats()
    assert stats["subtrees_stored"] == 3
    assert stats["duplicates"] == 1 + 3 + 2
    assert stats["inserts"] == 1 and stats["samples"] == 1
    assert stats["live_bytes"] == len(m0) + len(m1) + len(m2)
    assert kit.disk_subtrees(store) == 3


def test_duplicate_after_reopen_while_growing_and_complete(kit: SimpleNamespace) -> None:
    store = kit.open()
    kit.lease(store, 2)
    a = kit.messages("0")
    b = kit.messages("1", seed=1)
    kit.ingest_ok(store, [a[0], a[2]])  # growing; its final already known
    kit.ingest_ok(store, b)  # complete
    store = kit.reopen(store)
    outcomes = kit.ingest(store, [a[0], a[2], *b])
    assert all(o.ok and o.duplicate for o in outcomes)
    stats = store.stats()
    assert (stats["growing"], stats["ready"], stats["subtrees_stored"]) == (1, 1, 5)
    [last] = kit.ingest(store, [a[1]])
    assert last.ok and not last.duplicate
    stats = store.stats()
    assert (stats["growing"], stats["ready"], stats["inserts"], stats["subtrees_stored"]) == (0, 2, 2, 6)
    decision = store.sample("r", 2, 0)
    assert decision.ready
    by_id = {tree.record.tree_id: tree for tree in decision.trees}
    assert by_id["0"].messages == a and by_id["1"].messages == b
    assert_same_tree(assemble_tree(by_id["0"].messages), kit.make_tree("0"))
    assert_same_tree(assemble_tree(by_id["1"].messages), kit.make_tree("1", seed=1))


def test_duplicate_of_an_evicted_tree_is_acked_but_a_new_seq_is_refused(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(capacity_trees=2, trees_per_step=1))
    assert kit.lease(store, 2) == ["0", "1"]
    sent = kit.complete(store, "0")
    kit.complete(store, "1")
    assert kit.ids(store.sample("r", 1, 0)) == ["0"]
    assert kit.lease(store, 1) == ["2"]
    kit.complete(store, "2")  # three live trees > capacity 2: the consumed one goes
    assert store.stats()["evicted"] == 1
    assert kit.disk_record(store, "0").state is TreeState.EVICTED
    assert kit.disk_subtrees(store, "0") == 0
    outcomes = kit.ingest(store, sent)
    assert all(o.ok and o.duplicate for o in outcomes)
    beyond = kit.message("0", 3, [kit.turn(20, 0, 1, leaf=True, reward=1.0)])
    assert errors(kit.ingest(store, [beyond])) == [ErrorCode.TREE_COMPLETE]
    assert kit.disk_subtrees(store, "0") == 0
    assert store.stats()["subtrees_stored"] == 9


# ============================================================================ seqs and identities


def test_out_of_order_seqs_complete_the_tree_only_when_all_are_present(kit: SimpleNamespace) -> None:
    store = kit.open()
    kit.lease(store, 1)
    m0, m1, m2 = kit.messages("0")
    kit.ingest_ok(store, [m2])  # the final first
    assert (store.stats()["growing"], store.stats()["ready"]) == (1, 0)
    kit.ingest_ok(store, [m0])
    assert (store.stats()["growing"], store.stats()["ready"]) == (1, 0)
    not_yet = store.sample("early", 1, 0)
    assert not not_yet.ready and not not_yet.trees
    kit.ingest_ok(store, [m1])
    stats = store.stats()
    assert (stats["growing"], stats["ready"], stats["inserts"]) == (0, 1, 1)
    [tree] = store.sample("r", 1, 0).trees
    assert tree.messages == [m0, m1, m2]  # seq order, whatever the arrival order
    assert_same_tree(assemble_tree(tree.messages), kit.make_tree("0"))


def _chain(kit: SimpleNamespace) -> SimpleNamespace:
    """A three-node tree: root 0 -> turn 1 -> leaf 2."""
    return SimpleNamespace(
        root=kit.turn(0, -1, 0),
        n1=kit.turn(1, 0, 1),
        leaf2=kit.turn(2, 1, 2, leaf=True, reward=1.0),
    )


def test_seq_after_final_and_a_second_final_are_bad_subtrees(kit: SimpleNamespace) -> None:
    store = kit.open()
    kit.lease(store, 1)
    t = _chain(kit)
    kit.ingest_ok(store, [kit.message("0", 1, [t.leaf2], final=True)])
    after = kit.message("0", 2, [kit.turn(3, 1, 2, leaf=True, reward=0.0)])
    second_final = kit.message("0", 0, [t.root, t.n1], final=True)
    outcomes = kit.ingest(store, [after, second_final])
    assert errors(outcomes) == [ErrorCode.BAD_SUBTREE, ErrorCode.BAD_SUBTREE]
    assert "after the final seq 1" in outcomes[0].message
    assert "already was" in outcomes[1].message
    stats = store.stats()
    assert (stats["bad_subtrees"], stats["subtrees_stored"], stats["growing"]) == (2, 1, 1)
    assert kit.disk_subtrees(store, "0") == 1
    # The tree is still intact: the right seq 0 completes it.
    kit.ingest_ok(store, [kit.message("0", 0, [t.root, t.n1])])
    assert store.stats()["ready"] == 1


def test_final_below_an_already_stored_seq_is_a_bad_subtree(kit: SimpleNamespace) -> None:
    store = kit.open()
    kit.lease(store, 1)
    turn = kit.turn
    kit.ingest_ok(store, [kit.message("0", 0, [turn(0, -1, 0), turn(1, 0, 1)])])
    kit.ingest_ok(store, [kit.message("0", 3, [turn(2, 1, 2)])])
    low_final = kit.message("0", 2, [turn(4, 2, 3, leaf=True, reward=1.0)], final=True)
    [outcome] = kit.ingest(store, [low_final])
    assert outcome.error is ErrorCode.BAD_SUBTREE
    assert "below the already stored seq 3" in outcome.message
    assert store.stats()["bad_subtrees"] == 1
    kit.ingest_ok(
        store,
        [
            kit.message("0", 1, [turn(3, 2, 3, leaf=True, reward=0.0)]),
            kit.message("0", 2, [turn(4, 2, 3, leaf=True, reward=1.0)]),
        ],
    )
    assert store.stats()["ready"] == 0  # seq 4 (the final) still missing
    kit.ingest_ok(store, [kit.message("0", 4, [turn(5, 1, 2, leaf=True, reward=0.5)], final=True)])
    assert store.stats()["ready"] == 1
    [tree] = store.sample("r", 1, 0).trees
    assert sorted(assemble_tree(tree.messages).nodes) == [0, 1, 2, 3, 4, 5]


def test_wrong_actor_and_task_change_are_bad_subtrees(kit: SimpleNamespace) -> None:
    store = kit.open()
    assert kit.lease(store, 1, actor_id="actor-a") == ["0"]
    assert kit.lease(store, 1, actor_id="actor-b") == ["1"]
    t = _chain(kit)
    intruder = kit.message("0", 0, [t.root, t.n1], actor_id="actor-b")
    [outcome] = kit.ingest(store, [intruder])
    assert outcome.error is ErrorCode.BAD_SUBTREE and "actor-a" in outcome.message
    kit.ingest_ok(store, [kit.message("0", 0, [t.root, t.n1], actor_id="actor-a", task_id="t1")])
    other_task = kit.message("0", 1, [t.leaf2], final=True, actor_id="actor-a", task_id="t2")
    [outcome] = kit.ingest(store, [other_task])
    assert outcome.error is ErrorCode.BAD_SUBTREE and "t1" in outcome.message
    stats = store.stats()
    assert (stats["bad_subtrees"], stats["subtrees_stored"], stats["ready"]) == (2, 1, 0)
    kit.ingest_ok(store, [kit.message("0", 1, [t.leaf2], final=True, actor_id="actor-a", task_id="t1")])
    [tree] = store.sample("r", 1, 0).trees
    assert tree.record.task_id == "t1" and tree.record.actor_id == "actor-a"


@pytest.mark.parametrize("bad_id", ["1", "17", "abc", "-1", "00", "²", "٣", "99999999999999999999", "1e3"])
def test_unknown_tree_ids_are_refused_without_harming_the_batch(kit: SimpleNamespace, bad_id: str) -> None:
    store = kit.open()
    kit.lease(store, 1)  # only "0" was ever granted
    t = _chain(kit)
    good = kit.message("0", 0, [t.root, t.n1])
    bad = kit.message(bad_id, 0, [t.root, t.n1])
    outcomes = kit.ingest(store, [bad, good])
    assert errors(outcomes) == [ErrorCode.UNKNOWN_TREE, None]
    assert "never leased" in outcomes[0].message
    assert store.stats()["subtrees_stored"] == 1
    assert kit.disk_subtrees(store) == 1
    decision = store.grant_leases(kit.ACTOR, 0, renew=[bad_id, "0"])
    assert decision.renewed == ["0"] and decision.lost == [bad_id]


def test_parse_tree_id_accepts_only_canonical_decimal_indexes() -> None:
    assert parse_tree_id("0") == 0
    assert parse_tree_id("42") == 42
    assert parse_tree_id(str(2**63 - 1)) == 2**63 - 1
    for text in ("", "00", "042", "-1", "+1", " 1", "1.0", "²", "٣", str(2**63), "9" * 20):
        assert parse_tree_id(text) is None, text


def test_a_node_resent_with_another_parent_is_a_bad_subtree(kit: SimpleNamespace) -> None:
    store = kit.open()
    kit.lease(store, 1)
    turn = kit.turn
    kit.ingest_ok(store, [kit.message("0", 0, [turn(0, -1, 0), turn(1, 0, 1), turn(2, 0, 1)])])
    moved = kit.message("0", 1, [turn(2, 1, 2)])
    [outcome] = kit.ingest(store, [moved])
    assert outcome.error is ErrorCode.BAD_SUBTREE and "node 2" in outcome.message
    # Completing a node (same parent and depth, now a rewarded leaf) is allowed.
    completing = kit.message(
        "0", 1, [turn(2, 0, 1, leaf=True, reward=1.0), turn(3, 1, 2, leaf=True, reward=0.0)], final=True
    )
    kit.ingest_ok(store, [completing])
    assert store.stats()["ready"] == 1


@pytest.mark.parametrize("flaw", ["missing_parent", "leaf_without_reward", "childless_non_leaf"])
def test_an_invalid_complete_tree_is_rejected_as_a_whole(kit: SimpleNamespace, flaw: str) -> None:
    store = kit.open(kit.config(max_staleness=0, trees_per_step=2))  # admission: 2 trees at version 0
    assert kit.lease(store, 2) == ["0", "1"]
    turn = kit.turn
    first = kit.message("0", 0, [turn(0, -1, 0), turn(1, 0, 1)])
    last_nodes = {
        "missing_parent": [turn(3, 2, 2, leaf=True, reward=1.0)],
        "leaf_without_reward": [turn(2, 1, 2, leaf=True, reward=None)],
        "childless_non_leaf": [turn(2, 1, 2, leaf=True, reward=1.0), turn(3, 0, 1)],
    }[flaw]
    last = kit.message("0", 1, last_nodes, final=True)
    assert kit.ingest(store, [first])[0].ok
    assert store.stats()["live_bytes"] == len(first)
    [outcome] = kit.ingest(store, [last])
    assert outcome.error is ErrorCode.REJECTED_TREE
    stats = store.stats()
    assert stats["rejected_trees"] == 1
    assert (stats["inserts"], stats["ready"], stats["growing"], stats["live_trees"]) == (0, 0, 1, 1)
    assert stats["live_bytes"] == 0
    assert stats["bad_subtrees"] == 0
    assert kit.disk_subtrees(store, "0") == 0
    record = kit.disk_record(store, "0")
    assert record.state is TreeState.REJECTED and record.reason
    # Later messages for it, old or new, get REJECTED_TREE; it cannot be renewed.
    again = kit.ingest(store, [first, last, kit.message("0", 2, [turn(9, 0, 1)])])
    assert errors(again) == [ErrorCode.REJECTED_TREE] * 3
    assert kit.disk_subtrees(store, "0") == 0
    assert store.grant_leases(kit.ACTOR, 0, renew=["0"]).lost == ["0"]
    # It gave its admission place back.
    assert store.stats()["started_trees"] == 1
    assert kit.lease(store, 5) == ["2"]
    # And the rejection survives a restart.
    store = kit.reopen(store)
    assert errors(kit.ingest(store, [first])) == [ErrorCode.REJECTED_TREE]
    assert store.stats()["rejected_trees"] == 1


def test_rejection_inside_one_batch_keeps_the_other_trees(kit: SimpleNamespace) -> None:
    store = kit.open()
    kit.lease(store, 2)
    turn = kit.turn
    bad = [
        kit.message("0", 0, [turn(0, -1, 0), turn(1, 0, 1)]),
        kit.message("0", 1, [turn(3, 2, 2, leaf=True, reward=1.0)], final=True),
    ]
    good = kit.messages("1")
    outcomes = kit.ingest(store, [bad[0], good[0], bad[1], good[1], good[2]])
    assert errors(outcomes) == [None, None, ErrorCode.REJECTED_TREE, None, None]
    stats = store.stats()
    assert (stats["rejected_trees"], stats["ready"], stats["inserts"]) == (1, 1, 1)
    assert stats["live_bytes"] == sum(len(m) for m in good)
    assert kit.disk_subtrees(store, "0") == 0 and kit.disk_subtrees(store, "1") == 3


# ============================================================================ fifo ready queue


def test_fifo_hands_trees_out_in_completion_order_each_once(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(trees_per_step=2))
    ids = kit.lease(store, 5)
    assert ids == ["0", "1", "2", "3", "4"]
    sent = {tree_id: kit.messages(tree_id, seed=int(tree_id)) for tree_id in ids}
    kit.ingest_ok(store, [m for tree_id in ids for m in sent[tree_id][:-1]])
    assert store.stats()["ready"] == 0
    finals = {tree_id: sent[tree_id][-1] for tree_id in ids}
    kit.ingest_ok(store, [finals["3"], finals["1"]])
    kit.ingest_ok(store, [finals["4"]])
    kit.ingest_ok(store, [finals["0"], finals["2"]])
    assert store.stats()["ready"] == 5

    first = store.sample("r1", 2, 0)
    assert first.ready and kit.ids(first) == ["3", "1"]
    assert [t.messages for t in first.trees] == [sent["3"], sent["1"]]
    assert all(t.record.times_sampled == 1 and t.record.state is TreeState.CONSUMED for t in first.trees)
    second = store.sample("r2", 2, 0)
    assert kit.ids(second) == ["4", "0"]

    # A retried request gets the same trees and counts nothing again.
    before = store.stats()
    retry = store.sample("r1", 2, 0)
    assert retry.ready and kit.ids(retry) == ["3", "1"]
    assert [t.messages for t in retry.trees] == [sent["3"], sent["1"]]
    assert store.stats() == before
    assert (before["samples"], before["sample_batches"], before["ready"]) == (4, 2, 1)

    # Too few ready: nothing is handed out (all or none), with a reason.
    short = store.sample("r3", 2, 0)
    assert not short.ready and short.trees == []
    assert "1 completed trees ready, 2 requested" in short.reason
    assert store.stats() == before
    # The refused request id was not remembered: it can be asked again for what is there.
    last = store.sample("r3", 1, 0)
    assert kit.ids(last) == ["2"]
    empty = store.sample("r4", 1, 0)
    assert not empty.ready and empty.trees == []
    handed = [tree_id for batch in (first, second, last) for tree_id in kit.ids(batch)]
    assert sorted(handed) == ids and len(handed) == len(set(handed))
    stats = store.stats()
    assert (stats["samples"], stats["sample_batches"], stats["ready"], stats["retired_kept"]) == (5, 3, 0, 5)


@pytest.mark.parametrize("max_times_sampled", [0, 3])
def test_fifo_hands_each_tree_out_once_whatever_max_times_sampled(kit: SimpleNamespace, max_times_sampled: int) -> None:
    store = kit.open(kit.config(max_times_sampled=max_times_sampled, trees_per_step=1))
    for tree_id in kit.lease(store, 3):
        kit.complete(store, tree_id, seed=int(tree_id))
    assert [kit.ids(store.sample(f"r{i}", 1, 0)) for i in range(4)] == [["0"], ["1"], ["2"], []]
    assert store.stats()["samples"] == 3 and store.stats()["retired_kept"] == 3


def test_the_sample_reply_goes_out_before_its_bookkeeping_commits(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(trees_per_step=1))
    for tree_id in kit.lease(store, 2):
        kit.complete(store, tree_id, seed=int(tree_id))
    seen: list[tuple[list[str], int]] = []

    def reply(decision: SampleDecision) -> None:
        with store.env.begin() as txn:  # what is on disk while the reply leaves
            committed = json.loads(bytes(txn.get(_COUNTERS_KEY, db=store.db_meta)))
        seen.append((kit.ids(decision), committed["samples"]))

    decision = store.sample("r1", 1, 0, reply=reply)
    assert seen == [(["0"], 0)] and kit.ids(decision) == ["0"]
    assert store.stats()["samples"] == 1
    # a repeated request is answered through the same callback
    store.sample("r1", 1, 0, reply=reply)
    assert seen[-1][0] == ["0"]


def test_a_reply_whose_commit_fails_leaves_the_trees_to_be_handed_out_again(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(trees_per_step=1))
    for tree_id in kit.lease(store, 2):
        kit.complete(store, tree_id, seed=int(tree_id))

    def reply_then_fail(decision: SampleDecision) -> None:
        raise RuntimeError("the commit after this reply failed")

    with pytest.raises(RuntimeError):
        store.sample("r1", 1, 0, reply=reply_then_fail)
    # at-least-once: nothing was recorded, so the same FIFO tree comes out again
    assert kit.ids(store.sample("r2", 1, 0)) == ["0"]
    assert store.stats()["samples"] == 1


def test_a_sample_sink_sees_lmdb_buffers_once_per_batch_and_its_results_are_the_messages(
    kit: SimpleNamespace,
) -> None:
    store = kit.open(kit.config(trees_per_step=2))
    ids = kit.lease(store, 2)
    sent = {tree_id: kit.complete(store, tree_id, seed=int(tree_id)) for tree_id in ids}
    calls: list[list[memoryview]] = []

    def sink(views: list[memoryview], pin: ReadPin) -> list[bytearray]:
        calls.append(views)
        return [bytearray(view) for view in views]  # owned copies: the views end with the read

    for request_id in ("r1", "r1"):  # a new request, then its retry
        decision = store.sample(request_id, 2, 0, sink=sink)
        assert decision.ready and kit.ids(decision) == ids
        assert all(type(m) is bytearray for t in decision.trees for m in t.messages)
        assert [t.messages for t in decision.trees] == [sent[tree_id] for tree_id in ids]
    assert len(calls) == 2 and all(type(view) is memoryview for batch in calls for view in batch)
    assert [len(batch) for batch in calls] == [sum(len(m) for m in sent.values())] * 2
    # The default sink copies into bytes.
    again = store.sample("r1", 2, 0)
    assert all(type(m) is bytes for t in again.trees for m in t.messages)


def test_a_kept_pin_keeps_the_sampled_buffers_valid_through_later_writes(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(trees_per_step=1, sampler="fifo", capacity_trees=4))
    first = kit.lease(store, 1)[0]
    sent = kit.complete(store, first, seed=0)
    releases = []

    def keep(views: list[memoryview], pin: ReadPin) -> list[memoryview]:
        releases.append(pin.keep())
        return views

    decision = store.sample("r1", 1, 0, sink=keep)
    (tree,) = decision.trees
    assert all(type(m) is memoryview for m in tree.messages)
    # The sampled tree is consumed, then evicted by later trees: its pages are freed, not reused.
    for tree_id in kit.lease(store, 6):
        kit.complete(store, tree_id, seed=int(tree_id))
        store.sample(f"r-{tree_id}", 1, 0)
    assert store.stats()["evicted"] >= 1
    assert [bytes(m) for m in tree.messages] == sent
    releases[0]()


def test_only_recent_sample_batches_are_remembered(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(sample_batches_kept=2, trees_per_step=1))
    for tree_id in kit.lease(store, 4):
        kit.complete(store, tree_id, seed=int(tree_id))
    assert kit.ids(store.sample("a", 1, 0)) == ["0"]
    assert kit.ids(store.sample("b", 1, 0)) == ["1"]
    assert kit.ids(store.sample("c", 1, 0)) == ["2"]
    assert kit.ids(store.sample("c", 1, 0)) == ["2"]
    assert kit.ids(store.sample("b", 1, 0)) == ["1"]
    # "a" was forgotten: the same id is a new request now.
    assert kit.ids(store.sample("a", 1, 0)) == ["3"]
    assert store.stats()["samples"] == 4


def test_a_sample_larger_than_the_store_is_an_error(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(capacity_trees=8, trees_per_step=2))
    with pytest.raises(SampleRequestError, match="capacity_trees=8"):
        store.sample("r", 9, 0)
    assert store.stats()["sample_batches"] == 0


# ============================================================================ uniform sampling


def test_uniform_respects_max_times_sampled_and_distinct_batches(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(sampler="uniform", max_times_sampled=2, trees_per_step=1, seed=7))
    ids = kit.lease(store, 6)
    for tree_id in ids:
        kit.complete(store, tree_id, seed=int(tree_id))
    counts: Counter[str] = Counter()
    request = 0
    for n in (3, 1):  # batches of three while possible, then drain one by one
        while True:
            decision = store.sample(f"b{request}", n, 0)
            request += 1
            if not decision.ready:
                assert decision.trees == [] and decision.reason
                break
            batch = kit.ids(decision)
            assert len(batch) == n == len(set(batch))
            counts.update(batch)
            assert max(counts.values()) <= 2
    assert counts == dict.fromkeys(ids, 2)
    stats = store.stats()
    assert (stats["samples"], stats["ready"], stats["retired_kept"]) == (12, 0, 6)
    for tree_id in ids:
        record = kit.disk_record(store, tree_id)
        assert (record.state, record.times_sampled) == (TreeState.CONSUMED, 2)


def test_uniform_unbounded_keeps_trees_sampleable(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(sampler="uniform", max_times_sampled=0, trees_per_step=1, seed=3))
    ids = kit.lease(store, 3)
    for tree_id in ids:
        kit.complete(store, tree_id, seed=int(tree_id))
    counts: Counter[str] = Counter()
    for i in range(20):
        decision = store.sample(f"b{i}", 2, 0)
        assert decision.ready
        batch = kit.ids(decision)
        assert len(set(batch)) == 2
        counts.update(batch)
    assert sum(counts.values()) == 40 and max(counts.values()) > 2
    stats = store.stats()
    assert (stats["samples"], stats["ready"], stats["retired_kept"]) == (40, 3, 0)
    assert {tree_id: kit.disk_record(store, tree_id).times_sampled for tree_id in ids} == dict(counts)
    assert all(kit.disk_record(store, tree_id).state is TreeState.READY for tree_id in ids)


def _uniform_run(kit: SimpleNamespace, name: str, seed: int, rng: random.Random | None = None) -> list[list[str]]:
    config = kit.config(sampler="uniform", max_times_sampled=3, trees_per_step=1, seed=seed)
    store = kit.open(config, name=name, rng=rng)
    for tree_id in kit.lease(store, 8):
        kit.complete(store, tree_id, seed=int(tree_id))
    batches = [kit.ids(store.sample(f"b{i}", 3, 0)) for i in range(6)]
    store.close()
    return batches


def test_uniform_sampling_is_reproducible_from_its_seed(kit: SimpleNamespace) -> None:
    first = _uniform_run(kit, "a", seed=11)
    assert first == _uniform_run(kit, "b", seed=11)
    assert first != _uniform_run(kit, "c", seed=12)
    injected = _uniform_run(kit, "d", seed=0, rng=random.Random(5))
    assert injected == _uniform_run(kit, "e", seed=99, rng=random.Random(5))


# ============================================================================ staleness


def test_trees_that_fall_behind_the_learner_are_dropped_counted_and_give_their_place_back(
    kit: SimpleNamespace,
) -> None:
    store = kit.open(kit.config(max_staleness=1, trees_per_step=1))  # admission (v + 2) trees
    assert kit.lease(store, 2) == ["0", "1"]
    kit.complete(store, "0", version=0)
    kit.complete(store, "1", version=0, seed=1)
    store.set_learner_version(1)  # staleness 1: still fine
    assert store.stats()["stale_dropped"] == 0 and store.stats()["ready"] == 2
    assert kit.lease(store, 5) == ["2"]
    kit.complete(store, "2", version=1, seed=2)
    refused = store.grant_leases(kit.ACTOR, 1)
    assert refused.tree_ids == [] and "staleness admission" in refused.reason
    assert store.stats()["started_trees"] == 3

    store.set_learner_version(2)  # trees 0 and 1 are now 2 versions behind
    stats = store.stats()
    assert (stats["stale_dropped"], stats["ready"], stats["inserts"]) == (2, 1, 3)
    assert stats["started_trees"] == 2  # was 3 at a capacity of 3; stale trees gave their place back
    assert kit.lease(store, 5) == ["3", "4"]  # capacity 4
    for tree_id in ("0", "1"):
        record = kit.disk_record(store, tree_id)
        assert (record.state, record.times_sampled) == (TreeState.STALE, 0)
    short = store.sample("s", 2, 2)
    assert not short.ready and short.trees == []
    [tree] = store.sample("s1", 1, 2).trees
    assert tree.record.tree_id == "2" and tree.staleness == 1
    assert not store.sample("s2", 1, 2).ready
    assert store.stats()["stale_dropped"] == 2


def test_a_tree_completing_already_stale_is_dropped_and_gives_its_place_back(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(max_staleness=1, trees_per_step=2))  # admission 2 * (v + 2)
    assert kit.lease(store, 4) == ["0", "1", "2", "3"]
    kit.complete(store, "0", version=0)
    kit.complete(store, "1", version=0, seed=1)
    assert kit.ids(store.sample("a", 2, 0)) == ["0", "1"]
    store.set_learner_version(1)
    assert kit.lease(store, 9) == ["4", "5"]
    kit.complete(store, "4", version=1, seed=4)
    kit.complete(store, "5", version=1, seed=5)
    assert kit.ids(store.sample("b", 2, 1)) == ["4", "5"]
    store.set_learner_version(2)
    assert kit.lease(store, 9) == ["6", "7"]
    assert store.grant_leases(kit.ACTOR, 1).tree_ids == []
    assert store.stats()["started_trees"] == 8

    kit.complete(store, "2", version=0, seed=2)  # two versions behind on arrival
    stats = store.stats()
    assert (stats["stale_dropped"], stats["inserts"], stats["ready"]) == (1, 5, 0)
    assert kit.disk_record(store, "2").state is TreeState.STALE
    assert stats["started_trees"] == 7
    assert kit.lease(store, 9) == ["8"]
    assert not store.sample("c", 1, 2).ready
    kit.complete(store, "3", version=1, seed=3)  # one version behind: fine
    [tree] = store.sample("d", 1, 2).trees
    assert tree.record.tree_id == "3" and tree.staleness == 1


def test_a_sample_reporting_a_newer_version_drops_stale_trees_before_choosing(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(max_staleness=1, trees_per_step=4))
    kit.lease(store, 2)
    kit.complete(store, "0", version=0)
    store.set_learner_version(1)
    kit.complete(store, "1", version=1, seed=1)
    decision = store.sample("s", 1, 2)  # fifo would give "0", but at version 2 it is too old
    assert kit.ids(decision) == ["1"] and decision.trees[0].staleness == 1
    stats = store.stats()
    assert (stats["learner_version"], stats["stale_dropped"], stats["ready"]) == (2, 1, 0)


def test_staleness_counts_a_trees_oldest_token(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(max_staleness=1, trees_per_step=4))
    kit.lease(store, 2)
    store.set_learner_version(2)
    turn = kit.turn
    for tree_id, old_version in (("0", 0), ("1", 1)):
        kit.ingest_ok(
            store,
            [
                kit.message(tree_id, 0, [turn(0, -1, 0), turn(1, 0, 1, version=old_version)]),
                kit.message(tree_id, 1, [turn(2, 1, 2, leaf=True, reward=1.0, version=2)], final=True),
            ],
        )
    assert store.stats()["stale_dropped"] == 1
    assert kit.disk_record(store, "0").state is TreeState.STALE
    [tree] = store.sample("s", 1, 2).trees
    assert tree.record.tree_id == "1" and tree.staleness == 1
    assert (tree.record.min_version, tree.record.max_version) == (1, 2)


def test_uniform_never_hands_out_stale_trees(kit: SimpleNamespace) -> None:
    config = kit.config(sampler="uniform", max_times_sampled=0, max_staleness=1, trees_per_step=2, seed=5)
    store = kit.open(config)
    kit.lease(store, 4)
    for tree_id in ("0", "1"):
        kit.complete(store, tree_id, version=0, seed=int(tree_id))
    store.set_learner_version(1)
    for tree_id in ("2", "3"):
        kit.complete(store, tree_id, version=1, seed=int(tree_id))
    assert {tid for i in range(10) for tid in kit.ids(store.sample(f"a{i}", 2, 1))} == {"0", "1", "2", "3"}
    store.set_learner_version(2)
    stats = store.stats()
    assert (stats["stale_dropped"], stats["ready"]) == (2, 2)
    seen = {tid for i in range(10) for tid in kit.ids(store.sample(f"b{i}", 2, 2))}
    assert seen == {"2", "3"}
    assert not store.sample("c", 3, 2).ready


# ============================================================================ admission


def test_admission_stops_exactly_at_the_staleness_budget(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(max_staleness=2, trees_per_step=3))  # (2 + v + 1) * 3
    assert len(kit.lease(store, 4)) == 4
    assert len(kit.lease(store, 4)) == 4
    last = store.grant_leases(kit.ACTOR, 4)
    assert len(last.tree_ids) == 1
    assert "staleness admission" in last.reason and "of 9 allowed" in last.reason
    assert "max_staleness=2" in last.reason
    none = store.grant_leases(kit.ACTOR, 1)
    assert none.tree_ids == [] and "9 trees started of 9 allowed at learner version 0" in none.reason
    full = store.grant_leases(kit.ACTOR, 0)
    assert full.tree_ids == [] and full.reason == ""
    stats = store.stats()
    assert (stats["started_trees"], stats["admission_capacity"], stats["leases_granted"]) == (9, 9, 9)

    # The learner trains on three trees and reports version 1: three more may start.
    for tree_id in ("0", "1", "2"):
        kit.complete(store, tree_id, seed=int(tree_id))
    assert len(store.sample("a", 3, 0).trees) == 3
    store.set_learner_version(1)
    raised = store.grant_leases(kit.ACTOR, 5)
    assert len(raised.tree_ids) == 3 and raised.learner_version == 1
    assert store.stats()["admission_capacity"] == 12
    # The version carried by a sample request raises it too.
    for tree_id in ("3", "4", "5"):
        kit.complete(store, tree_id, seed=int(tree_id))
    assert len(store.sample("b", 3, 2).trees) == 3
    assert store.stats()["admission_capacity"] == 15
    assert len(kit.lease(store, 5)) == 3
    # A lower version report changes nothing.
    store.set_learner_version(0)
    stats = store.stats()
    assert (stats["learner_version"], stats["admission_capacity"], stats["started_trees"]) == (2, 15, 15)
    assert kit.lease(store, 1) == []


def test_admission_counters_survive_a_restart_without_a_burst(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(max_staleness=1, trees_per_step=2))
    kit.lease(store, 4)
    kit.complete(store, "0", version=0)
    kit.complete(store, "1", version=0, seed=1)
    kit.ingest_ok(store, kit.messages("2", seed=2)[:1])  # growing
    assert kit.ids(store.sample("a", 2, 0)) == ["0", "1"]
    store.set_learner_version(1)
    assert kit.lease(store, 9) == ["4", "5"]
    assert kit.lease(store, 1) == []
    before = store.stats()
    store = kit.reopen(store)
    assert store.stats() == before
    refused = store.grant_leases(kit.ACTOR, 3)
    assert refused.tree_ids == [] and "staleness admission" in refused.reason
    assert store.stats()["leases_granted"] == before["leases_granted"]


def test_a_version_reported_to_a_fresh_store_opens_no_burst(kit: SimpleNamespace) -> None:
    config = kit.config(max_staleness=2, trees_per_step=3)
    store = kit.open(config, name="by-report")
    store.set_learner_version(5)
    stats = store.stats()
    assert stats["admission_capacity"] == (2 + 5 + 1) * 3 and stats["admission_floor"] == 15
    assert len(kit.lease(store, 100)) == (2 + 1) * 3
    assert kit.lease(store, 1) == []
    store = kit.reopen(store)
    assert store.stats()["admission_floor"] == 15 and kit.lease(store, 1) == []

    other = kit.open(config, name="by-sample")
    assert not other.sample("s", 3, 5).ready
    assert len(kit.lease(other, 100)) == 9


# ============================================================================ capacity


def test_capacity_trees_evicts_the_oldest_consumed_first_and_never_unconsumed(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(capacity_trees=4, trees_per_step=1))
    ids = kit.lease(store, 6)
    assert ids == ["0", "1", "2", "3"]
    for tree_id in ids:
        kit.complete(store, tree_id, seed=int(tree_id))
    full = store.grant_leases(kit.ACTOR, 1)
    assert full.tree_ids == [] and "store full: 4 unconsumed or growing trees" in full.reason
    assert store.stats()["evicted"] == 0

    assert kit.ids(store.sample("a", 2, 0)) == ["0", "1"]
    assert kit.lease(store, 1) == ["4"]
    kit.complete(store, "4", seed=4)  # 5 live > 4: the oldest consumed goes
    assert kit.disk_record(store, "0").state is TreeState.EVICTED
    assert kit.disk_record(store, "1").state is TreeState.CONSUMED
    assert store.stats()["evicted"] == 1
    assert kit.lease(store, 1) == ["5"]
    kit.complete(store, "5", seed=5)
    assert kit.disk_record(store, "1").state is TreeState.EVICTED
    stats = store.stats()
    assert (stats["evicted"], stats["live_trees"], stats["ready"], stats["retired_kept"]) == (2, 4, 4, 0)
    assert kit.disk_subtrees(store, "0") == kit.disk_subtrees(store, "1") == 0
    # Full of unconsumed trees: nothing is evicted, leases are refused.
    refused = store.grant_leases(kit.ACTOR, 2)
    assert refused.tree_ids == [] and "store full" in refused.reason
    assert {kit.disk_record(store, t).state for t in ("2", "3", "4", "5")} == {TreeState.READY}
    # Growing trees count as held and are never evicted either.
    assert kit.ids(store.sample("b", 1, 0)) == ["2"]
    assert kit.lease(store, 2) == ["6"]
    kit.ingest_ok(store, kit.messages("6", seed=6)[:1])
    assert kit.disk_record(store, "2").state is TreeState.EVICTED
    assert store.stats()["growing"] == 1 and kit.disk_subtrees(store, "6") == 1
    assert kit.lease(store, 1) == []


def test_capacity_bytes_evicts_consumed_trees_and_refuses_leases_when_full(kit: SimpleNamespace) -> None:
    size = sum(len(m) for m in kit.messages("0"))  # every tree below has this size (same shape, 1-digit id)
    store = kit.open(kit.config(capacity_bytes=3 * size - 1, trees_per_step=1))
    assert kit.lease(store, 4) == ["0", "1", "2", "3"]
    kit.complete(store, "0")
    kit.complete(store, "1")
    assert kit.ids(store.sample("a", 1, 0)) == ["0"]
    assert store.stats()["retired_bytes"] == size
    kit.complete(store, "2")  # 3 trees > capacity: the consumed one goes
    stats = store.stats()
    assert (stats["evicted"], stats["live_bytes"], stats["retired_bytes"], stats["retired_kept"]) == (1, 2 * size, 0, 0)
    assert kit.disk_record(store, "0").state is TreeState.EVICTED
    kit.complete(store, "3")  # over capacity with unconsumed trees only: nothing can go
    stats = store.stats()
    assert (stats["evicted"], stats["live_bytes"], stats["ready"]) == (1, 3 * size, 3)
    refused = store.grant_leases(kit.ACTOR, 1)
    assert refused.tree_ids == [] and "store full" in refused.reason and "bytes" in refused.reason
    assert kit.ids(store.sample("b", 1, 0)) == ["1"]
    assert kit.lease(store, 1) == ["4"]  # the consumed tree is evicted before the grant
    stats = store.stats()
    assert (stats["evicted"], stats["live_bytes"], stats["retired_bytes"]) == (2, 2 * size, 0)
    assert kit.reopen(store).stats() == stats


# ============================================================================ lease expiry


def test_expired_growing_trees_are_dropped_counted_and_refused_later(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(lease_ttl_s=10, max_staleness=0, trees_per_step=3))  # admission: 3
    clock = kit.clock
    assert kit.lease(store, 3) == ["0", "1", "2"]  # leases until t+10
    a = kit.messages("0")
    b = kit.messages("1", seed=1)
    kit.ingest_ok(store, a[:1])
    clock.advance(5)
    kit.ingest_ok(store, b[:1])  # activity renews tree 1's lease
    decision = store.grant_leases(kit.ACTOR, 0, renew=["2", "7", "x"])
    assert decision.renewed == ["2"] and decision.lost == ["7", "x"]
    assert store.grant_leases("someone-else", 0, renew=["0"]).lost == ["0"]  # not its tree: no renewal
    assert store.expire_leases() == 0
    clock.advance(6)  # t+11: tree 0 is past its lease, 1 and 2 are not
    assert store.expire_leases() == 1
    stats = store.stats()
    assert (stats["expired"], stats["growing"], stats["started_trees"]) == (1, 2, 2)
    assert stats["live_bytes"] == len(b[0])
    assert kit.disk_subtrees(store, "0") == 0
    assert kit.disk_record(store, "0").state is TreeState.EXPIRED
    assert errors(kit.ingest(store, [a[0], a[1]])) == [ErrorCode.LEASE_EXPIRED] * 2
    assert store.grant_leases(kit.ACTOR, 0, renew=["0", "1"]).lost == ["0"]
    # It gave its admission place back.
    assert kit.lease(store, 5) == ["3"]
    # Ready trees never expire; growing ones keep expiring after their lease.
    kit.ingest_ok(store, b[1:])
    clock.advance(100)
    assert store.expire_leases() == 2  # trees 2 and 3
    stats = store.stats()
    assert (stats["expired"], stats["growing"], stats["ready"]) == (3, 0, 1)
    assert kit.ids(store.sample("s", 1, 0)) == ["1"]
    assert store.expire_leases() == 0


def test_a_repeated_lease_request_id_gets_the_first_grant_even_after_a_restart(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(lease_ttl_s=300, trees_per_step=2, max_staleness=1, lease_requests_kept=2))
    first = store.grant_leases(kit.ACTOR, 2, request_id="r1")
    assert first.tree_ids == ["0", "1"]
    again = store.grant_leases(kit.ACTOR, 2, renew=["1"], request_id="r1", release_others=True)
    # The same trees, no new ones, nothing released although the copy says release_others.
    assert (again.tree_ids, again.renewed) == (["0", "1"], ["1"])
    assert (store.stats()["growing"], store.stats()["lease_retries"], store.stats()["released"]) == (2, 1, 0)
    store = kit.reopen(store)  # a copy ZeroMQ queued while replay was down reaches the restarted one
    assert store.grant_leases(kit.ACTOR, 2, request_id="r1").tree_ids == ["0", "1"]
    assert store.stats()["growing"] == 2
    kit.complete(store, "0")
    assert store.grant_leases(kit.ACTOR, 2, request_id="r1").tree_ids == ["1"]  # only what still grows
    # Another actor's request with the same id is its own request.
    assert store.grant_leases("other", 1, request_id="r1").tree_ids == ["2"]
    # Only lease_requests_kept grants are remembered: the oldest one (actor's r1) is forgotten.
    store.grant_leases(kit.ACTOR, 0, request_id="r2")
    store = kit.reopen(store)
    assert store.grant_leases(kit.ACTOR, 1, request_id="r1").tree_ids == ["3"]
    assert store.stats()["leases_granted"] == 4


def test_a_restart_extends_the_leases_of_growing_trees(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(lease_ttl_s=10))
    kit.lease(store, 2)
    a = kit.messages("0")
    kit.ingest_ok(store, a[:1])
    kit.clock.advance(50)  # both leases ran out while the service was down
    store = kit.reopen(store)
    assert store.expire_leases() == 0
    assert store.stats()["growing"] == 2
    kit.ingest_ok(store, a[1:])
    assert store.stats()["ready"] == 1
    kit.clock.advance(11)
    assert store.expire_leases() == 1
    assert kit.disk_record(store, "1").state is TreeState.EXPIRED


# ============================================================================ crash consistency


def _scenario_before(kit: SimpleNamespace, store: TreeStore) -> None:
    """Leave the store with ready, consumed, stale, growing (out of order) trees and a remembered batch."""
    assert kit.lease(store, 7) == [str(i) for i in range(7)]
    kit.complete(store, "2", version=1, seed=2)
    kit.complete(store, "0", version=0)
    kit.complete(store, "4", version=1, seed=4)
    kit.complete(store, "6", version=1, seed=6)
    assert kit.ids(store.sample("a", 1, 1)) == ["2"]
    one = kit.messages("1", seed=1, version=1)
    kit.ingest_ok(store, [one[2], one[0]])  # growing, final first
    kit.ingest_ok(store, kit.messages("3", seed=3, version=1)[:1])
    turn = kit.turn
    kit.ingest_ok(store, [kit.message("5", 0, [turn(0, -1, 0), turn(1, 0, 1, version=1), turn(2, 0, 1, version=1)])])
    store.set_learner_version(3)  # tree 0 (version 0) is now stale


def _scenario_after(kit: SimpleNamespace, store: TreeStore) -> list[Any]:
    """Continue the scenario; returns what a client would observe."""
    seen: list[Any] = [store.stats()]
    turn = kit.turn
    replay = store.sample("a", 1, 3)
    seen.append((replay.ready, kit.ids(replay), [t.messages for t in replay.trees]))
    one = kit.messages("1", seed=1, version=1)
    three = kit.messages("3", seed=3, version=1)
    outcomes = kit.ingest(store, [one[0], three[0], one[1], three[1], three[2]])
    seen.append([(o.tree_id, o.seq, o.duplicate, o.error) for o in outcomes])
    moved = kit.message("5", 1, [turn(2, 1, 2, version=1)])
    seen.append([(o.error, o.message) for o in kit.ingest(store, [moved])])
    done = kit.message("5", 1, [turn(1, 0, 1, version=1), turn(2, 0, 1, leaf=True, reward=1.0, version=1)])
    seen.append(errors(kit.ingest(store, [done])))  # seq 1 of 5 is not final yet
    final = kit.message("5", 2, [turn(3, 1, 2, leaf=True, reward=0.0, version=1)], final=True)
    seen.append(errors(kit.ingest(store, [final])))
    seen.append(store.stats())
    for i in range(3):
        decision = store.sample(f"b{i}", 2, 3)
        seen.append((decision.ready, decision.reason, kit.ids(decision), [t.staleness for t in decision.trees]))
    # Capacity 8: new trees push out the oldest consumed ones, in retirement order.
    seen.append(store.grant_leases(kit.ACTOR, 3))
    for tree_id in ("7", "8"):
        kit.complete(store, tree_id, version=3, seed=int(tree_id))
    seen.append({tree_id: kit.disk_record(store, tree_id).state for tree_id in map(str, range(9))})
    seen.append(store.stats())
    return seen


def test_a_restart_rebuilds_every_index_and_behaves_as_if_nothing_happened(kit: SimpleNamespace) -> None:
    config = kit.config(max_staleness=2, trees_per_step=3, capacity_trees=8)
    steady = kit.open(config, name="steady")
    _scenario_before(kit, steady)
    restarted = kit.open(config, name="restarted")
    _scenario_before(kit, restarted)
    before = restarted.stats()
    assert before == steady.stats()
    assert (before["ready"], before["growing"], before["retired_kept"], before["stale_dropped"]) == (2, 3, 2, 1)
    restarted = kit.reopen(restarted)
    assert restarted.stats() == before
    assert list(restarted.ready_fifo) == list(steady.ready_fifo) == [4, 6]
    assert list(restarted.retired) == list(steady.retired)
    assert restarted.shapes == steady.shapes
    assert restarted.batches == steady.batches
    assert {i: r.encode() for i, r in restarted.live.items() if r.state is not TreeState.GROWING} == {
        i: r.encode() for i, r in steady.live.items() if r.state is not TreeState.GROWING
    }
    expected = _scenario_after(kit, steady)
    assert _scenario_after(kit, restarted) == expected
    # Spot-check what the scenario saw, so that "equal" is not "equally wrong".
    assert expected[1][:2] == (True, ["2"])
    assert expected[2] == [
        ("1", 0, True, None),
        ("3", 0, True, None),
        ("1", 1, False, None),
        ("3", 1, False, None),
        ("3", 2, False, None),
    ]
    assert expected[3][0][0] is ErrorCode.BAD_SUBTREE
    assert expected[5] == [None]
    assert [batch[2] for batch in expected[7:10]] == [["4", "6"], ["1", "3"], []]
    assert expected[10].tree_ids == ["7", "8", "9"]
    states = expected[11]
    assert states["0"] is TreeState.EVICTED and states["2"] is TreeState.EVICTED


def test_a_restart_keeps_uniform_sample_counts(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(sampler="uniform", max_times_sampled=3, trees_per_step=1, seed=1))
    ids = kit.lease(store, 4)
    for tree_id in ids:
        kit.complete(store, tree_id, seed=int(tree_id))
    counts: Counter[str] = Counter()
    for i in range(4):
        counts.update(kit.ids(store.sample(f"a{i}", 2, 0)))
    before = store.stats()
    store = kit.reopen(store)
    assert store.stats() == before
    assert sorted(store.sampleable) == sorted(int(t) for t in ids if counts[t] < 3)
    for i in range(20):
        decision = store.sample(f"b{i}", 1, 0)
        if not decision.ready:
            break
        counts.update(kit.ids(decision))
    assert counts == dict.fromkeys(ids, 3)


def test_a_failed_transaction_applies_nothing(kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    store = kit.open()
    kit.lease(store, 1)
    m0, m1, m2 = kit.messages("0")
    kit.ingest_ok(store, [m0])
    before = store.stats()

    def boom(txn: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "_evict", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        kit.ingest(store, [m1, m2])
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.grant_leases(kit.ACTOR, 2)
    monkeypatch.undo()
    assert store.stats() == before
    assert kit.disk_subtrees(store, "0") == 1
    outcomes = kit.ingest(store, [m1, m2])
    assert [(o.ok, o.duplicate) for o in outcomes] == [(True, False), (True, False)]
    assert store.stats()["ready"] == 1
    assert kit.lease(store, 1) == ["1"]


def test_a_full_map_raises_store_error_and_loses_nothing_committed(kit: SimpleNamespace) -> None:
    config = kit.config(map_size_gb=0.002, capacity_bytes=1_000_000, trees_per_step=1)
    store = kit.open(config)
    ids = kit.lease(store, 30)
    committed = None
    with pytest.raises(StoreError, match="LMDB"):
        for tree_id in ids:
            messages = kit.messages(tree_id, n_nodes=9, tokens_per_turn=4000, seed=int(tree_id))
            committed = store.stats()
            kit.ingest_ok(store, messages)
    assert committed is not None and committed["inserts"] >= 1
    assert store.stats() == committed
    assert kit.reopen(store).stats() == committed


def test_lmdb_layout_keeps_a_trees_subtrees_contiguous(kit: SimpleNamespace) -> None:
    store = kit.open()
    kit.lease(store, 2)
    a = kit.messages("0")
    b = kit.messages("1", seed=1)
    kit.ingest_ok(store, [b[2], a[1], b[0], a[0], a[2], b[1]])
    with store.env.begin() as txn:
        keys = [bytes(key) for key, _ in txn.cursor(db=store.db_subtrees)]
    assert keys == sorted(keys)
    assert [(int.from_bytes(k[:8], "big"), int.from_bytes(k[8:], "big")) for k in keys] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]


def test_a_restarted_actor_releases_its_abandoned_growing_trees(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(lease_ttl_s=300, trees_per_step=1, max_staleness=1))
    assert kit.lease(store, 2) == ["0", "1"]  # admission full: (1 + 0 + 1) x 1
    kit.ingest_ok(store, kit.messages("0")[:1])
    other = store.grant_leases("someone-else", 1, release_others=True)
    assert other.tree_ids == [] and store.stats()["growing"] == 2  # other actors' trees are untouched
    again = store.grant_leases(kit.ACTOR, 1, renew=["1"], release_others=True)
    assert again.renewed == ["1"] and again.tree_ids == ["2"]  # tree 0 released, its slot reused
    stats = store.stats()
    assert (stats["released"], stats["growing"]) == (1, 2)
    assert kit.disk_record(store, "0").state is TreeState.EXPIRED
    assert store.grant_leases(kit.ACTOR, 0).renewed == []  # without the flag nothing more is dropped
    assert store.stats()["growing"] == 2


# ------------------------------------------------------------------------------ samples by reference


def _reference_infos(decision: SampleDecision) -> list[SampledTreeInfo]:
    return [
        SampledTreeInfo(
            tree_id=t.record.tree_id,
            task_id="",
            actor_id=t.record.actor_id,
            n_messages=len(t.messages),
            min_version=None,
            max_version=None,
            staleness=t.staleness,
            times_sampled=1,
            keys=[bytes(k).hex() for k in t.messages],
        )
        for t in decision.trees
    ]


def test_a_sample_by_reference_names_keys_another_process_reads_as_the_same_bytes(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(trees_per_step=2))
    ids = kit.lease(store, 2)
    sent = {tree_id: kit.complete(store, tree_id, seed=int(tree_id)) for tree_id in ids}
    decision = store.sample("r1", 2, 0, by_reference=True)
    assert decision.ready and kit.ids(decision) == ids
    infos = _reference_infos(decision)
    reference = StoreReference(path=str(store.path), store_id=store.store_id, db=SUBTREES_DB)
    assert read_by_reference_in_child(reference, infos) == [sent[tree_id] for tree_id in ids]
    # The retry of the same request by value gets the same trees, as bytes.
    again = store.sample("r1", 2, 0)
    assert [t.messages for t in again.trees] == [sent[tree_id] for tree_id in ids]
    # Another store's id at that path, no store at a path: unusable here for good; a key that is gone: this once.
    other = read_by_reference_in_child(reference.model_copy(update={"store_id": "f" * 32}), infos)
    assert isinstance(other, tuple) and other[1] and "another store" in other[0]
    nowhere = read_by_reference_in_child(reference.model_copy(update={"path": str(store.path / "missing")}), infos)
    assert isinstance(nowhere, tuple) and nowhere[1] and "no replay store" in nowhere[0]
    gone = read_by_reference_in_child(reference, [infos[0].model_copy(update={"keys": ["ff" * 12] * len(sent["0"])})])
    assert isinstance(gone, tuple) and not gone[1] and "is gone" in gone[0]


def test_a_reader_in_the_stores_own_process_is_refused_for_good(kit: SimpleNamespace) -> None:
    """LMDB opens an environment once per process: the learner client then asks by value."""
    store = kit.open(kit.config(trees_per_step=1))
    (tree_id,) = kit.lease(store, 1)
    kit.complete(store, tree_id)
    infos = _reference_infos(store.sample("r1", 1, 0, by_reference=True))
    reader = StoreReader()
    try:
        with pytest.raises(StoreReferenceError) as refused:
            reader.read(StoreReference(path=str(store.path), store_id=store.store_id, db=SUBTREES_DB), infos)
        assert refused.value.permanent
    finally:
        reader.close()


def test_the_store_id_is_made_once_and_survives_a_restart(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config())
    first = store.store_id
    assert len(first) == 32
    assert kit.reopen(store).store_id == first
    assert kit.open(kit.config(), name="another").store_id != first


def test_a_tree_sampled_by_reference_is_held_from_eviction_until_its_hold_ends(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(capacity_trees=2, trees_per_step=1, sampler="fifo", reference_hold_s=10.0))
    (first,) = kit.lease(store, 1)
    sent = kit.complete(store, first, seed=0)
    assert store.sample("r1", 1, 0, by_reference=True).ready
    assert store.stats()["held_for_reference"] == 1
    for tree_id in kit.lease(store, 2):  # 3 live trees > 2: the consumed one would go first
        kit.complete(store, tree_id, seed=int(tree_id))
    assert kit.disk_record(store, first).state is TreeState.CONSUMED
    assert kit.disk_subtrees(store, first) == len(sent)
    assert store.stats()["live_trees"] == 3  # over capacity by the one tree held
    kit.clock.advance(10.0)
    assert store.stats()["held_for_reference"] == 0
    assert store.sample("r2", 1, 0).ready  # consumes tree 1; the next ingest evicts the oldest consumed first
    (last,) = kit.lease(store, 1)
    kit.complete(store, last, seed=int(last))
    assert kit.disk_record(store, first).state is TreeState.EVICTED
    assert kit.disk_subtrees(store, first) == 0


def test_the_reader_slot_of_a_learner_killed_mid_read_is_freed(kit: SimpleNamespace) -> None:
    """A slot left by a dead reader would pin its snapshot's pages for good (the map would fill up)."""
    store = kit.open(kit.config())
    code = (
        "import lmdb, sys, time\n"
        "env = lmdb.open(sys.argv[1], readonly=True, lock=True, max_dbs=8)\n"
        "txn = env.begin()\n"
        "print('reading', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(store.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "reading"
        assert store.clear_stale_readers() == 0  # alive: its slot stays
    finally:
        child.kill()
        child.wait(timeout=10)
    assert store.clear_stale_readers() == 1
    assert store.clear_stale_readers() == 0
