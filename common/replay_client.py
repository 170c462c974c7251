"""Client side of the replay service: the actor's subtree window and leases, the learner's samples.

Both roles talk to the replay ROUTER through one DEALER socket each (built by
`common.transport.connect_client_socket`, so size limits and CurveZMQ apply) using the framing of
`common.wire`. Nothing here imports torch or pickles anything; both actors/ and learner/ use it.

Delivery rules (decided here):

- **Subtree window.** `ActorReplayClient.send_subtree` puts each subtree in a bounded window keyed
  by (tree_id, seq) until replay acks it (replay acks only after its LMDB commit). A full window
  blocks the caller: that is the actor's back-pressure. A subtree keeps one `req` for all its
  copies; an ack must match both its (tree_id, seq) and that `req`, anything else is counted as a
  late reply and ignored. The (tree_id, seq) are read from the Arrow metadata and must equal the
  arguments (else ValueError), so an ack can never be credited to another tree.
- **Resends.** An unacked subtree or an unanswered request is re-sent, identical, `resend_after_s`
  after its last send. When the socket monitor reports that an established connection was lost
  and a new one completed its handshake (a restarted replay), everything unacked and every open
  request is re-sent at once. While the monitor says the link is down (disconnected, connection
  refused, handshake failed) timed resends are held back: ZeroMQ keeps queued messages for the
  next connection, so copies would only pile up. Before the monitor has reported anything the link
  counts as up.
- **Restarts.** The first lease request of a client says `release_others`: replay then drops the
  growing trees of this actor id that the request does not renew (a restarted actor with a fixed id
  frees its admission slots at once instead of after the lease TTL). Actor ids must be unique.
- **Errors.** For a subtree, `ErrorMsg` code `internal` keeps it in the window and re-sends it
  `resend_after_s` later; every other code is final: the subtree leaves the window, is appended to
  `rejected` and is never re-sent. For a request, `internal` means "retry after the resend
  interval" and any other code raises `ReplayRequestError` at once.
- **Replies** are validated with `common.wire.decode_message` against
  `transport.max_message_bytes`; undecodable ones, ones of the wrong kind for their `req`, or a
  sample reply for another request_id are counted in `bad_replies` and ignored. Replies whose `req`
  nobody waits for any more are counted in `late_replies` and ignored.
- **Samples.** A sample request carries a fresh `request_id`. Re-sends (timed or after a reconnect)
  keep the `req` and the `request_id`, so replay hands out the same trees again. If a `try_sample`
  call times out with no reply, its request stays open: the next `try_sample` with the same `n`
  and `learner_version` waits on it again, with the same request_id (so trees replay already gave
  out under that id are not lost); different arguments abandon it (counted in `abandoned_samples`).
  A not-ready reply closes the request; the next attempt uses a new request_id.
- **Leases** carry a fresh `request_id` and are re-sent with the same rules; replay answers every
  copy of one request id with the trees it granted the first time, so a re-send (or a copy ZeroMQ
  queued while replay was down and delivered to the restarted one) never takes more admission
  slots. A lease request that times out unanswered stays open: the next request for the same `n`
  re-uses its request_id (and so gets the trees replay may have granted meanwhile); a request for
  another `n` > 0 abandons it (counted in `abandoned_leases`; what replay granted to it expires with
  its TTL), a renewal alone (`n` = 0) leaves it open. `release_others` stays on until a grant has
  been received.
- **Samples by reference.** With `by_reference` (default from `transport.sample_by_reference`:
  "auto" = when the endpoint is loopback or ipc, i.e. replay is on this host) a sample request asks
  for keys instead of bytes, and the client reads the trees from replay's LMDB store itself
  (`common.store_reader`); the trees it returns are the same bytes. If they cannot be read there,
  the same request id is asked again by value (replay hands out the same trees), counted in
  `reference_fallbacks`; after a failure that says the store is not usable from this process
  (another host, another store) the client asks by value from then on.
- **Counters** (`counters()`): `sent`, `resent`, `bad_replies`, `late_replies`, `reconnects`,
  `send_blocked` (ZeroMQ queue full, left to the timer); the actor adds `acked` (subtrees that left
  the window by an ack), `duplicates` (acks flagged duplicate, matched or late: redundant copies),
  `unacked`, `rejected` and `abandoned_leases`; the learner adds `abandoned_samples`,
  `samples_by_reference` and `reference_fallbacks`.
- Every wait uses `zmq.Poller` with a timeout bounded by the next due resend; nothing spins.

Not thread-safe (ZeroMQ sockets are not): use one client per thread. `close()` drops whatever is
still unacked; call `flush` first to wait for it.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa  # already a dependency of common/ (common.subtree)
import zmq
from zmq.utils.monitor import recv_monitor_message

from common.config import TransportConfig
from common.log import get_logger
from common.store_reader import StoreReader, StoreReferenceError
from common.subtree import META_SEQ, META_TREE_ID, assemble_tree
from common.transport import connect_client_socket
from common.tree import TurnTree
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
    WireMessage,
    decode_message,
    encode_message,
)

_log = get_logger("common.replay_client")

# Monitor events that mean "no usable connection right now" and "a connection is ready".
_DOWN_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
# libzmq >= 4.3 reports the end of the ZMTP (and CURVE) handshake; before it, only the TCP connect.
_UP_EVENT = zmq.EVENT_HANDSHAKE_SUCCEEDED if zmq.zmq_version_info() >= (4, 3) else zmq.EVENT_CONNECTED
_MAX_DRAIN = 4096  # messages handled per wake-up before due resends get their turn


class ReplayClientError(RuntimeError):
    """The replay service could not do what was asked (or the client is closed)."""


class ReplayTimeout(ReplayClientError):
    """No answer in time; `waiting_for` says for what, `last_reason` is replay's last not-ready reason."""

    def __init__(self, message: str, *, waiting_for: str, last_reason: str | None = None) -> None:
        super().__init__(message)
        self.waiting_for = waiting_for
        self.last_reason = last_reason


class ReplayRequestError(ReplayClientError):
    """Replay refused a request with a final error code (anything but `internal`)."""

    def __init__(self, code: ErrorCode, detail: str, what: str) -> None:
        super().__init__(f"replay refused {what}: {code.value}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class RejectedSubtree:
    """A subtree replay refused for good; the actor should give up on (or restart) that tree."""

    tree_id: str
    seq: int
    code: str
    message: str


@dataclass(frozen=True)
class SampledTree:
    """One sampled tree: replay's description plus its stored Arrow messages as replay sent them.

    Messages from `LearnerReplayClient` are read-only memoryviews of the received ZeroMQ frames (no
    copy); they act as bytes for `len`, slicing, `b"".join`, comparison and Arrow reads, and
    `bytes(m)` makes a copy where real bytes are needed.
    """

    info: SampledTreeInfo
    messages: Sequence[bytes | memoryview]

    def assemble(self) -> TurnTree:
        """Decode and merge the messages (any order) into a validated, complete TurnTree."""
        return assemble_tree(self.messages)


@dataclass
class _Pending:
    """Something sent that waits for an answer: a subtree in the window or an open request."""

    req: int
    frames: list[bytes]
    what: str
    due: float
    attempts: int = 1
    # requests only
    accepts: Callable[[WireMessage], bool] | None = None
    reply: WireMessage | None = None
    blobs: list[memoryview] = field(default_factory=list)
    error: ErrorMsg | None = None
    last_internal: str | None = None


def _subtree_identity(data: bytes) -> tuple[str, int]:
    """(tree_id, seq) from a subtree's Arrow schema metadata (reads the schema only)."""
    try:
        metadata = pa.ipc.open_stream(pa.py_buffer(data)).schema.metadata or {}
        tree_id = metadata[META_TREE_ID].decode("utf-8")
        seq = int(metadata[META_SEQ].decode("ascii"))
    except (pa.ArrowException, OSError, KeyError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"data is not an at2po subtree message (cannot read tree_id/seq: {error})") from None
    return tree_id, seq


class _ReplayConnection:
    """One DEALER to replay plus its monitor: sends, resends, reply dispatch, reconnect detection."""

    def __init__(
        self,
        endpoint: str,
        transport: TransportConfig | None,
        resend_after_s: float,
        ctx: zmq.Context | None,
    ) -> None:
        if not resend_after_s > 0:
            raise ValueError(f"resend_after_s must be > 0, got {resend_after_s}")
        self.endpoint = endpoint
        self.transport = transport or TransportConfig()
        self.resend_after_s = float(resend_after_s)
        self._own_ctx = ctx is None
        self._ctx: zmq.Context = zmq.Context() if ctx is None else ctx
        self._closed = True
        try:
            self._sock = connect_client_socket(self._ctx, zmq.DEALER, endpoint, self.transport)
        except BaseException:
            if self._own_ctx:
                self._ctx.destroy(linger=0)
            raise
        self._monitor = self._sock.get_monitor_socket(_DOWN_EVENTS | _UP_EVENT)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._closed = False
        self._next_req = 1
        self._requests: dict[int, _Pending] = {}
        self._link_down = False
        self._lost_connection = False
        self.sent = 0
        self.resent = 0
        self.bad_replies = 0
        self.late_replies = 0
        self.reconnects = 0
        self.send_blocked = 0

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the sockets without lingering (anything unacked is dropped); idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.destroy(linger=0)

    def _check_open(self) -> None:
        if self._closed:
            raise ReplayClientError(f"the replay client for {self.endpoint} is closed")

    def counters(self) -> dict[str, int]:
        """Counters for metrics and logs."""
        return {
            "sent": self.sent,
            "resent": self.resent,
            "bad_replies": self.bad_replies,
            "late_replies": self.late_replies,
            "reconnects": self.reconnects,
            "send_blocked": self.send_blocked,
        }

    # ------------------------------------------------------------------------------ sending

    def _take_req(self) -> int:
        req = self._next_req
        self._next_req += 1
        return req

    def _send(self, frames: list[bytes]) -> bool:
        """Queue frames without blocking; False when ZeroMQ's queue is full (the timer retries)."""
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.send_blocked += 1
            return False
        except zmq.ZMQError as error:
            raise ReplayClientError(f"cannot send to replay at {self.endpoint}: {error}") from error
        return True

    def _transmit(self, pending: _Pending, resend: bool) -> None:
        self._send(pending.frames)
        pending.due = time.monotonic() + self.resend_after_s
        if resend:
            pending.attempts += 1
            self.resent += 1
        else:
            self.sent += 1

    def _start_request(self, message: WireMessage, accepts: Callable[[WireMessage], bool], what: str) -> _Pending:
        pending = _Pending(req=message.req, frames=encode_message(message), what=what, due=0.0, accepts=accepts)
        self._requests[message.req] = pending
        self._transmit(pending, resend=False)
        return pending

    def _await(self, pending: _Pending, timeout_s: float) -> None:
        """Serve the socket until `pending` has its reply; raises on timeout or a final error."""
        deadline = time.monotonic() + timeout_s
        while pending.reply is None:
            if pending.error is not None:
                self._requests.pop(pending.req, None)
                raise ReplayRequestError(pending.error.code, pending.error.message, pending.what)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                extra = f"; last error: internal: {pending.last_internal}" if pending.last_internal else ""
                raise ReplayTimeout(
                    f"no reply from replay at {self.endpoint} to {pending.what} within {timeout_s:.3g} s "
                    f"({pending.attempts} send(s){extra})",
                    waiting_for=pending.what,
                )
            self._service(remaining)
        self._requests.pop(pending.req, None)

    def _request(
        self, message: WireMessage, accepts: Callable[[WireMessage], bool], what: str, timeout_s: float
    ) -> _Pending:
        """Send a request and wait for its reply (re-sent on timeout and reconnect); forgets it after."""
        self._check_open()
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        pending = self._start_request(message, accepts, what)
        try:
            self._await(pending, timeout_s)
        finally:
            self._requests.pop(pending.req, None)
        return pending

    # ------------------------------------------------------------------------------ the loop

    def _window_items(self) -> list[_Pending]:
        """Subtrees awaiting acks (ActorReplayClient overrides); they are re-sent like requests."""
        return []

    def _next_due(self) -> float | None:
        if self._link_down:
            return None
        dues = [p.due for p in self._window_items()] + [p.due for p in self._requests.values()]
        return min(dues) if dues else None

    def _service(self, timeout_s: float) -> int:
        """Wait up to timeout_s (less when a resend falls due) for traffic, handle it, resend what is due.

        Returns the number of subtree acks processed.
        """
        self._check_open()
        wait = max(0.0, timeout_s)
        next_due = self._next_due()
        if next_due is not None:
            wait = min(wait, max(0.0, next_due - time.monotonic()))
        # Round up so a wait of a fraction of a millisecond does not turn into a busy poll.
        ready = dict(self._poller.poll(math.ceil(wait * 1000)))
        acks = 0
        if self._monitor in ready:
            self._drain_monitor()
        if self._sock in ready:
            acks += self._drain_socket()
        self._resend_due()
        return acks

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except (zmq.ZMQError, ValueError, KeyError):  # a malformed monitor frame; never crash on it
                return
            kind = event.get("event", 0)
            if kind == zmq.EVENT_DISCONNECTED:
                if not self._lost_connection:
                    _log.info("replay connection lost", endpoint=self.endpoint)
                self._link_down = True
                self._lost_connection = True
            elif kind & _DOWN_EVENTS:
                self._link_down = True
            elif kind == _UP_EVENT:
                was_down, self._link_down = self._link_down, False
                if self._lost_connection:
                    self._lost_connection = False
                    self.reconnects += 1
                    self._resend_all()
                elif was_down:
                    # First connection after refused attempts: ZeroMQ delivers what it queued, so the
                    # timers restart instead of firing at once for everything sent while down.
                    restart = time.monotonic() + self.resend_after_s
                    for pending in [*self._window_items(), *self._requests.values()]:
                        pending.due = max(pending.due, restart)

    def _resend_all(self) -> None:
        """After a reconnect: the old connection may have swallowed anything in flight."""
        everything = [*self._window_items(), *self._requests.values()]
        _log.info("replay reconnected; re-sending", endpoint=self.endpoint, messages=len(everything))
        for pending in everything:
            self._transmit(pending, resend=True)

    def _resend_due(self) -> None:
        if self._link_down:
            return
        now = time.monotonic()
        for pending in [*self._window_items(), *self._requests.values()]:
            if pending.due <= now:
                self._transmit(pending, resend=True)

    def _drain_socket(self) -> int:
        acks = 0
        for _ in range(_MAX_DRAIN):
            try:
                # copy=False: a sample reply's blobs stay in ZeroMQ's buffers (see `_dispatch`).
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            acks += self._dispatch(frames)
        return acks

    def _dispatch(self, frames: list[zmq.Frame]) -> int:
        """Handle one incoming message; returns 1 when it acked a subtree of the window."""
        try:
            message, blobs = decode_message(frames, self.transport.max_message_bytes)
        except WireError as error:
            self._bad(f"undecodable reply: {error}")
            return 0
        if isinstance(message, AckMsg) and message.tree_id is not None:
            return self._on_subtree_ack(message)
        if isinstance(message, ErrorMsg):
            if self._on_subtree_error(message):
                return 0
            pending = self._requests.get(message.req)
            if pending is None:
                self.late_replies += 1
                _log.warning(
                    "unmatched error from replay",
                    endpoint=self.endpoint,
                    req=message.req,
                    code=message.code.value,
                    detail=message.message,
                )
                return 0
            if message.code == ErrorCode.INTERNAL:
                pending.last_internal = message.message
                pending.due = time.monotonic() + self.resend_after_s
            else:
                pending.error = message
            return 0
        pending = self._requests.get(message.req)
        if pending is None or pending.reply is not None:
            self.late_replies += 1
            return 0
        if pending.accepts is None or not pending.accepts(message):
            self._bad(f"{message.kind} reply does not answer {pending.what} (req {message.req})")
            return 0
        pending.reply = message
        # Zero-copy views of the received frames (each keeps its frame alive): copying a 16 MB sample
        # into fresh bytes costs more in page faults than the whole transfer.
        pending.blobs = [b.buffer.toreadonly() for b in blobs]
        return 0

    def _bad(self, why: str) -> None:
        self.bad_replies += 1
        if self.bad_replies <= 10 or self.bad_replies % 1000 == 0:  # a misbehaving peer must not flood the log
            _log.warning("ignoring a bad reply from replay", endpoint=self.endpoint, why=why, count=self.bad_replies)

    def _on_subtree_ack(self, message: AckMsg) -> int:
        self.late_replies += 1  # the learner has no window; ActorReplayClient overrides
        return 0

    def _on_subtree_error(self, message: ErrorMsg) -> bool:
        return False


class ActorReplayClient(_ReplayConnection):
    """An actor's link to replay: a bounded window of unacked subtrees (back-pressure) and leases."""

    def __init__(
        self,
        endpoint: str,
        actor_id: str,
        transport: TransportConfig | None = None,
        *,
        window: int = 64,
        resend_after_s: float = 2.0,
        ctx: zmq.Context | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not actor_id:
            raise ValueError("actor_id must not be empty")
        self.actor_id = actor_id
        self.window = window
        self._window: dict[tuple[str, int], _Pending] = {}  # insertion order = send order
        self._by_req: dict[int, tuple[str, int]] = {}
        self.acked = 0
        self.duplicates = 0
        self.rejected: list[RejectedSubtree] = []
        self._first_lease_request = True
        self._unanswered_lease: tuple[int, str] | None = None  # (n, request_id) of a timed-out request
        self.abandoned_leases = 0
        super().__init__(endpoint, transport, resend_after_s, ctx)

    def __enter__(self) -> ActorReplayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def unacked(self) -> int:
        """Subtrees sent but not yet acked (nor rejected)."""
        return len(self._window)

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "unacked": self.unacked,
            "acked": self.acked,
            "duplicates": self.duplicates,
            "rejected": len(self.rejected),
            "abandoned_leases": self.abandoned_leases,
        }

    def send_subtree(self, data: bytes, tree_id: str, seq: int, timeout_s: float | None = None) -> None:
        """Send one Arrow subtree; blocks while the window is full (back-pressure).

        `timeout_s=None` waits as long as it takes (e.g. while replay restarts); otherwise
        ReplayTimeout if the window does not open in time (the subtree is then not sent).
        ValueError for a (tree_id, seq) already in the window, data whose metadata names another
        (tree_id, seq), or a message over the transport's size limit (replay could never take it).
        """
        self._check_open()
        key = (tree_id, seq)
        if key in self._window:
            raise ValueError(f"subtree {tree_id} seq {seq} is already waiting for its ack")
        identity = _subtree_identity(data)
        if identity != key:
            raise ValueError(f"data is subtree {identity[0]} seq {identity[1]}, not {tree_id} seq {seq}")
        req = self._take_req()
        frames = encode_message(SubtreeMsg(req=req), [data])
        size = sum(len(f) for f in frames)
        if size > self.transport.max_message_bytes:
            raise ValueError(
                f"subtree {tree_id} seq {seq} is {size} bytes, over transport.max_message_bytes "
                f"({self.transport.max_message_bytes}); send it in smaller messages"
            )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(self._window) >= self.window:
            remaining = 3600.0 if deadline is None else deadline - time.monotonic()
            self._service(remaining)  # at least one look at the socket, even with timeout_s=0
            if len(self._window) >= self.window and deadline is not None and time.monotonic() >= deadline:
                oldest = next(iter(self._window.values()))
                raise ReplayTimeout(
                    f"the window of {self.window} unacked subtrees did not open within {timeout_s:.3g} s "
                    f"(oldest: {oldest.what}, sent {oldest.attempts} time(s)); is replay at "
                    f"{self.endpoint} up?",
                    waiting_for="subtree acks (window full)",
                )
        pending = _Pending(req=req, frames=frames, what=f"subtree {tree_id} seq {seq}", due=0.0)
        self._window[key] = pending
        self._by_req[req] = key
        self._transmit(pending, resend=False)

    def pump(self, timeout_s: float = 0.0) -> int:
        """Handle replies and resend what is overdue; waits up to timeout_s for the first ack.

        Returns the number of subtrees acked during the call.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        acks = self._service(timeout_s)
        while acks == 0 and (remaining := deadline - time.monotonic()) > 0:
            acks += self._service(remaining)
        return acks

    def flush(self, timeout_s: float) -> None:
        """Wait until every sent subtree is acked or rejected; ReplayTimeout otherwise."""
        deadline = time.monotonic() + timeout_s
        while self._window:
            self._service(deadline - time.monotonic())  # at least one look, even with timeout_s=0
            if self._window and time.monotonic() >= deadline:
                raise ReplayTimeout(
                    f"{len(self._window)} subtree(s) still unacked by replay at {self.endpoint} after "
                    f"{timeout_s:.3g} s",
                    waiting_for="subtree acks (flush)",
                )

    def request_leases(self, n: int, renew: Sequence[str] = (), timeout_s: float = 10.0) -> LeaseGrantMsg:
        """Ask for `n` new trees and keep `renew` alive; re-sent every resend_after_s until answered.

        Idempotent per request_id (see the module docstring): on ReplayTimeout the request stays open
        and the next call for the same `n` continues it.
        """
        request_id = None
        unanswered = self._unanswered_lease
        if unanswered is not None and unanswered[0] == n:
            request_id = unanswered[1]
            self._unanswered_lease = None
        elif unanswered is not None and n > 0:  # a renewal alone (n = 0) leaves a request for trees open
            self.abandoned_leases += int(unanswered[0] > 0)
            self._unanswered_lease = None
        request_id = request_id or uuid.uuid4().hex
        message = LeaseRequestMsg(
            req=self._take_req(),
            actor_id=self.actor_id,
            n=n,
            renew=list(renew),
            release_others=self._first_lease_request,
            request_id=request_id,
        )
        try:
            pending = self._request(
                message, lambda m: isinstance(m, LeaseGrantMsg), f"lease request for {n} tree(s)", timeout_s
            )
        except ReplayTimeout:
            self._unanswered_lease = (n, request_id)
            raise
        self._first_lease_request = False
        assert isinstance(pending.reply, LeaseGrantMsg)
        return pending.reply

    # window plumbing -----------------------------------------------------------------------

    def _window_items(self) -> list[_Pending]:
        return list(self._window.values())

    def _forget(self, key: tuple[str, int]) -> _Pending:
        pending = self._window.pop(key)
        self._by_req.pop(pending.req, None)
        return pending

    def _on_subtree_ack(self, message: AckMsg) -> int:
        if message.duplicate:
            self.duplicates += 1
        key = (message.tree_id or "", message.seq if message.seq is not None else -1)
        pending = self._window.get(key)
        if pending is None or pending.req != message.req:
            self.late_replies += 1
            return 0
        self._forget(key)
        self.acked += 1
        return 1

    def _on_subtree_error(self, message: ErrorMsg) -> bool:
        key = self._by_req.get(message.req)
        if key is None:
            return False
        pending = self._window[key]
        if message.code == ErrorCode.INTERNAL:
            pending.due = time.monotonic() + self.resend_after_s
            return True
        self._forget(key)
        self.rejected.append(RejectedSubtree(key[0], key[1], message.code.value, message.message))
        _log.warning(
            "replay rejected a subtree", tree_id=key[0], seq=key[1], code=message.code.value, detail=message.message
        )
        return True


@dataclass
class _OpenSample:
    request_id: str
    n: int
    learner_version: int
    pending: _Pending


_LOCAL_PREFIXES = ("ipc://", "inproc://", "tcp://127.", "tcp://localhost:", "tcp://[::1]:")


def replay_is_local(endpoint: str) -> bool:
    """Whether an endpoint can only reach a replay on this host (loopback TCP, ipc)."""
    return endpoint.startswith(_LOCAL_PREFIXES)


def resolve_by_reference(endpoint: str, transport: TransportConfig) -> bool:
    """`transport.sample_by_reference` for this endpoint: on, off, or auto (= replay on this host)."""
    setting = transport.sample_by_reference
    return setting == "on" or (setting == "auto" and replay_is_local(endpoint))


class LearnerReplayClient(_ReplayConnection):
    """The learner's link to replay: sampling completed trees, reporting its version, stats."""

    def __init__(
        self,
        endpoint: str,
        transport: TransportConfig | None = None,
        *,
        request_timeout_s: float = 5.0,
        resend_after_s: float = 2.0,
        ctx: zmq.Context | None = None,
        by_reference: bool | None = None,
    ) -> None:
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        self.request_timeout_s = float(request_timeout_s)
        self._open_sample: _OpenSample | None = None
        self.abandoned_samples = 0
        self.samples_by_reference = 0
        self.reference_fallbacks = 0
        self._store_reader = StoreReader()
        super().__init__(endpoint, transport, resend_after_s, ctx)
        self.by_reference = resolve_by_reference(endpoint, self.transport) if by_reference is None else by_reference

    def __enter__(self) -> LearnerReplayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "abandoned_samples": self.abandoned_samples,
            "samples_by_reference": self.samples_by_reference,
            "reference_fallbacks": self.reference_fallbacks,
        }

    def close(self) -> None:
        self._store_reader.close()
        super().close()

    def try_sample(
        self, n: int, learner_version: int, timeout_s: float | None = None
    ) -> tuple[SampleReplyMsg, list[SampledTree]]:
        """One sampling attempt: the reply (ready or not, with replay's reason) and the trees if ready.

        Waits up to timeout_s (default request_timeout_s), re-sending the same request (same
        request_id) every resend_after_s and after a reconnect. On ReplayTimeout the request stays
        open and the next call with the same n and learner_version continues it.
        """
        self._check_open()
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        if not timeout > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout}")
        deadline = time.monotonic() + timeout
        open_sample = self._open_sample
        if open_sample is not None and (open_sample.n, open_sample.learner_version) != (n, learner_version):
            self._abandon_open_sample()
            open_sample = None
        if open_sample is None:
            open_sample = self._open(uuid.uuid4().hex, n, learner_version, self.by_reference)
        reply, blobs = self._await_open(open_sample, timeout)
        if reply.store is None:
            return reply, self._split_trees(reply, blobs)
        try:
            messages = self._store_reader.read(reply.store, reply.trees)
        except StoreReferenceError as error:
            self.reference_fallbacks += 1
            if error.permanent:
                self.by_reference = False
            _log.warning(
                "sample by reference unreadable here; asking for the same trees by value",
                request_id=reply.request_id,
                error=str(error),
                by_reference_from_now=self.by_reference,
            )
            again = self._open(reply.request_id, n, learner_version, by_reference=False)
            reply, blobs = self._await_open(again, max(deadline - time.monotonic(), 1e-3))
            return reply, self._split_trees(reply, blobs)
        self.samples_by_reference += 1
        return reply, [SampledTree(info, tree) for info, tree in zip(reply.trees, messages, strict=True)]

    def _open(self, request_id: str, n: int, learner_version: int, by_reference: bool) -> _OpenSample:
        """Send a sample request and make it the open one."""
        message = SampleRequestMsg(
            req=self._take_req(), request_id=request_id, n=n, learner_version=learner_version, by_reference=by_reference
        )

        def accepts(m: WireMessage, request_id: str = request_id) -> bool:
            return isinstance(m, SampleReplyMsg) and m.request_id == request_id

        pending = self._start_request(message, accepts, f"sample request {request_id} ({n} tree(s))")
        self._open_sample = _OpenSample(request_id, n, learner_version, pending)
        return self._open_sample

    def _await_open(self, open_sample: _OpenSample, timeout_s: float) -> tuple[SampleReplyMsg, list[memoryview]]:
        """The open request's reply; on ReplayTimeout it stays open (a later call continues it)."""
        try:
            self._await(open_sample.pending, timeout_s)
        except ReplayTimeout:
            raise
        except BaseException:
            self._drop_open_sample()
            raise
        self._drop_open_sample()
        reply = open_sample.pending.reply
        assert isinstance(reply, SampleReplyMsg)
        return reply, open_sample.pending.blobs

    def sample(
        self,
        n: int,
        learner_version: int,
        timeout_s: float = 60.0,
        poll_interval_s: float = 0.05,
        on_wait: Callable[[str], None] | None = None,
    ) -> list[SampledTree]:
        """`n` completed trees, asking again every poll_interval_s until replay is ready.

        on_wait gets replay's reason after each not-ready reply (and a note when a reply is
        overdue). ReplayTimeout after timeout_s carries the last reason in `last_reason`.
        """
        deadline = time.monotonic() + timeout_s
        last_reason: str | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplayTimeout(
                    f"replay at {self.endpoint} had no {n} tree(s) for learner version {learner_version} within "
                    f"{timeout_s:.3g} s; last reason: {last_reason or 'no reply'}",
                    waiting_for=f"{n} sampled tree(s)",
                    last_reason=last_reason,
                )
            try:
                reply, trees = self.try_sample(n, learner_version, timeout_s=min(remaining, self.request_timeout_s))
            except ReplayTimeout:
                if on_wait is not None:
                    on_wait(f"no reply from replay at {self.endpoint} yet")
                continue
            if reply.ready:
                return trees
            last_reason = reply.reason or "not ready"
            if on_wait is not None:
                on_wait(last_reason)
            self._idle(min(poll_interval_s, max(0.0, deadline - time.monotonic())))

    def report_version(self, version: int, timeout_s: float = 10.0) -> None:
        """Tell replay the learner's weights are at `version` (drives staleness and admission); acked."""
        message = VersionMsg(req=self._take_req(), version=version)
        self._request(
            message, lambda m: isinstance(m, AckMsg) and m.tree_id is None, f"version report {version}", timeout_s
        )

    def stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Replay's counters (queue sizes, staleness drops, ...)."""
        message = StatsRequestMsg(req=self._take_req())
        pending = self._request(message, lambda m: isinstance(m, StatsReplyMsg), "stats request", timeout_s)
        assert isinstance(pending.reply, StatsReplyMsg)
        return dict(pending.reply.stats)

    # internals -----------------------------------------------------------------------------

    def _idle(self, seconds: float) -> None:
        """Wait without spinning while still draining late replies and monitor events."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._service(remaining)

    def _drop_open_sample(self) -> None:
        if self._open_sample is not None:
            self._requests.pop(self._open_sample.pending.req, None)
            self._open_sample = None

    def _abandon_open_sample(self) -> None:
        assert self._open_sample is not None
        self.abandoned_samples += 1
        _log.warning(
            "abandoning an unanswered sample request",
            request_id=self._open_sample.request_id,
            endpoint=self.endpoint,
        )
        self._drop_open_sample()

    @staticmethod
    def _split_trees(reply: SampleReplyMsg, blobs: list[memoryview]) -> list[SampledTree]:
        trees: list[SampledTree] = []
        start = 0
        for info in reply.trees:
            trees.append(SampledTree(info=info, messages=blobs[start : start + info.n_messages]))
            start += info.n_messages
        return trees
