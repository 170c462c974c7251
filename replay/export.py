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

from common.subtree import SCHEMA_V1, subtree_batch
from replay.store import TreeRecord, TreeState, open_environment, subtree_key

_EXPORTED_STATES = {TreeState.READY, TreeState.CONSUMED, TreeState.STALE}

# The tree's identity and state, then the v1 node columns: the schema of every export, empty or not.
IDENTITY_FIELDS = [
    pa.field("tree_id", pa.string(), nullable=False),
    pa.field("task_id", pa.string(), nullable=False),
    pa.field("actor_id", pa.string(), nullable=False),
    pa.field("seq", pa.int32(), nullable=False),
    pa.field("tree_state", pa.string(), nullable=False),
    pa.field("times_sampled", pa.int32(), nullable=False),
]
EXPORT_SCHEMA = pa.schema([*IDENTITY_FIELDS, *SCHEMA_V1])


def _tree_table(record: TreeRecord, messages: list[bytes]) -> pa.Table:
    batches = []
    for data in messages:
        header, batch = subtree_batch(data)
        n = batch.num_rows
        identity = [
            pa.array([record.tree_id] * n, pa.string()),
            pa.array([header.task_id] * n, pa.string()),
            pa.array([header.actor_id] * n, pa.string()),
            pa.array([header.seq] * n, pa.int32()),
            pa.array([record.state.value] * n, pa.string()),
            pa.array([record.times_sampled] * n, pa.int32()),
        ]
        columns = identity + [batch.column(field.name) for field in SCHEMA_V1]
        batches.append(pa.Table.from_arrays(columns, schema=EXPORT_SCHEMA))
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
    table = pa.concat_tables(tables) if tables else EXPORT_SCHEMA.empty_table()
    pq.write_table(table, out)
    return {"trees": trees, "rows": table.num_rows, "out": str(out)}
