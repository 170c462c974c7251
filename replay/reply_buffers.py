"""Reusable buffers that carry sample replies from LMDB to the socket without fresh memory per reply.

Why: a sample reply is large (64 trees of 256 KB are 16.8 MB), and copying it into newly allocated
memory costs one page fault per 4 KB page: about 4,000 faults, 11 ms on the 2-core CI VM, against
about 1.5 ms for the copy itself. So each reply's LMDB buffers are copied into a buffer that earlier
replies already faulted in, and ZeroMQ sends slices of it without a further copy (`copy=False`
frames). A buffer returns to the pool only when ZeroMQ has released every frame cut from it (its
`MessageTracker` is done), so a frame is never overwritten while a socket may still read it. A peer
that never reads keeps its buffers, as it kept its bytes before; the pool just allocates new ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import zmq

# Below this, a message is copied into its own bytes: small allocations do not page-fault, and a
# zero-copy frame costs a message to pyzmq's garbage-collector thread when it is released.
ZERO_COPY_MIN_BYTES = 64 * 1024
_ROUND_BYTES = 1 << 20


@dataclass
class _Lent:
    buffer: bytearray
    tracker: zmq.MessageTracker


class ReplyBuffers:
    """A small pool of reply buffers; not thread-safe (the replay store thread owns it)."""

    def __init__(self, keep: int = 4) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._free: list[bytearray] = []
        self._lent: list[_Lent] = []
        self.allocated = 0

    @property
    def lent(self) -> int:
        """Buffers whose frames ZeroMQ may still read (checked on every `frames` call)."""
        self._reclaim()
        return len(self._lent)

    def frames(self, views: Sequence[memoryview]) -> list[zmq.Frame | bytes]:
        """Copies of `views` (valid only during this call) that stay valid until ZeroMQ has sent them.

        Each large view becomes a `copy=False` frame over a pooled buffer; small ones become bytes.
        """
        large = [v for v in views if v.nbytes >= ZERO_COPY_MIN_BYTES]
        if not large:
            return [bytes(v) for v in views]
        buffer = self._take(sum(v.nbytes for v in large))
        whole = memoryview(buffer)
        out: list[zmq.Frame | bytes] = []
        tracked: list[zmq.Frame] = []
        position = 0
        for view in views:
            size = view.nbytes
            if size < ZERO_COPY_MIN_BYTES:
                out.append(bytes(view))
                continue
            part = whole[position : position + size]
            part[:] = view
            frame = zmq.Frame(part, track=True, copy=False)
            tracked.append(frame)
            out.append(frame)
            position += size
        self._lent.append(_Lent(buffer, zmq.MessageTracker(*tracked)))
        return out

    def _take(self, size: int) -> bytearray:
        self._reclaim()
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

    def _reclaim(self) -> None:
        still_lent = []
        for lent in self._lent:
            if lent.tracker.done:
                self._free.append(lent.buffer)
            else:
                still_lent.append(lent)
        self._lent = still_lent
        while len(self._free) > self.keep:
            self._free.remove(min(self._free, key=len))
