"""The LMDB tree store: durable subtrees, tree states, the ready queue, sampling, admission, eviction.

One process (the replay service) owns the store and is its only writer; every mutating call is one
LMDB write transaction, so the on-disk state is always consistent and a `kill -9` loses nothing
that was committed. In-memory indexes are a cache of the disk: they are rebuilt from it at open and
after any failed transaction.

Layout (named LMDB databases, big-endian integer keys so that key order is numeric order):
- `subtrees`: tree index (u64) + seq (u32) -> the Arrow bytes exactly as received. A tree's
  messages are contiguous and in seq order, so a tree is read with one cursor range scan.
- `trees`: tree index -> JSON record (state, lease, counts, versions). Dropped trees keep a small
  tombstone so that late messages get a precise answer.
- `ready`: ready sequence number (u64) -> tree index: completed trees in completion order.
- `batches`: sample request id -> JSON list of tree indexes (recent ones only), so a learner that
  retries a request whose reply was lost gets the same trees.
- `meta`: counters (JSON), persisted in the same transaction as the changes they count, so the
  admission counters after a restart are exactly those before it.

Tree ids on the wire are the decimal tree index, granted by the store with a lease.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import lmdb

from common.config import ReplayConfig
from common.subtree import SubtreeSummary, inspect_subtree
from common.tree import InvalidTreeError, NodeShape, validate_structure
from common.wire import ErrorCode
from replay.limits import RateLimiter, admission_capacity, check_replay_config

_U64 = struct.Struct(">Q")
_SUBTREE_KEY = struct.Struct(">QI")
_COUNTERS_KEY = b"counters"
_MAX_TREE_INDEX = 2**63 - 1

# Persisted counters. `inserts` counts completed valid trees, `samples` trees handed out (a tree
# sampled twice counts twice), `stale_dropped` completed trees never handed out because too old.
COUNTER_NAMES = (
    "next_tree_index",
    "next_ready_seq",
    "learner_version",
    "leases_granted",
    "inserts",
    "samples",
    "sample_batches",
    "stale_dropped",
    "expired",
    "rejected_trees",
    "evicted",
    "subtrees_stored",
    "duplicates",
    "bad_subtrees",
    "bytes_stored_total",
    "next_retire_seq",
    "admission_floor",
    "forfeited_samples",
    "released",
)


class TreeState(StrEnum):
    GROWING = "growing"
    READY = "ready"
    CONSUMED = "consumed"
    STALE = "stale"
    EXPIRED = "expired"
    REJECTED = "rejected"
    EVICTED = "evicted"


_LIVE_STATES = {TreeState.GROWING, TreeState.READY, TreeState.CONSUMED, TreeState.STALE}
_RETIRED_STATES = {TreeState.CONSUMED, TreeState.STALE}


@dataclass
class TreeRecord:
    """What the store knows about one tree (its subtrees' bytes live in `subtrees`)."""

    index: int
    actor_id: str
    state: TreeState
    lease_version: int
    lease_expires: float
    task_id: str | None = None
    n_messages: int = 0
    final_seq: int | None = None
    nbytes: int = 0
    min_version: int | None = None
    max_version: int | None = None
    times_sampled: int = 0
    ready_seq: int | None = None
    retired_seq: int | None = None
    created: float = 0.0
    completed: float | None = None
    reason: str | None = None

    def encode(self) -> bytes:
        data = {name: getattr(self, name) for name in _RECORD_FIELDS}
        data["state"] = self.state.value
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> TreeRecord:
        data = json.loads(raw)
        data["state"] = TreeState(data["state"])
        return cls(**data)

    @property
    def tree_id(self) -> str:
        return str(self.index)

    def staleness(self, learner_version: int) -> int:
        oldest = self.min_version if self.min_version is not None else self.lease_version
        return max(0, learner_version - oldest)


_RECORD_FIELDS = tuple(f.name for f in fields(TreeRecord))


@dataclass(frozen=True)
class IngestItem:
    """A validated subtree message waiting for the group commit."""

    summary: SubtreeSummary
    data: bytes


@dataclass(frozen=True)
class IngestOutcome:
    """Per message: ack (maybe as a duplicate) or a final error code with a reason."""

    tree_id: str
    seq: int
    duplicate: bool = False
    error: ErrorCode | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class LeaseDecision:
    tree_ids: list[str]
    renewed: list[str]
    lost: list[str]
    learner_version: int
    reason: str


@dataclass(frozen=True)
class SampledTree:
    """A sampled tree; `messages` are what the sample's sink made of its stored messages (bytes by default)."""

    record: TreeRecord
    staleness: int
    messages: list[Any]


class ReadPin:
    """The read transaction behind a sample's buffers; a sink that keeps it keeps them valid.

    Why: a sink that sends the buffers themselves (zero-copy) needs the pages until the send is
    done, and LMDB keeps a snapshot's pages only while its transaction is open. A kept pin must be
    released (from the store's thread) once nothing reads the buffers any more.
    """

    def __init__(self, txn: lmdb.Transaction) -> None:
        self._txn = txn
        self.kept = False

    def keep(self) -> Callable[[], None]:
        """Keep the transaction open; returns the call that ends it."""
        self.kept = True
        return self._txn.abort


# Turns a sample's LMDB buffers (valid only during the call, unless it keeps the pin) into the
# trees' messages.
MessageSink = Callable[[list[memoryview], ReadPin], Sequence[Any]]


def copy_messages(views: list[memoryview], pin: ReadPin) -> list[bytes]:
    """The default sink: each message copied into its own bytes."""
    return [bytes(view) for view in views]


@dataclass(frozen=True)
class SampleDecision:
    ready: bool
    reason: str
    trees: list[SampledTree] = field(default_factory=list)


class StoreError(RuntimeError):
    """The store could not complete a transaction (disk full, map full); nothing of it was applied."""


class SampleRequestError(ValueError):
    """A sample request that can never be satisfied (answered with an error, not a wait)."""


class _Rejection(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def subtree_key(index: int, seq: int) -> bytes:
    return _SUBTREE_KEY.pack(index, seq)


def parse_tree_id(tree_id: str) -> int | None:
    """The tree index of a wire tree id: canonical ASCII decimal only (as granted), else None."""
    # str.isdigit() also accepts non-ASCII digits ("²" makes int() raise); a leading zero would alias
    # another tree ("00" is tree 0).
    if not (tree_id.isascii() and tree_id.isdigit()) or len(tree_id) > 19 or (tree_id[0] == "0" and tree_id != "0"):
        return None
    index = int(tree_id)
    return index if index <= _MAX_TREE_INDEX else None


def open_environment(path: Path, map_size_bytes: int, readonly: bool = False) -> lmdb.Environment:
    """Open the store's LMDB environment (readers may open it while the service writes)."""
    if not readonly:
        path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(
        str(path),
        map_size=map_size_bytes,
        max_dbs=8,
        subdir=True,
        readonly=readonly,
        sync=True,
        metasync=True,
        meminit=False,
        max_readers=256,
    )


class TreeStore:
    """The replay store. Not thread-safe: one thread of one process calls it."""

    def __init__(
        self,
        path: str | Path,
        config: ReplayConfig,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.map_size_bytes = int(config.map_size_gb * 1024**3)
        check_replay_config(config, self.map_size_bytes)
        self.limiter = RateLimiter.from_config(config)
        self.clock = clock
        self.rng = rng or random.Random(config.seed)
        self.env = open_environment(self.path, self.map_size_bytes)
        self.db_subtrees = self.env.open_db(b"subtrees")
        self.db_trees = self.env.open_db(b"trees")
        self.db_ready = self.env.open_db(b"ready")
        self.db_batches = self.env.open_db(b"batches")
        self.db_meta = self.env.open_db(b"meta")
        self._load()

    # ------------------------------------------------------------------------------ state (cache)

    def _load(self) -> None:
        """(Re)build every in-memory index from disk."""
        self.counters: dict[str, Any] = dict.fromkeys(COUNTER_NAMES, 0)
        self.live: dict[int, TreeRecord] = {}
        self.shapes: dict[int, dict[int, tuple[int, NodeShape]]] = {}
        self.ready_fifo: deque[int] = deque()
        self.sampleable: list[int] = []
        self.sampleable_pos: dict[int, int] = {}
        self.retired: OrderedDict[int, None] = OrderedDict()
        self.batches: OrderedDict[str, list[int]] = OrderedDict()
        self.live_bytes = 0
        self.retired_bytes = 0
        now = self.clock()
        with self.env.begin() as txn:
            raw = txn.get(_COUNTERS_KEY, db=self.db_meta)
            if raw is not None:
                self.counters.update(json.loads(raw))
            for _, value in txn.cursor(db=self.db_trees):
                record = TreeRecord.decode(value)
                if record.state not in _LIVE_STATES:
                    continue
                self.live[record.index] = record
                self.live_bytes += record.nbytes
                if record.state is TreeState.GROWING:
                    # A restart must not expire the leases of actors that were waiting on us.
                    record.lease_expires = max(record.lease_expires, now + self.config.lease_ttl_s)
                    self.shapes[record.index] = self._read_shapes(txn, record.index)
            for _, value in txn.cursor(db=self.db_ready):
                index = _U64.unpack(value)[0]
                if index in self.live and self.live[index].state is TreeState.READY:
                    self._add_ready(index)
            retired = sorted(
                (r for r in self.live.values() if r.state in _RETIRED_STATES), key=lambda r: r.retired_seq or 0
            )
            for record in retired:
                self.retired[record.index] = None
                self.retired_bytes += record.nbytes
            batch_rows = []
            for key, value in txn.cursor(db=self.db_batches):
                entry = json.loads(value)
                batch_rows.append((entry["seq"], key.decode(), entry["trees"]))
            for _, request_id, trees in sorted(batch_rows):
                self.batches[request_id] = trees

    def _read_shapes(self, txn: lmdb.Transaction, index: int) -> dict[int, tuple[int, NodeShape]]:
        shapes: dict[int, tuple[int, NodeShape]] = {}
        for _, data in self._iter_messages(txn, index):
            summary = inspect_subtree(data)
            self._merge_shapes(shapes, summary)
        return shapes

    @staticmethod
    def _merge_shapes(shapes: dict[int, tuple[int, NodeShape]], summary: SubtreeSummary) -> None:
        seq = summary.header.seq
        for node_id, shape in summary.shapes.items():
            earlier = shapes.get(node_id)
            if earlier is None or earlier[0] < seq:
                shapes[node_id] = (seq, shape)

    def _iter_messages(self, txn: lmdb.Transaction, index: int) -> Iterable[tuple[int, bytes]]:
        cursor = txn.cursor(db=self.db_subtrees)
        prefix = _U64.pack(index)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            yield _SUBTREE_KEY.unpack(key)[1], value

    def _add_ready(self, index: int) -> None:
        if self.config.sampler == "fifo":
            self.ready_fifo.append(index)
        else:
            self.sampleable_pos[index] = len(self.sampleable)
            self.sampleable.append(index)

    def _remove_ready(self, index: int) -> None:
        if self.config.sampler == "fifo":
            self.ready_fifo.remove(index)
            return
        position = self.sampleable_pos.pop(index)
        last = self.sampleable.pop()
        if last != index:
            self.sampleable[position] = last
            self.sampleable_pos[last] = position

    # ------------------------------------------------------------------------------ derived figures

    @property
    def growing(self) -> int:
        return len(self.shapes)

    @property
    def ready_count(self) -> int:
        return len(self.ready_fifo) if self.config.sampler == "fifo" else len(self.sampleable)

    @property
    def started_trees(self) -> int:
        """Trees counted against the staleness budget: valid completed (not stale-dropped) + growing."""
        kept = max(self.counters["inserts"] - self.counters["stale_dropped"], self.counters["admission_floor"])
        return kept + self.growing

    @property
    def _limiter_samples(self) -> float:
        """Samples as the rate limiter sees them: a stale-dropped tree's unused samples count as taken,
        because they never will be; otherwise every stale drop would shrink the insert room for good."""
        return self.counters["samples"] + self.counters["forfeited_samples"]

    @property
    def learner_version(self) -> int:
        return self.counters["learner_version"]

    # ------------------------------------------------------------------------------ transactions

    def _transact(
        self, body: Callable[[lmdb.Transaction], Any], before_commit: Callable[[Any], Any] | None = None
    ) -> Any:
        """Run `body` in one write transaction; on failure nothing is applied and caches are rebuilt.

        `before_commit(result)` runs after the body, before the commit (and its fsync); what it returns
        is returned instead of the body's result. An exception in it aborts the transaction.
        """
        txn = self.env.begin(write=True)
        try:
            result = body(txn)
            txn.put(_COUNTERS_KEY, json.dumps(self.counters).encode(), db=self.db_meta)
            if before_commit is not None:
                result = before_commit(result)
            txn.commit()
        except BaseException as error:
            txn.abort()
            self._load()
            if isinstance(error, lmdb.Error):
                raise StoreError(f"LMDB transaction failed: {error}") from error
            raise
        return result

    def _put_record(self, txn: lmdb.Transaction, record: TreeRecord) -> None:
        txn.put(_U64.pack(record.index), record.encode(), db=self.db_trees)

    def _get_record(self, txn: lmdb.Transaction, index: int) -> TreeRecord | None:
        record = self.live.get(index)
        if record is not None:
            return record
        raw = txn.get(_U64.pack(index), db=self.db_trees)
        return TreeRecord.decode(raw) if raw is not None else None

    # ------------------------------------------------------------------------------ ingestion

    def ingest(self, items: Sequence[IngestItem]) -> list[IngestOutcome]:
        """Store a group of subtrees in one transaction; outcomes are valid once this returns."""
        outcomes: list[IngestOutcome] = []

        def body(txn: lmdb.Transaction) -> None:
            for item in items:
                outcomes.append(self._ingest_one(txn, item))
            self._evict(txn)

        self._transact(body)
        return outcomes

    def _ingest_one(self, txn: lmdb.Transaction, item: IngestItem) -> IngestOutcome:
        header = item.summary.header
        try:
            duplicate = self._store_subtree(txn, item)
        except _Rejection as rejection:
            if rejection.code is ErrorCode.BAD_SUBTREE:
                self.counters["bad_subtrees"] += 1
            return IngestOutcome(header.tree_id, header.seq, error=rejection.code, message=rejection.message)
        return IngestOutcome(header.tree_id, header.seq, duplicate=duplicate)

    def _store_subtree(self, txn: lmdb.Transaction, item: IngestItem) -> bool:
        """Returns True for a duplicate (already stored: ack again, store nothing)."""
        summary = item.summary
        header = summary.header
        index = parse_tree_id(header.tree_id)
        if index is None or index >= self.counters["next_tree_index"]:
            raise _Rejection(ErrorCode.UNKNOWN_TREE, f"tree {header.tree_id!r} was never leased by this replay service")
        key = subtree_key(index, header.seq)
        record = self._get_record(txn, index)
        if record is None:
            raise _Rejection(ErrorCode.UNKNOWN_TREE, f"tree {header.tree_id} is no longer known to this store")
        # LMDB reads its own uncommitted writes, so a duplicate within this batch is seen here too.
        if record.state in _LIVE_STATES and txn.get(key, db=self.db_subtrees) is not None:
            self.counters["duplicates"] += 1
            return True
        if record.state is TreeState.EXPIRED:
            raise _Rejection(ErrorCode.LEASE_EXPIRED, f"tree {header.tree_id}: its lease expired, it was dropped")
        if record.state is TreeState.REJECTED:
            raise _Rejection(ErrorCode.REJECTED_TREE, f"tree {header.tree_id} was rejected: {record.reason}")
        if record.state is not TreeState.GROWING:
            if record.state is TreeState.EVICTED and record.final_seq is not None and header.seq <= record.final_seq:
                self.counters["duplicates"] += 1
                return True
            raise _Rejection(ErrorCode.TREE_COMPLETE, f"tree {header.tree_id} is already complete ({record.state})")
        if header.actor_id != record.actor_id:
            raise _Rejection(
                ErrorCode.BAD_SUBTREE,
                f"tree {header.tree_id} is leased to actor {record.actor_id!r}, not {header.actor_id!r}",
            )
        if record.task_id is not None and header.task_id != record.task_id:
            raise _Rejection(
                ErrorCode.BAD_SUBTREE,
                f"tree {header.tree_id} is task {record.task_id!r}, message says {header.task_id!r}",
            )
        self._check_seq(txn, record, header.seq, header.final)
        shapes = self.shapes[index]
        for node_id, shape in summary.shapes.items():
            earlier = shapes.get(node_id)
            if earlier is not None and (earlier[1].parent_id, earlier[1].depth) != (shape.parent_id, shape.depth):
                raise _Rejection(
                    ErrorCode.BAD_SUBTREE,
                    f"tree {header.tree_id}: node {node_id} re-sent with another parent or depth",
                )
        # Accepted: stage it.
        txn.put(key, item.data, db=self.db_subtrees)
        self._merge_shapes(shapes, summary)
        now = self.clock()
        record.task_id = header.task_id
        record.n_messages += 1
        record.nbytes += len(item.data)
        record.lease_expires = now + self.config.lease_ttl_s
        if header.final:
            record.final_seq = header.seq
        if summary.min_version is not None:
            record.min_version = (
                summary.min_version if record.min_version is None else min(record.min_version, summary.min_version)
            )
        if summary.max_version is not None:
            record.max_version = (
                summary.max_version if record.max_version is None else max(record.max_version, summary.max_version)
            )
        self.live_bytes += len(item.data)
        self.counters["subtrees_stored"] += 1
        self.counters["bytes_stored_total"] += len(item.data)
        if record.final_seq is not None and record.n_messages == record.final_seq + 1:
            self._complete(txn, record)
            if record.state is TreeState.REJECTED:
                raise _Rejection(ErrorCode.REJECTED_TREE, f"tree {header.tree_id} rejected: {record.reason}")
        else:
            self._put_record(txn, record)
        return False

    def _check_seq(self, txn: lmdb.Transaction, record: TreeRecord, seq: int, final: bool) -> None:
        tree_id = record.tree_id
        if record.final_seq is not None:
            if final:
                raise _Rejection(
                    ErrorCode.BAD_SUBTREE, f"tree {tree_id}: seq {seq} is final but seq {record.final_seq} already was"
                )
            if seq > record.final_seq:
                raise _Rejection(
                    ErrorCode.BAD_SUBTREE, f"tree {tree_id}: seq {seq} comes after the final seq {record.final_seq}"
                )
        elif final:
            highest = self._highest_seq(txn, record.index)
            if highest is not None and highest > seq:
                raise _Rejection(
                    ErrorCode.BAD_SUBTREE, f"tree {tree_id}: final seq {seq} is below the already stored seq {highest}"
                )

    def _highest_seq(self, txn: lmdb.Transaction, index: int) -> int | None:
        cursor = txn.cursor(db=self.db_subtrees)
        if not cursor.set_range(_U64.pack(index + 1)):
            if not cursor.last():
                return None
        elif not cursor.prev():
            return None
        found_index, seq = _SUBTREE_KEY.unpack(cursor.key())
        return seq if found_index == index else None

    def _complete(self, txn: lmdb.Transaction, record: TreeRecord) -> None:
        shapes = {node_id: shape for node_id, (_, shape) in self.shapes.pop(record.index).items()}
        try:
            validate_structure(record.tree_id, shapes, complete=True)
        except InvalidTreeError as error:
            self._drop(txn, record, TreeState.REJECTED, str(error))
            self.counters["rejected_trees"] += 1
            return
        record.state = TreeState.READY
        record.completed = self.clock()
        record.ready_seq = self.counters["next_ready_seq"]
        self.counters["next_ready_seq"] += 1
        self.counters["inserts"] += 1
        txn.put(_U64.pack(record.ready_seq), _U64.pack(record.index), db=self.db_ready)
        self._put_record(txn, record)
        self._add_ready(record.index)
        if record.staleness(self.learner_version) > self.config.max_staleness:
            self._retire_stale(txn, record)

    def _retire_stale(self, txn: lmdb.Transaction, record: TreeRecord) -> None:
        self._retire(txn, record, TreeState.STALE)
        self.counters["stale_dropped"] += 1
        if self.limiter is not None:
            unused = self.limiter.samples_per_insert - record.times_sampled
            self.counters["forfeited_samples"] += max(0.0, unused)

    def _drop(self, txn: lmdb.Transaction, record: TreeRecord, state: TreeState, reason: str | None) -> None:
        """Delete a tree's subtrees and keep a tombstone in `state`."""
        keys = [subtree_key(record.index, seq) for seq, _ in self._iter_messages(txn, record.index)]
        for key in keys:
            txn.delete(key, db=self.db_subtrees)
        if record.ready_seq is not None:
            txn.delete(_U64.pack(record.ready_seq), db=self.db_ready)
        self.shapes.pop(record.index, None)
        self.live.pop(record.index, None)
        if record.index in self.retired:
            del self.retired[record.index]
            self.retired_bytes -= record.nbytes
        self.live_bytes -= record.nbytes
        record.state = state
        record.reason = reason
        record.nbytes = 0
        self._put_record(txn, record)

    # ------------------------------------------------------------------------------ leases

    def grant_leases(
        self, actor_id: str, n: int, renew: Sequence[str] = (), release_others: bool = False
    ) -> LeaseDecision:
        """Admission control: grant up to n new trees, renew the listed growing ones.

        `release_others` (an actor's first request after it started): its growing trees not in `renew`
        were abandoned by its previous process, so they are dropped now (counted as `released`).
        """

        def body(txn: lmdb.Transaction) -> LeaseDecision:
            now = self.clock()
            renewed, lost = [], []
            if release_others:
                keep = set(renew)
                abandoned = [
                    r
                    for r in self.live.values()
                    if r.state is TreeState.GROWING and r.actor_id == actor_id and r.tree_id not in keep
                ]
                for record in abandoned:
                    self._drop(txn, record, TreeState.EXPIRED, "actor restarted")
                    self.counters["released"] += 1
            for tree_id in renew:
                index = parse_tree_id(tree_id)
                record = self.live.get(index) if index is not None else None
                if record is not None and record.state is TreeState.GROWING and record.actor_id == actor_id:
                    record.lease_expires = now + self.config.lease_ttl_s
                    self._put_record(txn, record)
                    renewed.append(tree_id)
                else:
                    lost.append(tree_id)
            self._evict(txn)
            allowed, reason = self._admissible(n)
            granted = []
            for _ in range(allowed):
                index = self.counters["next_tree_index"]
                self.counters["next_tree_index"] += 1
                self.counters["leases_granted"] += 1
                record = TreeRecord(
                    index=index,
                    actor_id=actor_id,
                    state=TreeState.GROWING,
                    lease_version=self.learner_version,
                    lease_expires=now + self.config.lease_ttl_s,
                    created=now,
                )
                self.live[index] = record
                self.shapes[index] = {}
                self._put_record(txn, record)
                granted.append(record.tree_id)
            return LeaseDecision(granted, renewed, lost, self.learner_version, reason)

        return self._transact(body)

    def _admissible(self, n: int) -> tuple[int, str]:
        """How many of n leases may be granted now, and why not more."""
        limits: list[tuple[int, str]] = [(n, "")]
        capacity = admission_capacity(self.config.max_staleness, self.learner_version, self.config.trees_per_step)
        limits.append(
            (
                capacity - self.started_trees,
                f"staleness admission: {self.started_trees} trees started of {capacity} allowed at learner "
                f"version {self.learner_version} (max_staleness={self.config.max_staleness})",
            )
        )
        held = len(self.live) - len(self.retired)
        limits.append((self.config.capacity_trees - held, f"store full: {held} unconsumed or growing trees"))
        if self.live_bytes - self.retired_bytes >= self.config.capacity_bytes:
            limits.append((0, f"store full: {self.live_bytes} bytes of unconsumed or growing trees"))
        if self.limiter is not None:
            pending = self.counters["inserts"] + self.growing
            limits.append(
                (
                    self.limiter.inserts_allowed(pending, self._limiter_samples),
                    "rate limiter: inserts are ahead of samples (samples_per_insert band)",
                )
            )
        allowed, reason = min(limits, key=lambda item: item[0])
        allowed = max(0, allowed)
        return allowed, (reason if allowed < n else "")

    def expire_leases(self) -> int:
        """Drop growing trees whose lease ran out; returns how many."""
        now = self.clock()
        expired = [r for r in self.live.values() if r.state is TreeState.GROWING and r.lease_expires < now]
        if not expired:
            return 0

        def body(txn: lmdb.Transaction) -> int:
            for record in expired:
                self._drop(txn, record, TreeState.EXPIRED, "lease expired")
                self.counters["expired"] += 1
            return len(expired)

        return self._transact(body)

    # ------------------------------------------------------------------------------ learner side

    def set_learner_version(self, version: int) -> None:
        """Record the learner's version; retire trees it made too stale."""

        def body(txn: lmdb.Transaction) -> None:
            if version > self.counters["learner_version"]:
                self.counters["learner_version"] = version
            # A learner resuming at a later version on a fresh store must not open a burst of
            # admissions (AReaL #1388): count the trees it has already trained on as started.
            self.counters["admission_floor"] = max(
                self.counters["admission_floor"], version * self.config.trees_per_step
            )
            self._drop_stale(txn)

        self._transact(body)

    def _drop_stale(self, txn: lmdb.Transaction) -> None:
        version = self.learner_version
        candidates = list(self.ready_fifo) if self.config.sampler == "fifo" else list(self.sampleable)
        for index in candidates:
            record = self.live[index]
            if record.staleness(version) > self.config.max_staleness:
                self._retire_stale(txn, record)

    def _retire(self, txn: lmdb.Transaction, record: TreeRecord, state: TreeState) -> None:
        self._remove_ready(record.index)
        if record.ready_seq is not None:
            txn.delete(_U64.pack(record.ready_seq), db=self.db_ready)
        record.state = state
        record.retired_seq = self.counters["next_retire_seq"]
        self.counters["next_retire_seq"] += 1
        self.retired[record.index] = None
        self.retired_bytes += record.nbytes
        self._put_record(txn, record)

    def sample(
        self,
        request_id: str,
        n: int,
        learner_version: int,
        sink: MessageSink | None = None,
        reply: Callable[[SampleDecision], None] | None = None,
    ) -> SampleDecision:
        """Hand out n completed trees (all or none); a repeated request_id returns the same trees.

        The trees' messages are read from a read transaction (the last committed state, which holds
        every subtree of a completed tree) and passed to `sink` as LMDB buffers (valid during that
        call, or until the pin the sink kept is released); its results become the trees' `messages`.
        The default sink copies them into bytes.

        `reply(decision)`, when given, is called with the decision before the bookkeeping commit
        (times sampled, FIFO retirement, the remembered batch) is fsynced, so the answer travels while
        the disk writes: a sample's latency does not include its own fsync. The price: if replay dies
        between the reply and the end of that commit, the same trees can be handed out again after
        the restart (the learner drops trees it has already trained on, see `learner.sampling`). If
        the commit fails, the in-memory state is rebuilt from the store and the error is raised after
        the reply went out.
        """
        if n > self.config.capacity_trees:
            raise SampleRequestError(
                f"asked for {n} trees but the store holds at most replay.capacity_trees={self.config.capacity_trees}"
            )
        sink = sink or copy_messages
        if request_id in self.batches:
            decision = self._replay_batch(request_id, sink)
            if reply is not None:
                reply(decision)
            return decision
        if learner_version > self.learner_version:
            self.set_learner_version(learner_version)

        def body(txn: lmdb.Transaction) -> SampleDecision | list[tuple[TreeRecord, int]]:
            reason = self._sample_block_reason(n)
            if reason is not None:
                return SampleDecision(False, reason)
            chosen = self._choose(n)
            picked = []
            for index in chosen:
                record = self.live[index]
                record.times_sampled += 1
                self.counters["samples"] += 1
                picked.append((record, record.staleness(self.learner_version)))
                if self.config.sampler == "fifo" or (
                    self.config.max_times_sampled and record.times_sampled >= self.config.max_times_sampled
                ):
                    self._retire(txn, record, TreeState.CONSUMED)
                else:
                    self._put_record(txn, record)
            self.counters["sample_batches"] += 1
            self._remember_batch(txn, request_id, chosen)
            return picked

        def answer(outcome: SampleDecision | list[tuple[TreeRecord, int]]) -> SampleDecision:
            decision = (
                outcome
                if isinstance(outcome, SampleDecision)
                else SampleDecision(True, "", self._read_trees(outcome, sink))
            )
            if reply is not None:
                reply(decision)
            return decision

        return self._transact(body, before_commit=answer)

    def _read_trees(self, picked: Sequence[tuple[TreeRecord, int]], sink: MessageSink) -> list[SampledTree]:
        """The picked trees' messages through `sink`, all from one read transaction (zero-copy buffers)."""
        txn = self.env.begin(buffers=True)
        pin = ReadPin(txn)
        try:
            per_tree = [self._message_views(txn, record.index) for record, _ in picked]
            made = sink([view for views in per_tree for view in views], pin)
        finally:
            if not pin.kept:
                txn.abort()
        trees, start = [], 0
        for (record, staleness), views in zip(picked, per_tree, strict=True):
            trees.append(SampledTree(record, staleness, list(made[start : start + len(views)])))
            start += len(views)
        return trees

    def _message_views(self, txn: lmdb.Transaction, index: int) -> list[memoryview]:
        """A tree's messages in seq order as buffers into the map (`txn` must use buffers=True)."""
        cursor = txn.cursor(db=self.db_subtrees)
        prefix = _U64.pack(index)
        views: list[memoryview] = []
        if cursor.set_range(prefix):
            for key, value in cursor:
                if key[: len(prefix)] != prefix:
                    break
                views.append(value)
        return views

    def _sample_block_reason(self, n: int) -> str | None:
        ready = self.ready_count
        if ready < n:
            return f"{ready} completed trees ready, {n} requested ({self.growing} growing)"
        if self.limiter is not None:
            return self.limiter.sample_block_reason(n, self.counters["inserts"], self._limiter_samples)
        return None

    def _choose(self, n: int) -> list[int]:
        if self.config.sampler == "fifo":
            return [self.ready_fifo[i] for i in range(n)]
        return self.rng.sample(self.sampleable, n)

    def _remember_batch(self, txn: lmdb.Transaction, request_id: str, indexes: list[int]) -> None:
        seq = self.counters["sample_batches"]
        entry = json.dumps({"seq": seq, "trees": indexes}).encode()
        txn.put(request_id.encode(), entry, db=self.db_batches)
        self.batches[request_id] = indexes
        while len(self.batches) > self.config.sample_batches_kept:
            old_id, _ = self.batches.popitem(last=False)
            txn.delete(old_id.encode(), db=self.db_batches)

    def _replay_batch(self, request_id: str, sink: MessageSink) -> SampleDecision:
        picked = []
        with self.env.begin() as txn:
            for index in self.batches[request_id]:
                record = self._get_record(txn, index)
                if record is None or record.state not in _LIVE_STATES:
                    return SampleDecision(False, f"request {request_id} was answered before, but its trees are gone")
                picked.append((record, record.staleness(self.learner_version)))
        return SampleDecision(True, "", self._read_trees(picked, sink))

    # ------------------------------------------------------------------------------ capacity

    def _evict(self, txn: lmdb.Transaction) -> None:
        """Evict the oldest retired trees while the store is over either capacity bound."""
        while self.retired and (
            len(self.live) > self.config.capacity_trees or self.live_bytes > self.config.capacity_bytes
        ):
            index = next(iter(self.retired))  # _drop removes it from `retired` and its bytes from retired_bytes
            record = self.live[index]
            self._drop(txn, record, TreeState.EVICTED, None)
            self.counters["evicted"] += 1

    # ------------------------------------------------------------------------------ reading

    def stats(self) -> dict[str, Any]:
        capacity = admission_capacity(self.config.max_staleness, self.learner_version, self.config.trees_per_step)
        return {
            **self.counters,
            "growing": self.growing,
            "ready": self.ready_count,
            "retired_kept": len(self.retired),
            "live_trees": len(self.live),
            "live_bytes": self.live_bytes,
            "retired_bytes": self.retired_bytes,
            "started_trees": self.started_trees,
            "admission_capacity": capacity,
            "sampler": self.config.sampler,
        }

    def close(self) -> None:
        self.env.close()
