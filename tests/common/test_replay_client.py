"""The replay client against a scripted fake ROUTER on loopback TCP: window, resends, reconnects, samples."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq

from common.config import TransportConfig
from common.replay_client import (
    ActorReplayClient,
    LearnerReplayClient,
    RejectedSubtree,
    ReplayClientError,
    ReplayRequestError,
    ReplayTimeout,
    replay_is_local,
    resolve_by_reference,
)
from common.subtree import SubtreeHeader, decode_subtree, encode_subtree
from common.tree import FinishReason, TurnNode
from common.wire import (
    AckMsg,
    ErrorCode,
    ErrorMsg,
    LeaseGrantMsg,
    LeaseRequestMsg,
    SampledTreeInfo,
    SampleReplyMsg,
    SampleRequestMsg,
    StatsReplyMsg,
    StatsRequestMsg,
    SubtreeMsg,
    VersionMsg,
    WireError,
    decode_message,
    encode_message,
    split_routed,
)

# --------------------------------------------------------------------------------- subtrees


def _root() -> TurnNode:
    return TurnNode(
        node_id=0,
        parent_id=-1,
        depth=0,
        obs_ids=[1, 2, 3],
        token_ids=[],
        logprobs=[],
        versions=[],
        finish_reason=FinishReason.PROMPT,
    )


def _leaf(node_id: int, reward: float) -> TurnNode:
    return TurnNode(
        node_id=node_id,
        parent_id=0,
        depth=1,
        obs_ids=[7],
        token_ids=[4, 5, node_id],
        logprobs=[-0.1, -0.2, -0.3],
        versions=[0, 0, 1],
        finish_reason=FinishReason.ANSWER,
        entropy=0.5,
        reward=reward,
        is_leaf=True,
    )


def subtree(tree_id: str, seq: int = 0, final: bool = True) -> bytes:
    """A valid Arrow subtree message; seq 0 holds the root (plus a leaf when final)."""
    header = SubtreeHeader(tree_id=tree_id, task_id="task", actor_id="actor-0", seq=seq, final=final)
    nodes = [_root()] if seq == 0 else []
    if final:
        nodes.append(_leaf(seq + 1, reward=float(seq + 1)))
    return encode_subtree(header, nodes)


def identity(blob: bytes) -> tuple[str, int]:
    header = decode_subtree(blob).header
    return header.tree_id, header.seq


# --------------------------------------------------------------------------------- fake server

Reply = tuple[Any, list[bytes]] | list[bytes]  # a wire message with blobs, or raw frames (garbage)


@dataclass
class Received:
    identity: bytes
    message: Any
    blobs: list[bytes]


@dataclass
class FakeReplay:
    """A ROUTER in a thread; `handler(received, server)` returns the replies to send back."""

    ctx: zmq.Context
    handler: Callable[[Received, FakeReplay], list[Reply]]
    endpoint: str | None = None  # chosen on first start, kept across restarts
    received: list[Received] = field(default_factory=list)
    _commands: queue.Queue[Callable[[zmq.Socket], None]] = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    seen: set[tuple[str, int]] = field(default_factory=set)  # subtrees "committed"
    _placeholder: socket.socket | None = None

    def start(self) -> FakeReplay:
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        bound = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(bound,), daemon=True)
        self._thread.start()
        assert bound.wait(5), "fake replay did not bind"
        return self

    def _run(self, bound: threading.Event) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        if self.endpoint is None:
            # Below Linux's ephemeral range, so no outgoing connection can take the port between restarts.
            port = sock.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=30000, max_tries=1000)
            self.endpoint = f"tcp://127.0.0.1:{port}"
        else:
            deadline = time.monotonic() + 5
            while True:  # the previous socket's listener is closed asynchronously by libzmq
                try:
                    sock.bind(self.endpoint)
                    break
                except zmq.ZMQError as error:
                    if error.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        bound.set()
        try:
            while not self._stop.is_set():
                while not self._commands.empty():
                    self._commands.get()(sock)
                if not sock.poll(10):
                    continue
                peer, frames = split_routed(sock.recv_multipart())
                try:
                    message, blobs = decode_message(frames, 1 << 26)
                except WireError as error:
                    sock.send_multipart([peer, *encode_message(ErrorMsg(req=error.req, code=error.code, message="x"))])
                    continue
                received = Received(peer, message, [bytes(b) for b in blobs])
                self.received.append(received)
                for reply in self.handler(received, self):
                    frames_out = reply if isinstance(reply, list) else encode_message(reply[0], reply[1])
                    sock.send_multipart([peer, *frames_out])
        finally:
            sock.close(linger=0)

    def stop(self, hold_port: bool = True) -> None:
        """Stop answering; the port stays reserved (refusing connections) so no other test can take it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            assert not self._thread.is_alive()
            self._thread = None
        if hold_port and self.endpoint is not None and self._placeholder is None:
            port = int(self.endpoint.rsplit(":", 1)[1])
            deadline = time.monotonic() + 5
            placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq does: TIME_WAIT ok
            while True:  # libzmq closes the listener asynchronously
                try:
                    placeholder.bind(("127.0.0.1", port))  # bound, never listening: connects are refused
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        placeholder.close()
                        raise
                    time.sleep(0.02)
            self._placeholder = placeholder

    def close(self) -> None:
        self.stop(hold_port=False)
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def restart(self, handler: Callable[[Received, FakeReplay], list[Reply]] | None = None) -> None:
        """Kill the socket (messages in flight are lost) and bind a fresh one on the same endpoint."""
        self.stop()
        if handler is not None:
            self.handler = handler
        self.start()

    def send(self, peer: bytes, message: Any, blobs: list[bytes] | None = None) -> None:
        """Send from the server thread (sockets stay in their thread)."""
        frames = encode_message(message, blobs or [])
        self._commands.put(lambda sock: sock.send_multipart([peer, *frames]))

    def of(self, kind: type) -> list[Received]:
        return [r for r in list(self.received) if isinstance(r.message, kind)]

    def subtree_copies(self, key: tuple[str, int]) -> int:
        return sum(1 for r in self.of(SubtreeMsg) if identity(r.blobs[0]) == key)


def ack(received: Received, server: FakeReplay) -> list[Reply]:
    """Commit and ack a subtree (duplicate when already held)."""
    key = identity(received.blobs[0])
    duplicate = key in server.seen
    server.seen.add(key)
    return [(AckMsg(req=received.message.req, tree_id=key[0], seq=key[1], duplicate=duplicate), [])]


def silent(received: Received, server: FakeReplay) -> list[Reply]:
    return []


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def servers(ctx: zmq.Context) -> Iterator[Callable[..., FakeReplay]]:
    started: list[FakeReplay] = []

    def make(handler: Callable[[Received, FakeReplay], list[Reply]]) -> FakeReplay:
        server = FakeReplay(ctx, handler).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


@pytest.fixture
def clients() -> Iterator[list[ActorReplayClient | LearnerReplayClient]]:
    made: list[ActorReplayClient | LearnerReplayClient] = []
    yield made
    for client in made:
        client.close()


def actor(clients: list, server: FakeReplay, **kwargs: Any) -> ActorReplayClient:
    client = ActorReplayClient(server.endpoint, "actor-0", **kwargs)
    clients.append(client)
    return client


def learner(clients: list, server: FakeReplay, **kwargs: Any) -> LearnerReplayClient:
    client = LearnerReplayClient(server.endpoint, **kwargs)
    clients.append(client)
    return client


# --------------------------------------------------------------------------------- actor: window


def test_acks_empty_the_window(servers, clients) -> None:
    server = servers(ack)
    client = actor(clients, server)
    for i in range(5):
        client.send_subtree(subtree(f"t{i}"), f"t{i}", 0)
    client.send_subtree(subtree("t0", 1, final=True), "t0", 1)
    assert client.unacked > 0 or client.acked > 0
    client.flush(5)
    assert client.unacked == 0
    assert client.acked == 6
    assert client.resent == 0 and client.duplicates == 0 and client.rejected == []
    assert sorted(identity(r.blobs[0]) for r in server.of(SubtreeMsg)) == sorted(
        [(f"t{i}", 0) for i in range(5)] + [("t0", 1)]
    )


def test_pump_returns_acks_processed(servers, clients) -> None:
    server = servers(ack)
    client = actor(clients, server)
    client.send_subtree(subtree("a"), "a", 0)
    client.send_subtree(subtree("b"), "b", 0)
    total = 0
    deadline = time.monotonic() + 5
    while total < 2 and time.monotonic() < deadline:
        total += client.pump(0.5)
    assert total == 2
    assert client.pump(0.0) == 0


def test_window_full_blocks_and_times_out_until_acks_come(servers, clients) -> None:
    server = servers(silent)  # withholds acks
    client = actor(clients, server, window=2, resend_after_s=30)
    client.send_subtree(subtree("a"), "a", 0, timeout_s=0.1)
    client.send_subtree(subtree("b"), "b", 0, timeout_s=0.1)
    started = time.monotonic()
    with pytest.raises(ReplayTimeout) as raised:
        client.send_subtree(subtree("c"), "c", 0, timeout_s=0.3)
    assert time.monotonic() - started >= 0.29
    assert "window" in raised.value.waiting_for
    assert client.unacked == 2
    wait_until(lambda: len(server.of(SubtreeMsg)) == 2)
    assert server.subtree_copies(("c", 0)) == 0  # not sent while the window was full

    # Replay catches up: ack "a" a little later, while send_subtree is blocked on the full window.
    first = server.of(SubtreeMsg)[0]
    key = identity(first.blobs[0])

    def late_ack() -> None:
        time.sleep(0.2)
        server.send(first.identity, AckMsg(req=first.message.req, tree_id=key[0], seq=key[1]))

    threading.Thread(target=late_ack, daemon=True).start()
    started = time.monotonic()
    client.send_subtree(subtree("c"), "c", 0, timeout_s=5)
    assert 0.15 <= time.monotonic() - started < 4
    assert client.unacked == 2 and client.acked == 1
    wait_until(lambda: server.subtree_copies(("c", 0)) == 1)


def test_resend_after_timeout_when_the_first_copy_is_dropped(servers, clients) -> None:
    def drop_first(received: Received, server: FakeReplay) -> list[Reply]:
        if server.subtree_copies(identity(received.blobs[0])) == 1:
            return []
        return ack(received, server)

    server = servers(drop_first)
    client = actor(clients, server, resend_after_s=0.3)
    client.send_subtree(subtree("a"), "a", 0)
    client.pump(0.15)
    assert server.subtree_copies(("a", 0)) == 1 and client.resent == 0  # not before the timeout
    client.flush(5)
    assert client.acked == 1 and client.resent == 1
    assert server.subtree_copies(("a", 0)) == 2
    reqs = {r.message.req for r in server.of(SubtreeMsg)}
    assert len(reqs) == 1  # a resend is the identical message


def test_resend_everything_unacked_on_reconnect(servers, clients) -> None:
    server = servers(silent)
    client = actor(clients, server, resend_after_s=30)
    for name in ("a", "b", "c"):
        client.send_subtree(subtree(name), name, 0)
    wait_until(lambda: len(server.of(SubtreeMsg)) == 3)
    assert client.pump(0.1) == 0

    server.restart(handler=ack)  # replay killed and restarted on the same port
    started = time.monotonic()
    client.flush(5)
    assert time.monotonic() - started < 5  # far sooner than resend_after_s
    assert client.acked == 3 and client.resent == 3 and client.reconnects == 1
    assert sorted(k for k in server.seen) == [("a", 0), ("b", 0), ("c", 0)]


def test_no_timed_resends_pile_up_while_replay_is_down(servers, clients) -> None:
    server = servers(ack)
    client = actor(clients, server, resend_after_s=0.2)
    client.send_subtree(subtree("a"), "a", 0)
    client.flush(5)
    server.stop()  # replay is down for five resend intervals
    client.send_subtree(subtree("b"), "b", 0)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        client.pump(deadline - time.monotonic())
    assert client.unacked == 1
    server.start()
    client.flush(5)
    assert client.reconnects == 1
    # The copy ZeroMQ queued for the new connection plus the one re-sent on reconnect, no more.
    assert server.subtree_copies(("b", 0)) <= 2
    assert client.resent <= 2


def test_open_request_is_resent_on_reconnect(servers, clients) -> None:
    def stats(received: Received, server: FakeReplay) -> list[Reply]:
        return [(StatsReplyMsg(req=received.message.req, stats={"up": 1}), [])]

    server = servers(silent)
    client = learner(clients, server, resend_after_s=30)
    restarter = threading.Timer(0.3, server.restart, kwargs={"handler": stats})
    restarter.start()
    started = time.monotonic()
    try:
        assert client.stats(timeout_s=5) == {"up": 1}
    finally:
        restarter.join()
    assert time.monotonic() - started < 5
    assert client.reconnects == 1 and client.resent == 1


def test_duplicate_acks_are_counted_and_foreign_acks_ignored(servers, clients) -> None:
    def commit_silently_then_dup(received: Received, server: FakeReplay) -> list[Reply]:
        key = identity(received.blobs[0])
        if key not in server.seen:
            server.seen.add(key)  # committed, but the ack is "lost"
            return []
        return ack(received, server)

    server = servers(commit_silently_then_dup)
    client = actor(clients, server, resend_after_s=0.3)
    client.send_subtree(subtree("a"), "a", 0)
    client.send_subtree(subtree("b"), "b", 0)
    wait_until(lambda: len(server.of(SubtreeMsg)) == 2)
    a_msg, b_msg = sorted(server.of(SubtreeMsg), key=lambda r: identity(r.blobs[0]))
    # An ack naming b but carrying a's req, one for a message never sent, one for a's seq 1: all ignored.
    server.send(a_msg.identity, AckMsg(req=a_msg.message.req, tree_id="b", seq=0))
    server.send(a_msg.identity, AckMsg(req=a_msg.message.req, tree_id="a", seq=1))
    server.send(a_msg.identity, AckMsg(req=999, tree_id="zzz", seq=0))
    client.pump(0.1)
    assert client.unacked == 2 and client.acked == 0
    assert client.late_replies == 3
    client.flush(5)
    assert client.acked == 2 and client.duplicates == 2 and client.resent == 2
    # An ack after the window emptied (replay answering a redundant copy) is ignored.
    server.send(b_msg.identity, AckMsg(req=b_msg.message.req, tree_id="b", seq=0, duplicate=True))
    client.pump(0.2)
    assert client.acked == 2 and client.duplicates == 3 and client.late_replies == 4


def test_same_key_twice_in_the_window_is_refused(servers, clients) -> None:
    server = servers(silent)
    client = actor(clients, server, resend_after_s=30)
    client.send_subtree(subtree("a"), "a", 0)
    with pytest.raises(ValueError, match="already waiting"):
        client.send_subtree(subtree("a"), "a", 0)
    with pytest.raises(ValueError, match="not b seq 0"):
        client.send_subtree(subtree("a", 1), "b", 0)
    with pytest.raises(ValueError, match="not an at2po subtree"):
        client.send_subtree(b"garbage", "c", 0)
    assert client.unacked == 1
    wait_until(lambda: len(server.of(SubtreeMsg)) == 1)


def test_oversized_subtree_is_refused_before_sending(servers, clients) -> None:
    server = servers(ack)
    client = actor(clients, server, transport=TransportConfig(max_message_bytes=2048))
    big = TurnNode(
        node_id=0,
        parent_id=-1,
        depth=0,
        obs_ids=list(range(2000)),
        token_ids=[],
        logprobs=[],
        versions=[],
        finish_reason=FinishReason.PROMPT,
    )
    data = encode_subtree(SubtreeHeader("big", "task", "actor-0", 0, False), [big])
    with pytest.raises(ValueError, match="max_message_bytes"):
        client.send_subtree(data, "big", 0)
    assert client.unacked == 0


FINAL_CODES = [
    ErrorCode.BAD_SUBTREE,
    ErrorCode.UNKNOWN_TREE,
    ErrorCode.LEASE_EXPIRED,
    ErrorCode.TREE_COMPLETE,
    ErrorCode.REJECTED_TREE,
    ErrorCode.MALFORMED,
    ErrorCode.OVERSIZED,
    ErrorCode.UNSUPPORTED_PROTOCOL,
    ErrorCode.UNKNOWN_KIND,
]


def test_final_errors_are_rejected_for_good_and_internal_is_retried(servers, clients) -> None:
    def handler(received: Received, server: FakeReplay) -> list[Reply]:
        tree_id, seq = identity(received.blobs[0])
        req = received.message.req
        if tree_id.startswith("final-"):
            return [(ErrorMsg(req=req, code=ErrorCode(tree_id.removeprefix("final-")), message="no"), [])]
        if tree_id == "flaky" and server.subtree_copies((tree_id, seq)) == 1:
            return [(ErrorMsg(req=req, code=ErrorCode.INTERNAL, message="disk hiccup"), [])]
        return ack(received, server)

    server = servers(handler)
    client = actor(clients, server, resend_after_s=0.3, window=16)
    for code in FINAL_CODES:
        client.send_subtree(subtree(f"final-{code.value}"), f"final-{code.value}", 0)
    client.send_subtree(subtree("flaky"), "flaky", 0)
    client.send_subtree(subtree("fine"), "fine", 0)
    client.flush(5)
    assert sorted(client.rejected, key=lambda r: r.code) == sorted(
        [RejectedSubtree(f"final-{code.value}", 0, code.value, "no") for code in FINAL_CODES], key=lambda r: r.code
    )
    assert client.acked == 2 and client.resent == 1
    assert server.subtree_copies(("flaky", 0)) == 2
    client.pump(0.5)  # longer than resend_after_s: nothing rejected comes back
    for code in FINAL_CODES:
        assert server.subtree_copies((f"final-{code.value}", 0)) == 1


# --------------------------------------------------------------------------------- actor: leases


def grant(received: Received, server: FakeReplay) -> list[Reply]:
    message = received.message
    if isinstance(message, SubtreeMsg):
        return ack(received, server)
    assert isinstance(message, LeaseRequestMsg)
    ids = [f"{message.actor_id}-lease-{len(server.received)}-{i}" for i in range(message.n)]
    grant_msg = LeaseGrantMsg(
        req=message.req, tree_ids=ids, learner_version=3, lease_ttl_s=60.0, renewed=message.renew, reason="ok"
    )
    return [(grant_msg, [])]


def test_lease_round_trip_also_handles_acks(servers, clients) -> None:
    server = servers(grant)
    client = actor(clients, server)
    client.send_subtree(subtree("a"), "a", 0)
    reply = client.request_leases(2, renew=["t-old"], timeout_s=5)
    assert len(reply.tree_ids) == 2 and reply.renewed == ["t-old"] and reply.learner_version == 3
    (request,) = server.of(LeaseRequestMsg)
    assert (request.message.actor_id, request.message.n, request.message.renew) == ("actor-0", 2, ["t-old"])
    wait_until(lambda: client.pump(0.05) >= 0 and client.unacked == 0)


def test_lease_request_is_retried_after_a_lost_reply(servers, clients) -> None:
    def lose_first(received: Received, server: FakeReplay) -> list[Reply]:
        if len(server.of(LeaseRequestMsg)) == 1:
            return []
        return grant(received, server)

    server = servers(lose_first)
    client = actor(clients, server, resend_after_s=0.3)
    started = time.monotonic()
    reply = client.request_leases(1, timeout_s=5)
    assert 0.25 <= time.monotonic() - started < 4
    assert len(reply.tree_ids) == 1
    requests = server.of(LeaseRequestMsg)
    assert len(requests) == 2 and requests[0].message.req == requests[1].message.req


def test_lease_request_times_out_and_final_error_raises(servers, clients) -> None:
    def refuse(received: Received, server: FakeReplay) -> list[Reply]:
        return [(ErrorMsg(req=received.message.req, code=ErrorCode.BAD_REQUEST, message="too many"), [])]

    server = servers(silent)
    client = actor(clients, server, resend_after_s=0.2)
    with pytest.raises(ReplayTimeout) as raised:
        client.request_leases(1, timeout_s=0.5)
    assert "lease" in raised.value.waiting_for
    assert len(server.of(LeaseRequestMsg)) >= 2  # re-sent on timeout, never more than once per interval
    assert len(server.of(LeaseRequestMsg)) <= 4
    server.handler = refuse
    with pytest.raises(ReplayRequestError) as refused:
        client.request_leases(1, timeout_s=5)
    assert refused.value.code == ErrorCode.BAD_REQUEST


def test_lease_requests_carry_a_request_id_kept_across_copies_and_timeouts(servers, clients) -> None:
    server = servers(silent)
    client = actor(clients, server, resend_after_s=0.2)
    with pytest.raises(ReplayTimeout):
        client.request_leases(1, timeout_s=0.5)
    copies = server.of(LeaseRequestMsg)
    assert len({c.message.request_id for c in copies}) == 1 and copies[0].message.request_id
    assert all(c.message.release_others for c in copies)
    server.handler = grant
    reply = client.request_leases(1, timeout_s=5)  # continues the unanswered request: same id
    assert len(reply.tree_ids) == 1
    last = server.of(LeaseRequestMsg)[-1].message
    assert last.request_id == copies[0].message.request_id and last.release_others
    client.request_leases(1, timeout_s=5)  # answered before: a new id, and no release any more
    newest = server.of(LeaseRequestMsg)[-1].message
    assert newest.request_id != last.request_id and not newest.release_others
    server.handler = silent
    with pytest.raises(ReplayTimeout):
        client.request_leases(2, timeout_s=0.3)
    unanswered = server.of(LeaseRequestMsg)[-1].message.request_id
    server.handler = grant
    client.request_leases(0, renew=["t"], timeout_s=5)  # a renewal alone leaves the request for trees open
    assert server.of(LeaseRequestMsg)[-1].message.request_id != unanswered
    client.request_leases(2, timeout_s=5)
    assert server.of(LeaseRequestMsg)[-1].message.request_id == unanswered
    assert client.counters()["abandoned_leases"] == 0
    server.handler = silent
    with pytest.raises(ReplayTimeout):
        client.request_leases(2, timeout_s=0.3)
    unanswered = server.of(LeaseRequestMsg)[-1].message.request_id
    server.handler = grant
    client.request_leases(1, timeout_s=5)  # another n: the open request is abandoned, counted
    assert server.of(LeaseRequestMsg)[-1].message.request_id not in {last.request_id, newest.request_id, unanswered}
    assert client.counters()["abandoned_leases"] == 1


# --------------------------------------------------------------------------------- learner


def tree_messages(tree_id: str, n_messages: int) -> list[bytes]:
    if n_messages == 1:
        return [subtree(tree_id)]
    return [subtree(tree_id, 0, final=False), subtree(tree_id, 1, final=True)]


def info(tree_id: str, n_messages: int) -> SampledTreeInfo:
    return SampledTreeInfo(
        tree_id=tree_id,
        task_id="task",
        actor_id="actor-0",
        n_messages=n_messages,
        min_version=0,
        max_version=1,
        staleness=1,
        times_sampled=0,
    )


def test_sample_not_ready_then_ready_keeps_request_id_on_retry(servers, clients) -> None:
    calls: list[str] = []

    def handler(received: Received, server: FakeReplay) -> list[Reply]:
        message = received.message
        assert isinstance(message, SampleRequestMsg)
        calls.append(message.request_id)
        if len(calls) == 1:
            return [(SampleReplyMsg(req=message.req, request_id=message.request_id, ready=False, reason="2 < 3"), [])]
        if len(calls) == 2:
            return []  # the reply to the new request is lost
        blobs = tree_messages("x", 2) + tree_messages("y", 1)
        reply = SampleReplyMsg(
            req=message.req, request_id=message.request_id, ready=True, trees=[info("x", 2), info("y", 1)]
        )
        return [(reply, blobs)]

    server = servers(handler)
    client = learner(clients, server, request_timeout_s=2.0, resend_after_s=0.3)
    reasons: list[str] = []
    trees = client.sample(2, learner_version=1, timeout_s=5, poll_interval_s=0.01, on_wait=reasons.append)
    assert reasons == ["2 < 3"]
    assert len(calls) == 3 and calls[0] != calls[1] and calls[1] == calls[2]
    requests = server.of(SampleRequestMsg)
    assert requests[1].message.req == requests[2].message.req
    assert all(r.message.n == 2 and r.message.learner_version == 1 for r in requests)
    assert [t.info.tree_id for t in trees] == ["x", "y"]
    assert [len(t.messages) for t in trees] == [2, 1]
    assert trees[0].messages == tree_messages("x", 2)
    tree_x, tree_y = trees[0].assemble(), trees[1].assemble()
    assert tree_x.tree_id == "x" and sorted(tree_x.nodes) == [0, 2]
    assert tree_x.nodes[2].reward == 2.0 and tree_y.nodes[1].reward == 1.0
    assert list(tree_x.nodes[2].token_ids) == [4, 5, 2]


def test_try_sample_timeout_keeps_the_request_open(servers, clients) -> None:
    pending: list[Received] = []

    def hold(received: Received, server: FakeReplay) -> list[Reply]:
        pending.append(received)
        return []

    server = servers(hold)
    client = learner(clients, server, request_timeout_s=0.2, resend_after_s=10)
    with pytest.raises(ReplayTimeout) as raised:
        client.try_sample(1, 0)
    assert "sample" in raised.value.waiting_for
    # Replay answers the first copy late; the next try with the same arguments takes that answer.
    first = pending[0].message
    reply = SampleReplyMsg(req=first.req, request_id=first.request_id, ready=True, trees=[info("x", 1)])
    server.send(pending[0].identity, reply, tree_messages("x", 1))
    got, trees = client.try_sample(1, 0, timeout_s=2)
    assert got.request_id == first.request_id and got.ready
    assert [t.info.tree_id for t in trees] == ["x"]
    assert len(server.of(SampleRequestMsg)) == 1
    # Different arguments after a timeout abandon the open request and use a new request_id.
    with pytest.raises(ReplayTimeout):
        client.try_sample(1, 0)
    with pytest.raises(ReplayTimeout):
        client.try_sample(2, 0)
    ids = [r.message.request_id for r in server.of(SampleRequestMsg)]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert client.abandoned_samples == 1


def test_sample_times_out_with_the_last_reason(servers, clients) -> None:
    def limiter(received: Received, server: FakeReplay) -> list[Reply]:
        m = received.message
        return [(SampleReplyMsg(req=m.req, request_id=m.request_id, ready=False, reason="rate limiter"), [])]

    server = servers(limiter)
    client = learner(clients, server)
    reasons: list[str] = []
    started = time.monotonic()
    with pytest.raises(ReplayTimeout) as raised:
        client.sample(4, 0, timeout_s=0.4, poll_interval_s=0.05, on_wait=reasons.append)
    elapsed = time.monotonic() - started
    assert 0.39 <= elapsed < 2
    assert raised.value.last_reason == "rate limiter"
    assert "rate limiter" in str(raised.value)
    assert 2 <= len(reasons) <= 12  # polled at poll_interval_s, not in a busy loop
    ids = [r.message.request_id for r in server.of(SampleRequestMsg)]
    assert len(set(ids)) == len(ids)  # a new request_id after every not-ready reply


def test_report_version_and_stats(servers, clients) -> None:
    versions: list[int] = []

    def handler(received: Received, server: FakeReplay) -> list[Reply]:
        m = received.message
        if isinstance(m, VersionMsg):
            versions.append(m.version)
            return [(AckMsg(req=m.req), [])]
        assert isinstance(m, StatsRequestMsg)
        return [(StatsReplyMsg(req=m.req, stats={"ready_trees": 7, "versions": versions}), [])]

    server = servers(handler)
    client = learner(clients, server)
    client.report_version(5, timeout_s=5)
    assert versions == [5]
    assert client.stats(timeout_s=5) == {"ready_trees": 7, "versions": [5]}


def test_internal_error_on_a_request_is_retried(servers, clients) -> None:
    def flaky(received: Received, server: FakeReplay) -> list[Reply]:
        m = received.message
        if len(server.received) == 1:
            return [(ErrorMsg(req=m.req, code=ErrorCode.INTERNAL, message="busy"), [])]
        return [(AckMsg(req=m.req), [])]

    server = servers(flaky)
    client = learner(clients, server, resend_after_s=0.2)
    client.report_version(1, timeout_s=5)
    assert len(server.of(VersionMsg)) == 2


def test_garbage_replies_are_counted_and_ignored(servers, clients) -> None:
    def noisy(received: Received, server: FakeReplay) -> list[Reply]:
        m = received.message
        return [
            [b"\xff not json"],
            [b"[1, 2]"],
            [b'{"proto": 9, "kind": "ack", "req": %d}' % m.req],
            [b'{"proto": 1, "kind": "nope", "req": %d}' % m.req],
            [AckMsg(req=m.req).model_dump_json().encode(), b"unexpected blob"],
            [b'{"proto": 1, "kind": "stats_reply", "req": %d, "stats": 3}' % m.req],
            [b""],
            (LeaseGrantMsg(req=m.req, tree_ids=[], learner_version=0, lease_ttl_s=1.0), []),  # wrong kind
            (StatsReplyMsg(req=m.req + 1000, stats={}), []),  # nobody asked
            (StatsReplyMsg(req=m.req, stats={"ok": True}), []),
        ]

    server = servers(noisy)
    client = learner(clients, server)
    # One connection keeps order: all the noise has been handled by the time the real reply is.
    assert client.stats(timeout_s=5) == {"ok": True}
    assert client.bad_replies == 8
    assert client.late_replies == 1
    assert client.stats(timeout_s=5) == {"ok": True}  # still usable afterwards
    assert client.bad_replies == 16


def test_closed_client_refuses_work(servers, ctx) -> None:
    server = servers(ack)
    with ActorReplayClient(server.endpoint, "actor-0", ctx=ctx) as client:
        client.send_subtree(subtree("a"), "a", 0)
        client.flush(5)
    assert client.closed
    with pytest.raises(ReplayClientError, match="closed"):
        client.send_subtree(subtree("b"), "b", 0)
    client.close()  # idempotent
    assert not ctx.closed  # a context passed in stays usable


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.2:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/replay.sock", True),
        ("tcp://10.0.0.7:5555", False),
        ("tcp://replay-host:5555", False),
    ],
)
def test_samples_by_reference_follow_the_setting_and_auto_means_replay_on_this_host(endpoint: str, local: bool) -> None:
    assert replay_is_local(endpoint) is local
    assert resolve_by_reference(endpoint, TransportConfig(sample_by_reference="auto")) is local
    assert resolve_by_reference(endpoint, TransportConfig(sample_by_reference="on")) is True
    assert resolve_by_reference(endpoint, TransportConfig(sample_by_reference="off")) is False


def test_a_sample_request_asks_by_reference_when_the_client_does(servers, clients) -> None:
    seen: list[SampleRequestMsg] = []

    def not_ready(received: Received, server: FakeReplay) -> list[Reply]:
        assert isinstance(received.message, SampleRequestMsg)
        seen.append(received.message)
        return [(SampleReplyMsg(req=received.message.req, request_id=received.message.request_id, ready=False), [])]

    server = servers(not_ready)
    for by_reference in (True, False):
        client = learner(clients, server, by_reference=by_reference)
        reply, trees = client.try_sample(2, 0, timeout_s=5)
        assert not reply.ready and trees == []
    assert [m.by_reference for m in seen] == [True, False]
