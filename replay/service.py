"""The replay service: a ZeroMQ ROUTER in front of the TreeStore, with group commits.

One thread owns the socket and the store. Each round it drains up to `commit_max_messages`
subtrees (waiting at most `commit_max_delay_ms` for more once the first arrived), validates each
one (`inspect_subtree`), stores the valid ones in one LMDB transaction, and only then sends the
acks. Requests (leases, samples, versions, stats) are answered after that round's commit, in
arrival order. Nothing a peer sends can stop the loop: every bad message gets an error reply (or is
dropped when even the sender cannot be told) and is counted by its error code.
"""

from __future__ import annotations

import signal
import threading
import time
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
    SubtreeMsg,
    VersionMsg,
    WireError,
    WireMessage,
    decode_message,
    encode_message,
    split_routed,
)
from replay.store import IngestItem, SampleRequestError, StoreError, TreeStore

log = get_logger("replay.service")

HOUSEKEEPING_INTERVAL_S = 1.0
METRICS_INTERVAL_S = 5.0


@dataclass
class _PendingSubtree:
    identity: bytes
    req: int
    item: IngestItem


class ReplayService:
    """Serve one store on one endpoint until `stop()` (or SIGTERM/SIGINT in `serve_forever`)."""

    def __init__(self, config: RunConfig, store_dir: str | Path | None = None, endpoint: str | None = None) -> None:
        self.config = config
        self.endpoint = endpoint or config.transport.replay_endpoint
        self.max_message_bytes = config.transport.max_message_bytes
        self.store = TreeStore(store_dir or config.replay.dir, config.replay)
        self.counters = Counters()
        self.metrics = MetricsWriter(config.logging.metrics_path, role="replay")
        self.ctx = zmq.Context()
        self._server: ServerSocket | None = None
        self._stop = threading.Event()
        self.started = time.time()

    # ------------------------------------------------------------------------------ lifecycle

    def bind(self) -> str:
        """Bind the ROUTER (refuses a non-loopback endpoint without CurveZMQ keys); returns the endpoint."""
        self._server = bind_server_socket(self.ctx, zmq.ROUTER, self.endpoint, self.config.transport)
        self._server.socket.setsockopt(zmq.SNDHWM, 100_000)
        self._server.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.endpoint = self._server.endpoint
        return self.endpoint

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        """Bind if needed, stop on SIGTERM/SIGINT, and run the loop."""
        if self._server is None:
            self.bind()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        log.info("replay_serving", endpoint=self.endpoint, dir=str(self.store.path), **self._brief_stats())
        try:
            self.run()
        finally:
            self.close()

    def run(self) -> None:
        if self._server is None:
            self.bind()
        assert self._server is not None
        sock = self._server.socket
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL_S
        next_metrics = time.monotonic() + METRICS_INTERVAL_S
        while not self._stop.is_set():
            timeout_ms = max(0.0, min(next_housekeeping - time.monotonic(), 0.2)) * 1000
            if poller.poll(timeout_ms):
                self._round(sock, poller)
            now = time.monotonic()
            if now >= next_housekeeping:
                self._housekeeping()
                next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
            if now >= next_metrics:
                self.metrics.emit("replay_stats", **self._brief_stats())
                next_metrics = now + METRICS_INTERVAL_S

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.store.close()
        self.metrics.close()
        self.ctx.destroy(linger=0)
        log.info("replay_stopped")

    # ------------------------------------------------------------------------------ one round

    def _round(self, sock: zmq.Socket, poller: zmq.Poller) -> None:
        pending: list[_PendingSubtree] = []
        requests: list[tuple[bytes, WireMessage, list[Any]]] = []
        limit = self.config.replay.commit_max_messages
        deadline: float | None = None
        while len(pending) < limit:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if not pending:
                    break
                if deadline is None:
                    deadline = time.monotonic() + self.config.replay.commit_max_delay_ms / 1000
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poller.poll(remaining * 1000):
                    break
                continue
            self._accept(sock, frames, pending, requests)
        if pending:
            self._commit(sock, pending)
        for identity, message, blobs in requests:
            self._answer(sock, identity, message, blobs)

    def _accept(
        self,
        sock: zmq.Socket,
        frames: list[zmq.Frame],
        pending: list[_PendingSubtree],
        requests: list[tuple[bytes, WireMessage, list[Any]]],
    ) -> None:
        self.counters.inc("messages_received")
        try:
            identity, body = split_routed(frames)
        except WireError:
            self.counters.inc("dropped_unroutable")
            return
        self.counters.inc("bytes_received", sum(len(f) for f in body))
        try:
            message, blobs = decode_message(body, self.max_message_bytes)
        except WireError as error:
            self._reply_error(sock, identity, error.req, error.code, error.detail)
            return
        if isinstance(message, SubtreeMsg):
            data = blobs[0].buffer
            try:
                summary = inspect_subtree(data)
            except SubtreeDecodeError as error:
                self._reply_error(sock, identity, message.req, ErrorCode.BAD_SUBTREE, f"{type(error).__name__}: {error}")
                return
            pending.append(_PendingSubtree(identity, message.req, IngestItem(summary, data)))
        elif isinstance(message, LeaseRequestMsg | SampleRequestMsg | VersionMsg | StatsRequestMsg):
            requests.append((identity, message, blobs))
        else:
            self._reply_error(sock, identity, message.req, ErrorCode.UNKNOWN_KIND, f"{message.kind} is not a request")

    def _commit(self, sock: zmq.Socket, pending: list[_PendingSubtree]) -> None:
        try:
            outcomes = self.store.ingest([p.item for p in pending])
        except StoreError as error:
            log.error("replay_commit_failed", error=str(error), messages=len(pending))
            for p in pending:
                self._reply_error(sock, p.identity, p.req, ErrorCode.INTERNAL, f"store error, resend later: {error}")
            return
        for p, outcome in zip(pending, outcomes, strict=True):
            if outcome.ok:
                self.counters.inc("acks_sent")
                ack = AckMsg(req=p.req, tree_id=outcome.tree_id, seq=outcome.seq, duplicate=outcome.duplicate)
                self._send(sock, p.identity, encode_message(ack))
            else:
                assert outcome.error is not None
                self._reply_error(sock, p.identity, p.req, outcome.error, outcome.message)

    def _answer(self, sock: zmq.Socket, identity: bytes, message: WireMessage, blobs: list[Any]) -> None:
        try:
            frames = self._handle_request(message)
        except SampleRequestError as error:
            self._reply_error(sock, identity, message.req, ErrorCode.BAD_REQUEST, str(error))
            return
        except StoreError as error:
            log.error("replay_request_failed", kind=message.kind, error=str(error))
            self._reply_error(sock, identity, message.req, ErrorCode.INTERNAL, f"store error, retry later: {error}")
            return
        self._send(sock, identity, frames)

    def _handle_request(self, message: WireMessage) -> list[Any]:
        if isinstance(message, LeaseRequestMsg):
            self.counters.inc("lease_requests")
            decision = self.store.grant_leases(message.actor_id, message.n, message.renew)
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
        if isinstance(message, SampleRequestMsg):
            self.counters.inc("sample_requests")
            decision = self.store.sample(message.request_id, message.n, message.learner_version)
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
                    )
                )
                blobs.extend(tree.messages)
            if not decision.ready:
                self.counters.inc("sample_not_ready")
            reply = SampleReplyMsg(
                req=message.req, request_id=message.request_id, ready=decision.ready, reason=decision.reason, trees=infos
            )
            return encode_message(reply, blobs)
        if isinstance(message, VersionMsg):
            self.counters.inc("version_reports")
            self.store.set_learner_version(message.version)
            return encode_message(AckMsg(req=message.req))
        if isinstance(message, StatsRequestMsg):
            return encode_message(StatsReplyMsg(req=message.req, stats=self.stats()))
        raise AssertionError(f"unhandled request {message.kind}")

    # ------------------------------------------------------------------------------ helpers

    def _send(self, sock: zmq.Socket, identity: bytes, frames: list[Any]) -> None:
        try:
            sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.counters.inc("replies_dropped")

    def _reply_error(self, sock: zmq.Socket, identity: bytes, req: int, code: ErrorCode, detail: str) -> None:
        self.counters.inc(f"errors.{code.value}")
        log.warning("replay_bad_message", code=code.value, detail=detail[:300], req=req)
        self._send(sock, identity, encode_message(ErrorMsg(req=req, code=code, message=detail)))

    def _housekeeping(self) -> None:
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
