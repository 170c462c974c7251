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
- `leases`: sha256 of (actor id, lease request id) -> JSON {seq, actor, request_id, trees} (recent
  ones only), so a re-sent lease request (a lost reply, or a copy ZeroMQ delivered after a replay
  restart) is answered with the trees granted the first time instead of taking more admission slots.
- `meta`: counters (JSON), persisted in the same transaction as the changes they count, so the
  admission counters after a restart are exactly those before it.

Tree ids on the wire are the decimal tree index, granted by the store with a lease.

Threads: one writer, and samples answered beside it. A sample must not wait for an ingest commit's
fsync (25-40 ms on a slow disk), so the state lock (`TreeStore._lock`) guards the in-memory state
and is held for a transaction's body but not for its commit. Hence the rules:
- What a commit makes readable (a completed tree) becomes sampleable only after that commit
  (`_publish`); what a body removes (stale trees, evictions) is gone from memory at once. So every
  tree the in-memory state offers is in the snapshot of a read transaction opened under the lock,
  and it stays there: LMDB keeps a snapshot's pages while its transaction is open, whatever later
  commits delete.
- `answer_sample` (any thread) chooses under the lock, reserves the trees (FIFO trees, and trees
  that reach max_times_sampled, leave the ready set; the rate limiter and times_sampled count the
  reservation), reads them and replies without it. The writer records reserved samples whose reply
  went out (`commit_samples`: times sampled, FIFO retirement, the remembered batch) after the reply;
  a failed reply gives its trees back. A crash before that commit may hand them out again (at least
  once; the learner drops (tree_id, times_sampled) it already has). Reservations outlive `_load`,
  which hides their trees again, and a failed bookkeeping commit is retried. A reserved tree stays
  READY (held, not retired) until recorded, so eviction, which takes retired trees only, leaves it
  alone; one retired meanwhile as stale may go, but its reply reads its own snapshot.
- py-lmdb opens every environment with MDB_NOTLS, so read transactions (and pinned ones) may be
  begun and ended on any thread; LMDB's writer lock stays with the writer thread.

Samples by reference (`answer_sample(..., by_reference=True)`): instead of the messages, each
sampled tree carries its subtree keys, and the learner reads them from the map in its own process
(`common.store_reader`), in a read transaction it opens after the reply. So that the keys are still
there, a tree handed out this way is held from eviction for `replay.reference_hold_s` after the
reservation (in memory: a restarted replay holds nothing, and a learner that finds a key gone asks
again by value). While held trees are skipped, the store may stay above its capacity bounds by at
most the trees held. `store_id` (written into `meta` when the store is created) lets a reader check
that a path names this store and not another one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import struct
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import lmdb

from common.config import ReplayConfig
from common.store_reader import MAX_DBS, META_DB, STORE_ID_KEY
from common.subtree import SubtreeSummary, inspect_subtree
from common.tree import InvalidTreeError, NodeShape, validate_structure
from common.wire import ErrorCode
from replay.limits import RateLimiter, admission_capacity, check_replay_config

_U64 = struct.Struct(">Q")
_SUBTREE_KEY = struct.Struct(">QI")
SUBTREES_DB = "subtrees"

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
    "lease_retries",
    "next_lease_seq",
)


def _lease_key(actor_id: str, request_id: str) -> bytes:
    """A fixed-size LMDB key (ids may be longer than LMDB's 511-byte key limit together)."""
    return hashlib.sha256(json.dumps([actor_id, request_id]).encode()).digest()


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
    released (from any thread: MDB_NOTLS) once nothing reads the buffers any more.
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


class _Reply(StrEnum):
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


@dataclass
class _Reservation:
    """Trees chosen for a sample whose bookkeeping is not committed yet (see the module docstring)."""

    key: int
    request_id: str
    indexes: list[int]
    picked: list[tuple[TreeRecord, int]]  # each record as this sample leaves it, and its staleness
    reply: _Reply = _Reply.SENDING


class VersionAheadError(RuntimeError):
    """A sample request carries a learner version the store has not recorded yet (a write comes first)."""


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
        max_dbs=MAX_DBS,
        subdir=True,
        readonly=readonly,
        sync=True,
        metasync=True,
        meminit=False,
        max_readers=256,
    )


class TreeStore:
    """The replay store of one process: one writer thread, samples answered from any thread.

    Every method that writes (ingest, grant_leases, expire_leases, set_learner_version,
    commit_samples, sample) belongs to the writer thread; `answer_sample` and `stats` may be called
    from other threads meanwhile (see the module docstring).
    """

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
        self.db_subtrees = self.env.open_db(SUBTREES_DB.encode())
        self.db_trees = self.env.open_db(b"trees")
        self.db_ready = self.env.open_db(b"ready")
        self.db_batches = self.env.open_db(b"batches")
        self.db_leases = self.env.open_db(b"leases")
        self.db_meta = self.env.open_db(META_DB)
        self._lock = threading.RLock()  # the in-memory state; never held through a commit
        self._writer = threading.Lock()  # one transaction at a time, body and commit
        self._reservations: dict[int, _Reservation] = {}
        self._reservation_keys = itertools.count()
        self._pending: Counter[int] = Counter()  # tree index -> reserved samples not yet recorded
        self._held: dict[int, float] = {}  # tree index -> clock time until which eviction leaves it (by reference)
        self.store_id = self._ensure_store_id()
        self._load()

    def _ensure_store_id(self) -> str:
        """The id written into the store when it was created (by this call if it is new)."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(STORE_ID_KEY, db=self.db_meta)
            if raw is None:
                raw = uuid.uuid4().hex.encode()
                txn.put(STORE_ID_KEY, raw, db=self.db_meta)
        return raw.decode()

    # ------------------------------------------------------------------------------ state (cache)

    def _load(self) -> None:
        """(Re)build every in-memory index from disk; reservations survive and hide their trees again."""
        self.counters: dict[str, Any] = dict.fromkeys(COUNTER_NAMES, 0)
        self.live: dict[int, TreeRecord] = {}
        self.shapes: dict[int, dict[int, tuple[int, NodeShape]]] = {}
        self.ready_fifo: dict[int, None] = {}  # in completion order
        self._unpublished: dict[int, None] = {}  # ready in the open transaction, sampleable once it commits
        self.sampleable: list[int] = []
        self.sampleable_pos: dict[int, int] = {}
        self.retired: OrderedDict[int, None] = OrderedDict()
        self.batches: OrderedDict[str, list[int]] = OrderedDict()
        self.lease_grants: OrderedDict[tuple[str, str], list[int]] = OrderedDict()  # (actor, request id) -> trees
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
                    self._show_ready(index)
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
            lease_rows = []
            for _, value in txn.cursor(db=self.db_leases):
                entry = json.loads(value)
                lease_rows.append((entry["seq"], entry["actor"], entry["request_id"], entry["trees"]))
            for _, actor, request_id, trees in sorted(lease_rows):
                self.lease_grants[actor, request_id] = trees
        self._committed_inserts = self.counters["inserts"]
        self._pending = Counter(i for r in self._reservations.values() for i in r.indexes)
        for index in self._pending:
            if index in self.live and self._hidden(index):
                self._remove_ready(index)

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
        """A tree completed in the open transaction: sampleable once that commits (`_publish`)."""
        self._unpublished[index] = None

    def _publish(self) -> None:
        """After a commit: its completed trees become sampleable, its inserts count for the limiter."""
        for index in self._unpublished:
            self._show_ready(index)
        self._unpublished.clear()
        self._committed_inserts = self.counters["inserts"]

    def _show_ready(self, index: int, in_order: bool = False) -> None:
        if self.config.sampler != "fifo":
            self.sampleable_pos[index] = len(self.sampleable)
            self.sampleable.append(index)
            return
        self.ready_fifo[index] = None
        if in_order:  # a tree given back: back to its place in completion order
            self.ready_fifo = dict.fromkeys(sorted(self.ready_fifo, key=lambda i: self.live[i].ready_seq or 0))

    def _is_shown(self, index: int) -> bool:
        return index in (self.ready_fifo if self.config.sampler == "fifo" else self.sampleable_pos)

    def _remove_ready(self, index: int) -> None:
        """Take a tree out of the ready set (a no-op for one not in it: reserved, or already out)."""
        if index in self._unpublished:
            del self._unpublished[index]
            return
        if self.config.sampler == "fifo":
            self.ready_fifo.pop(index, None)
            return
        position = self.sampleable_pos.pop(index, None)
        if position is None:
            return
        last = self.sampleable.pop()
        if last != index:
            self.sampleable[position] = last
            self.sampleable_pos[last] = position

    def _used_up(self, times_sampled: int) -> bool:
        """Whether a tree sampled this often retires (FIFO: after one sample)."""
        limit = self.config.max_times_sampled
        return self.config.sampler == "fifo" or bool(limit and times_sampled >= limit)

    def _hidden(self, index: int) -> bool:
        """Whether a ready tree's reservations keep it out of the ready set until they are recorded."""
        pending = self._pending.get(index, 0)
        return pending > 0 and self._used_up(self.live[index].times_sampled + pending)

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
        """Samples as the rate limiter sees them: reserved ones count, and a stale-dropped tree's unused
        samples count as taken, because they never will be; otherwise every stale drop would shrink
        the insert room for good."""
        return self.counters["samples"] + self.counters["forfeited_samples"] + self._pending.total()

    @property
    def learner_version(self) -> int:
        return self.counters["learner_version"]

    # ------------------------------------------------------------------------------ transactions

    def _transact(self, body: Callable[[lmdb.Transaction], Any]) -> Any:
        """Run `body` in one write transaction; on failure nothing is applied and caches are rebuilt.

        The body runs under the state lock, the commit (and its fsync) without it, so that samples are
        answered while the disk writes; `_publish` then makes what the commit stored sampleable.
        """
        with self._writer:
            with self._lock:
                txn = self.env.begin(write=True)
                try:
                    result = body(txn)
                    txn.put(_COUNTERS_KEY, json.dumps(self.counters).encode(), db=self.db_meta)
                except BaseException as error:
                    self._abandon(txn, error)
                    raise
            try:
                self._commit(txn)
            except BaseException as error:
                with self._lock:
                    self._abandon(txn, error)
                raise
            with self._lock:
                self._publish()
        return result

    def _commit(self, txn: lmdb.Transaction) -> None:
        """Commit a write transaction and wait for the disk (the state lock is free meanwhile)."""
        txn.commit()

    def _abandon(self, txn: lmdb.Transaction, error: BaseException) -> None:
        txn.abort()
        self._load()
        if isinstance(error, lmdb.Error):
            raise StoreError(f"LMDB transaction failed: {error}") from error

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
            taken = record.times_sampled + self._pending.get(record.index, 0)
            self.counters["forfeited_samples"] += max(0.0, self.limiter.samples_per_insert - taken)

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
        self,
        actor_id: str,
        n: int,
        renew: Sequence[str] = (),
        release_others: bool = False,
        request_id: str | None = None,
    ) -> LeaseDecision:
        """Admission control: grant up to n new trees, renew the listed growing ones.

        `release_others` (an actor's first request after it started): its growing trees not in `renew`
        were abandoned by its previous process, so they are dropped now (counted as `released`).
        `request_id` makes the grant idempotent: a request id this actor used before gets the
        trees granted the first time that are still growing, its renewals are applied again, and
        nothing new is granted or released (counted as `lease_retries`).
        """

        def body(txn: lmdb.Transaction) -> LeaseDecision:
            now = self.clock()
            renewed, lost = [], []
            earlier = self.lease_grants.get((actor_id, request_id)) if request_id is not None else None
            if release_others and earlier is None:
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
            if earlier is not None:
                self.counters["lease_retries"] += 1
                still = [
                    self.live[i].tree_id for i in earlier if i in self.live and self.live[i].state is TreeState.GROWING
                ]
                return LeaseDecision(still, renewed, lost, self.learner_version, "")
            self._evict(txn)
            allowed, reason = self._admissible(n)
            granted: list[int] = []
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
                granted.append(index)
            if request_id is not None:
                self._remember_lease(txn, request_id, actor_id, granted)
            return LeaseDecision([self.live[i].tree_id for i in granted], renewed, lost, self.learner_version, reason)

        return self._transact(body)

    def _remember_lease(self, txn: lmdb.Transaction, request_id: str, actor_id: str, indexes: list[int]) -> None:
        seq = self.counters["next_lease_seq"]
        self.counters["next_lease_seq"] += 1
        entry = {"seq": seq, "actor": actor_id, "request_id": request_id, "trees": indexes}
        txn.put(_lease_key(actor_id, request_id), json.dumps(entry).encode(), db=self.db_leases)
        self.lease_grants[actor_id, request_id] = indexes
        while len(self.lease_grants) > self.config.lease_requests_kept:
            (old_actor, old_id), _ = self.lease_grants.popitem(last=False)
            txn.delete(_lease_key(old_actor, old_id), db=self.db_leases)

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
        by_reference: bool = False,
    ) -> SampleDecision:
        """Writer thread: record a newer learner version, answer the sample, then record it.

        What the service does on two threads (`answer_sample` and `commit_samples`), in one call.
        `reply(decision)` is called before the sample's bookkeeping commit, so a sample's latency
        does not include its own fsync; if replay dies between the two, the same trees can be handed
        out again after the restart (the learner drops trees it has already trained on, see
        `learner.sampling`). If that commit fails, the error is raised after the reply went out.
        """
        try:
            try:
                return self.answer_sample(request_id, n, learner_version, sink, reply, by_reference)
            except VersionAheadError:
                self.set_learner_version(learner_version)
                return self.answer_sample(request_id, n, learner_version, sink, reply, by_reference)
        finally:
            self.commit_samples()

    def answer_sample(
        self,
        request_id: str,
        n: int,
        learner_version: int,
        sink: MessageSink | None = None,
        reply: Callable[[SampleDecision], None] | None = None,
        by_reference: bool = False,
    ) -> SampleDecision:
        """Any thread: hand out n completed trees (all or none); a repeated request_id gets the same trees.

        With `by_reference`, each tree's `messages` are its subtree keys (bytes, seq order) instead,
        and the trees are held from eviction for `replay.reference_hold_s` (the module docstring).

        Writes nothing and never waits for a commit (only for a transaction body, which holds the
        state lock): the trees are reserved, read from a read transaction (the last committed state,
        which holds every subtree of a sampleable tree) and passed to `sink` as LMDB buffers (valid
        during that call, or until the pin the sink kept is released); its results become the trees'
        `messages` (the default sink copies them into bytes). `reply(decision)`, when given, is then
        called; the writer records the sample in its next `commit_samples`, or gives the trees back
        if reading or replying raised. Raises VersionAheadError when `learner_version` is newer than
        the store's (the writer records it first, `set_learner_version`), and StoreError when LMDB
        could not be read.
        """
        if n > self.config.capacity_trees:
            raise SampleRequestError(
                f"asked for {n} trees but the store holds at most replay.capacity_trees={self.config.capacity_trees}"
            )
        with self._lock:
            plan = self._plan_sample(request_id, n, learner_version)
        if isinstance(plan, SampleDecision):
            if reply is not None:
                reply(plan)
            return plan
        picked, txn, reservation = plan
        if by_reference:
            self._hold(record.index for record, _ in picked)
        try:
            if by_reference:
                trees = self._read_keys(txn, picked)
            else:
                trees = self._read_trees(txn, picked, sink or copy_messages)
            decision = SampleDecision(True, "", trees)
            if reply is not None:
                reply(decision)
        except BaseException as error:
            self._settle(reservation, _Reply.FAILED)
            if isinstance(error, lmdb.Error):
                raise StoreError(f"LMDB read failed: {error}") from error
            raise
        self._settle(reservation, _Reply.SENT)
        return decision

    def _plan_sample(
        self, request_id: str, n: int, learner_version: int
    ) -> SampleDecision | tuple[list[tuple[TreeRecord, int]], lmdb.Transaction, _Reservation | None]:
        """Under the lock: the trees to send and the read transaction to read them from, or a refusal."""
        reservation = None
        picked = self._retry_picks(request_id)
        if isinstance(picked, SampleDecision):
            return picked
        if picked is None:
            if learner_version > self.learner_version:
                raise VersionAheadError(f"learner version {learner_version} is ahead of {self.learner_version}")
            reason = self._sample_block_reason(n)
            if reason is not None:
                return SampleDecision(False, reason)
            reservation = self._reserve(request_id, n)
            picked = reservation.picked
        try:
            # Begun under the lock: no body can delete a picked tree before this snapshot exists.
            txn = self.env.begin(buffers=True)
        except lmdb.Error as error:
            self._settle(reservation, _Reply.FAILED)
            raise StoreError(f"LMDB read failed: {error}") from error
        return picked, txn, reservation

    def _reserve(self, request_id: str, n: int) -> _Reservation:
        """Choose n trees and reserve them; FIFO trees (and trees sampled up to the limit) leave the ready set."""
        picked = []
        chosen = self._choose(n)
        for index in chosen:
            record = self.live[index]
            self._pending[index] += 1
            times = record.times_sampled + self._pending[index]
            state = TreeState.CONSUMED if self._used_up(times) else record.state
            picked.append((replace(record, times_sampled=times, state=state), record.staleness(self.learner_version)))
            if self._hidden(index):
                self._remove_ready(index)
        reservation = _Reservation(next(self._reservation_keys), request_id, chosen, picked)
        self._reservations[reservation.key] = reservation
        return reservation

    def _settle(self, reservation: _Reservation | None, outcome: _Reply) -> None:
        if reservation is not None:
            with self._lock:
                reservation.reply = outcome

    def _retry_picks(self, request_id: str) -> list[tuple[TreeRecord, int]] | SampleDecision | None:
        """A repeated request's trees (reserved or recorded), a refusal if they are gone, or None if new."""
        reserved = next(
            (r for r in self._reservations.values() if r.request_id == request_id and r.reply is not _Reply.FAILED),
            None,
        )
        if reserved is not None:
            indexes = reserved.indexes
            shown = {record.index: record for record, _ in reserved.picked}
        elif request_id in self.batches:
            indexes = self.batches[request_id]
            shown = {}
        else:
            return None
        picked = []
        for index in indexes:
            record = self.live.get(index)
            if record is None:
                return SampleDecision(False, f"request {request_id} was answered before, but its trees are gone")
            copy = shown[index] if index in shown else replace(record)
            picked.append((copy, record.staleness(self.learner_version)))
        return picked

    def commit_samples(self) -> int:
        """Writer thread: record every reserved sample whose reply went out; give back those that failed.

        Records times sampled, FIFO (or max_times_sampled) retirement and the batch for retries.
        Returns how many samples were settled.
        """
        with self._lock:
            done = [r for r in self._reservations.values() if r.reply is not _Reply.SENDING]
        if not done:
            return 0

        def body(txn: lmdb.Transaction) -> None:
            for reservation in done:
                if reservation.reply is _Reply.SENT:
                    self._record_sample(txn, reservation)
                else:
                    self._give_back(txn, reservation)

        self._transact(body)
        with self._lock:
            for reservation in done:
                del self._reservations[reservation.key]
        return len(done)

    def _record_sample(self, txn: lmdb.Transaction, reservation: _Reservation) -> None:
        for index in reservation.indexes:
            self._unpend(index)
            self.counters["samples"] += 1
            record = self.live.get(index)
            if record is None:  # stale, then evicted, while its reply was out
                continue
            record.times_sampled += 1
            if record.state is TreeState.READY and self._used_up(record.times_sampled):
                self._retire(txn, record, TreeState.CONSUMED)
            else:
                self._put_record(txn, record)
        self.counters["sample_batches"] += 1
        self._remember_batch(txn, reservation.request_id, reservation.indexes)

    def _give_back(self, txn: lmdb.Transaction, reservation: _Reservation) -> None:
        """A reservation whose reply never went out: its trees are sampleable again (unless stale by now)."""
        for index in reservation.indexes:
            self._unpend(index)
            record = self.live.get(index)
            if record is None or record.state is not TreeState.READY or self._is_shown(index) or self._hidden(index):
                continue
            if record.staleness(self.learner_version) > self.config.max_staleness:
                self._retire_stale(txn, record)
            else:
                self._show_ready(index, in_order=True)

    def _unpend(self, index: int) -> None:
        self._pending[index] -= 1
        if self._pending[index] <= 0:
            del self._pending[index]

    def _read_trees(
        self, txn: lmdb.Transaction, picked: Sequence[tuple[TreeRecord, int]], sink: MessageSink
    ) -> list[SampledTree]:
        """The picked trees' messages through `sink`, all from `txn` (buffers=True: zero-copy views)."""
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

    def _read_keys(self, txn: lmdb.Transaction, picked: Sequence[tuple[TreeRecord, int]]) -> list[SampledTree]:
        """The picked trees with their subtree keys (bytes, seq order) as `messages`; ends `txn`."""
        try:
            trees = []
            for record, staleness in picked:
                # Not _iter_messages: this txn gives buffers (memoryview keys), like _message_views.
                cursor = txn.cursor(db=self.db_subtrees)
                prefix = _U64.pack(record.index)
                keys: list[bytes] = []
                if cursor.set_range(prefix):
                    for key in cursor.iternext(keys=True, values=False):
                        if bytes(key[: len(prefix)]) != prefix:
                            break
                        keys.append(bytes(key))
                trees.append(SampledTree(record, staleness, keys))
            return trees
        finally:
            txn.abort()

    def _hold(self, indexes: Iterable[int]) -> None:
        """Keep these trees from eviction for reference_hold_s (a sample by reference names their keys)."""
        until = self.clock() + self.config.reference_hold_s
        with self._lock:
            for index in indexes:
                self._held[index] = until

    def _current_holds(self) -> dict[int, float]:
        """The holds that have not run out (expired ones are forgotten); under the lock."""
        now = self.clock()
        for index in [i for i, until in self._held.items() if until <= now]:
            del self._held[index]
        return self._held

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
            return self.limiter.sample_block_reason(n, self._committed_inserts, self._limiter_samples)
        return None

    def _choose(self, n: int) -> list[int]:
        if self.config.sampler == "fifo":
            return list(itertools.islice(self.ready_fifo, n))
        return self.rng.sample(self.sampleable, n)

    def _remember_batch(self, txn: lmdb.Transaction, request_id: str, indexes: list[int]) -> None:
        seq = self.counters["sample_batches"]
        entry = json.dumps({"seq": seq, "trees": indexes}).encode()
        txn.put(request_id.encode(), entry, db=self.db_batches)
        self.batches[request_id] = indexes
        while len(self.batches) > self.config.sample_batches_kept:
            old_id, _ = self.batches.popitem(last=False)
            txn.delete(old_id.encode(), db=self.db_batches)

    # ------------------------------------------------------------------------------ capacity

    def _evict(self, txn: lmdb.Transaction) -> None:
        """Evict the oldest retired trees while the store is over either capacity bound."""
        held = self._current_holds()
        while self.retired and (
            len(self.live) > self.config.capacity_trees or self.live_bytes > self.config.capacity_bytes
        ):
            # _drop removes it from `retired` and its bytes from retired_bytes; held trees (few) are skipped
            index = next((i for i in self.retired if i not in held), None)
            if index is None:
                break
            record = self.live[index]
            self._drop(txn, record, TreeState.EVICTED, None)
            self.counters["evicted"] += 1

    # ------------------------------------------------------------------------------ reading

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        capacity = admission_capacity(self.config.max_staleness, self.learner_version, self.config.trees_per_step)
        return {
            **self.counters,
            "samples_pending": self._pending.total(),
            "growing": self.growing,
            "ready": self.ready_count,
            "retired_kept": len(self.retired),
            "held_for_reference": len(self._current_holds()),
            "live_trees": len(self.live),
            "live_bytes": self.live_bytes,
            "retired_bytes": self.retired_bytes,
            "started_trees": self.started_trees,
            "admission_capacity": capacity,
            "sampler": self.config.sampler,
        }

    def clear_stale_readers(self) -> int:
        """Free the reader slots of dead processes (a learner killed inside a read of a sample by reference):
        LMDB keeps every page such a slot's snapshot sees, so the map would fill up. Any thread."""
        return int(self.env.reader_check())

    def close(self) -> None:
        self.env.close()
