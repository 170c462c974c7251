"""`kill -9` of a real replay service mid-stream: nothing acked is lost, nothing is stored twice.

Real processes: the service runs as `python -m ops.cli replay serve`, and two actor processes each
lease trees and stream their subtree messages through `ActorReplayClient`, recording every
(tree_id, seq) the moment its ack credits it (the client has no public per-key ack hook, so the
actor script overrides `_on_subtree_ack`, the one place an ack is matched to its window entry).
Once about a third of the messages are acked, the service is killed with SIGKILL, restarted on the
same directory and port, and the actors must finish on their own (re-sends on reconnect/timeout).
The LMDB files are then read directly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.replay_client import ActorReplayClient, LearnerReplayClient, ReplayTimeout
from common.subtree import assemble_tree
from common.tree import TurnTree
from replay.store import TreeRecord, TreeState, open_environment
from replay.synthetic import random_tree, tree_messages

N_CLIENTS = 2
TREES_PER_CLIENT = 40
NODES_PER_MESSAGE = 2
TASK_ID = "crash-task"
MAP_SIZE_GB = 0.5
KILL_AT_FRACTION = 0.3

# The actor process. Tree shapes must match `build_tree` below (seed and node count from the index).
ACTOR_SCRIPT = r'''
import json
import sys
import time
from pathlib import Path

import numpy as np

from common.replay_client import ActorReplayClient
from replay.synthetic import random_tree, tree_messages

endpoint, actor_id, n_trees, base_seed, out_dir = sys.argv[1:6]
n_trees, base_seed, out = int(n_trees), int(base_seed), Path(out_dir)
ack_log = open(out / f"{actor_id}.acks.jsonl", "a", encoding="utf-8")


class RecordingClient(ActorReplayClient):
    """Writes (tree_id, seq) to the ack log as soon as an ack takes it out of the window."""

    def _on_subtree_ack(self, message):
        credited = super()._on_subtree_ack(message)
        if credited:
            ack_log.write(json.dumps([message.tree_id, message.seq]) + "\n")
            ack_log.flush()
        return credited


def build_tree(tree_id, index):
    rng = np.random.default_rng(base_seed + index)
    return random_tree(
        rng, tree_id, task_id="crash-task", actor_id=actor_id, n_nodes=6 + index % 5,
        tokens_per_turn=16, obs_tokens=8, prompt_tokens=16, vocab=1000,
    )


client = RecordingClient(endpoint, actor_id, window=8, resend_after_s=1.0)
tree_ids = []
while len(tree_ids) < n_trees:
    grant = client.request_leases(n_trees - len(tree_ids), timeout_s=30.0)
    tree_ids.extend(grant.tree_ids)
    if not grant.tree_ids:
        time.sleep(0.1)
(out / f"{actor_id}.plan.json").write_text(json.dumps(tree_ids), encoding="utf-8")

sent = 0
for index, tree_id in enumerate(tree_ids):
    for seq, data in enumerate(tree_messages(build_tree(tree_id, index), nodes_per_message=2)):
        client.send_subtree(data, tree_id, seq)  # blocks while the window is full (replay down)
        client.pump(0.0)
        sent += 1
        if sent % 2 == 0:
            time.sleep(0.02)  # slow enough that the kill lands mid-stream
client.flush(timeout_s=90.0)
result = {"counters": client.counters(), "rejected": [r.__dict__ for r in client.rejected], "sent": sent}
(out / f"{actor_id}.result.json").write_text(json.dumps(result), encoding="utf-8")
client.close()
ack_log.close()
'''


def build_tree(actor_id: str, base_seed: int, tree_id: str, index: int) -> TurnTree:
    """The tree the actor script builds for its `index`-th lease (same seed, same shape)."""
    return random_tree(
        np.random.default_rng(base_seed + index),
        tree_id,
        task_id=TASK_ID,
        actor_id=actor_id,
        n_nodes=6 + index % 5,
        tokens_per_turn=16,
        obs_tokens=8,
        prompt_tokens=16,
        vocab=1000,
    )


def n_messages_of(index: int) -> int:
    return -(-(6 + index % 5) // NODES_PER_MESSAGE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(store_dir: Path, endpoint: str, log_path: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "ops.cli", "replay", "serve",
        "--dir", str(store_dir),
        "--endpoint", endpoint,
        "--set", f"replay.map_size_gb={MAP_SIZE_GB}",
        "--set", f"replay.capacity_bytes={200 * 1024 * 1024}",  # below 90% of the 0.5 GiB map
        "--set", "replay.capacity_trees=10000",
        "--set", "replay.trees_per_step=64",
        "--set", "replay.max_staleness=1000",
        "--set", "logging.level=warning",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_until_serving(endpoint: str, timeout_s: float = 30.0) -> None:
    with LearnerReplayClient(endpoint, request_timeout_s=timeout_s, resend_after_s=1.0) as client:
        stats = client.stats(timeout_s=timeout_s)
    assert "store" in stats


def read_acks(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            tree_id, seq = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        keys.append((tree_id, seq))
    return keys


def logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp_path.glob("*.log")))


def read_store(store_dir: Path) -> tuple[dict[tuple[int, int], bytes], dict[int, TreeRecord], dict[str, Any]]:
    """Every subtree row, tree record and the persisted counters, straight from LMDB (read-only)."""
    env = open_environment(store_dir, map_size_bytes=int(MAP_SIZE_GB * 1024**3), readonly=True)
    try:
        db_subtrees = env.open_db(b"subtrees", create=False)
        db_trees = env.open_db(b"trees", create=False)
        db_meta = env.open_db(b"meta", create=False)
        subtrees: dict[tuple[int, int], bytes] = {}
        trees: dict[int, TreeRecord] = {}
        with env.begin() as txn:
            for key, value in txn.cursor(db=db_subtrees):
                index, seq = int.from_bytes(key[:8], "big"), int.from_bytes(key[8:], "big")
                assert (index, seq) not in subtrees
                subtrees[(index, seq)] = bytes(value)
            for key, value in txn.cursor(db=db_trees):
                record = TreeRecord.decode(value)
                assert record.index == int.from_bytes(key, "big")
                trees[record.index] = record
            counters = json.loads(txn.get(b"counters", db=db_meta))
    finally:
        env.close()
    return subtrees, trees, counters


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kill_9_mid_stream_loses_no_acked_subtree_and_stores_none_twice(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    script = tmp_path / "actor.py"
    script.write_text(ACTOR_SCRIPT, encoding="utf-8")
    actors = [(f"actor-{i}", 1000 * (i + 1)) for i in range(N_CLIENTS)]
    total = N_CLIENTS * sum(n_messages_of(i) for i in range(TREES_PER_CLIENT))
    service: subprocess.Popen[bytes] | None = None
    clients: list[subprocess.Popen[bytes]] = []
    try:
        service = start_service(store_dir, endpoint, tmp_path / "service-1.log")
        wait_until_serving(endpoint)
        for actor_id, seed in actors:
            with open(tmp_path / f"{actor_id}.log", "wb") as log:
                command = [sys.executable, str(script), endpoint, actor_id, str(TREES_PER_CLIENT), str(seed)]
                clients.append(
                    subprocess.Popen([*command, str(tmp_path)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
                )

        # Let a third of the messages be acked, then kill -9 the service while both actors stream.
        deadline = time.monotonic() + 45
        while True:
            acked_before_kill = {
                key for actor_id, _ in actors for key in read_acks(tmp_path / f"{actor_id}.acks.jsonl")
            }
            if len(acked_before_kill) >= KILL_AT_FRACTION * total:
                break
            assert all(c.poll() is None for c in clients), f"an actor exited early\n{logs(tmp_path)}"
            assert service.poll() is None, f"replay exited early\n{logs(tmp_path)}"
            assert time.monotonic() < deadline, f"only {len(acked_before_kill)} of {total} acked\n{logs(tmp_path)}"
            time.sleep(0.02)
        os.kill(service.pid, signal.SIGKILL)
        service.wait(timeout=10)
        assert service.returncode == -signal.SIGKILL
        # The kill must land mid-stream: both actors still sending, most messages not yet acked.
        assert all(c.poll() is None for c in clients), "an actor finished before the kill: slow the actors down"
        assert len(acked_before_kill) < 0.8 * total

        time.sleep(1.0)
        service = start_service(store_dir, endpoint, tmp_path / "service-2.log")
        for client in clients:
            client.wait(timeout=90)
            assert client.returncode == 0, logs(tmp_path)
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=15)
        assert service.returncode == 0, logs(tmp_path)
    finally:
        for process in [*clients, service]:
            stop(process)

    # What the actors sent, regenerated from the same seeds; and what they saw.
    expected: dict[int, tuple[TurnTree, list[bytes]]] = {}
    for actor_id, seed in actors:
        plan = json.loads((tmp_path / f"{actor_id}.plan.json").read_text(encoding="utf-8"))
        assert len(plan) == TREES_PER_CLIENT
        for index, tree_id in enumerate(plan):
            tree = build_tree(actor_id, seed, tree_id, index)
            messages = tree_messages(tree, nodes_per_message=NODES_PER_MESSAGE)
            assert len(messages) == n_messages_of(index)
            expected[int(tree_id)] = (tree, messages)
        result = json.loads((tmp_path / f"{actor_id}.result.json").read_text(encoding="utf-8"))
        counters = result["counters"]
        assert result["rejected"] == [], result
        # `sent` also counts lease requests; every subtree the actor sent was acked once.
        assert result["sent"] == counters["acked"] == sum(n_messages_of(i) for i in range(TREES_PER_CLIENT))
        assert counters["sent"] > result["sent"], counters
        assert counters["unacked"] == 0
        assert counters["reconnects"] >= 1, f"{actor_id} never saw the restart: {counters}"
        assert counters["resent"] >= 1, counters
        acks = read_acks(tmp_path / f"{actor_id}.acks.jsonl")
        assert len(acks) == len(set(acks)) == counters["acked"], "an ack was credited twice"
    assert len(expected) == N_CLIENTS * TREES_PER_CLIENT
    expected_keys = {(index, seq) for index, (_, messages) in expected.items() for seq in range(len(messages))}
    assert len(expected_keys) == total

    subtrees, records, counters = read_store(store_dir)

    # Everything acked before the kill survived it.
    missing = {key for key in acked_before_kill if (int(key[0]), key[1]) not in subtrees}
    assert not missing, f"acked before the kill but lost: {sorted(missing)[:10]}"
    # Every message sent is stored exactly once, byte for byte (LMDB keys are unique: no copies).
    assert set(subtrees) == expected_keys
    assert len(subtrees) == total
    for index, (tree, messages) in expected.items():
        stored = [subtrees[(index, seq)] for seq in range(len(messages))]
        assert stored == messages, f"tree {index}: stored bytes differ from what was sent"
        record = records[index]
        assert record.state is TreeState.READY, record
        assert record.n_messages == len(messages)
        assert record.final_seq == len(messages) - 1
        assert record.actor_id == tree.actor_id and record.task_id == TASK_ID
        assembled = assemble_tree(stored)
        assert assembled.tree_id == tree.tree_id
        assert sorted(assembled.nodes) == sorted(tree.nodes)
        for node_id, node in tree.nodes.items():
            assert assembled.nodes[node_id].equals(node), f"tree {index} node {node_id} differs"
    # Leases granted twice (a re-sent lease request) may leave empty growing trees; nothing else.
    for index, record in records.items():
        if index not in expected:
            assert record.state in (TreeState.GROWING, TreeState.EXPIRED) and record.n_messages == 0, record
    assert counters["inserts"] == len(expected)
    assert counters["subtrees_stored"] == total
    assert counters["bad_subtrees"] == 0 and counters["rejected_trees"] == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_lease_request_sent_while_replay_is_down_is_granted_once(tmp_path: Path) -> None:
    """ZeroMQ queues the request for the next connection and the client re-sends it on reconnect:
    the restarted service gets it twice and must grant it once (the request id makes it idempotent)."""
    store_dir = tmp_path / "store"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    service = start_service(store_dir, endpoint, tmp_path / "replay.log")
    client = ActorReplayClient(endpoint, "actor-down", resend_after_s=0.5)
    try:
        wait_until_serving(endpoint)
        assert client.request_leases(1, timeout_s=10).tree_ids == ["0"]
        service.kill()
        service.wait(timeout=10)
        with pytest.raises(ReplayTimeout):
            client.request_leases(1, renew=["0"], timeout_s=2)
        service = start_service(store_dir, endpoint, tmp_path / "replay.log")
        grant = client.request_leases(1, renew=["0"], timeout_s=30)
        assert grant.tree_ids == ["1"] and grant.renewed == ["0"]
        client.pump(2.0)  # the remaining copies reach the service (and their replies come back late)
        with LearnerReplayClient(endpoint, request_timeout_s=10) as learner:
            store = learner.stats()["store"]
        assert (store["growing"], store["leases_granted"]) == (2, 2), logs(tmp_path)
        assert store["lease_retries"] >= 1
    finally:
        client.close()
        stop(service)
