"""Samples answered beside the writer: never behind its commit, reserved until the writer records them.

`TreeStore.answer_sample` runs on another thread than the writer (as the service's sampler thread
does); `commit_samples` is the writer's half. A slow disk is simulated by holding `TreeStore._commit`
(the commit and its fsync) on an event.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import lmdb
import pytest

from replay.store import ReadPin, SampleDecision, StoreError, TreeState, TreeStore

HANG_S = 30.0  # only ever reached when something hangs


class HeldCommit:
    """Replaces a store's `_commit`: the next commit waits until `release()` (then all pass)."""

    def __init__(self, store: TreeStore) -> None:
        self._commit = store._commit
        self.entered = threading.Event()
        self._released = threading.Event()

    def __call__(self, txn: lmdb.Transaction) -> None:
        if not self._released.is_set():
            self.entered.set()
            assert self._released.wait(HANG_S), "the held commit was never released"
        self._commit(txn)

    def release(self) -> None:
        self._released.set()


@pytest.fixture
def held(kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[TreeStore], HeldCommit]]:
    holds: list[HeldCommit] = []

    def hold(store: TreeStore) -> HeldCommit:
        commit = HeldCommit(store)
        monkeypatch.setattr(store, "_commit", commit)
        holds.append(commit)
        return commit

    yield hold
    for commit in holds:
        commit.release()


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `target` on a thread; the list gets its result, or the exception it raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as error:  # handed to the test thread
            out.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_sample_is_answered_while_an_ingest_commit_waits_for_the_disk(
    kit: SimpleNamespace, held: Callable[[TreeStore], HeldCommit]
) -> None:
    store = kit.open(kit.config(trees_per_step=1))
    ids = kit.lease(store, 3)
    sent = {tree_id: kit.complete(store, tree_id, seed=int(tree_id)) for tree_id in ids[:2]}
    third = kit.messages(ids[2], seed=2)
    commit = held(store)
    writer, outcomes = in_thread(lambda: kit.ingest(store, third))
    assert commit.entered.wait(HANG_S)

    first = store.answer_sample("a", 1, 0)  # while the writer waits in its commit
    assert kit.ids(first) == ["0"] and first.trees[0].messages == sent["0"]
    # The tree that the held transaction completes is not sampleable before its commit returns.
    short = store.answer_sample("b", 2, 0)
    assert not short.ready and "1 completed trees ready, 2 requested" in short.reason
    assert writer.is_alive() and outcomes == []

    commit.release()
    writer.join(HANG_S)
    assert all(o.ok for o in outcomes[0])
    assert store.commit_samples() == 1
    assert kit.ids(store.sample("c", 2, 0)) == ["1", "2"]


def test_the_sample_bookkeeping_commit_does_not_hold_up_the_next_sample(
    kit: SimpleNamespace, held: Callable[[TreeStore], HeldCommit]
) -> None:
    store = kit.open(kit.config(trees_per_step=1))
    for tree_id in kit.lease(store, 2):
        kit.complete(store, tree_id, seed=int(tree_id))
    assert kit.ids(store.answer_sample("a", 1, 0)) == ["0"]
    commit = held(store)
    writer, done = in_thread(store.commit_samples)  # records "a", held in its commit
    assert commit.entered.wait(HANG_S)
    # "a" is being recorded: its retry gets the same tree, the next request the next one.
    assert kit.ids(store.answer_sample("a", 1, 0)) == ["0"]
    assert kit.ids(store.answer_sample("b", 1, 0)) == ["1"]
    commit.release()
    writer.join(HANG_S)
    assert done == [1] and store.commit_samples() == 1
    stats = store.stats()
    assert (stats["samples"], stats["sample_batches"], stats["samples_pending"]) == (2, 2, 0)


def test_a_reserved_sample_is_recorded_by_the_writer_and_redelivered_after_a_crash_before(
    kit: SimpleNamespace,
) -> None:
    store = kit.open(kit.config(trees_per_step=1))
    for tree_id in kit.lease(store, 3):
        kit.complete(store, tree_id, seed=int(tree_id))
    a = store.answer_sample("a", 1, 0)
    b = store.answer_sample("b", 1, 0)
    assert (kit.ids(a), kit.ids(b)) == (["0"], ["1"])  # a reserved FIFO tree is not handed out again
    assert [(t.record.times_sampled, t.record.state) for t in a.trees + b.trees] == [(1, TreeState.CONSUMED)] * 2
    retry = store.answer_sample("a", 1, 0)
    assert kit.ids(retry) == ["0"] and retry.trees[0].record.times_sampled == 1
    stats = store.stats()
    assert (stats["samples"], stats["samples_pending"], stats["ready"], stats["live_trees"]) == (0, 2, 1, 3)
    assert kit.disk_record(store, "0").state is TreeState.READY  # nothing written yet

    # A crash now (closing without commit_samples): both trees come out again, with the same
    # (tree_id, times_sampled), which the learner drops as redeliveries.
    restarted = kit.reopen(store)
    again = restarted.sample("x", 2, 0)
    assert kit.ids(again) == ["0", "1"] and [t.record.times_sampled for t in again.trees] == [1, 1]

    # Without the crash, the writer records them.
    assert restarted.answer_sample("y", 1, 0).ready
    assert restarted.commit_samples() == 1 and restarted.commit_samples() == 0
    stats = restarted.stats()
    assert (stats["samples"], stats["sample_batches"], stats["samples_pending"], stats["ready"]) == (3, 2, 0, 0)
    assert {kit.disk_record(restarted, t).state for t in ("0", "1", "2")} == {TreeState.CONSUMED}
    assert kit.ids(restarted.answer_sample("y", 1, 0)) == ["2"]  # the retry, from the remembered batch


def test_a_failed_bookkeeping_commit_keeps_the_trees_reserved_and_is_retried(
    kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = kit.open(kit.config(trees_per_step=1))
    for tree_id in kit.lease(store, 2):
        kit.complete(store, tree_id, seed=int(tree_id))
    assert kit.ids(store.answer_sample("a", 1, 0)) == ["0"]

    def full_disk(txn: lmdb.Transaction) -> None:
        raise lmdb.DiskError("no space left on device")

    monkeypatch.setattr(store, "_commit", full_disk)
    with pytest.raises(StoreError, match="no space"):
        store.commit_samples()
    monkeypatch.undo()
    # The learner has tree 0: it is not handed out again, and its request still gets it.
    assert kit.ids(store.answer_sample("b", 1, 0)) == ["1"]
    assert kit.ids(store.answer_sample("a", 1, 0)) == ["0"]
    assert store.stats()["samples_pending"] == 2
    assert store.commit_samples() == 2
    assert {kit.disk_record(store, t).state for t in ("0", "1")} == {TreeState.CONSUMED}
    assert store.stats()["samples"] == 2


def test_a_failed_reply_gives_its_trees_back_in_completion_order(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(trees_per_step=2))
    for tree_id in kit.lease(store, 4):
        kit.complete(store, tree_id, seed=int(tree_id))

    def fail(decision: SampleDecision) -> None:
        raise ConnectionError("the reply could not be sent")

    with pytest.raises(ConnectionError):
        store.answer_sample("a", 2, 0, reply=fail)
    assert kit.ids(store.answer_sample("b", 1, 0)) == ["2"]  # 0 and 1 wait for the writer
    assert store.commit_samples() == 2
    assert kit.ids(store.answer_sample("a", 2, 0)) == ["0", "1"]  # a new request: the failed one left nothing
    assert kit.ids(store.answer_sample("c", 1, 0)) == ["3"]
    store.commit_samples()
    stats = store.stats()
    assert (stats["samples"], stats["sample_batches"], stats["ready"]) == (4, 3, 0)


def test_a_reserved_tree_is_not_dropped_as_stale_but_one_given_back_stale_is(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(max_staleness=1, trees_per_step=2))
    assert kit.lease(store, 3) == ["0", "1", "2"]
    for tree_id in ("0", "1", "2"):
        kit.complete(store, tree_id, seed=int(tree_id))
    assert kit.ids(store.answer_sample("a", 1, 0)) == ["0"]  # its reply went out

    def fail(decision: SampleDecision) -> None:
        raise ConnectionError("the reply could not be sent")

    with pytest.raises(ConnectionError):
        store.answer_sample("b", 1, 0, reply=fail)  # tree 1: reserved, its reply failed
    store.set_learner_version(2)  # trees 0..2 are two versions behind now; only 2 is ready
    assert store.stats()["stale_dropped"] == 1
    assert store.commit_samples() == 2
    states = {t: kit.disk_record(store, t).state for t in ("0", "1", "2")}
    assert states == {"0": TreeState.CONSUMED, "1": TreeState.STALE, "2": TreeState.STALE}
    stats = store.stats()
    assert (stats["samples"], stats["stale_dropped"], stats["ready"]) == (1, 2, 0)


def test_the_rate_limiter_counts_reserved_samples(kit: SimpleNamespace) -> None:
    config = kit.config(
        sampler="uniform",
        max_times_sampled=0,
        samples_per_insert=1.0,
        min_size_to_sample=1,
        error_buffer=2.0,
        trees_per_step=1,
        seed=3,
    )
    store = kit.open(config)
    for tree_id in kit.lease(store, 2):
        kit.complete(store, tree_id, seed=int(tree_id))
    # inserts * spi - samples may go down to min_diff = 1 - 2: three samples of one tree, not four.
    assert all(store.answer_sample(f"s{i}", 1, 0).ready for i in range(3))
    blocked = store.answer_sample("s3", 1, 0)
    assert not blocked.ready and "rate limiter" in blocked.reason
    assert store.commit_samples() == 3
    assert not store.answer_sample("s4", 1, 0).ready
    assert store.stats()["samples"] == 3


def test_reserved_uniform_samples_count_toward_max_times_sampled(kit: SimpleNamespace) -> None:
    store = kit.open(kit.config(sampler="uniform", max_times_sampled=2, trees_per_step=1))
    kit.complete(store, kit.lease(store, 1)[0])
    first, second = (store.answer_sample(r, 1, 0) for r in ("a", "b"))
    assert [(t.record.times_sampled, t.record.state) for t in first.trees + second.trees] == [
        (1, TreeState.READY),
        (2, TreeState.CONSUMED),
    ]
    assert not store.answer_sample("c", 1, 0).ready
    assert store.commit_samples() == 2
    record = kit.disk_record(store, "0")
    assert (record.state, record.times_sampled) == (TreeState.CONSUMED, 2)


# ============================================================================ stress


class Learner:
    """Samples on the test thread while a writer thread ingests; checks every answer as it comes."""

    def __init__(self, kit: SimpleNamespace, store: TreeStore, sent: dict[str, list[bytes]]) -> None:
        self.kit = kit
        self.store = store
        self.sent = sent
        self.handed: list[tuple[str, list[tuple[str, int]]]] = []  # request id, (tree id, times sampled)
        self.pins: list[tuple[Callable[[], None], list[tuple[str, list[memoryview]]]]] = []
        self.requests = 0

    def keep(self, views: list[memoryview], pin: ReadPin) -> list[memoryview]:
        self.pins.append((pin.keep(), []))
        return views

    def sample(self, n: int) -> bool:
        request_id = f"r{self.requests}"
        self.requests += 1
        decision = self.store.answer_sample(request_id, n, 0, sink=self.keep)
        if not decision.ready:
            assert decision.trees == [] and decision.reason
            return False
        got = self.check(decision, n)
        self.pins[-1][1].extend((t.record.tree_id, list(t.messages)) for t in decision.trees)
        retry = self.store.answer_sample(request_id, n, 0)
        assert self.check(retry, n) == got  # the same trees, sampled as often
        self.handed.append((request_id, got))
        if len(self.handed) > 3:  # an older request, recorded (or evicted) by now perhaps: the same trees
            old_id, old = self.handed[-4]
            again = self.store.answer_sample(old_id, n, 0)
            if again.ready:
                assert [tree_id for tree_id, _ in self.check(again, len(old))] == [tree_id for tree_id, _ in old]
            else:
                assert "gone" in again.reason
        while len(self.pins) > 6:
            release, _ = self.pins.pop(0)
            release()
        return True

    def check(self, decision: SampleDecision, n: int) -> list[tuple[str, int]]:
        assert decision.ready and len(decision.trees) == n  # all or none
        ids = self.kit.ids(decision)
        assert len(set(ids)) == n
        for tree in decision.trees:
            assert [bytes(m) for m in tree.messages] == self.sent[tree.record.tree_id]
        return [(t.record.tree_id, t.record.times_sampled) for t in decision.trees]

    def check_pinned(self) -> None:
        """Replies still pinned read the bytes they were given, whatever was evicted since."""
        for release, trees in self.pins:
            for tree_id, messages in trees:
                assert [bytes(m) for m in messages] == self.sent[tree_id]
            release()
        self.pins.clear()


def _writer(kit: SimpleNamespace, store: TreeStore, sent: dict[str, list[bytes]], n_trees: int) -> None:
    """Lease and complete n_trees (two transactions each), recording samples between transactions."""
    deadline = time.monotonic() + HANG_S
    done = 0
    while done < n_trees:
        assert time.monotonic() < deadline, "the writer made no progress"
        store.commit_samples()
        granted = kit.lease(store, 1)
        if not granted:  # the store is full of unconsumed trees: wait for the learner
            time.sleep(0.001)
            continue
        (tree_id,) = granted
        messages = kit.messages(tree_id, seed=int(tree_id))
        sent[tree_id] = messages
        kit.ingest_ok(store, messages[:1])
        kit.ingest_ok(store, messages[1:])
        done += 1
    store.commit_samples()


def _slow_commits(store: TreeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = store._commit

    def slow(txn: lmdb.Transaction) -> None:
        time.sleep(0.0005)  # a slow disk: widens the window between a body and its commit
        commit(txn)

    monkeypatch.setattr(store, "_commit", slow)


@pytest.mark.parametrize(("sampler", "max_times_sampled"), [("fifo", 0), ("uniform", 2)])
def test_ingest_and_samples_on_two_threads_keep_every_guarantee(
    kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, sampler: str, max_times_sampled: int
) -> None:
    n_trees = 48
    config = kit.config(
        sampler=sampler, max_times_sampled=max_times_sampled, capacity_trees=8, trees_per_step=2, seed=1
    )
    store = kit.open(config)
    _slow_commits(store, monkeypatch)
    sent: dict[str, list[bytes]] = {}
    learner = Learner(kit, store, sent)
    writer, failure = in_thread(lambda: _writer(kit, store, sent, n_trees))
    deadline = time.monotonic() + HANG_S
    while writer.is_alive():
        assert time.monotonic() < deadline, "sampling made no progress"
        if not learner.sample(2):
            time.sleep(0.0005)
    writer.join()
    assert failure == [None], failure
    while learner.sample(1):  # the writer is done: drain what is left on this thread
        store.commit_samples()
    store.commit_samples()
    learner.check_pinned()

    deliveries = [pair for _, trees in learner.handed for pair in trees]
    assert len(deliveries) == len(set(deliveries))  # no (tree_id, times_sampled) handed out twice
    per_tree = Counter(tree_id for tree_id, _ in deliveries)
    wanted = 1 if sampler == "fifo" else max_times_sampled
    assert per_tree == dict.fromkeys(sent, wanted)
    if sampler == "fifo":  # completion order, each tree once
        assert [int(tree_id) for tree_id, _ in deliveries] == sorted(int(t) for t in sent)
    stats = store.stats()
    assert (stats["samples"], stats["samples_pending"], stats["ready"]) == (len(deliveries), 0, 0)
    assert stats["sample_batches"] == len(learner.handed) and stats["evicted"] > 0
    monkeypatch.undo()
    assert kit.reopen(store).stats() == stats  # memory and disk agree
