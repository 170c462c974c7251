"""Weights from the learner to the actors: versioned announcements on PUB, checksummed chunks on demand.

Decided here (learner and actors rely on it):
- The learner serialises its state dict itself (safetensors bytes; the announcement names the
  format) and hands `WeightPublisher.publish(version, blob, format)` opaque bytes: common/ never
  imports torch. The blob is cut into `chunk_bytes` chunks; the announcement carries the version,
  sizes and the sha256 of the whole blob, and each chunk reply carries its own sha256.
- The publisher keeps the newest `keep_versions` blobs, so an actor that is mid-fetch when a newer
  version appears can finish; a fetch of a version no longer kept gets `unknown_version`.
- Announcements are repeated every `reannounce_s` (PUB/SUB drops messages sent before a subscriber
  connected), so an actor that joins late learns the newest version within that interval.
- One background thread owns both publisher sockets; `publish` only swaps in the new state under a
  lock, so training never blocks on actors.
- `WeightSubscriber.latest()` is non-blocking (newest announcement seen, or None);
  `fetch(announcement)` pulls the chunks with a window of requests in flight, checks every chunk and
  the whole blob, and raises `WeightFetchError` (typed by cause) instead of returning bad bytes.
- Endpoints follow the transport rules: a non-loopback bind needs CurveZMQ keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass

import zmq

from common.config import TransportConfig
from common.log import get_logger
from common.metrics import Counters
from common.transport import ServerSocket, bind_server_socket, connect_client_socket
from common.wire import (
    ErrorCode,
    ErrorMsg,
    WeightsAnnounceMsg,
    WeightsChunkMsg,
    WeightsFetchMsg,
    WireError,
    decode_message,
    encode_message,
    split_routed,
)

log = get_logger("common.weights")


class WeightFetchError(RuntimeError):
    """A weight transfer failed; `cause` is one of: timeout, checksum, unknown_version, protocol."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(f"{cause}: {message}")
        self.cause = cause


@dataclass(frozen=True)
class _Published:
    announcement: WeightsAnnounceMsg
    chunks: tuple[bytes, ...]
    chunk_sha256: tuple[str, ...]


def _cut(blob: bytes, chunk_bytes: int) -> tuple[bytes, ...]:
    return tuple(blob[start : start + chunk_bytes] for start in range(0, len(blob), chunk_bytes))


class WeightPublisher:
    """Learner side: announce versions and serve their chunks from a background thread."""

    def __init__(
        self,
        transport: TransportConfig,
        pub_endpoint: str | None = None,
        serve_endpoint: str | None = None,
        keep_versions: int = 2,
        reannounce_s: float = 1.0,
    ) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.transport = transport
        self.pub_endpoint = pub_endpoint or transport.weights_pub_endpoint
        self.serve_endpoint = serve_endpoint or transport.weights_endpoint
        self.keep_versions = keep_versions
        self.reannounce_s = reannounce_s
        self.counters = Counters()
        self._lock = threading.Lock()
        self._versions: dict[int, _Published] = {}
        self._announce_pending = False
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        # Bind in the caller's thread so a bad endpoint or missing keys fail here, loudly.
        self._pub: ServerSocket = bind_server_socket(self._ctx, zmq.PUB, self.pub_endpoint, transport)
        try:
            self._router: ServerSocket = bind_server_socket(self._ctx, zmq.ROUTER, self.serve_endpoint, transport)
        except BaseException:
            self._pub.close()
            raise
        # publish() wakes the serving thread at once, so an announcement does not wait out a poll interval.
        wake_endpoint = f"inproc://at2po-weights-wake-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake_endpoint)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake_endpoint)
        self._thread = threading.Thread(target=self._serve, name="weight-publisher", daemon=True)
        self._thread.start()

    def publish(self, version: int, blob: bytes, format: str = "safetensors") -> WeightsAnnounceMsg:
        chunk_bytes = self.transport.weights_chunk_bytes
        chunks = _cut(blob, chunk_bytes)
        announcement = WeightsAnnounceMsg(
            version=version,
            total_bytes=len(blob),
            chunk_bytes=chunk_bytes,
            n_chunks=len(chunks),
            sha256=hashlib.sha256(blob).hexdigest(),
            format=format,
        )
        published = _Published(announcement, chunks, tuple(hashlib.sha256(c).hexdigest() for c in chunks))
        with self._lock:
            if self._versions and version <= max(self._versions):
                raise ValueError(f"version {version} is not newer than {max(self._versions)}")
            self._versions[version] = published
            for old in sorted(self._versions)[: -self.keep_versions]:
                del self._versions[old]
            self._announce_pending = True
            with contextlib.suppress(zmq.Again):
                self._wake_tx.send(b"", flags=zmq.NOBLOCK)
        self.counters.inc("versions_published")
        return announcement

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pub.close()
        self._router.close()
        self._wake_tx.close(linger=0)
        self._wake_rx.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        pub, router = self._pub.socket, self._router.socket
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        next_announce = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                newest = self._versions[max(self._versions)] if self._versions else None
                due = newest is not None and (self._announce_pending or now >= next_announce)
                self._announce_pending = False
            if due and newest is not None:
                pub.send_multipart(encode_message(newest.announcement))
                next_announce = now + self.reannounce_s
            events = dict(poller.poll(50))
            if events.get(self._wake_rx):
                while True:
                    try:
                        self._wake_rx.recv(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
            if events.get(router):
                self._answer(router)

    def _answer(self, router: zmq.Socket) -> None:
        while True:
            try:
                frames = router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                identity, body = split_routed(frames)
                message, _ = decode_message(body, self.transport.max_message_bytes)
                if not isinstance(message, WeightsFetchMsg):
                    raise WireError(ErrorCode.BAD_REQUEST, f"{message.kind} is not served here", message.req)
            except WireError as error:
                self.counters.inc(f"errors_{error.code.value}")
                if frames and len(frames) > 1:
                    reply = ErrorMsg(req=error.req, code=error.code, message=error.detail)
                    router.send_multipart([frames[0], *encode_message(reply)])
                continue
            with self._lock:
                published = self._versions.get(message.version)
            if published is None or message.chunk >= len(published.chunks):
                self.counters.inc("errors_unknown_version")
                what = "chunk" if published is not None else "version"
                reply = ErrorMsg(
                    req=message.req,
                    code=ErrorCode.UNKNOWN_VERSION,
                    message=f"{what} {message.version}/{message.chunk} is not held (newest kept: {self.newest()})",
                )
                router.send_multipart([identity, *encode_message(reply)])
                continue
            chunk = WeightsChunkMsg(
                req=message.req,
                version=message.version,
                chunk=message.chunk,
                sha256=published.chunk_sha256[message.chunk],
            )
            router.send_multipart([identity, *encode_message(chunk, [published.chunks[message.chunk]])], copy=False)
            self.counters.inc("chunks_served")

    def newest(self) -> int | None:
        with self._lock:
            return max(self._versions) if self._versions else None


class WeightSubscriber:
    """Actor side: learn announced versions without blocking, fetch and verify a version's bytes."""

    def __init__(
        self,
        transport: TransportConfig,
        pub_endpoint: str | None = None,
        serve_endpoint: str | None = None,
        window: int = 4,
    ) -> None:
        self.transport = transport
        self.window = max(1, window)
        self.counters = Counters()
        self._ctx = zmq.Context()
        self._sub = connect_client_socket(self._ctx, zmq.SUB, pub_endpoint or transport.weights_pub_endpoint, transport)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._dealer = connect_client_socket(
            self._ctx, zmq.DEALER, serve_endpoint or transport.weights_endpoint, transport
        )
        self._latest: WeightsAnnounceMsg | None = None
        self._req = 0

    def latest(self) -> WeightsAnnounceMsg | None:
        """The newest announcement received so far (drains the SUB socket; never blocks)."""
        while True:
            try:
                frames = self._sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return self._latest
            try:
                message, _ = decode_message(frames, self.transport.max_message_bytes)
            except WireError:
                self.counters.inc("bad_announcements")
                continue
            if not isinstance(message, WeightsAnnounceMsg):
                self.counters.inc("bad_announcements")
                continue
            if self._latest is None or message.version > self._latest.version:
                self._latest = message

    def wait_for(self, min_version: int, timeout_s: float) -> WeightsAnnounceMsg:
        """Block until an announcement of at least `min_version` arrives (tests, start-up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            latest = self.latest()
            if latest is not None and latest.version >= min_version:
                return latest
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WeightFetchError("timeout", f"no announcement of version >= {min_version} in {timeout_s} s")
            self._sub.poll(min(remaining, 0.1) * 1000)

    def fetch(self, announcement: WeightsAnnounceMsg, timeout_s: float = 60.0) -> bytes:
        """All chunks of the announced version, verified; raises WeightFetchError on any failure."""
        deadline = time.monotonic() + timeout_s
        chunks: dict[int, bytes] = {}
        in_flight: dict[int, int] = {}  # req -> chunk
        next_chunk = 0
        while len(chunks) < announcement.n_chunks:
            while next_chunk < announcement.n_chunks and len(in_flight) < self.window:
                self._req += 1
                request = WeightsFetchMsg(req=self._req, version=announcement.version, chunk=next_chunk)
                self._dealer.send_multipart(encode_message(request))
                in_flight[self._req] = next_chunk
                next_chunk += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._dealer.poll(remaining * 1000):
                self.counters.inc("fetch_timeouts")
                raise WeightFetchError(
                    "timeout", f"version {announcement.version}: {len(chunks)}/{announcement.n_chunks} chunks"
                )
            frames = self._dealer.recv_multipart(copy=True)
            try:
                message, blobs = decode_message(frames, self.transport.max_message_bytes)
            except WireError as error:
                raise WeightFetchError("protocol", str(error)) from None
            if message.req not in in_flight:
                continue  # a reply to an abandoned earlier fetch
            chunk_index = in_flight.pop(message.req)
            if isinstance(message, ErrorMsg):
                cause = "unknown_version" if message.code is ErrorCode.UNKNOWN_VERSION else "protocol"
                raise WeightFetchError(cause, message.message)
            if not isinstance(message, WeightsChunkMsg) or (message.version, message.chunk) != (
                announcement.version,
                chunk_index,
            ):
                raise WeightFetchError("protocol", f"unexpected reply {message.kind} to chunk {chunk_index}")
            data = bytes(blobs[0])
            if hashlib.sha256(data).hexdigest() != message.sha256:
                self.counters.inc("checksum_failures")
                raise WeightFetchError("checksum", f"chunk {chunk_index} of version {announcement.version}")
            chunks[chunk_index] = data
        blob = b"".join(chunks[i] for i in range(announcement.n_chunks))
        if len(blob) != announcement.total_bytes or hashlib.sha256(blob).hexdigest() != announcement.sha256:
            self.counters.inc("checksum_failures")
            raise WeightFetchError("checksum", f"version {announcement.version}: the whole blob does not match")
        self.counters.inc("versions_fetched")
        return blob

    def close(self) -> None:
        self._sub.close(linger=0)
        self._dealer.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> WeightSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
