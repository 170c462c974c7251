"""The replay service: a ZeroMQ ROUTER in front of the TreeStore, with pipelined group commits.

Three threads, one job each:
- the IO thread owns the ROUTER: it receives, validates (`decode_message`, `inspect_subtree`),
  groups valid subtrees into batches and sends every reply;
- the store thread is the TreeStore's writer: it commits one batch of up to `commit_max_messages`
  subtrees (and about `commit_max_bytes`) per LMDB transaction, answers leases, versions and
  stats, and records the samples that were answered (`TreeStore.commit_samples`);
- the sampler thread answers sample requests (`TreeStore.answer_sample`): it chooses the trees
  under the store's state lock, reads them from its own LMDB read transaction and replies, so a
  sample never waits for an ingest commit's fsync, only (about a millisecond) for a transaction's
  body. It then asks the store thread to record the sample, after the reply (at least once: see
  `replay.store`). A request whose learner version the store has not seen goes through the store
  thread first (`set_learner_version`) and comes back.
While the store thread waits for a commit to reach the disk, the IO thread validates the next
batch, so validation and fsync overlap. The IO thread hands over a new batch only when the store
thread is idle (a batch grows while a commit runs) and waits at most `commit_max_delay_ms` to fill
a small one. Requests jump ahead of waiting batches, so a lease never waits behind more than one
commit, and the byte bound keeps that commit's fsync short. While a sample request is being
answered the IO thread receives and forwards but validates nothing (for at most
SAMPLE_PRIORITY_MAX_S), so the sampler thread does not queue for the GIL behind validation. A
sample's messages go out as zero-copy frames over LMDB's own pages, or pooled copies
(`replay.reply_buffers`, owned by the sampler thread); a sample by reference sends only the keys
and the store's path and id (`common.wire`), for a learner that reads the map itself. Replies
travel back over an inproc socket, and an ack is sent only after the commit that holds its
subtree. Nothing a peer sends can stop any thread: every bad message gets an error reply (or is
dropped when even the sender cannot be told) and is counted by its error code.
"""

from __future__ import annotations

import itertools
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from common.config import RunConfig
from common.log import get_logger
from common.metrics import Counters, MetricsWriter
from common.subtree import SubtreeDecodeError, inspect_subtree
from common.transport import ServerSocket, bind_server_socket
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
    StoreReference,
    SubtreeMsg,
    VersionMsg,
    WireError,
    WireMessage,
    decode_message,
    encode_message,
    split_routed,
)
from replay.limits import check_replay_config
from replay.reply_buffers import ReplyBuffers
from replay.store import (
    SUBTREES_DB,
    IngestItem,
    SampleDecision,
    SampleRequestError,
    StoreError,
    TreeStore,
    VersionAheadError,
)

log = get_logger("replay.service")

HOUSEKEEPING_INTERVAL_S = 1.0
METRICS_INTERVAL_S = 5.0
_REPLIES_ENDPOINT = "inproc://replay-replies-{}"
_REQUEST_PRIORITY, _BATCH_PRIORITY, _STOP_PRIORITY = 0, 1, 2
# Subtrees received but not yet validated (bounded: beyond this they wait in ZeroMQ's queue).
MAX_UNCHECKED = 4096
INSPECT_SLICE = 2
# Single-frame markers on the inproc reply socket (a reply has at least an identity and a header).
_BATCH_DONE, _SAMPLE_DONE = b"", b"s"
# While a sample request is being answered the IO thread validates nothing, so the sampler thread has
# the GIL and the CPU to itself; this long at most, so a learner that samples without pause cannot
# starve ingest.
SAMPLE_PRIORITY_MAX_S = 0.05
GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass
class _PendingSubtree:
    identity: bytes
    req: int
    item: IngestItem


@dataclass
class _Request:
    identity: bytes
    message: WireMessage


@dataclass
class _VersionFirst:
    """A sample request with a learner version the store has not recorded: the store thread records it."""

    request: _Request


# Store-thread work: record the samples the sampler thread answered.
_COMMIT_SAMPLES = "commit-samples"


class ReplayService:
    """Serve one store on one endpoint until `stop()` (or SIGTERM/SIGINT in `serve_forever`)."""

    def __init__(self, config: RunConfig, store_dir: str | Path | None = None, endpoint: str | None = None) -> None:
        """Check the configuration and bind before the store is opened, so a refusal leaves no files behind.

        Raises DeadlockConfigError or SecurityError (nothing is left open then).
        """
        self.config = config
        self.endpoint = endpoint or config.transport.replay_endpoint
        self.max_message_bytes = config.transport.max_message_bytes
        check_replay_config(config.replay, int(config.replay.map_size_gb * 1024**3))
        # Two ZeroMQ IO threads: a 16 MB sample reply need not queue behind the actors' ingest in one.
        self.ctx = zmq.Context(io_threads=2)
        self._server: ServerSocket | None = None
        try:
            self.bind()
            self.store = TreeStore(store_dir or config.replay.dir, config.replay)
        except BaseException:
            if self._server is not None:
                self._server.close()
            self.ctx.destroy(linger=0)
            raise
        self._store_reference = StoreReference(
            path=str(self.store.path.resolve()), store_id=self.store.store_id, db=SUBTREES_DB
        )
        self.counters = Counters()
        self.metrics = MetricsWriter(config.logging.metrics_path, role="replay")
        self._stop = threading.Event()
        self._work: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._batches_in_flight = 0
        self._samples_waiting = 0  # IO thread only: sample requests handed over, not yet answered
        self._sampling_since = 0.0
        self._samples: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()  # for the sampler thread
        self._reply_buffers = ReplyBuffers()  # the sampler thread's; sample replies leave LMDB through it
        self._replies_endpoint = _REPLIES_ENDPOINT.format(id(self))
        self.started = time.time()

    # ------------------------------------------------------------------------------ lifecycle

    def bind(self) -> str:
        """Bind the ROUTER (refuses a non-loopback endpoint without CurveZMQ keys); returns the endpoint."""
        if self._server is not None:
            return self.endpoint
        self._server = bind_server_socket(self.ctx, zmq.ROUTER, self.endpoint, self.config.transport)
        self._server.socket.setsockopt(zmq.SNDHWM, 100_000)
        self._server.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.endpoint = self._server.endpoint
        return self.endpoint

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        """Bind if needed, stop on SIGTERM/SIGINT, and run until stopped."""
        if self._server is None:
            self.bind()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
            # This process is the service: the store and sampler threads give the GIL up for LMDB calls and
            # must not wait the default 5 ms to get it back from an IO thread busy in Python.
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        log.info("replay_serving", endpoint=self.endpoint, dir=str(self.store.path), **self._brief_stats())
        try:
            self.run()
        finally:
            self.close()

    def run(self) -> None:
        """Run the IO loop in this thread, the store and sampler loops in two more, until stop()."""
        if self._server is None:
            self.bind()
        assert self._server is not None
        replies = self.ctx.socket(zmq.PULL)
        replies.setsockopt(zmq.RCVHWM, 0)
        replies.bind(self._replies_endpoint)
        store_thread = threading.Thread(target=self._store_loop, name="replay-store", daemon=True)
        sampler_thread = threading.Thread(target=self._sample_loop, name="replay-sampler", daemon=True)
        store_thread.start()
        sampler_thread.start()
        try:
            self._io_loop(self._server.socket, replies)
        finally:
            self._samples.put(None)
            sampler_thread.join()
            self._work.put((_STOP_PRIORITY, next(self._order), None))
            store_thread.join()
            replies.close(linger=0)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        # ZeroMQ first: a sample reply still queued may point into LMDB's map, which closing the
        # store unmaps.
        self.ctx.destroy(linger=0)
        self.store.close()
        self.metrics.close()
        log.info("replay_stopped")

    # ------------------------------------------------------------------------------ IO thread

    def _io_loop(self, sock: zmq.Socket, replies: zmq.Socket) -> None:
        """Receive eagerly, validate in small slices, hand batches to the store thread when it is idle.

        Receiving is cheap and validating is not, so the socket is drained first (requests go to the
        store or sampler thread at once) and subtrees wait in `unchecked`; a request therefore never queues
        behind more than INSPECT_SLICE validations, however many subtrees the actors have in flight.
        """
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        limit = self.config.replay.commit_max_messages
        byte_limit = self.config.replay.commit_max_bytes
        delay_s = self.config.replay.commit_max_delay_ms / 1000
        unchecked: deque[tuple[bytes, int, Any]] = deque()
        batch: list[_PendingSubtree] = []
        batch_bytes = 0
        batch_started = 0.0
        while not self._stop.is_set():
            full = len(batch) >= limit or batch_bytes >= byte_limit
            validate = self._samples_waiting == 0 or time.monotonic() > self._sampling_since + SAMPLE_PRIORITY_MAX_S
            if unchecked and not full and validate:
                wait_s = 0.0
            elif batch and self._batches_in_flight == 0:
                # The store is idle: hand the batch over once full, or once the fill window closed.
                wait_s = 0.0 if full else max(0.0, batch_started + delay_s - time.monotonic())
            else:
                wait_s = 0.2
            events = dict(poller.poll(wait_s * 1000))
            if replies in events:
                self._forward_replies(sock, replies)
            for _ in range(MAX_UNCHECKED - len(unchecked)):
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                subtree = self._receive(sock, frames)
                if subtree is not None:
                    unchecked.append(subtree)
            for _ in range(min(INSPECT_SLICE, limit - len(batch), len(unchecked)) if validate else 0):
                if batch_bytes >= byte_limit:
                    break
                pending = self._inspect(sock, *unchecked.popleft())
                if pending is not None:
                    if not batch:
                        batch_started = time.monotonic()
                    batch.append(pending)
                    batch_bytes += len(pending.item.data)
            full = len(batch) >= limit or batch_bytes >= byte_limit
            if (
                batch
                and self._batches_in_flight == 0
                and (full or (not unchecked and time.monotonic() >= batch_started + delay_s))
            ):
                self._batches_in_flight += 1
                self._work.put((_BATCH_PRIORITY, next(self._order), batch))
                batch = []
                batch_bytes = 0

    def _forward_replies(self, sock: zmq.Socket, replies: zmq.Socket) -> None:
        while True:
            try:
                frames = replies.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) == 1:
                if frames[0].bytes == _SAMPLE_DONE:
                    self._samples_waiting -= 1
                else:  # _BATCH_DONE: the end of a committed batch
                    self._batches_in_flight -= 1
                continue
            self._send(sock, frames)

    def _receive(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> tuple[bytes, int, Any] | None:
        """Decode one message's envelope: a subtree to validate, a request to queue, or an error reply."""
        self.counters.inc("messages_received")
        try:
            identity, body = split_routed(frames)
        except WireError:
            self.counters.inc("dropped_unroutable")
            return None
        self.counters.inc("bytes_received", sum(len(f) for f in body))
        try:
            message, blobs = decode_message(body, self.max_message_bytes)
        except WireError as error:
            self._send(sock, self._error_frames(identity, error.req, error.code, error.detail))
            return None
        if isinstance(message, SubtreeMsg):
            return identity, message.req, blobs[0].buffer
        if isinstance(message, LeaseRequestMsg | SampleRequestMsg | VersionMsg | StatsRequestMsg):
            if isinstance(message, SampleRequestMsg):
                if self._samples_waiting == 0:
                    self._sampling_since = time.monotonic()
                self._samples_waiting += 1
                self._samples.put(_Request(identity, message))
            else:
                self._work.put((_REQUEST_PRIORITY, next(self._order), _Request(identity, message)))
            return None
        detail = f"{message.kind} is not a request"
        self._send(sock, self._error_frames(identity, message.req, ErrorCode.UNKNOWN_KIND, detail))
        return None

    def _inspect(self, sock: zmq.Socket, identity: bytes, req: int, data: Any) -> _PendingSubtree | None:
        """Validate a subtree fully; a bad one is answered with BAD_SUBTREE and never reaches the store."""
        try:
            summary = inspect_subtree(data)
        except SubtreeDecodeError as error:
            detail = f"{type(error).__name__}: {error}"
            self._send(sock, self._error_frames(identity, req, ErrorCode.BAD_SUBTREE, detail))
            return None
        return _PendingSubtree(identity, req, IngestItem(summary, data))

    def _send(self, sock: zmq.Socket, frames: list[Any]) -> None:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.counters.inc("replies_dropped")

    def _error_frames(self, identity: bytes, req: int, code: ErrorCode, detail: str) -> list[Any]:
        self.counters.inc(f"errors.{code.value}")
        log.warning("replay_bad_message", code=code.value, detail=detail[:300], req=req)
        return [identity, *encode_message(ErrorMsg(req=req, code=code, message=detail))]

    # ------------------------------------------------------------------------------ store thread

    def _store_loop(self) -> None:
        replies = self.ctx.socket(zmq.PUSH)
        replies.setsockopt(zmq.SNDHWM, 0)
        replies.connect(self._replies_endpoint)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL_S
        next_metrics = time.monotonic() + METRICS_INTERVAL_S
        try:
            while True:
                try:
                    priority, _, work = self._work.get(timeout=max(0.0, next_housekeeping - time.monotonic()))
                except queue.Empty:
                    work, priority = None, None
                if priority == _STOP_PRIORITY:
                    return
                if isinstance(work, list):
                    for frames in self._commit(work):
                        replies.send_multipart(frames, copy=False)
                    replies.send(_BATCH_DONE)
                elif isinstance(work, _Request):
                    replies.send_multipart(self._answer(work), copy=False)
                elif isinstance(work, _VersionFirst):
                    self._record_version_first(work.request, replies)
                elif work == _COMMIT_SAMPLES:
                    self._commit_samples()
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._housekeeping()
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
                if now >= next_metrics:
                    self.metrics.emit("replay_stats", **self._brief_stats())
                    next_metrics = now + METRICS_INTERVAL_S
        finally:
            replies.close(linger=0)

    def _commit(self, pending: list[_PendingSubtree]) -> list[list[Any]]:
        try:
            outcomes = self.store.ingest([p.item for p in pending])
        except StoreError as error:
            log.error("replay_commit_failed", error=str(error), messages=len(pending))
            detail = f"store error, resend later: {error}"
            return [self._error_frames(p.identity, p.req, ErrorCode.INTERNAL, detail) for p in pending]
        out = []
        for p, outcome in zip(pending, outcomes, strict=True):
            if outcome.ok:
                self.counters.inc("acks_sent")
                ack = AckMsg(req=p.req, tree_id=outcome.tree_id, seq=outcome.seq, duplicate=outcome.duplicate)
                out.append([p.identity, *encode_message(ack)])
            else:
                assert outcome.error is not None
                out.append(self._error_frames(p.identity, p.req, outcome.error, outcome.message))
        return out

    def _answer(self, request: _Request) -> list[Any]:
        """The reply frames to a lease, version or stats request."""
        message = request.message
        try:
            return [request.identity, *self._handle_request(message)]
        except StoreError as error:
            log.error("replay_request_failed", kind=message.kind, error=str(error))
            detail = f"store error, retry later: {error}"
            return self._error_frames(request.identity, message.req, ErrorCode.INTERNAL, detail)

    def _handle_request(self, message: WireMessage) -> list[Any]:
        if isinstance(message, LeaseRequestMsg):
            self.counters.inc("lease_requests")
            decision = self.store.grant_leases(
                message.actor_id,
                message.n,
                message.renew,
                release_others=message.release_others,
                request_id=message.request_id,
            )
            grant = LeaseGrantMsg(
                req=message.req,
                tree_ids=decision.tree_ids,
                learner_version=decision.learner_version,
                lease_ttl_s=self.config.replay.lease_ttl_s,
                renewed=decision.renewed,
                lost=decision.lost,
                reason=decision.reason,
            )
            return encode_message(grant)
        if isinstance(message, VersionMsg):
            self.counters.inc("version_reports")
            self.store.set_learner_version(message.version)
            return encode_message(AckMsg(req=message.req))
        if isinstance(message, StatsRequestMsg):
            return encode_message(StatsReplyMsg(req=message.req, stats=self.stats()))
        raise AssertionError(f"unhandled request {message.kind}")

    def _record_version_first(self, request: _Request, replies: zmq.Socket) -> None:
        """Store thread: record a sample request's newer learner version, then hand it back to the sampler."""
        message = request.message
        assert isinstance(message, SampleRequestMsg)
        try:
            self.store.set_learner_version(message.learner_version)
        except StoreError as error:
            log.error("replay_request_failed", kind=message.kind, error=str(error))
            detail = f"store error, retry later: {error}"
            replies.send_multipart(self._error_frames(request.identity, message.req, ErrorCode.INTERNAL, detail))
            replies.send(_SAMPLE_DONE)
            return
        self._samples.put(request)

    def _commit_samples(self) -> None:
        """Store thread: record the samples whose replies went out."""
        try:
            self.store.commit_samples()
        except StoreError as error:  # the reservations stay; the next sample's commit retries them
            self.counters.inc("sample_commit_failures")
            log.error("replay_sample_commit_failed", error=str(error))

    # ------------------------------------------------------------------------------ sampler thread

    def _sample_loop(self) -> None:
        replies = self.ctx.socket(zmq.PUSH)
        replies.setsockopt(zmq.SNDHWM, 0)
        replies.connect(self._replies_endpoint)
        try:
            while True:
                try:
                    request = self._samples.get(timeout=HOUSEKEEPING_INTERVAL_S)
                except queue.Empty:
                    self._reply_buffers.reclaim()  # ends pinned reads that were sent, so LMDB can reuse their pages
                    continue
                if request is None:
                    return
                if self._answer_sample(request, replies):
                    replies.send(_SAMPLE_DONE)
                    self._work.put((_REQUEST_PRIORITY, next(self._order), _COMMIT_SAMPLES))
        finally:
            replies.close(linger=0)

    def _answer_sample(self, request: _Request, replies: zmq.Socket) -> bool:
        """Answer one sample request; False when it went to the store thread to record its version first."""
        message = request.message
        assert isinstance(message, SampleRequestMsg)

        def reply(decision: SampleDecision) -> None:
            replies.send_multipart([request.identity, *self._sample_reply(message, decision)], copy=False)

        try:
            self.store.answer_sample(
                message.request_id,
                message.n,
                message.learner_version,
                sink=self._reply_buffers.frames,
                reply=reply,
                by_reference=message.by_reference,
            )
        except VersionAheadError:
            self._work.put((_REQUEST_PRIORITY, next(self._order), _VersionFirst(request)))
            return False
        except SampleRequestError as error:
            replies.send_multipart(self._error_frames(request.identity, message.req, ErrorCode.BAD_REQUEST, str(error)))
        except StoreError as error:
            log.error("replay_request_failed", kind=message.kind, error=str(error))
            detail = f"store error, retry later: {error}"
            replies.send_multipart(self._error_frames(request.identity, message.req, ErrorCode.INTERNAL, detail))
        self.counters.inc("sample_requests")
        if message.by_reference:
            self.counters.inc("sample_requests_by_reference")
        return True

    def _sample_reply(self, message: SampleRequestMsg, decision: SampleDecision) -> list[Any]:
        """The sample reply's frames: the trees' infos, then their Arrow messages as the store gave them
        (by reference: no blobs; each info lists its subtree keys and the reply names the store)."""
        by_reference = message.by_reference and decision.ready
        infos, blobs = [], []
        for tree in decision.trees:
            record = tree.record
            infos.append(
                SampledTreeInfo(
                    tree_id=record.tree_id,
                    task_id=record.task_id or "",
                    actor_id=record.actor_id,
                    n_messages=len(tree.messages),
                    min_version=record.min_version,
                    max_version=record.max_version,
                    staleness=tree.staleness,
                    times_sampled=record.times_sampled,
                    keys=[bytes(key).hex() for key in tree.messages] if by_reference else None,
                )
            )
            if not by_reference:
                blobs.extend(tree.messages)
        if not decision.ready:
            self.counters.inc("sample_not_ready")
        reply = SampleReplyMsg(
            req=message.req,
            request_id=message.request_id,
            ready=decision.ready,
            reason=decision.reason,
            trees=infos,
            store=self._store_reference if by_reference else None,
        )
        return encode_message(reply, blobs)

    # ------------------------------------------------------------------------------ helpers

    def _housekeeping(self) -> None:
        self._commit_samples()  # samples whose recording failed are retried even when no new sample comes
        if cleared := self.store.clear_stale_readers():
            self.counters.inc("stale_readers_cleared", cleared)
            log.warning("replay_stale_readers_cleared", readers=cleared)
        try:
            expired = self.store.expire_leases()
        except StoreError as error:
            log.error("replay_expiry_failed", error=str(error))
            return
        if expired:
            log.warning("replay_leases_expired", trees=expired)

    def _brief_stats(self) -> dict[str, Any]:
        stats = self.store.stats()
        keys = ("learner_version", "inserts", "samples", "growing", "ready", "live_trees", "live_bytes")
        return {k: stats[k] for k in keys}

    def stats(self) -> dict[str, Any]:
        return {
            "store": self.store.stats(),
            "service": self.counters.snapshot(),
            "uptime_s": round(time.time() - self.started, 3),
            "endpoint": self.endpoint,
        }
