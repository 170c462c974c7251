"""The sample-reply buffer pool: frames carry the exact bytes, and a buffer is reused only once sent."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from replay.reply_buffers import ZERO_COPY_MIN_BYTES, ReplyBuffers


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    sender.bind("inproc://reply-buffers-test")
    receiver.connect("inproc://reply-buffers-test")
    yield sender, receiver
    sender.close(linger=0)
    receiver.close(linger=0)
    ctx.term()


def blobs(seed: int, sizes: list[int]) -> list[bytes]:
    return [bytes((seed + i + j) % 251 for j in range(size)) for i, size in enumerate(sizes)]


def wait_until_returned(pool: ReplyBuffers, expect: int = 0, timeout_s: float = 5.0) -> None:
    """pyzmq releases sent frames from its garbage-collector thread, so the return is asynchronous."""
    deadline = time.monotonic() + timeout_s
    while pool.lent > expect and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.lent == expect


def test_frames_hold_the_views_bytes_large_as_frames_small_as_bytes() -> None:
    pool = ReplyBuffers()
    data = blobs(1, [ZERO_COPY_MIN_BYTES, 10, ZERO_COPY_MIN_BYTES * 3 + 7, ZERO_COPY_MIN_BYTES - 1])
    frames = pool.frames([memoryview(d) for d in data])
    assert [bytes(f) for f in frames] == data
    assert [type(f) for f in frames] == [zmq.Frame, bytes, zmq.Frame, bytes]
    assert pool.lent == 1


def test_only_small_views_need_no_buffer() -> None:
    pool = ReplyBuffers()
    data = blobs(2, [5, 100])
    assert pool.frames([memoryview(d) for d in data]) == data
    assert pool.allocated == 0 and pool.lent == 0


def test_a_sent_buffer_is_reused_and_received_copies_stay_intact(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    sender, receiver = pair
    pool = ReplyBuffers()
    sizes = [ZERO_COPY_MIN_BYTES * 2] * 3
    received = []
    for seed in range(4):
        data = blobs(seed, sizes)
        frames = pool.frames([memoryview(d) for d in data])
        sender.send_multipart(frames, copy=False)
        del frames
        received.append((data, receiver.recv_multipart()))  # copies: inproc shares the frames otherwise
        wait_until_returned(pool)
    assert pool.allocated == 1
    for data, got in received:
        assert got == data


def test_a_buffer_is_lent_while_a_receiver_holds_its_frames(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    sender, receiver = pair
    pool = ReplyBuffers()
    data = blobs(5, [ZERO_COPY_MIN_BYTES] * 2)
    sender.send_multipart(pool.frames([memoryview(d) for d in data]), copy=False)
    got = receiver.recv_multipart(copy=False)  # inproc hands over the same memory
    time.sleep(0.05)
    assert pool.lent == 1
    pool.frames([memoryview(d) for d in blobs(6, [ZERO_COPY_MIN_BYTES] * 2)])
    assert pool.allocated == 2
    assert [f.bytes for f in got] == data
    del got
    wait_until_returned(pool)


def test_a_buffer_still_lent_is_never_overwritten() -> None:
    pool = ReplyBuffers()
    first = blobs(3, [ZERO_COPY_MIN_BYTES] * 2)
    held = pool.frames([memoryview(d) for d in first])  # never sent: ZeroMQ may still read it
    second = pool.frames([memoryview(d) for d in blobs(4, [ZERO_COPY_MIN_BYTES] * 2)])
    assert pool.allocated == 2 and pool.lent == 2
    assert [bytes(f) for f in held] == first
    assert len(second) == 2


def test_keep_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplyBuffers(keep=0)
