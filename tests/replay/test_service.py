"""The replay service over real ZeroMQ sockets: replies, acks after commit, and bad input of every kind."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import RunConfig, TransportConfig, build_config
from common.replay_client import ActorReplayClient, LearnerReplayClient
from common.store_reader import StoreReader, StoreReferenceError
from common.wire import (
    AckMsg,
    ErrorCode,
    ErrorMsg,
    LeaseRequestMsg,
    SampleRequestMsg,
    StatsRequestMsg,
    SubtreeMsg,
    VersionMsg,
    decode_message,
    encode_message,
)
from replay.reply_buffers import ZERO_COPY_MIN_BYTES
from replay.service import ReplayService
from replay.synthetic import random_tree, tree_messages
from tests.support import at2po, free_endpoint

MAX_MESSAGE_BYTES = 256 * 1024


def make_config(tmp_path: Path, **replay: Any) -> RunConfig:
    return build_config(
        {
            "transport": {"replay_endpoint": "tcp://127.0.0.1:*", "max_message_bytes": MAX_MESSAGE_BYTES},
            "replay": {
                "dir": str(tmp_path / "store"),
                "map_size_gb": 0.05,
                "capacity_bytes": 20_000_000,
                "trees_per_step": 2,
                "max_staleness": 2,
                "capacity_trees": 50,
                **replay,
            },
            "logging": {"level": "error"},
        }
    )


class Peer:
    """A raw DEALER that speaks the wire format by hand."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_ms: int = 5000) -> tuple[Any, list[Any]]:
        if not self.sock.poll(timeout_ms):
            raise TimeoutError("no reply from the replay service")
        return decode_message(self.sock.recv_multipart(), 1 << 30)

    def request(self, message: Any, blobs: list[bytes] | None = None) -> tuple[Any, list[Any]]:
        self.send(encode_message(message, blobs or []))
        return self.recv()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ReplayService]:
    svc = ReplayService(make_config(tmp_path))
    svc.bind()
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    yield svc
    svc.stop()
    thread.join(timeout=10)
    svc.close()


@pytest.fixture
def peer(service: ReplayService) -> Iterator[Peer]:
    ctx = zmq.Context()
    yield Peer(ctx, service.endpoint)
    ctx.destroy(linger=0)


def lease(peer: Peer, n: int = 1) -> list[str]:
    reply, _ = peer.request(LeaseRequestMsg(req=1, actor_id="actor", n=n))
    assert reply.kind == "lease_grant", reply
    return reply.tree_ids


def stats(peer: Peer) -> dict[str, Any]:
    reply, _ = peer.request(StatsRequestMsg(req=99))
    return reply.stats


def test_subtrees_are_acked_and_duplicates_acked_again(peer: Peer) -> None:
    (tree_id,) = lease(peer)
    messages = tree_messages(random_tree(np.random.default_rng(0), tree_id, n_nodes=6), nodes_per_message=2)
    for seq, data in enumerate(messages):
        reply, _ = peer.request(SubtreeMsg(req=10 + seq), [data])
        assert isinstance(reply, AckMsg) and (reply.tree_id, reply.seq, reply.duplicate) == (tree_id, seq, False)
    reply, _ = peer.request(SubtreeMsg(req=50), [messages[0]])
    assert isinstance(reply, AckMsg) and reply.duplicate and reply.req == 50
    figures = stats(peer)["store"]
    assert figures["subtrees_stored"] == len(messages)
    assert figures["duplicates"] == 1
    assert figures["ready"] == 1


def test_sample_version_and_stats_round_trip(peer: Peer) -> None:
    tree_ids = lease(peer, 2)
    rng = np.random.default_rng(1)
    for tree_id in tree_ids:
        for data in tree_messages(random_tree(rng, tree_id, n_nodes=5)):
            assert peer.request(SubtreeMsg(req=1), [data])[0].kind == "ack"
    reply, blobs = peer.request(SampleRequestMsg(req=7, request_id="a", n=3, learner_version=0))
    assert reply.kind == "sample_reply" and not reply.ready and "2 completed trees ready" in reply.reason
    assert blobs == []
    reply, blobs = peer.request(SampleRequestMsg(req=8, request_id="b", n=2, learner_version=0))
    assert reply.ready and [t.tree_id for t in reply.trees] == tree_ids
    assert len(blobs) == sum(t.n_messages for t in reply.trees)
    reply, _ = peer.request(VersionMsg(req=9, version=3))
    assert isinstance(reply, AckMsg) and reply.req == 9
    assert stats(peer)["store"]["learner_version"] == 3


def test_sample_request_beyond_capacity_is_an_error(peer: Peer) -> None:
    reply, _ = peer.request(SampleRequestMsg(req=3, request_id="x", n=51, learner_version=0))
    assert isinstance(reply, ErrorMsg) and reply.code is ErrorCode.BAD_REQUEST and reply.req == 3


def _error_code(peer: Peer, frames: list[bytes]) -> ErrorCode:
    peer.send(frames)
    reply, _ = peer.recv()
    assert isinstance(reply, ErrorMsg), reply
    return reply.code


def test_each_kind_of_bad_message_gets_its_error(peer: Peer) -> None:
    (tree_id,) = lease(peer)
    good = tree_messages(random_tree(np.random.default_rng(2), tree_id, n_nodes=3), nodes_per_message=8)[0]
    header = json.dumps({"proto": 1, "kind": "subtree", "req": 4}).encode()
    cases = {
        ErrorCode.MALFORMED: [b"{not json"],
        ErrorCode.UNSUPPORTED_PROTOCOL: [json.dumps({"proto": 2, "kind": "subtree", "req": 1}).encode(), good],
        ErrorCode.UNKNOWN_KIND: [json.dumps({"proto": 1, "kind": "teleport", "req": 1}).encode()],
        ErrorCode.OVERSIZED: [header, b"\0" * (MAX_MESSAGE_BYTES + 10)],
        ErrorCode.BAD_SUBTREE: [header, good[: len(good) // 2]],
    }
    for expected, frames in cases.items():
        assert _error_code(peer, frames) is expected
    # Replies the service itself sends are not requests.
    assert _error_code(peer, encode_message(AckMsg(req=1))) is ErrorCode.UNKNOWN_KIND
    # Wrong blob count for a subtree.
    assert _error_code(peer, [header]) is ErrorCode.MALFORMED
    # A subtree for a tree never leased.
    stranger = tree_messages(random_tree(np.random.default_rng(3), "999", n_nodes=3), nodes_per_message=8)[0]
    assert _error_code(peer, [header, stranger]) is ErrorCode.UNKNOWN_TREE
    figures = stats(peer)
    assert figures["store"]["subtrees_stored"] == 0, "a refused message must never be stored, not even half"
    errors = {k: v for k, v in figures["service"].items() if k.startswith("errors.")}
    assert sum(errors.values()) == 8
    assert errors["errors.malformed"] == 2
    # Still serving: the intact message is stored and acked.
    assert peer.request(SubtreeMsg(req=5), [good])[0].kind == "ack"


def test_vanishing_client_does_not_hurt_the_service(service: ReplayService, peer: Peer) -> None:
    ctx = zmq.Context()
    leaver = Peer(ctx, service.endpoint)
    tree_ids = lease(leaver, 2)
    rng = np.random.default_rng(4)
    for tree_id in tree_ids:
        for data in tree_messages(random_tree(rng, tree_id, n_nodes=5, actor_id="actor")):
            leaver.send(encode_message(SubtreeMsg(req=1), [data]))
    ctx.destroy(linger=0)  # gone before reading a single ack
    figures = stats(peer)["store"]
    assert figures["growing"] + figures["ready"] == 2
    assert lease(peer, 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    frames=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from(
                [
                    b'{"proto": 1, "kind": "subtree", "req": 1}',
                    b'{"proto": 1, "kind": "sample_request", "req": 2, "request_id": "r", "n": 1}',
                    b'{"proto": 1, "kind": "lease_request", "req": 3, "actor_id": "", "n": -1}',
                    b'{"proto": 1, "kind": "version", "req": 4, "version": "x"}',
                    b"ARROW1\x00\x00",
                    b"[]",
                ]
            ),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzzed_frames_get_an_error_and_never_stop_the_service(peer: Peer, frames: list[bytes]) -> None:
    peer.send(frames)
    reply, _ = peer.recv()
    # Anything that is not a well-formed request is answered with an error, never stored.
    assert reply.kind in {"error", "lease_grant", "sample_reply", "ack", "stats_reply"}
    assert stats(peer)["store"]["subtrees_stored"] == 0


def test_sample_replies_arrive_zero_copy_and_equal_the_stored_trees(tmp_path: Path) -> None:
    """Large messages leave through pooled buffers and arrive as views of the received frames."""
    config = make_config(tmp_path, sampler="uniform", max_times_sampled=0)
    config = config.model_copy(
        update={"transport": config.transport.model_copy(update={"max_message_bytes": 64 * 1024**2})}
    )
    svc = ReplayService(config)
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        rng = np.random.default_rng(5)
        with ActorReplayClient(svc.endpoint, "actor", config.transport) as actor:
            tree_ids = actor.request_leases(2).tree_ids
            # Tree 0: messages far above ZERO_COPY_MIN_BYTES; tree 1: small ones (copied into bytes).
            trees = [
                random_tree(rng, tree_ids[0], n_nodes=6, tokens_per_turn=4 * ZERO_COPY_MIN_BYTES // 12),
                random_tree(rng, tree_ids[1], n_nodes=6),
            ]
            sent = {tree.tree_id: tree_messages(tree, nodes_per_message=2) for tree in trees}
            assert max(len(m) for m in sent[tree_ids[0]]) > ZERO_COPY_MIN_BYTES > max(len(m) for m in sent[tree_ids[1]])
            for tree_id, messages in sent.items():
                for seq, data in enumerate(messages):
                    actor.send_subtree(data, tree_id, seq)
            actor.flush(timeout_s=10)
        with LearnerReplayClient(svc.endpoint, config.transport, by_reference=False) as learner:
            replies = [learner.sample(2, 0, timeout_s=10) for _ in range(5)]
        for sampled in replies:
            assert sorted(t.info.tree_id for t in sampled) == sorted(tree_ids)
            for tree in sampled:
                assert all(isinstance(m, memoryview) and m.readonly for m in tree.messages)
                assert [bytes(m) for m in tree.messages] == sent[tree.info.tree_id]
                want = next(t for t in trees if t.tree_id == tree.info.tree_id)
                assert sorted(tree.assemble().nodes) == sorted(want.nodes)
                assert all(tree.assemble().nodes[i].same_tokens(want.nodes[i]) for i in want.nodes)
        # Every reply went out zero-copy (pinned LMDB pages); earlier ones stayed intact meanwhile.
        assert svc._reply_buffers.pinned_replies == len(replies)
    finally:
        svc.stop()
        thread.join(timeout=10)
        svc.close()


def test_a_sample_is_answered_while_an_ingest_commit_waits_for_the_disk(
    service: ReplayService, peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree_ids = lease(peer, 3)
    rng = np.random.default_rng(2)
    sent = {tree_id: tree_messages(random_tree(rng, tree_id, n_nodes=5)) for tree_id in tree_ids}
    for tree_id in tree_ids[:2]:
        for data in sent[tree_id]:
            assert peer.request(SubtreeMsg(req=1), [data])[0].kind == "ack"
    entered, release = threading.Event(), threading.Event()
    commit = service.store._commit

    def held_commit(txn: Any) -> None:  # the next commit waits for the test, as on a slow disk
        if not release.is_set():
            entered.set()
            release.wait(30)
        commit(txn)

    monkeypatch.setattr(service.store, "_commit", held_commit)
    ctx = zmq.Context()
    try:
        learner = Peer(ctx, service.endpoint)
        for seq, data in enumerate(sent[tree_ids[2]]):
            peer.send(encode_message(SubtreeMsg(req=100 + seq), [data]))
        assert entered.wait(10), "the ingest commit never started"
        reply, blobs = learner.request(SampleRequestMsg(req=7, request_id="a", n=2, learner_version=0))
        assert reply.ready and [t.tree_id for t in reply.trees] == tree_ids[:2]
        assert [bytes(b) for b in blobs] == sent[tree_ids[0]] + sent[tree_ids[1]]
        assert not peer.sock.poll(0)  # the commit is still held: nothing of the third tree is acked
        reply, _ = learner.request(SampleRequestMsg(req=8, request_id="b", n=1, learner_version=0))
        assert not reply.ready  # the third tree is not sampleable before its commit
        release.set()
        acks = [peer.recv()[0] for _ in sent[tree_ids[2]]]
        assert sorted((a.kind, a.seq) for a in acks) == [("ack", seq) for seq in range(len(sent[tree_ids[2]]))]
        reply, _ = learner.request(SampleRequestMsg(req=9, request_id="c", n=1, learner_version=0))
        assert reply.ready and [t.tree_id for t in reply.trees] == tree_ids[2:]
        reply, _ = learner.request(SampleRequestMsg(req=10, request_id="a", n=2, learner_version=0))
        assert [t.tree_id for t in reply.trees] == tree_ids[:2]  # a retried request: the same trees
    finally:
        release.set()
        ctx.destroy(linger=0)
    figures = stats(peer)["store"]
    assert (figures["samples"], figures["sample_batches"]) == (3, 2)


def test_a_sample_with_a_newer_learner_version_records_it_first(peer: Peer) -> None:
    tree_ids = lease(peer, 2)
    rng = np.random.default_rng(3)
    for tree_id in tree_ids:
        for data in tree_messages(random_tree(rng, tree_id, n_nodes=5)):
            assert peer.request(SubtreeMsg(req=1), [data])[0].kind == "ack"
    reply, _ = peer.request(SampleRequestMsg(req=7, request_id="a", n=2, learner_version=2))
    assert reply.ready and [t.staleness for t in reply.trees] == [2, 2]
    figures = stats(peer)["store"]
    assert (figures["learner_version"], figures["samples"]) == (2, 2)
    reply, _ = peer.request(SampleRequestMsg(req=8, request_id="b", n=1, learner_version=3))
    assert not reply.ready and stats(peer)["store"]["learner_version"] == 3


# ------------------------------------------------------------------------------ samples by reference


def _send_trees(endpoint: str, config: RunConfig, n: int, seed: int = 7) -> dict[str, list[bytes]]:
    """n trees streamed by an actor client (acked); their messages by tree id."""
    rng = np.random.default_rng(seed)
    with ActorReplayClient(endpoint, "actor", config.transport) as actor:
        tree_ids = actor.request_leases(n).tree_ids
        sent = {
            tree_id: tree_messages(random_tree(rng, tree_id, n_nodes=6), nodes_per_message=2) for tree_id in tree_ids
        }
        for tree_id, messages in sent.items():
            for seq, data in enumerate(messages):
                actor.send_subtree(data, tree_id, seq)
        actor.flush(timeout_s=10)
    return sent


def test_a_learner_beside_replay_reads_its_samples_from_the_store(tmp_path: Path) -> None:
    """Replay in its own process (as in `at2po run`): a loopback learner samples by reference by default."""
    endpoint = free_endpoint()
    config = make_config(tmp_path).model_copy(
        update={"transport": TransportConfig(replay_endpoint=endpoint, max_message_bytes=MAX_MESSAGE_BYTES)}
    )
    command = [
        *at2po(), "replay", "serve", "--dir", str(tmp_path / "store"), "--endpoint", endpoint,
        "--set", "replay.map_size_gb=0.05", "--set", "replay.capacity_bytes=20000000",
        "--set", "replay.trees_per_step=4", "--set", "logging.level=warning",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sent = _send_trees(endpoint, config, 4)
        with LearnerReplayClient(endpoint, config.transport, request_timeout_s=30) as learner:
            assert learner.by_reference  # auto on a loopback endpoint
            first = learner.sample(2, 0, timeout_s=30)
            second = learner.sample(2, 0, timeout_s=30)
            counters = learner.counters()
            replay_stats = learner.stats()
        got = {tree.info.tree_id: list(tree.messages) for tree in [*first, *second]}
        assert got == sent  # fifo: each tree once, every byte as sent
        assert all(isinstance(m, memoryview) and m.readonly for tree in first for m in tree.messages)
        assert (counters["samples_by_reference"], counters["reference_fallbacks"]) == (2, 0)
        assert replay_stats["service"]["sample_requests_by_reference"] == 2
        assert replay_stats["store"]["held_for_reference"] == 4
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_learner_that_cannot_read_the_store_gets_the_same_trees_by_value(service: ReplayService) -> None:
    """In replay's own process LMDB refuses a second opening: the client asks again by value, and from then on."""
    config = make_config(Path(service.store.path).parent)
    sent = _send_trees(service.endpoint, config, 2)
    with LearnerReplayClient(service.endpoint, config.transport, by_reference=True) as learner:
        sampled = learner.sample(2, 0, timeout_s=10)  # fifo: a new request id would find no tree left
        assert {tree.info.tree_id: [bytes(m) for m in tree.messages] for tree in sampled} == sent
        assert learner.counters()["reference_fallbacks"] == 1 and not learner.by_reference
        assert learner.counters()["samples_by_reference"] == 0


def test_a_key_gone_falls_back_once_and_keeps_asking_by_reference(
    service: ReplayService, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(Path(service.store.path).parent)
    sent = _send_trees(service.endpoint, config, 2)

    def gone(self: StoreReader, store: Any, trees: Any) -> list[list[bytes]]:
        raise StoreReferenceError("subtree key gone", permanent=False)

    monkeypatch.setattr(StoreReader, "read", gone)
    with LearnerReplayClient(service.endpoint, config.transport, by_reference=True) as learner:
        sampled = learner.sample(2, 0, timeout_s=10)
        assert {tree.info.tree_id: [bytes(m) for m in tree.messages] for tree in sampled} == sent
        assert learner.counters()["reference_fallbacks"] == 1 and learner.by_reference
