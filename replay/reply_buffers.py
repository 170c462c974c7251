"""How a sample reply's messages get from LMDB to the socket: zero-copy where it is safe, else pooled copies.

Why: a sample reply is large (64 trees of 256 KB are 16.8 MB). Copying it into newly allocated
memory costs one page fault per 4 KB page: about 4,000 faults, 11 ms on the 2-core CI VM, against
about 2.5 ms for the copy itself, and sending LMDB's own pages costs nothing at all.

- Pinned (the default): each large message goes out as a `copy=False` frame over LMDB's map, and the
  sample's read transaction stays open (LMDB keeps that snapshot's pages) until ZeroMQ has released
  every frame (their `MessageTracker` is done). At most `max_pins` replies are pinned at once: a
  snapshot held by a peer that never reads would keep LMDB from reusing freed pages.
- Pooled (beyond that): the messages are copied into a buffer that earlier replies already faulted
  in, which returns to the pool once ZeroMQ has released its frames; a peer that never reads keeps
  its buffer, as it kept its bytes before, and the pool allocates another.
Messages below ZERO_COPY_MIN_BYTES are copied into bytes either way. Not thread-safe: the replay
service's sampler thread owns its instance and releases its pins (a read transaction may end on any
thread, see `replay.store`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zmq

from replay.store import ReadPin

# Below this, a message is copied into its own bytes: small allocations do not page-fault, and a
# zero-copy frame costs a message to pyzmq's garbage-collector thread when it is released.
ZERO_COPY_MIN_BYTES = 64 * 1024
_ROUND_BYTES = 1 << 20


@dataclass
class _Lent:
    tracker: zmq.MessageTracker
    buffer: bytearray | None = None  # a pooled copy, back to the pool when done
    release: Callable[[], None] | None = None  # a pinned read, ended when done


class ReplyBuffers:
    """Frames for sample replies (a `TreeStore.sample` sink), pinned or pooled; see the module docstring."""

    def __init__(self, keep: int = 4, max_pins: int = 4) -> None:
        if keep < 1 or max_pins < 0:
            raise ValueError(f"need keep >= 1 and max_pins >= 0, got {keep} and {max_pins}")
        self.keep = keep
        self.max_pins = max_pins
        self._free: list[bytearray] = []
        self._lent: list[_Lent] = []
        self.allocated = 0
        self.pinned_replies = 0
        self.pooled_replies = 0

    @property
    def lent(self) -> int:
        """Replies whose frames ZeroMQ may still read (pinned reads and pooled buffers)."""
        self.reclaim()
        return len(self._lent)

    @property
    def pins(self) -> int:
        self.reclaim()
        return sum(1 for lent in self._lent if lent.release is not None)

    def frames(self, views: Sequence[memoryview], pin: ReadPin) -> list[zmq.Frame | bytes]:
        """Frames with the bytes of `views` that stay valid until ZeroMQ has sent them."""
        large = sum(v.nbytes for v in views if v.nbytes >= ZERO_COPY_MIN_BYTES)
        if not large:
            return [bytes(v) for v in views]
        if self.pins < self.max_pins:
            self.pinned_replies += 1
            return self._wrap(views, lambda view: view, pin)
        self.pooled_replies += 1
        buffer = self._take(large)
        whole = memoryview(buffer)
        position = 0

        def copy(view: memoryview) -> memoryview:
            nonlocal position
            part = whole[position : position + view.nbytes]
            part[:] = view
            position += view.nbytes
            return part

        return self._wrap(views, copy, None, buffer)

    def _wrap(
        self,
        views: Sequence[memoryview],
        place: Callable[[memoryview], memoryview],
        pin: ReadPin | None,
        buffer: bytearray | None = None,
    ) -> list[zmq.Frame | bytes]:
        out: list[zmq.Frame | bytes] = []
        tracked: list[zmq.Frame] = []
        for view in views:
            if view.nbytes < ZERO_COPY_MIN_BYTES:
                out.append(bytes(view))
                continue
            frame = zmq.Frame(place(view), track=True, copy=False)
            tracked.append(frame)
            out.append(frame)
        tracker = zmq.MessageTracker(*tracked)
        self._lent.append(_Lent(tracker, buffer, pin.keep() if pin is not None else None))
        return out

    def _take(self, size: int) -> bytearray:
        self.reclaim()
        fitting = [b for b in self._free if len(b) >= size]
        if fitting:
            best = min(fitting, key=len)
            self._free.remove(best)
            return best
        if len(self._free) >= self.keep:
            # Every kept buffer is too small for this reply: give up the smallest for a larger one.
            self._free.remove(min(self._free, key=len))
        self.allocated += 1
        return bytearray(-(-size // _ROUND_BYTES) * _ROUND_BYTES)

    def reclaim(self) -> None:
        """End the pinned reads and take back the buffers that ZeroMQ no longer reads."""
        still_lent = []
        for lent in self._lent:
            if not lent.tracker.done:
                still_lent.append(lent)
                continue
            if lent.release is not None:
                lent.release()
            if lent.buffer is not None:
                self._free.append(lent.buffer)
        self._lent = still_lent
        while len(self._free) > self.keep:
            self._free.remove(min(self._free, key=len))
