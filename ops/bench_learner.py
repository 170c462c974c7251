"""`at2po bench learner`: what tree packing buys the learner on AT²PO trees, and how fast weights go out.

Decided interface:
- Trees: `trees` tasks of the synthetic world, one AT²PO tree each (the `at2po` builder made from
  `tree.at2po_initial_chains/at2po_rounds/at2po_expansions`, by default the paper's M=10, L=2, K=6),
  grown by the tiny policy (a fresh one under the work dir unless `--model-dir`) exactly as
  `at2po bench rollout` grows them. `path_tokens` and `unique_tokens` are means per tree
  (`learner.packing`); `path_over_unique` is their ratio, the most packing can save.
- Rewards: the environment's. An untrained policy mostly scores -1 on every leaf, which gives a tree
  zero credit, and the updater would then skip it: only trees whose leaves all score the same get a
  deterministic jitter (±0.05, seeded by tree index) on their leaf rewards, so both layouts train
  every tree. `settings.rewards` says "env" or "env+jitter" and `settings.jittered_trees` how many.
- Training: two `TrainEngine`s from the same model directory, identical but for `learner.packing`
  (true = packed in `packed_layout`, by default the tree layout; false = one row per path), run the
  same `PolicyUpdater.update` on the same groups (each tree its own group). One warm-up update each
  (on the first tree), then `repeats` timed updates per layout, alternating which goes first;
  medians. Throughput counts PATH tokens (the per-path equivalent work) per second in both layouts,
  so `packed_speedup` = per-path time / packed time = packed_tokens_per_s / per_path_tokens_per_s.
  `target_speedup` = 0.8 × path_over_unique. `loss_packed` and `loss_per_path` are the first timed
  update's losses: the engines have taken the same single warm-up step, so the two agree to float
  noise (equal work, not merely equal tokens).
- Weights: the trained tiny model published through `WeightBroadcaster` and received by a
  `WeightSubscriber` (announcement, then a windowed, checksummed chunk fetch) on loopback TCP.
  `weight_sync_mb_s` counts from `publish` returning to the verified blob (announce + fetch; the
  serialisation before it is `weight_serialise_ms`); `weight_fetch_mb_s` the fetch alone.
  `raw_zmq_mb_s` is a plain DEALER/ROUTER transfer of the same bytes in the same chunks with the same
  window of requests in flight, no checksums or headers. MB = 10^6 bytes; medians of `sync_repeats`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from common.config import LearnerConfig, TreeConfig

if TYPE_CHECKING:
    from torch import nn

    from common.tree import TurnTree
    from learner.update import PolicyUpdater

LAYOUTS = ("packed", "per_path")
JITTER = 0.05
MB = 1e6
_TREE = TreeConfig()


@dataclass(frozen=True)
class LearnerBenchSettings:
    """What the bench runs; kept small by default so it finishes in minutes on a 2-core CPU."""

    trees: int = 2
    repeats: int = 3
    max_new_tokens: int = 64
    initial_chains: int = _TREE.at2po_initial_chains
    rounds: int = _TREE.at2po_rounds
    expansions: int = _TREE.at2po_expansions
    micro_batch_tokens: int = 16384
    packed_layout: str = LearnerConfig().packed_layout
    segment_tokens: int = LearnerConfig().segment_tokens
    torch_threads: int = 2
    lr: float = 1e-6
    sync_repeats: int = 5
    chunk_kb: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("trees", "repeats", "max_new_tokens", "micro_batch_tokens", "torch_threads", "sync_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.packed_layout not in ("tree", "segments"):
            raise ValueError(f"packed_layout must be 'tree' or 'segments', got {self.packed_layout!r}")
        if self.chunk_kb < 4:
            raise ValueError("chunk_kb must be >= 4 (the transport's smallest chunk)")


def _progress(message: str) -> None:
    """Progress goes to stderr, so `--json` leaves stdout to the JSON object."""
    print(f"[bench learner] {message}", file=sys.stderr, flush=True)


def grow_at2po_trees(settings: LearnerBenchSettings, scratch: Path, model_dir: Path) -> list[TurnTree]:
    """Real AT²PO trees from the builder the actors use, on the world `bench rollout` uses."""
    from actors.actor import builder_from_config
    from ops.bench_rollout import grow_trees, open_world

    world = open_world(scratch, settings.trees, settings.seed, model_dir)
    tree_config = TreeConfig(
        builder="at2po",
        at2po_initial_chains=settings.initial_chains,
        at2po_rounds=settings.rounds,
        at2po_expansions=settings.expansions,
    )
    builder = builder_from_config(tree_config, vocab_size=len(world.policy.tokenizer))
    builds = asyncio.run(
        grow_trees(builder, world.tasks, world.env, world.backend, world.codec, settings.max_new_tokens)
    )
    return [build.tree for build in builds]


def jitter_flat_rewards(trees: Sequence[TurnTree], seed: int) -> tuple[list[TurnTree], int]:
    """Trees whose leaves all score the same get a small seeded jitter (zero credit would be skipped).

    Returns the trees (the others unchanged) and how many were jittered; the tokens are untouched.
    """
    from common.tree import TurnTree

    out: list[TurnTree] = []
    jittered = 0
    for index, tree in enumerate(trees):
        rewards = {leaf.reward for leaf in tree.leaves()}
        if len(rewards) > 1:
            out.append(tree)
            continue
        rng = random.Random(seed * 1_000_003 + index)
        nodes = [
            replace(node, reward=node.reward + rng.uniform(-JITTER, JITTER)) if node.reward is not None else node
            for _, node in sorted(tree.nodes.items())
        ]
        out.append(TurnTree.from_nodes(tree.tree_id, tree.task_id, tree.actor_id, nodes))
        jittered += 1
    return out, jittered


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_updaters(model_dir: Path, settings: LearnerBenchSettings) -> dict[str, PolicyUpdater]:
    """One engine per layout from the same weights; equal but for `learner.packing`."""
    from learner.engine import DistributedSpec, TrainEngine, load_train_model
    from learner.update import PolicyUpdater, UpdateSettings

    dist = DistributedSpec(master_port=_free_port())  # torch.distributed starts once; both engines share it
    updaters = {}
    for name in LAYOUTS:
        cfg = LearnerConfig(
            packing=name == "packed",
            packed_layout=settings.packed_layout,  # type: ignore[arg-type]
            segment_tokens=settings.segment_tokens,
            micro_batch_tokens=settings.micro_batch_tokens,
            lr=settings.lr,
        )
        engine = TrainEngine(load_train_model(model_dir), cfg, dist)
        updaters[name] = PolicyUpdater(engine, UpdateSettings.from_config(cfg))
    return updaters


def time_updates(
    updaters: dict[str, PolicyUpdater], groups: list[list[TurnTree]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Seconds of each timed update per layout (warm-up first, order alternating), and each one's first metrics."""
    for name in LAYOUTS:
        updaters[name].update(groups[:1], learner_version=0)
    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    first: dict[str, dict[str, float]] = {}
    for repeat in range(repeats):
        for name in LAYOUTS if repeat % 2 == 0 else LAYOUTS[::-1]:
            metrics = updaters[name].update(groups, learner_version=0)
            if metrics["trees_skipped"]:
                raise RuntimeError(f"{name}: {int(metrics['trees_skipped'])} tree(s) skipped; the work is not equal")
            seconds[name].append(metrics["update_seconds"])
            first.setdefault(name, metrics)
        _progress(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in LAYOUTS))
    return seconds, first


def _free_endpoint() -> str:
    return f"tcp://127.0.0.1:{_free_port()}"


def weight_sync_times(model: nn.Module, chunk_bytes: int, repeats: int) -> dict[str, Any]:
    """Publish → announcement → verified blob, `repeats` times after one warm-up version; seconds per phase."""
    from common.config import TransportConfig
    from common.weights import WeightSubscriber
    from learner.weights_out import WeightBroadcaster

    transport = TransportConfig(
        weights_pub_endpoint=_free_endpoint(), weights_endpoint=_free_endpoint(), weights_chunk_bytes=chunk_bytes
    )
    phases: dict[str, list[float]] = {"serialise": [], "announce": [], "fetch": []}
    with WeightBroadcaster(transport, reannounce_s=0.2) as broadcaster, WeightSubscriber(transport) as subscriber:
        broadcaster.publish(model, 0)
        subscriber.fetch(subscriber.wait_for(0, timeout_s=30))  # connects both sockets; not timed
        for version in range(1, repeats + 1):
            started = time.perf_counter()
            announced = broadcaster.publish(model, version)
            published = time.perf_counter()
            seen = subscriber.wait_for(version, timeout_s=30)
            noticed = time.perf_counter()
            blob = subscriber.fetch(seen)
            fetched = time.perf_counter()
            if len(blob) != announced.total_bytes:
                raise RuntimeError("weight fetch returned the wrong number of bytes")
            phases["serialise"].append(published - started)
            phases["announce"].append(noticed - published)
            phases["fetch"].append(fetched - noticed)
        window = subscriber.window
    return {"bytes": announced.total_bytes, "chunks": announced.n_chunks, "window": window, "phases": phases}


def raw_zmq_times(blob_size: int, chunk_bytes: int, window: int, repeats: int) -> list[float]:
    """Seconds to pull `blob_size` bytes in `chunk_bytes` chunks over loopback DEALER/ROUTER, `window` in flight."""
    import zmq

    data = os.urandom(blob_size)
    chunks = [data[start : start + chunk_bytes] for start in range(0, len(data), chunk_bytes)]
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if router.poll(50):
                identity, index = router.recv_multipart()
                router.send_multipart([identity, chunks[int(index)]], copy=False)

    server = threading.Thread(target=serve, name="raw-zmq-server", daemon=True)
    server.start()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    times: list[float] = []
    try:
        for attempt in range(repeats + 1):  # the first is a warm-up
            started = time.perf_counter()
            received: dict[int, Any] = {}
            sent = 0
            while len(received) < len(chunks):
                while sent < len(chunks) and sent - len(received) < window:
                    dealer.send(str(sent).encode())
                    sent += 1
                received[len(received)] = dealer.recv(copy=False)  # ROUTER answers in request order
            blob = b"".join(frame.buffer for _, frame in sorted(received.items()))
            if len(blob) != blob_size:
                raise RuntimeError("raw transfer returned the wrong number of bytes")
            if attempt:
                times.append(time.perf_counter() - started)
    finally:
        stop.set()
        server.join(timeout=5)
        dealer.close(linger=0)
        router.close(linger=0)
        context.term()
    return times


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarise(
    path_counts: Sequence[int],
    unique_counts: Sequence[int],
    seconds: dict[str, list[float]],
    sync: dict[str, Any],
    raw_seconds: Sequence[float],
) -> dict[str, Any]:
    """The figures from the raw counts and timings (medians; ratios from unrounded values)."""
    path_mean, unique_mean = _mean(path_counts), _mean(unique_counts)
    ratio = path_mean / unique_mean
    packed_s, per_path_s = statistics.median(seconds["packed"]), statistics.median(seconds["per_path"])
    speedup = per_path_s / packed_s
    target = 0.8 * ratio
    size = sync["bytes"]
    phases = sync["phases"]
    delivered = [a + f for a, f in zip(phases["announce"], phases["fetch"], strict=True)]
    sync_rate = size / statistics.median(delivered) / MB
    fetch_rate = size / statistics.median(phases["fetch"]) / MB
    raw_rate = size / statistics.median(raw_seconds) / MB
    batch_path_tokens = sum(path_counts)
    return {
        "trees": len(path_counts),
        "path_tokens": round(path_mean, 1),
        "unique_tokens": round(unique_mean, 1),
        "path_over_unique": round(ratio, 3),
        "packed_update_s": round(packed_s, 4),
        "per_path_update_s": round(per_path_s, 4),
        "packed_tokens_per_s": round(batch_path_tokens / packed_s, 1),
        "per_path_tokens_per_s": round(batch_path_tokens / per_path_s, 1),
        "packed_speedup": round(speedup, 3),
        "target_speedup": round(target, 3),
        "meets_target": speedup >= target,
        "weight_bytes": size,
        "weight_sync_mb_s": round(sync_rate, 1),
        "weight_fetch_mb_s": round(fetch_rate, 1),
        "raw_zmq_mb_s": round(raw_rate, 1),
        "weight_sync_vs_raw": round(sync_rate / raw_rate, 3),
        "weight_fetch_vs_raw": round(fetch_rate / raw_rate, 3),
        "weight_announce_ms": round(1000 * statistics.median(phases["announce"]), 2),
        "weight_serialise_ms": round(1000 * statistics.median(phases["serialise"]), 2),
    }


def run_learner_bench(
    settings: LearnerBenchSettings, work_dir: Path | None = None, model_dir: Path | None = None
) -> dict[str, Any]:
    """Grow the trees, time both layouts' updates, time the weight broadcast; returns the JSON figures."""
    import torch

    from actors.tiny_model import init_tiny_model
    from learner.packing import path_tokens, unique_tokens

    load_at_start = os.getloadavg()[0]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.torch_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="at2po-bench-learner-", dir=work_dir) as scratch_name:
            scratch = Path(scratch_name)
            if model_dir is None:
                _progress("making the tiny policy")
                model_dir = init_tiny_model(scratch / "model")
            shape = f"M={settings.initial_chains}, L={settings.rounds}, K={settings.expansions}"
            _progress(f"growing {settings.trees} AT²PO tree(s) ({shape})")
            started = time.perf_counter()
            trees = grow_at2po_trees(settings, scratch, model_dir)
            grow_s = time.perf_counter() - started
            trees, jittered = jitter_flat_rewards(trees, settings.seed)
            path_counts = [path_tokens(tree) for tree in trees]
            unique_counts = [unique_tokens(tree) for tree in trees]
            _progress(f"path tokens {path_counts}, unique tokens {unique_counts}; timing both layouts")
            updaters = make_updaters(model_dir, settings)
            seconds, first = time_updates(updaters, [[tree] for tree in trees], settings.repeats)
            _progress("timing the weight broadcast")
            chunk_bytes = settings.chunk_kb * 1024
            sync = weight_sync_times(updaters["packed"].engine.module, chunk_bytes, settings.sync_repeats)
            raw_seconds = raw_zmq_times(sync["bytes"], chunk_bytes, sync["window"], settings.sync_repeats)
    finally:
        torch.set_num_threads(threads_before)
    figures = summarise(path_counts, unique_counts, seconds, sync, raw_seconds)
    figures["loss_packed"] = first["packed"]["loss"]
    figures["loss_per_path"] = first["per_path"]["loss"]
    figures["settings"] = {
        **asdict(settings),
        "builder": "at2po",
        "rewards": "env+jitter" if jittered else "env",
        "jittered_trees": jittered,
        "credit": updaters["packed"].settings.credit,
        "trees_per_update": len(trees),
        "weight_chunks": sync["chunks"],
        "fetch_window": sync["window"],
        "raw_zmq": "DEALER/ROUTER over tcp://127.0.0.1, same chunks and window, no headers or checksums",
        "timing": "medians; one warm-up update per layout, then repeats alternating which layout goes first",
        "grow_s": round(grow_s, 1),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": round(load_at_start, 2),
    }
    return figures


def bench_learner_command(
    trees: Annotated[int, typer.Option(help="AT²PO trees grown, all trained in every update (one group each)")] = 2,
    repeats: Annotated[int, typer.Option(help="timed updates per layout (after one warm-up each)")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens generated per turn")] = 64,
    initial_chains: Annotated[int, typer.Option(help="M: initial chains per tree")] = _TREE.at2po_initial_chains,
    rounds: Annotated[int, typer.Option(help="L: expansion rounds")] = _TREE.at2po_rounds,
    expansions: Annotated[int, typer.Option(help="K: nodes expanded per round")] = _TREE.at2po_expansions,
    micro_batch_tokens: Annotated[int, typer.Option(help="most tokens per forward (a tree is never split)")] = 16384,
    packed_layout: Annotated[
        str, typer.Option(help="packed: tree (flat row, ancestors' K/V reused) or segments (learner.packed_layout)")
    ] = LearnerConfig().packed_layout,
    segment_tokens: Annotated[
        int, typer.Option(help="segments layout: most tokens per segment (learner.segment_tokens); 0 = whole tree")
    ] = LearnerConfig().segment_tokens,
    torch_threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    sync_repeats: Annotated[int, typer.Option(help="timed weight transfers")] = 5,
    chunk_kb: Annotated[int, typer.Option(help="weight chunk size in KiB")] = 1024,
    seed: Annotated[int, typer.Option(help="sampling and jitter seed")] = 0,
    model_dir: Annotated[Path | None, typer.Option(help="policy directory (default: a fresh tiny model)")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="where the temporary world and model go")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON object")] = False,
) -> None:
    """Packed vs per-path training on AT²PO trees (path tokens/s), and weight broadcast vs raw ZeroMQ."""
    from common.log import configure_logging

    configure_logging("warning" if as_json else "info", role="bench")
    settings = LearnerBenchSettings(
        trees=trees,
        repeats=repeats,
        max_new_tokens=max_new_tokens,
        initial_chains=initial_chains,
        rounds=rounds,
        expansions=expansions,
        micro_batch_tokens=micro_batch_tokens,
        packed_layout=packed_layout,
        segment_tokens=segment_tokens,
        torch_threads=torch_threads,
        sync_repeats=sync_repeats,
        chunk_kb=chunk_kb,
        seed=seed,
    )
    figures = run_learner_bench(settings, work_dir, model_dir)
    typer.echo(json.dumps(figures, indent=None if as_json else 2))
