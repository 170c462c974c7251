"""The actor loop: lease, grow trees concurrently, stream their subtrees, swap weights between turns.

Decided here:
- Tasks come from the run's training split in a seeded order (reshuffled every pass).
  `actor.concurrent_tasks` workers each take a task, lease `builder.trees_per_task` trees from
  replay (fewer if that is what replay grants; none: wait and ask again), and grow them at once;
  all branches of all trees share one generation scheduler, so their turns batch together while
  tool calls run concurrently.
- Streaming: while a tree grows, every `stream_interval_s` the nodes that can no longer change
  (the recorder's rule) go out as one subtree message (seq 0, 1, ...); when the tree is built the
  rest go out as the final message. If nothing is left, the last node sent is sent again in the
  final message (allowed: a node may be repeated with identical content). Sending blocks while
  replay's window of unacked messages is full: that is the back-pressure on this tree.
- Leases of growing trees are renewed every third of their TTL.
- Replay away (restarting): a lease request that times out is counted (`lease_timeouts`) and asked
  again after a backoff (the replay client re-uses its request id, so replay grants it once); the
  actor keeps running and its growing trees keep streaming into the client's window.
- Weights: see actors.weight_sync; every token carries the version that generated it.
- SIGTERM / SIGINT (or `actor.max_trees` reached): no new leases; trees already growing are
  abandoned (replay expires their leases), sent messages are flushed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.builders.common import Budget, BuiltTree, TreeJob, open_recorder
from actors.builders.registry import Builder, make_builder
from actors.generation import GenerationBackend, SamplingParams
from actors.replay_link import ReplayLink
from actors.scheduler import GenerationScheduler
from actors.tree_recorder import TreeRecorder
from actors.weight_sync import WeightWatcher
from common.config import RunConfig, TreeConfig
from common.log import get_logger
from common.metrics import Counters, MetricsWriter
from common.replay_client import ReplayTimeout
from common.subtree import SubtreeHeader, encode_subtree
from common.tree import TurnNode
from common.wire import LeaseGrantMsg
from tools_env.env import ToolEnvironment
from tools_env.task import Task

log = get_logger("actors.actor")


def default_actor_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def builder_from_config(tree: TreeConfig, vocab_size: int) -> Builder:
    """The configured tree builder with its options taken from the `tree.*` keys."""
    if tree.builder == "chain":
        return make_builder("chain", chains=tree.chains)
    if tree.builder == "tree-grpo":
        return make_builder(
            "tree-grpo", trees=tree.tree_grpo_trees, expansions=tree.tree_grpo_expansions, rounds=tree.tree_grpo_rounds
        )
    if tree.builder == "arpo":
        return make_builder(
            "arpo",
            paths=tree.arpo_paths,
            initial_chains=tree.arpo_initial_chains,
            alpha=tree.arpo_alpha,
            beta=tree.arpo_beta,
            variant=tree.arpo_variant,
            vocab_size=vocab_size,
        )
    return make_builder(
        "at2po",
        initial_chains=tree.at2po_initial_chains,
        rounds=tree.at2po_rounds,
        expansions=tree.at2po_expansions,
        alpha=tree.at2po_alpha,
        variant=tree.at2po_variant,
    )


def tree_seed(actor_seed: int, tree_id: str) -> int:
    """A tree's sampling seed: a function of the run's seed and the tree id (stable across processes)."""
    return (actor_seed * 1_000_003 + zlib.crc32(tree_id.encode())) % 2**31


def tool_latency_means(counters: dict[str, int]) -> dict[str, float]:
    """Mean latency per tool from the environment's summed-latency and call counters."""
    means = {}
    for name, total in counters.items():
        if name.startswith("tool_latency_ms_"):
            tool = name.removeprefix("tool_latency_ms_")
            calls = counters.get(f"tool_calls_{tool}", 0)
            if calls:
                means[tool] = round(total / calls, 2)
    return means


def task_order(tasks: Sequence[Task], seed: int) -> Iterator[Task]:
    """Every task once per pass, in a new seeded order each pass."""
    if not tasks:
        raise ValueError("no training tasks")
    rng = random.Random(seed)
    while True:
        order = list(tasks)
        rng.shuffle(order)
        yield from order


@dataclass
class ActorStats:
    trees: int = 0
    leaves: int = 0
    generated_tokens: int = 0
    rewards: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, built: BuiltTree) -> None:
        self.trees += 1
        self.leaves += built.leaves
        self.generated_tokens += built.generated_tokens
        self.rewards.extend(
            node.reward for node in built.tree.nodes.values() if node.is_leaf and node.reward is not None
        )

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self.started)
        recent = self.rewards[-512:]
        return {
            "trees": self.trees,
            "leaves": self.leaves,
            "generated_tokens": self.generated_tokens,
            "trees_per_s": round(self.trees / elapsed, 4),
            "tokens_per_s": round(self.generated_tokens / elapsed, 2),
            "leaf_reward_mean": round(float(np.mean(recent)), 4) if recent else None,
        }


class Actor:
    """One actor process's work, given its parts (so tests can hand in a small backend and env)."""

    def __init__(
        self,
        config: RunConfig,
        backend: GenerationBackend,
        codec: Any,
        vocab_size: int,
        env: ToolEnvironment,
        tasks: Sequence[Task],
        actor_id: str | None = None,
        stream_interval_s: float = 0.2,
    ) -> None:
        self.config = config
        self.backend = backend
        self.codec = codec
        self.vocab_size = vocab_size
        self.env = env
        self.actor_id = actor_id or config.actor.actor_id or default_actor_id()
        self.stream_interval_s = stream_interval_s
        self.builder = builder_from_config(config.tree, vocab_size)
        tree = config.tree
        self.sampling = SamplingParams(temperature=tree.temperature, top_p=tree.top_p)
        self.budget = Budget(
            max_new_tokens=tree.max_new_tokens,
            max_tree_tokens=tree.max_tree_tokens,
            max_context_tokens=tree.max_context_tokens,
        )
        self.tasks = task_order(tasks, config.actor.seed)
        self.counters = Counters()
        self.stats = ActorStats()
        self.metrics = MetricsWriter(config.logging.metrics_path, role="actor")
        self.stopping = asyncio.Event()
        self._growing: set[str] = set()
        self._trees_started = 0
        self._learner_version = 0

    # ---------------------------------------------------------------------------------- running

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("actor_stopping", actor_id=self.actor_id)
        self.stopping.set()

    async def run(self) -> ActorStats:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, self.request_stop)
        transport = self.config.transport
        scheduler = GenerationScheduler(self.backend, self.sampling, max_batch=self.config.actor.max_batch)
        link = ReplayLink(transport.replay_endpoint, self.actor_id, transport, self.config.actor.window)
        watcher = WeightWatcher(
            transport, self.backend, scheduler, timeout_s=self.config.actor.weights_timeout_s, counters=self.counters
        )
        log.info("actor_started", actor_id=self.actor_id, builder=self.builder.name, version=self.backend.version)
        helpers = [
            asyncio.create_task(watcher.run(self.stopping)),
            asyncio.create_task(self._renew_leases(link)),
            asyncio.create_task(self._report(link, scheduler)),
        ]
        workers = [
            asyncio.create_task(self._worker(link, scheduler)) for _ in range(self.config.actor.concurrent_tasks)
        ]
        try:
            stop_wait = asyncio.create_task(self.stopping.wait())
            pending: set[asyncio.Task[Any]] = {stop_wait, *workers}
            while stop_wait in pending and len(pending) > 1:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(not task.cancelled() and task.exception() is not None for task in done):
                    break  # a worker failed: stop the others and report it
            self.request_stop()
            stop_wait.cancel()
            # Workers finish the message they are sending, then stop; growing trees are abandoned.
            for worker in workers:
                worker.cancel()
            results = await asyncio.gather(*workers, return_exceptions=True)
            failures = [
                r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
            ]
            for failure in failures:
                log.error("actor_worker_failed", error=repr(failure))
            await link.flush(timeout_s=30.0)
        finally:
            self.stopping.set()
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            scheduler.close()
            watcher.close()
            link.close()
            self.metrics.emit("actor_final", **self.stats.snapshot(), counters=self.counters.snapshot())
            self.metrics.close()
        log.info("actor_stopped", actor_id=self.actor_id, **self.stats.snapshot())
        if failures:
            raise failures[0]
        return self.stats

    # ---------------------------------------------------------------------------------- trees

    def _may_start(self) -> bool:
        limit = self.config.actor.max_trees
        return not self.stopping.is_set() and (limit is None or self._trees_started < limit)

    async def _worker(self, link: ReplayLink, scheduler: GenerationScheduler) -> None:
        backoff_s = 0.05
        while self._may_start():
            task = next(self.tasks)
            wanted = self.builder.trees_per_task
            limit = self.config.actor.max_trees
            if limit is not None:
                wanted = min(wanted, limit - self._trees_started)
            grant = await self._ask_leases(link, wanted)
            if grant is not None and not grant.tree_ids:
                self.counters.inc("leases_refused")
                log.debug("leases_refused", reason=grant.reason)
            if grant is None or not grant.tree_ids:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=backoff_s)
                backoff_s = min(2.0, backoff_s * 2)
                continue
            backoff_s = 0.05
            self._trees_started += len(grant.tree_ids)
            await asyncio.gather(
                *(
                    self._grow(link, scheduler, task, tree_id, tree_seed(self.config.actor.seed, tree_id))
                    for tree_id in grant.tree_ids
                )
            )

    async def _grow(
        self, link: ReplayLink, scheduler: GenerationScheduler, task: Task, tree_id: str, seed: int
    ) -> None:
        recorder = open_recorder(task, self.env, self.codec, seed, tree_id, self.actor_id, self.vocab_size)
        self._growing.add(tree_id)
        build = asyncio.create_task(
            self.builder.build(
                TreeJob(
                    task,
                    self.env,
                    scheduler,
                    self.codec,
                    self.sampling,
                    seed,
                    self.budget,
                    tree_id=tree_id,
                    actor_id=self.actor_id,
                    recorder=recorder,
                )
            )
        )
        seq = 0
        last_sent: list[TurnNode] = []
        try:
            while not build.done():
                await asyncio.wait({build}, timeout=self.stream_interval_s)
                if build.done():
                    break
                nodes = recorder.take_new_nodes()
                if nodes:
                    await self._send(link, recorder, task, nodes, seq, final=False)
                    seq, last_sent = seq + 1, nodes
            built = build.result()
            nodes = recorder.take_new_nodes() or last_sent[-1:]
            await self._send(link, recorder, task, nodes, seq, final=True)
        except asyncio.CancelledError:
            build.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await build
            self.counters.inc("trees_abandoned")
            raise
        finally:
            self._growing.discard(tree_id)
        self.stats.add(built)
        self.counters.inc("trees_done")
        self.metrics.emit(
            "tree",
            tree_id=tree_id,
            task_id=task.task_id,
            leaves=built.leaves,
            generated_tokens=built.generated_tokens,
            tool_calls=sum(1 for node in built.tree.nodes.values() if node.tool_call),
            leaf_rewards=[n.reward for n in built.tree.nodes.values() if n.is_leaf and n.reward is not None],
            messages=seq + 1,
            policy_version=self.backend.version,
            staleness=max(0, self._learner_version - self.backend.version),
            builder_stats={k: v for k, v in built.stats.items() if isinstance(v, int | float | str)},
        )

    async def _send(
        self, link: ReplayLink, recorder: TreeRecorder, task: Task, nodes: list[TurnNode], seq: int, final: bool
    ) -> None:
        header = SubtreeHeader(recorder.tree_id, task.task_id, self.actor_id, seq, final)
        await link.send(encode_subtree(header, nodes), recorder.tree_id, seq)
        self.counters.inc("subtrees_sent")

    # ---------------------------------------------------------------------------------- upkeep

    async def _renew_leases(self, link: ReplayLink) -> None:
        interval = max(1.0, self.config.replay.lease_ttl_s / 3)
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=interval)
            if self._growing and not self.stopping.is_set():
                grant = await self._ask_leases(link, 0, renew=sorted(self._growing))
                if grant is not None and grant.lost:
                    self.counters.inc("leases_lost", len(grant.lost))
                    log.warning("leases_lost", trees=grant.lost)

    async def _ask_leases(self, link: ReplayLink, n: int, renew: Sequence[str] = ()) -> LeaseGrantMsg | None:
        """A lease grant (its learner version noted), or None when replay did not answer in time (counted; the
        caller asks again)."""
        try:
            grant = await link.leases(n, renew=renew)
        except ReplayTimeout as error:
            self.counters.inc("lease_timeouts")
            log.warning("lease_request_timed_out", n=n, renew=len(renew), error=str(error))
            return None
        self._learner_version = max(self._learner_version, grant.learner_version)
        return grant

    async def _report(self, link: ReplayLink, scheduler: GenerationScheduler, interval_s: float = 10.0) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=interval_s)
            snapshot = {
                **self.stats.snapshot(),
                "policy_version": self.backend.version,
                "learner_version": self._learner_version,
                "weights_staleness": max(0, self._learner_version - self.backend.version),
                "growing_trees": len(self._growing),
                "tool_latency_ms_mean": tool_latency_means(self.env.counters.snapshot()),
                "env": self.env.counters.snapshot(),
                "actor": self.counters.snapshot(),
                "scheduler": scheduler.stats.snapshot(),
                "replay_client": await link.counters(),
            }
            self.metrics.emit("actor_stats", **snapshot)
            log.info("actor_progress", **{k: v for k, v in snapshot.items() if not isinstance(v, dict)})
