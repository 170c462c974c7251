"""From replay's sampled trees to training groups: task grouping, carried-over groups, a byte framing.

Decided here:
- A training group is one task's trees (credit normalises within it). Tree-GRPO grows M trees per task
  that reach replay independently, so `GroupAssembler` holds a task's trees until `group_size` of them
  arrived; a group still incomplete after `wait_steps` updates trains with what it has (its credit
  then normalises over fewer trees; counted as `groups_incomplete`). For single-tree builders
  (chain, arpo, at2po) group_size is 1 and every tree is a group at once.
- Replay may hand a tree out again after it crashed between its sample reply and the commit that
  recorded it (the reply goes out first, see `replay.store.TreeStore.sample`). The assembler drops
  a tree whose (tree_id, times_sampled) it already took among the last `DELIVERIES_REMEMBERED`,
  counted as `redelivered_dropped`; a deliberate re-sample (uniform sampling) has a higher
  times_sampled and is kept.
- Trees the assembler holds are part of the learner's sampling state: replay handed them out already,
  so a checkpoint stores them (`encode_sampled`) and a resume puts them back.
- `encode_sampled`/`decode_sampled` frame sampled trees as bytes without pickle: an 8-byte big-endian
  header length, a JSON header (each tree's replay info and its message sizes), then the Arrow messages
  as replay sent them. The same framing carries a batch from rank 0 to the other learner ranks.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from dataclasses import dataclass

from common.replay_client import SampledTree
from common.tree import TurnTree
from common.wire import SampledTreeInfo

_HEADER = struct.Struct(">Q")
FRAMING_VERSION = 1
DELIVERIES_REMEMBERED = 65536


class FramingError(ValueError):
    """Bytes that are not a framed list of sampled trees."""


def encode_sampled(trees: list[SampledTree]) -> bytes:
    header = {
        "version": FRAMING_VERSION,
        "trees": [
            {"info": tree.info.model_dump(mode="json"), "sizes": [len(m) for m in tree.messages]} for tree in trees
        ],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_HEADER.pack(len(head)), head, *(m for tree in trees for m in tree.messages)])


def decode_sampled(data: bytes) -> list[SampledTree]:
    if len(data) < _HEADER.size:
        raise FramingError(f"framed trees need at least {_HEADER.size} bytes, got {len(data)}")
    (head_len,) = _HEADER.unpack_from(data)
    start = _HEADER.size + head_len
    if start > len(data):
        raise FramingError(f"header length {head_len} runs past the end ({len(data)} bytes)")
    try:
        header = json.loads(data[_HEADER.size : start])
        if header.get("version") != FRAMING_VERSION:
            raise FramingError(f"framing version {header.get('version')!r}, expected {FRAMING_VERSION}")
        entries = header["trees"]
        out: list[SampledTree] = []
        cursor = start
        for entry in entries:
            messages: list[bytes] = []
            for size in entry["sizes"]:
                if not isinstance(size, int) or size < 0 or cursor + size > len(data):
                    raise FramingError(f"message size {size!r} at offset {cursor} runs past the end")
                messages.append(data[cursor : cursor + size])
                cursor += size
            out.append(SampledTree(info=SampledTreeInfo.model_validate(entry["info"]), messages=messages))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, FramingError):
            raise
        raise FramingError(f"bad framed-trees header: {error}") from None
    if cursor != len(data):
        raise FramingError(f"{len(data) - cursor} trailing bytes after the framed trees")
    return out


@dataclass
class TreeItem:
    """A decoded tree with replay's description and its raw messages (kept for checkpoints)."""

    sampled: SampledTree
    tree: TurnTree

    @property
    def staleness(self) -> int | None:
        return self.sampled.info.staleness

    @classmethod
    def decode(cls, sampled: SampledTree) -> TreeItem:
        return cls(sampled=sampled, tree=sampled.assemble())


@dataclass
class _Waiting:
    items: list[TreeItem]
    age: int = 0


class GroupAssembler:
    """Collect a task's trees into a group of `group_size`; release stragglers after `wait_steps` updates."""

    def __init__(self, group_size: int, wait_steps: int) -> None:
        if group_size < 1 or wait_steps < 0:
            raise ValueError("group_size must be >= 1 and wait_steps >= 0")
        self.group_size = group_size
        self.wait_steps = wait_steps
        self._waiting: OrderedDict[str, _Waiting] = OrderedDict()
        self._delivered: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.groups_incomplete = 0
        self.redelivered_dropped = 0

    def add(self, items: list[TreeItem]) -> None:
        for item in items:
            info = item.sampled.info
            key = (info.tree_id, info.times_sampled)
            if key in self._delivered:
                self.redelivered_dropped += 1
                continue
            self._delivered[key] = None
            if len(self._delivered) > DELIVERIES_REMEMBERED:
                self._delivered.popitem(last=False)
            self._waiting.setdefault(item.tree.task_id, _Waiting([])).items.append(item)

    @property
    def held_trees(self) -> int:
        return sum(len(w.items) for w in self._waiting.values())

    def held(self) -> list[SampledTree]:
        """The trees waiting for their group's other members (sampling state for a checkpoint)."""
        return [item.sampled for w in self._waiting.values() for item in w.items]

    def take(self) -> list[list[TreeItem]]:
        """Complete groups (each at most group_size trees, arrival order) and overdue ones; ages the rest."""
        ready: list[list[TreeItem]] = []
        for task_id in list(self._waiting):
            waiting = self._waiting[task_id]
            while len(waiting.items) >= self.group_size:
                ready.append(waiting.items[: self.group_size])
                waiting.items = waiting.items[self.group_size :]
            if not waiting.items:
                del self._waiting[task_id]
            elif waiting.age >= self.wait_steps:
                ready.append(waiting.items)
                self.groups_incomplete += 1
                del self._waiting[task_id]
            else:
                waiting.age += 1
        return ready
