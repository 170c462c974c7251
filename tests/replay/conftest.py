"""Shared helpers for the replay store tests: small configs, a fake clock, tree and message builders.

Tests run with `--import-mode=importlib`, so test modules cannot import this file; the helpers are
handed to them as the `kit` fixture (a namespace of the functions below plus `open`, `clock`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from common.config import ReplayConfig
from common.subtree import SubtreeHeader, encode_subtree, inspect_subtree
from common.tree import FinishReason, TurnNode, TurnTree
from replay.store import _U64, IngestItem, IngestOutcome, TreeRecord, TreeStore
from replay.synthetic import random_tree, tree_messages

ACTOR = "actor-a"
TASK = "task-1"
MAP_SIZE_GB = 0.05
CAPACITY_BYTES = 20 * 1024 * 1024  # well below 90% of the 0.05 GiB map


def make_config(**overrides: Any) -> ReplayConfig:
    """A small store: tiny map, no admission pressure unless a test asks for it."""
    fields: dict[str, Any] = {
        "map_size_gb": MAP_SIZE_GB,
        "capacity_bytes": CAPACITY_BYTES,
        "capacity_trees": 1000,
        "trees_per_step": 4,
        "max_staleness": 1000,
        "lease_ttl_s": 100.0,
        "sample_batches_kept": 16,
    }
    fields.update(overrides)
    return ReplayConfig(**fields)


class FakeClock:
    """An injectable clock that only moves when a test moves it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


StoreFactory = Callable[..., TreeStore]


@pytest.fixture
def open_store(tmp_path: Path, clock: FakeClock) -> Iterator[StoreFactory]:
    """`open_store(config=None, name="store", **kw)` opens a store under tmp_path.

    Every store opened here (or by `kit.reopen`) is closed at teardown (closing twice is harmless).
    """
    opened: list[TreeStore] = []

    def factory(config: ReplayConfig | None = None, name: str = "store", **kwargs: Any) -> TreeStore:
        kwargs.setdefault("clock", clock)
        store = TreeStore(tmp_path / name, config or make_config(), **kwargs)
        opened.append(store)
        return store

    factory.opened = opened  # type: ignore[attr-defined]
    yield factory
    for store in opened:
        store.close()


def reopen(store: TreeStore, **kwargs: Any) -> TreeStore:
    """Close a store and open the same directory again (what a restarted service does)."""
    store.close()
    kwargs.setdefault("clock", store.clock)
    return TreeStore(store.path, store.config, **kwargs)


# ------------------------------------------------------------------------------------ trees


def make_tree(
    tree_id: str,
    version: int = 0,
    actor_id: str = ACTOR,
    task_id: str = TASK,
    n_nodes: int = 9,
    seed: int = 0,
    tokens_per_turn: int = 6,
) -> TurnTree:
    """A valid random tree; the same seed gives the same shape (and byte size for same-length ids)."""
    return random_tree(
        np.random.default_rng(seed),
        tree_id,
        task_id=task_id,
        actor_id=actor_id,
        n_nodes=n_nodes,
        tokens_per_turn=tokens_per_turn,
        obs_tokens=3,
        prompt_tokens=5,
        version=version,
        vocab=1000,
    )


def make_messages(tree_id: str, version: int = 0, nodes_per_message: int = 4, **kwargs: Any) -> list[bytes]:
    """A tree's subtree messages, seq 0.. with the last final (9 nodes / 4 per message = 3 messages)."""
    return tree_messages(make_tree(tree_id, version=version, **kwargs), nodes_per_message=nodes_per_message)


def as_items(messages: Sequence[bytes]) -> list[IngestItem]:
    return [IngestItem(inspect_subtree(m), m) for m in messages]


def ingest(store: TreeStore, messages: Sequence[bytes]) -> list[IngestOutcome]:
    return store.ingest(as_items(messages))


def ingest_ok(store: TreeStore, messages: Sequence[bytes]) -> list[IngestOutcome]:
    """Ingest and insist that every message was acked."""
    outcomes = ingest(store, messages)
    assert all(o.ok for o in outcomes), outcomes
    return outcomes


def complete_tree(store: TreeStore, tree_id: str, version: int = 0, **kwargs: Any) -> list[bytes]:
    """Send a whole valid tree to the store (it must complete) and return its messages."""
    messages = make_messages(tree_id, version=version, **kwargs)
    ingest_ok(store, messages)
    return messages


def lease(store: TreeStore, n: int, actor_id: str = ACTOR) -> list[str]:
    return store.grant_leases(actor_id, n).tree_ids


def turn(
    node_id: int,
    parent_id: int,
    depth: int,
    leaf: bool = False,
    reward: float | None = None,
    version: int = 0,
    tokens: int = 3,
) -> TurnNode:
    """A generated turn (or the prompt root when parent_id is -1), for hand-made trees."""
    if parent_id == -1:
        return TurnNode(
            node_id=node_id,
            parent_id=-1,
            depth=0,
            obs_ids=np.arange(4, dtype=np.int32),
            token_ids=np.zeros(0, np.int32),
            logprobs=np.zeros(0, np.float32),
            versions=np.zeros(0, np.int32),
            finish_reason=FinishReason.PROMPT,
        )
    return TurnNode(
        node_id=node_id,
        parent_id=parent_id,
        depth=depth,
        obs_ids=np.arange(2, dtype=np.int32),
        token_ids=np.arange(tokens, dtype=np.int32),
        logprobs=np.full(tokens, -0.5, np.float32),
        versions=np.full(tokens, version, np.int32),
        finish_reason=FinishReason.ANSWER if leaf else FinishReason.TOOL_CALL,
        tool_call=None if leaf else "call",
        reward=reward,
        is_leaf=leaf,
    )


def message(
    tree_id: str,
    seq: int,
    nodes: Sequence[TurnNode],
    final: bool = False,
    actor_id: str = ACTOR,
    task_id: str = TASK,
) -> bytes:
    """One hand-made subtree message."""
    return encode_subtree(SubtreeHeader(tree_id, task_id, actor_id, seq=seq, final=final), nodes)


# ------------------------------------------------------------------------------------ disk views


def disk_record(store: TreeStore, tree_id: str) -> TreeRecord | None:
    """The tree's record as committed to LMDB (not the in-memory cache)."""
    with store.env.begin() as txn:
        raw = txn.get(_U64.pack(int(tree_id)), db=store.db_trees)
    return TreeRecord.decode(raw) if raw is not None else None


def disk_subtree_count(store: TreeStore, tree_id: str | None = None) -> int:
    """Subtree rows on disk, of one tree or of all."""
    prefix = _U64.pack(int(tree_id)) if tree_id is not None else b""
    with store.env.begin() as txn:
        return sum(1 for key, _ in txn.cursor(db=store.db_subtrees) if key.startswith(prefix))


def tree_ids(decision: Any) -> list[str]:
    return [tree.record.tree_id for tree in decision.trees]


def _track(factory: StoreFactory, store: TreeStore) -> TreeStore:
    factory.opened.append(store)  # type: ignore[attr-defined]
    return store


@pytest.fixture
def kit(open_store: StoreFactory, clock: FakeClock) -> SimpleNamespace:
    return SimpleNamespace(
        open=open_store,
        clock=clock,
        config=make_config,
        reopen=lambda store, **kw: _track(open_store, reopen(store, **kw)),
        make_tree=make_tree,
        messages=make_messages,
        items=as_items,
        ingest=ingest,
        ingest_ok=ingest_ok,
        complete=complete_tree,
        lease=lease,
        turn=turn,
        message=message,
        disk_record=disk_record,
        disk_subtrees=disk_subtree_count,
        ids=tree_ids,
        ACTOR=ACTOR,
        TASK=TASK,
        MAP_SIZE_GB=MAP_SIZE_GB,
    )
