"""Export stored trees as Parquet: one row per node, with the tree's identity and state as columns.

Reads the LMDB store read-only, so it works while the service is running. A node re-sent in a
later message of its tree (to add its reward) appears once, as its latest version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.subtree import subtree_batch
from replay.store import TreeRecord, TreeState, open_environment, subtree_key

_EXPORTED_STATES = {TreeState.READY, TreeState.CONSUMED, TreeState.STALE}


def _tree_table(record: TreeRecord, messages: list[bytes]) -> pa.Table:
    batches = []
    for data in messages:
        header, batch = subtree_batch(data)
        n = batch.num_rows
        identity = {
            "tree_id": pa.array([record.tree_id] * n, pa.string()),
            "task_id": pa.array([header.task_id] * n, pa.string()),
            "actor_id": pa.array([header.actor_id] * n, pa.string()),
            "seq": pa.array([header.seq] * n, pa.int32()),
            "tree_state": pa.array([record.state.value] * n, pa.string()),
            "times_sampled": pa.array([record.times_sampled] * n, pa.int32()),
        }
        columns = {**identity, **{name: batch.column(name) for name in batch.schema.names}}
        batches.append(pa.table(columns))
    table = pa.concat_tables(batches)
    node_ids = table.column("node_id").to_numpy()
    if len(np.unique(node_ids)) != len(node_ids):
        # Keep each node's last appearance (messages are in seq order).
        last: dict[int, int] = {}
        for row, node_id in enumerate(node_ids.tolist()):
            last[node_id] = row
        table = table.take(pa.array(sorted(last.values()), pa.int64()))
    return table


def export_parquet(store_dir: Path, out: Path, include_growing: bool = False) -> dict[str, Any]:
    """Write every complete (optionally also growing) tree to `out`; returns counts."""
    env = open_environment(store_dir, map_size_bytes=1 << 20, readonly=True)
    states = _EXPORTED_STATES | ({TreeState.GROWING} if include_growing else set())
    tables: list[pa.Table] = []
    trees = 0
    try:
        db_trees = env.open_db(b"trees", create=False)
        db_subtrees = env.open_db(b"subtrees", create=False)
        with env.begin() as txn:
            for _, raw in txn.cursor(db=db_trees):
                record = TreeRecord.decode(raw)
                if record.state not in states:
                    continue
                cursor = txn.cursor(db=db_subtrees)
                messages: list[bytes] = []
                if cursor.set_range(subtree_key(record.index, 0)):
                    for key, value in cursor:
                        if key[:8] != subtree_key(record.index, 0)[:8]:
                            break
                        messages.append(bytes(value))
                if messages:
                    tables.append(_tree_table(record, messages))
                    trees += 1
    finally:
        env.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = pa.table({"tree_id": pa.array([], pa.string())})
    pq.write_table(table, out)
    return {"trees": trees, "rows": table.num_rows, "out": str(out)}
