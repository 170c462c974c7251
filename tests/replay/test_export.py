"""`at2po replay export`: stored trees as Parquet, one row per node, readable by pyarrow and pandas."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from common.subtree import SCHEMA_V1
from common.tree import TurnNode, TurnTree
from ops.cli import app

runner = CliRunner()
IDENTITY_COLUMNS = ["tree_id", "task_id", "actor_id", "seq", "tree_state", "times_sampled"]
COLUMNS = IDENTITY_COLUMNS + SCHEMA_V1.names


def export(store_dir: Path, out: Path, *extra: str) -> SimpleNamespace:
    result = runner.invoke(app, ["replay", "export", "--dir", str(store_dir), "--out", str(out), *extra])
    return SimpleNamespace(code=result.exit_code, stdout=result.stdout, output=result.output)


def build_store(kit: SimpleNamespace) -> tuple[Path, dict[str, TurnTree]]:
    """Tree 0: consumed, node 2 re-sent with its reward; trees 1 and 2: ready; tree 3: still growing."""
    store = kit.open()
    assert kit.lease(store, 4) == ["0", "1", "2", "3"]
    turn = kit.turn
    first = [turn(0, -1, 0), turn(1, 0, 1), turn(2, 0, 1)]
    completing = [turn(2, 0, 1, leaf=True, reward=1.0), turn(3, 1, 2, leaf=True, reward=0.25)]
    kit.ingest_ok(store, [kit.message("0", 0, first), kit.message("0", 1, completing, final=True)])
    hand_made = TurnTree.from_nodes("0", kit.TASK, kit.ACTOR, [first[0], first[1], *completing])
    trees = {"0": hand_made}
    for tree_id, seed in (("1", 11), ("2", 12)):
        kit.complete(store, tree_id, seed=seed, n_nodes=7, nodes_per_message=3, tokens_per_turn=5)
        trees[tree_id] = kit.make_tree(tree_id, seed=seed, n_nodes=7, tokens_per_turn=5)
    kit.ingest_ok(store, kit.messages("3", seed=13, n_nodes=7, nodes_per_message=3)[:1])
    decision = store.sample("request-1", 1, 0)
    assert decision.ready and kit.ids(decision) == ["0"]
    store.close()
    return store.path, trees


def assert_node_row(row: dict, node: TurnNode) -> None:
    assert row["parent_id"] == node.parent_id and row["depth"] == node.depth
    assert list(row["obs_ids"]) == node.obs_ids.tolist()
    assert list(row["token_ids"]) == node.token_ids.tolist()
    assert np.array_equal(np.asarray(row["logprobs"], np.float32), node.logprobs)
    assert list(row["versions"]) == node.versions.tolist()
    topk = [list(r) for r in row["topk_logprobs"]]
    assert np.array_equal(np.asarray(topk, np.float32).reshape(node.topk_logprobs.shape), node.topk_logprobs)
    assert row["finish_reason"] == node.finish_reason.value
    assert row["tool_call"] == node.tool_call
    assert row["is_leaf"] == node.is_leaf
    if node.reward is None:
        assert row["reward"] is None or np.isnan(row["reward"])
    else:
        assert row["reward"] == node.reward


def test_export_writes_one_row_per_node_readable_by_pyarrow_and_pandas(kit: SimpleNamespace, tmp_path: Path) -> None:
    store_dir, trees = build_store(kit)
    out = tmp_path / "out" / "trees.parquet"
    result = export(store_dir, out, "--format", "parquet")
    assert result.code == 0, result.output
    summary = json.loads(result.stdout)
    n_rows = sum(len(tree.nodes) for tree in trees.values())
    assert summary == {"trees": 3, "rows": n_rows, "out": str(out)}

    table = pq.read_table(out)
    assert table.column_names == COLUMNS
    for field in SCHEMA_V1:
        assert table.schema.field(field.name).type == field.type, field.name
    assert table.num_rows == n_rows
    rows = table.to_pylist()
    by_node = {(row["tree_id"], row["node_id"]): row for row in rows}
    assert len(by_node) == len(rows), "a node appears twice"
    assert {tree_id for tree_id, _ in by_node} == {"0", "1", "2"}  # the growing tree 3 is left out
    for tree_id, tree in trees.items():
        for node_id, node in tree.nodes.items():
            row = by_node[(tree_id, node_id)]
            assert (row["task_id"], row["actor_id"]) == (kit.TASK, kit.ACTOR)
            state, sampled = ("consumed", 1) if tree_id == "0" else ("ready", 0)
            assert (row["tree_state"], row["times_sampled"]) == (state, sampled)
            assert_node_row(row, node)
    # The re-sent node keeps its final version: the rewarded leaf from seq 1.
    resent = by_node[("0", 2)]
    assert (resent["seq"], resent["reward"], resent["is_leaf"], resent["finish_reason"]) == (1, 1.0, True, "answer")
    assert by_node[("0", 1)]["seq"] == 0

    frame = pd.read_parquet(out)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == n_rows
    assert frame.groupby("tree_id").size().to_dict() == {tree_id: len(tree.nodes) for tree_id, tree in trees.items()}
    for record in frame.to_dict("records"):
        node = trees[record["tree_id"]].nodes[int(record["node_id"])]
        assert np.array_equal(np.asarray(record["token_ids"]), node.token_ids)
        assert np.array_equal(np.asarray(record["obs_ids"]), node.obs_ids)
        assert np.array_equal(np.asarray(record["logprobs"], np.float32), node.logprobs)


def test_export_can_include_growing_trees(kit: SimpleNamespace, tmp_path: Path) -> None:
    store_dir, _ = build_store(kit)
    out = tmp_path / "all.parquet"
    assert export(store_dir, out, "--include-growing").code == 0
    table = pq.read_table(out)
    growing = [row for row in table.to_pylist() if row["tree_id"] == "3"]
    assert [row["node_id"] for row in growing] == [0, 1, 2]  # seq 0 of 7 nodes in messages of 3
    assert {row["tree_state"] for row in growing} == {"growing"}


def test_export_of_an_empty_store_has_the_full_schema(kit: SimpleNamespace, tmp_path: Path) -> None:
    store = kit.open(name="empty")
    kit.lease(store, 2)  # growing trees with no messages are not exported
    store.close()
    out = tmp_path / "empty.parquet"
    result = export(store.path, out, "--format", "parquet")
    assert result.code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 0
    table = pq.read_table(out)
    assert table.num_rows == 0
    assert table.column_names == COLUMNS
    for field in SCHEMA_V1:
        assert table.schema.field(field.name).type == field.type, field.name
    frame = pd.read_parquet(out)
    assert list(frame.columns) == COLUMNS and len(frame) == 0

    # The same schema as a non-empty export, so files of one run can be read together.
    full_dir, _ = build_store(kit)
    full = tmp_path / "full.parquet"
    assert export(full_dir, full).code == 0
    assert pq.read_schema(full).remove_metadata() == pq.read_schema(out).remove_metadata()
    combined = pa.concat_tables([pq.read_table(out), pq.read_table(full)])
    assert combined.num_rows == pq.read_table(full).num_rows


def test_export_refuses_an_unknown_format(kit: SimpleNamespace, tmp_path: Path) -> None:
    store = kit.open()
    store.close()
    out = tmp_path / "trees.csv"
    result = export(store.path, out, "--format", "csv")
    assert result.code == 2
    assert "unknown format 'csv'" in result.output
    assert not out.exists()


def test_export_refuses_a_directory_without_a_store(tmp_path: Path) -> None:
    out = tmp_path / "trees.parquet"
    for directory in (tmp_path / "missing", tmp_path):
        result = export(directory, out)
        assert result.code == 2
        assert "holds no replay store" in result.output
    assert not out.exists()
