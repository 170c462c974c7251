"""Sample-reply frames: the exact bytes, a pinned read ends and a pooled buffer is reused only once sent."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from replay.reply_buffers import ZERO_COPY_MIN_BYTES, ReplyBuffers
from replay.store import ReadPin


class FakeTxn:
    """Stands in for the LMDB read transaction behind a pin; counts how often it was ended."""

    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


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


def make_frames(pool: ReplyBuffers, data: list[bytes], txn: FakeTxn | None = None) -> list[zmq.Frame | bytes]:
    return pool.frames([memoryview(d) for d in data], ReadPin(txn or FakeTxn()))


def wait_until_returned(pool: ReplyBuffers, timeout_s: float = 5.0) -> None:
    """pyzmq releases sent frames from its garbage-collector thread, so the return is asynchronous."""
    deadline = time.monotonic() + timeout_s
    while pool.lent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.lent == 0


@pytest.mark.parametrize("max_pins", [0, 4])
def test_frames_hold_the_views_bytes_large_as_frames_small_as_bytes(max_pins: int) -> None:
    pool = ReplyBuffers(max_pins=max_pins)
    data = blobs(1, [ZERO_COPY_MIN_BYTES, 10, ZERO_COPY_MIN_BYTES * 3 + 7, ZERO_COPY_MIN_BYTES - 1])
    frames = make_frames(pool, data)
    assert [bytes(f) for f in frames] == data
    assert [type(f) for f in frames] == [zmq.Frame, bytes, zmq.Frame, bytes]
    assert pool.lent == 1
    assert (pool.pinned_replies, pool.pooled_replies) == ((1, 0) if max_pins else (0, 1))


def test_only_small_views_need_neither_pin_nor_buffer() -> None:
    pool = ReplyBuffers()
    txn = FakeTxn()
    data = blobs(2, [5, 100])
    assert make_frames(pool, data, txn) == data
    assert pool.allocated == 0 and pool.lent == 0 and pool.pinned_replies == 0


def test_a_pinned_read_ends_once_its_frames_were_sent(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    sender, receiver = pair
    pool = ReplyBuffers(max_pins=1)
    txn = FakeTxn()
    data = blobs(3, [ZERO_COPY_MIN_BYTES * 2] * 2)
    sender.send_multipart(make_frames(pool, data, txn), copy=False)
    assert pool.pins == 1 and txn.aborted == 0
    # The only pin is taken: the next reply is a pooled copy, its read ends at once (not kept).
    other = FakeTxn()
    assert [bytes(f) for f in make_frames(pool, blobs(4, [ZERO_COPY_MIN_BYTES] * 2), other)] == blobs(
        4, [ZERO_COPY_MIN_BYTES] * 2
    )
    assert pool.pooled_replies == 1 and other.aborted == 0
    assert receiver.recv_multipart() == data  # copies: inproc shares the frames otherwise
    wait_until_returned(pool)
    assert txn.aborted == 1 and other.aborted == 0


def test_a_sent_buffer_is_reused_and_received_copies_stay_intact(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    sender, receiver = pair
    pool = ReplyBuffers(max_pins=0)
    received = []
    for seed in range(4):
        data = blobs(seed, [ZERO_COPY_MIN_BYTES * 2] * 3)
        sender.send_multipart(make_frames(pool, data), copy=False)
        received.append((data, receiver.recv_multipart()))
        wait_until_returned(pool)
    assert pool.allocated == 1
    for data, got in received:
        assert got == data


def test_a_buffer_is_lent_while_a_receiver_holds_its_frames(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    sender, receiver = pair
    pool = ReplyBuffers(max_pins=0)
    data = blobs(5, [ZERO_COPY_MIN_BYTES] * 2)
    sender.send_multipart(make_frames(pool, data), copy=False)
    got = receiver.recv_multipart(copy=False)  # inproc hands over the same memory
    time.sleep(0.05)
    assert pool.lent == 1
    make_frames(pool, blobs(6, [ZERO_COPY_MIN_BYTES] * 2))
    assert pool.allocated == 2
    assert [f.bytes for f in got] == data
    del got
    wait_until_returned(pool)


def test_a_buffer_still_lent_is_never_overwritten() -> None:
    pool = ReplyBuffers(max_pins=0)
    first = blobs(3, [ZERO_COPY_MIN_BYTES] * 2)
    held = make_frames(pool, first)  # never sent: ZeroMQ may still read it
    second = make_frames(pool, blobs(4, [ZERO_COPY_MIN_BYTES] * 2))
    assert pool.allocated == 2 and pool.lent == 2
    assert [bytes(f) for f in held] == first
    assert len(second) == 2


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        ReplyBuffers(keep=0)
    with pytest.raises(ValueError):
        ReplyBuffers(max_pins=-1)
