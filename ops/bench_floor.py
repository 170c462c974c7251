"""The socket floor of `at2po bench replay`: a sample reply's bytes over bare ZeroMQ, with no store behind.

Why: under ingest a sample's latency is mostly the cost of moving its bytes between two processes
on CPUs the ingest keeps busy. Timing the same frames through a bare ROUTER that answers from
memory, in the same process and under the same load as the samples, shows how much of a sample's
latency replay adds and how much no replay change can remove.
"""

from __future__ import annotations

import time

import zmq

_SHAPE_SEPARATOR = b","


def echo_main(endpoint: str) -> None:
    """Answer `b"N,SIZE"` with N frames of SIZE bytes each (sent zero-copy from memory); `b""` stops."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    cache: dict[bytes, list[bytes]] = {}
    try:
        while True:
            identity, request = sock.recv_multipart()
            if not request:
                return
            if request not in cache:
                count, size = (int(part) for part in request.split(_SHAPE_SEPARATOR))
                cache[request] = [bytes([i % 251]) * size for i in range(count)]
            sock.send_multipart([identity, *cache[request]], copy=False)
    finally:
        sock.close(linger=0)
        ctx.term()


class BareTransfer:
    """The sampler's side: time one reply of given frames from `echo_main`, request to last byte."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def time_ms(self, frames: int, frame_bytes: int, timeout_s: float = 30.0) -> float:
        start = time.perf_counter()
        self.sock.send(b"%d,%d" % (frames, frame_bytes))
        if not self.sock.poll(timeout_s * 1000):
            raise TimeoutError(f"the echo process sent nothing within {timeout_s} s")
        received = self.sock.recv_multipart(copy=False)
        elapsed = (time.perf_counter() - start) * 1000
        if len(received) != frames:
            raise RuntimeError(f"the echo process sent {len(received)} frames, expected {frames}")
        return elapsed

    def close(self, stop_echo: bool = True) -> None:
        if stop_echo:
            self.sock.send(b"")
        self.sock.close(linger=0)
        self.ctx.term()
