"""`at2po bench replay`: durable ingest through ZeroMQ against raw LMDB, and sample latency under load.

All figures come from one run on one machine, and the headline is a ratio against a baseline
measured in the same run, because absolute times on a shared machine mean little:
- `raw_lmdb_mb_s`: the same message bytes put straight into LMDB by one process, 64 messages per
  synced transaction (the ceiling the service's group commit works against);
- `ingest_mb_s`: the same bytes streamed by 2 client processes through the replay service, counted
  when acked (acks come only after the commit that holds the message);
- `sample_p50_ms` / `sample_p99_ms`: a learner process sampling a batch of completed trees every
  `sample_interval_s` (a fast learner) while the ingest runs, the way the learner does on replay's
  host: by reference (`transport.sample_by_reference`), request to every byte copied out of the map
  into the learner's memory. `sample_by_value_p50_ms` / `_p99_ms`: right after each, the same batch
  size with the bytes carried in the reply (a learner on another host), request to last byte
  received; `reference_vs_value_p99` their ratio. `*_idle_p50_ms` are the same with no ingest
  running;
- `socket_floor_p50_ms` / `socket_floor_p99_ms`: right after those, the by-value reply's frames from
  a bare ZeroMQ ROUTER that answers from memory (`ops.bench_floor`), under the same ingest: what
  moving those bytes between two processes costs with no store at all (`socket_floor_idle_p50_ms`
  without ingest). `sample_p50_ms_per_tree` is the sample p50 over the trees in a batch.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from common.config import RunConfig, build_config
from common.subtree import SubtreeHeader, encode_subtree
from ops.bench_floor import BareTransfer, echo_main
from replay.synthetic import random_tree

IDLE_SAMPLES = 20


@dataclass(frozen=True)
class BenchSettings:
    total_mb: float = 1024.0
    clients: int = 2
    message_kb: float = 256.0
    messages_per_tree: int = 1
    sample_trees: int = 64
    window: int = 128
    sample_interval_s: float = 0.1
    seed: int = 0


def free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def bench_config(store_dir: Path, endpoint: str, settings: BenchSettings) -> RunConfig:
    return build_config(
        {
            "transport": {"replay_endpoint": endpoint},
            "replay": {
                "dir": str(store_dir),
                "map_size_gb": max(1.0, 3 * settings.total_mb / 1024),
                "capacity_bytes": int(2 * settings.total_mb * 1024**2),
                "sampler": "uniform",
                "max_times_sampled": 0,
                "max_staleness": 1_000_000,
                "trees_per_step": settings.sample_trees,
                "lease_ttl_s": 3600.0,
            },
            "logging": {"level": "warning"},
        }
    )


def template_nodes(settings: BenchSettings, rng: np.random.Generator) -> list[list[Any]]:
    """Nodes of one tree, cut into `messages_per_tree` chunks of about `message_kb` each."""
    nodes_per_message = 4
    n_nodes = nodes_per_message * settings.messages_per_tree

    def chunks_for(tokens: int) -> list[list[Any]]:
        tree = random_tree(rng, "0", n_nodes=n_nodes, tokens_per_turn=tokens, obs_tokens=16, prompt_tokens=64)
        ordered = [tree.nodes[i] for i in sorted(tree.nodes)]
        return [ordered[i : i + nodes_per_message] for i in range(0, n_nodes, nodes_per_message)]

    # Calibrate tokens per turn so that an encoded message has about the asked size (size is linear in tokens).
    small, large = (max(len(m) for m in encode_tree(chunks_for(t), "0", "probe")) for t in (64, 512))
    bytes_per_token = (large - small) / (512 - 64)
    fixed = small - 64 * bytes_per_token
    tokens = max(8, int((settings.message_kb * 1024 - fixed) / bytes_per_token))
    return chunks_for(tokens)


def encode_tree(chunks: list[list[Any]], tree_id: str, actor_id: str) -> list[bytes]:
    return [
        encode_subtree(SubtreeHeader(tree_id, "bench-task", actor_id, seq, seq == len(chunks) - 1), chunk)
        for seq, chunk in enumerate(chunks)
    ]


def _client_main(config: RunConfig, actor_id: str, settings: BenchSettings, n_trees: int, conn: Connection) -> None:
    from common.replay_client import ActorReplayClient

    rng = np.random.default_rng(settings.seed + hash(actor_id) % 1000)
    chunks = template_nodes(settings, rng)
    endpoint = config.transport.replay_endpoint
    with ActorReplayClient(endpoint, actor_id, config.transport, window=settings.window) as client:
        tree_ids: list[str] = []
        while len(tree_ids) < n_trees:
            grant = client.request_leases(min(1024, n_trees - len(tree_ids)), timeout_s=30)
            tree_ids.extend(grant.tree_ids)
        messages = [(tid, seq, data) for tid in tree_ids for seq, data in enumerate(encode_tree(chunks, tid, actor_id))]
        conn.send(("ready", sum(len(m[2]) for m in messages)))
        conn.recv()  # go
        start = time.perf_counter()
        for tree_id, seq, data in messages:
            client.send_subtree(data, tree_id, seq, timeout_s=120)
        client.flush(timeout_s=120)
        elapsed = time.perf_counter() - start
        conn.send(("done", elapsed, client.acked, client.resent, len(client.rejected)))


@dataclass
class SamplerTimes:
    """What the sampler process measured (milliseconds), idle and under ingest."""

    by_reference: list[float] = field(default_factory=list)
    by_value: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    reply_bytes: list[int] = field(default_factory=list)
    idle_by_reference: list[float] = field(default_factory=list)
    idle_by_value: list[float] = field(default_factory=list)
    idle_floor: list[float] = field(default_factory=list)
    fallbacks: int = 0


def _timed_sample(client: Any, n: int) -> tuple[float | None, int]:
    """One sample of n trees: milliseconds from request to every byte in this process, and the bytes."""
    start = time.perf_counter()
    reply, trees = client.try_sample(n, learner_version=0)
    elapsed = (time.perf_counter() - start) * 1000
    return (elapsed if reply.ready else None), sum(len(m) for t in trees for m in t.messages)


def _sampler_main(config: RunConfig, settings: BenchSettings, echo_endpoint: str, conn: Connection) -> None:
    """Each cycle: a sample by reference, the same size by value, then those bytes through the bare echo."""
    from common.replay_client import LearnerReplayClient

    times = SamplerTimes()
    bare = BareTransfer(echo_endpoint)
    endpoint = config.transport.replay_endpoint
    try:
        with (
            LearnerReplayClient(endpoint, config.transport, by_reference=True) as local,
            LearnerReplayClient(endpoint, config.transport, by_reference=False) as remote,
        ):

            def cycle(by_reference: list[float], by_value: list[float], floor: list[float]) -> None:
                ref_ms, _ = _timed_sample(local, settings.sample_trees)
                value_ms, nbytes = _timed_sample(remote, settings.sample_trees)
                if ref_ms is None or value_ms is None:
                    return
                by_reference.append(ref_ms)
                by_value.append(value_ms)
                times.reply_bytes.append(nbytes)
                frames = settings.sample_trees * settings.messages_per_tree
                floor.append(bare.time_ms(frames, nbytes // frames))

            for _ in range(IDLE_SAMPLES):
                cycle(times.idle_by_reference, times.idle_by_value, times.idle_floor)
            conn.send("ready")
            conn.recv()
            while not conn.poll(settings.sample_interval_s):
                cycle(times.by_reference, times.by_value, times.floor)
            times.fallbacks = local.reference_fallbacks
    finally:
        bare.close()
    conn.send(times)


def _server_main(config: RunConfig) -> None:
    from common.log import configure_logging
    from replay.service import ReplayService

    configure_logging(config.logging.level, config.logging.json_logs, role="replay")
    ReplayService(config).serve_forever()


def raw_lmdb_mb_s(messages: list[bytes], directory: Path, per_txn: int = 64) -> float:
    """The same bytes straight into LMDB from one process, `per_txn` messages per synced commit."""
    env = lmdb.open(str(directory), map_size=4 * sum(len(m) for m in messages) + (64 << 20), sync=True, meminit=False)
    try:
        start = time.perf_counter()
        for first in range(0, len(messages), per_txn):
            with env.begin(write=True) as txn:
                for offset, data in enumerate(messages[first : first + per_txn]):
                    txn.put((first + offset).to_bytes(8, "big"), data)
        elapsed = time.perf_counter() - start
    finally:
        env.close()
    return sum(len(m) for m in messages) / elapsed / 1e6


def prefill(config: RunConfig, settings: BenchSettings) -> None:
    """Complete enough trees before the clock starts that sampling is possible from the first moment."""
    from common.replay_client import ActorReplayClient

    chunks = template_nodes(settings, np.random.default_rng(settings.seed))
    with ActorReplayClient(config.transport.replay_endpoint, "prefill", config.transport) as client:
        grant = client.request_leases(settings.sample_trees, timeout_s=30)
        for tree_id in grant.tree_ids:
            for seq, data in enumerate(encode_tree(chunks, tree_id, "prefill")):
                client.send_subtree(data, tree_id, seq, timeout_s=60)
        client.flush(timeout_s=60)


def run_replay_bench(settings: BenchSettings, work_dir: Path | None = None) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="at2po-bench-", dir=work_dir))
    ctx = mp.get_context("spawn")
    processes: list[Any] = []
    try:
        chunks = template_nodes(settings, np.random.default_rng(settings.seed))
        tree_messages = encode_tree(chunks, "1", "raw")
        tree_bytes = sum(len(m) for m in tree_messages)
        trees_per_client = max(1, int(settings.total_mb * 1e6 / settings.clients / tree_bytes))
        raw_messages = tree_messages * (trees_per_client * settings.clients)
        raw = raw_lmdb_mb_s(raw_messages, base / "raw")
        shutil.rmtree(base / "raw", ignore_errors=True)
        del raw_messages

        config = bench_config(base / "store", free_endpoint(), settings)
        server = ctx.Process(target=_server_main, args=(config,), daemon=True)
        server.start()
        processes.append(server)
        prefill(config, settings)

        # The idle baseline is taken before the clients start: their start-up (encoding every
        # message) would otherwise share the 2 cores with it.
        sampler_pipe, sampler_child = ctx.Pipe()
        echo_endpoint = free_endpoint()
        echo = ctx.Process(target=echo_main, args=(echo_endpoint,), daemon=True)
        echo.start()
        processes.append(echo)
        sampler = ctx.Process(target=_sampler_main, args=(config, settings, echo_endpoint, sampler_child), daemon=True)
        sampler.start()
        processes.append(sampler)
        deadline = time.monotonic() + 300
        while not sampler_pipe.poll(0.5):
            if not sampler.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the sampler process died or did not finish its idle samples within 300 s")
        sampler_pipe.recv()

        client_pipes = []
        for i in range(settings.clients):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(config, f"bench-{i}", settings, trees_per_client, child))
            proc.start()
            processes.append(proc)
            client_pipes.append(parent)

        ingest_bytes = sum(_expect(pipe, "ready", 300)[1] for pipe in client_pipes)
        start = time.perf_counter()
        sampler_pipe.send("go")
        for pipe in client_pipes:
            pipe.send("go")
        results = [_expect(pipe, "done", 600) for pipe in client_pipes]
        wall = time.perf_counter() - start
        sampler_pipe.send("stop")
        times: SamplerTimes = sampler_pipe.recv()
        acked = sum(r[2] for r in results)
        ingest = ingest_bytes / wall / 1e6
        p50, p99 = _percentile(times.by_reference, 50), _percentile(times.by_reference, 99)
        value_p99 = _percentile(times.by_value, 99)
        return {
            "ingest_mb_s": round(ingest, 1),
            "raw_lmdb_mb_s": round(raw, 1),
            "ingest_vs_raw": round(ingest / raw, 3),
            "sample_p50_ms": p50,
            "sample_p99_ms": p99,
            "samples": len(times.by_reference),
            "sample_idle_p50_ms": _percentile(times.idle_by_reference, 50),
            "sample_by_value_p50_ms": _percentile(times.by_value, 50),
            "sample_by_value_p99_ms": value_p99,
            "sample_by_value_idle_p50_ms": _percentile(times.idle_by_value, 50),
            "reference_vs_value_p99": round(p99 / value_p99, 3) if p99 and value_p99 else None,
            "reference_fallbacks": times.fallbacks,
            "socket_floor_p50_ms": _percentile(times.floor, 50),
            "socket_floor_p99_ms": _percentile(times.floor, 99),
            "socket_floor_idle_p50_ms": _percentile(times.idle_floor, 50),
            "sample_p50_ms_per_tree": round(p50 / settings.sample_trees, 3) if p50 is not None else None,
            "sample_batch_trees": settings.sample_trees,
            "sample_reply_mb": round(float(np.mean(times.reply_bytes)) / 1e6, 2) if times.reply_bytes else None,
            "clients": settings.clients,
            "messages_acked": acked,
            "message_kb": round(len(tree_messages[0]) / 1024, 1),
            "messages_per_tree": settings.messages_per_tree,
            "ingest_mb": round(ingest_bytes / 1e6, 1),
            "ingest_wall_s": round(wall, 2),
            "resent": sum(r[3] for r in results),
            "rejected": sum(r[4] for r in results),
        }
    finally:
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _expect(pipe: Connection, tag: str, timeout_s: float) -> tuple[Any, ...]:
    if not pipe.poll(timeout_s):
        raise TimeoutError(f"benchmark process sent no {tag!r} within {timeout_s} s")
    message = pipe.recv()
    if message[0] != tag:
        raise RuntimeError(f"benchmark process sent {message!r}, expected {tag!r}")
    return message
