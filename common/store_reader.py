"""Reading a sample by reference: a learner on replay's host copies the sampled subtrees out of the LMDB map.

Why: a sample of 64 trees is about 16 MB; through the socket it is copied into ZeroMQ, across
loopback and out again while the actors' ingest competes for the same cores. Read from the map in
the learner's own process it is one memory copy from the page cache (the sample reply then carries
only keys, see `common.wire`).

Decided here:
- `StoreReader().read(store, trees) -> list[list[memoryview]]`: each tree's messages in the order of
  its keys (hex in `SampledTreeInfo.keys`), copied inside one read transaction into one bytes object
  per sample and handed out as read-only slices of it, so nothing refers to the map after it returns
  and a slice keeps its sample's bytes alive. One copy of the whole sample, not one per message:
  measured on 64 trees of 255 KB, 3-4 ms against 9 ms for 64 fresh bytes objects (whose pages the
  allocator maps and faults in one by one). The environment of a path is opened on first use, read-only,
  with LMDB's lock file (its reader table keeps replay's writer from reusing pages a read
  transaction still sees), and kept open; `close()` closes them.
- The store is checked by its id (`meta` key `store_id`, see `replay.store`): a path that holds
  another store (a replay restarted on a fresh directory at the same path) is refused.
- Failures raise `StoreReferenceError`; `permanent` is True when this process cannot use that store
  at all (no such directory here, not an LMDB store, another store's id: e.g. the learner runs on
  another host), False when only this sample failed (a key is gone: its hold ran out). The learner
  client falls back to asking for the same trees by value either way, and stops asking by
  reference after a permanent failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lmdb

from common.wire import SampledTreeInfo, StoreReference

STORE_ID_KEY = b"store_id"
META_DB = b"meta"
MAX_DBS = 8  # named databases of a replay store (replay.store opens it with the same bound)


class StoreReferenceError(RuntimeError):
    """A sample by reference could not be read here; `permanent`: the store is not usable from this process."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class StoreReader:
    """Read-only LMDB environments of replay stores, one per path, opened on first use."""

    def __init__(self) -> None:
        self._envs: dict[str, lmdb.Environment] = {}

    def read(self, store: StoreReference, trees: Sequence[SampledTreeInfo]) -> list[list[memoryview]]:
        env = self._env(store.path)
        try:
            return self._read(env, store, trees)
        except lmdb.MapResizedError:  # replay grew its map: adopt the new size and read again
            env.set_mapsize(0)
            return self._read(env, store, trees)
        except lmdb.Error as error:
            raise StoreReferenceError(f"reading store {store.path}: {error}", permanent=False) from error

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()

    def _env(self, path: str) -> lmdb.Environment:
        env = self._envs.get(path)
        if env is not None:
            return env
        if not (Path(path) / "data.mdb").is_file():
            raise StoreReferenceError(f"no replay store at {path} on this host", permanent=True)
        try:
            env = lmdb.open(path, readonly=True, lock=True, max_dbs=MAX_DBS, subdir=True, create=False)
        except lmdb.Error as error:
            raise StoreReferenceError(f"cannot open the replay store at {path}: {error}", permanent=True) from error
        self._envs[path] = env
        return env

    @staticmethod
    def _read(env: lmdb.Environment, store: StoreReference, trees: Sequence[SampledTreeInfo]) -> list[list[memoryview]]:
        with env.begin(buffers=True) as txn:
            try:
                meta = env.open_db(META_DB, txn=txn, create=False)
                subtrees = env.open_db(store.db.encode(), txn=txn, create=False)
            except lmdb.NotFoundError as error:
                raise StoreReferenceError(f"{store.path} is not a replay store: {error}", permanent=True) from None
            found = txn.get(STORE_ID_KEY, db=meta)
            if found is None or bytes(found).decode(errors="replace") != store.store_id:
                raise StoreReferenceError(
                    f"{store.path} holds another store than the one replay named ({store.store_id})", permanent=True
                )
            views: list[memoryview] = []
            for tree in trees:
                for key in tree.keys or ():
                    value = txn.get(bytes.fromhex(key), db=subtrees)
                    if value is None:
                        raise StoreReferenceError(
                            f"tree {tree.tree_id}: subtree key {key} is gone from {store.path}", permanent=False
                        )
                    views.append(value)
            sizes = [len(view) for view in views]
            joined = memoryview(b"".join(views))  # the one copy, while the transaction holds the pages
        slices, offset = [], 0
        for size in sizes:
            slices.append(joined[offset : offset + size])
            offset += size
        in_order = iter(slices)
        return [[next(in_order) for _ in tree.keys or ()] for tree in trees]
