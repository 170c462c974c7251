"""The learner process: sample completed trees from replay, update, publish weights, report the version.

Order of one step (decided here; the staleness bound depends on it):
1. rank 0 asks replay for `trees_per_step` trees at the current version, waiting (logged every few
   seconds with replay's reason) up to `sample_timeout_s`, and groups them by task;
2. the batch goes to every rank as framed bytes (torch.distributed broadcast of a uint8 tensor);
3. every rank runs the update; the version becomes v + 1;
4. rank 0 publishes weights v + 1 (if due), THEN reports v + 1 to replay: a report opens admission
   for newer trees, so actors must be able to fetch the weights it refers to;
5. every `checkpoint_every` steps, and at a clean stop, a checkpoint (all ranks; rank 0 marks it).
At start (and after a resume) the current version is published and reported before the first sample.

Stopping: `stop` (a threading.Event, set by SIGTERM/SIGINT in the CLI) is checked between steps and
while waiting for replay; rank 0 then tells the other ranks through the same broadcast.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from common.config import RunConfig
from common.log import get_logger
from common.metrics import MetricsWriter
from common.replay_client import LearnerReplayClient, ReplayClientError, ReplayTimeout, SampledTree
from learner import checkpoint
from learner.engine import DistributedSpec, TrainEngine, load_train_model
from learner.sampling import GroupAssembler, TreeItem, decode_sampled, encode_sampled
from learner.update import PolicyUpdater, UpdateSettings
from learner.weights_out import WeightBroadcaster

log = get_logger("learner")

_BATCH, _STOP = 0, 1


class LearnerStalled(RuntimeError):
    """Replay handed out no trees within `sample_timeout_s`; says what the learner waited for."""


@dataclass
class LearnerSummary:
    steps: int = 0
    version: int = 0
    trees_trained: int = 0
    stopped_by: str = ""
    last_metrics: dict[str, float] = field(default_factory=dict)


def resolve_group_size(config: RunConfig) -> int:
    if config.learner.group_size is not None:
        return config.learner.group_size
    return config.tree.tree_grpo_trees if config.tree.builder == "tree-grpo" else 1


class Learner:
    """One rank of the learner; rank 0 also owns the replay link, the weight publisher and metrics."""

    def __init__(
        self,
        config: RunConfig,
        dist: DistributedSpec | None = None,
        resume: bool = False,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.cfg = config.learner
        self.dist = dist or DistributedSpec()
        self.stop = stop or threading.Event()
        if self.cfg.torch_threads is not None:
            torch.set_num_threads(self.cfg.torch_threads)
        torch.manual_seed(self.cfg.seed)
        self.checkpoint_root = Path(self.cfg.checkpoint_dir)
        settings = UpdateSettings.from_config(self.cfg, config.tree.temperature)  # bad names fail before any work
        model = load_train_model(config.model.dir, self.cfg.bf16)
        ref_model = None
        if self.cfg.kl_coef > 0:
            ref_model = copy.deepcopy(model).eval()
            ref_model.requires_grad_(False)
            if self.cfg.bf16:
                ref_model = ref_model.to(torch.bfloat16)
        self.engine = TrainEngine(model, self.cfg, self.dist)
        self.updater = PolicyUpdater(self.engine, settings, ref_model)
        self.assembler = GroupAssembler(resolve_group_size(config), self.cfg.group_wait_steps)
        self.trees_per_step = self.cfg.trees_per_step or config.replay.trees_per_step
        self.state = checkpoint.LearnerState(version=0, step=0)
        self._saved_version: int | None = None
        if resume:
            self._resume()
        self.is_main = self.dist.rank == 0
        self.replay: LearnerReplayClient | None = None
        self.broadcaster: WeightBroadcaster | None = None
        self.metrics = MetricsWriter(config.logging.metrics_path if self.is_main else None, "learner")
        if self.is_main:
            self.replay = LearnerReplayClient(config.transport.replay_endpoint, config.transport)
            self.broadcaster = WeightBroadcaster(config.transport, publish_every=self.cfg.publish_every)

    # ------------------------------------------------------------------------------------------ state

    def _resume(self) -> None:
        path = checkpoint.latest(self.checkpoint_root)
        if path is None:
            log.info("no complete checkpoint to resume from; starting at version 0", dir=str(self.checkpoint_root))
            return
        self.engine.load(path / checkpoint.ENGINE_DIR, checkpoint.ENGINE_TAG)
        state, held = checkpoint.read_state(path)
        self.state = state
        self._saved_version = state.version
        self.assembler.groups_incomplete = state.groups_incomplete
        self.assembler.add([TreeItem.decode(t) for t in decode_sampled(held)])
        log.info("resumed", checkpoint=str(path), version=state.version, step=state.step, held_trees=len(held))

    def save_checkpoint(self) -> Path:
        """Collective: every rank writes its engine shard; rank 0 writes the learner state and the marker."""
        path = self.checkpoint_root / checkpoint.checkpoint_name(self.state.version)
        self._saved_version = self.state.version
        if self.dist.rank == 0:
            checkpoint.prepare_dir(self.checkpoint_root, self.state.version)
        self._barrier()
        self.engine.save(path / checkpoint.ENGINE_DIR, checkpoint.ENGINE_TAG)
        self._barrier()
        if self.dist.rank == 0:
            self.state.groups_incomplete = self.assembler.groups_incomplete
            checkpoint.export_model(self.engine.module, Path(self.config.model.dir), path / checkpoint.MODEL_DIR)
            checkpoint.finish(path, self.state, encode_sampled(self.assembler.held()))
            removed = checkpoint.prune(self.checkpoint_root, self.cfg.keep_checkpoints)
            log.info("checkpoint written", path=str(path), version=self.state.version, pruned=len(removed))
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            torch_dist.barrier()

    # ------------------------------------------------------------------------------------ publishing

    def _announce(self, force: bool = False) -> float:
        """Publish weights (if due) then report the version to replay; returns the seconds it took."""
        if not self.is_main:
            return 0.0
        assert self.broadcaster is not None and self.replay is not None
        started = time.perf_counter()
        module = self.engine.module
        if force:
            self.broadcaster.publish(module, self.state.version)
        else:
            self.broadcaster.maybe_publish(module, self.state.version)
        self.replay.report_version(self.state.version, timeout_s=self.cfg.sample_timeout_s)
        return time.perf_counter() - started

    # -------------------------------------------------------------------------------------- sampling

    def _sample_groups(self) -> list[list[TreeItem]] | None:
        """Rank 0: trees from replay until at least one task group is ready; None when asked to stop."""
        assert self.replay is not None
        deadline = time.monotonic() + self.cfg.sample_timeout_s
        last_log = 0.0
        last_reason = "no reply yet"
        while True:
            groups = self.assembler.take() if self.assembler.held_trees else []
            if groups:
                return groups
            if self.stop.is_set():
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LearnerStalled(
                    f"learner waited {self.cfg.sample_timeout_s:.0f} s for {self.trees_per_step} completed tree(s) "
                    f"at version {self.state.version} from replay at {self.replay.endpoint}; last reason: {last_reason}"
                )
            try:
                sampled = self.replay.sample(self.trees_per_step, self.state.version, timeout_s=min(1.0, remaining))
            except ReplayTimeout as error:
                last_reason = error.last_reason or "no reply from replay"
                now = time.monotonic()
                if now - last_log > 5.0:
                    last_log = now
                    log.info(
                        "waiting for trees",
                        wanted=self.trees_per_step,
                        version=self.state.version,
                        reason=last_reason,
                        waited_s=round(self.cfg.sample_timeout_s - remaining, 1),
                    )
                continue
            self.assembler.add([TreeItem.decode(t) for t in sampled])
            # Groups of a multi-tree task may need another sample; `take` ages stragglers per update only.
            ready = self.assembler.take()
            if ready:
                return ready

    def _share_batch(self, groups: list[list[TreeItem]] | None) -> list[list[TreeItem]] | None:
        """Rank 0's groups on every rank (framed bytes over torch.distributed); None = stop."""
        if self.dist.world_size == 1:
            return groups
        device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else None
        device = device or torch.device("cpu")
        if self.dist.rank == 0:
            if groups is None:
                header = torch.tensor([_STOP, 0, 0], dtype=torch.long, device=device)
                torch_dist.broadcast(header, 0)
                return None
            flat: list[SampledTree] = [item.sampled for group in groups for item in group]
            payload = encode_sampled(flat)
            header = torch.tensor([_BATCH, len(payload), len(groups)], dtype=torch.long, device=device)
            torch_dist.broadcast(header, 0)
            torch_dist.broadcast(torch.tensor([len(g) for g in groups], dtype=torch.long, device=device), 0)
            torch_dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device), 0)
            return groups
        header = torch.zeros(3, dtype=torch.long, device=device)
        torch_dist.broadcast(header, 0)
        if int(header[0]) == _STOP:
            return None
        sizes = torch.zeros(int(header[2]), dtype=torch.long, device=device)
        torch_dist.broadcast(sizes, 0)
        payload_t = torch.zeros(int(header[1]), dtype=torch.uint8, device=device)
        torch_dist.broadcast(payload_t, 0)
        items = [TreeItem.decode(t) for t in decode_sampled(payload_t.cpu().numpy().tobytes())]
        out: list[list[TreeItem]] = []
        start = 0
        for size in sizes.tolist():
            out.append(items[start : start + size])
            start += size
        return out

    # ------------------------------------------------------------------------------------------- run

    def run(self) -> LearnerSummary:
        summary = LearnerSummary(version=self.state.version)
        try:
            self._announce(force=True)
            while True:
                groups: list[list[TreeItem]] | None = None
                wait_started = time.perf_counter()
                if self.is_main:
                    done = self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps
                    if done:
                        summary.stopped_by = "max_steps"
                    elif self.stop.is_set():
                        summary.stopped_by = "signal"
                    else:
                        groups = self._sample_groups()
                        if groups is None:
                            summary.stopped_by = "signal"
                groups = self._share_batch(groups)
                if groups is None:
                    break
                wait_s = time.perf_counter() - wait_started
                metrics = self._step(groups, wait_s)
                summary.steps += 1
                summary.last_metrics = metrics
                if self.state.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if self._saved_version != self.state.version:
                self.save_checkpoint()
        finally:
            self.close()
        summary.version = self.state.version
        summary.trees_trained = self.state.trees_trained
        return summary

    def _step(self, groups: list[list[TreeItem]], wait_s: float) -> dict[str, float]:
        trees = [[item.tree for item in group] for group in groups]
        staleness = [float(item.staleness) for group in groups for item in group if item.staleness is not None]
        metrics = self.updater.update(trees, self.state.version)
        self.state.version += 1
        self.state.step += 1
        self.state.trees_trained += sum(len(g) for g in groups)
        publish_s = self._announce()
        metrics.update(
            {
                "staleness_min": min(staleness) if staleness else math.nan,
                "staleness_mean": sum(staleness) / len(staleness) if staleness else math.nan,
                "staleness_max": max(staleness) if staleness else math.nan,
                "groups": float(len(groups)),
                "groups_incomplete": float(self.assembler.groups_incomplete),
                "redelivered_dropped": float(self.assembler.redelivered_dropped),
                "held_trees": float(self.assembler.held_trees),
                "sample_wait_s": wait_s,
                "publish_s": publish_s,
            }
        )
        if self.is_main:
            counts = Counter(int(v) for v in staleness)
            link = self.replay.counters() if self.replay is not None else {}
            self.metrics.emit(
                "learner_step",
                step=self.state.step,
                version=self.state.version,
                staleness_counts={str(k): n for k, n in sorted(counts.items())},
                samples_by_reference=link.get("samples_by_reference", 0),
                reference_fallbacks=link.get("reference_fallbacks", 0),
                **metrics,
            )
            log.info(
                "update",
                step=self.state.step,
                version=self.state.version,
                trees=int(metrics["trees"]),
                reward=round(metrics["reward_mean"], 4),
                loss=round(metrics["loss"], 6),
                clip=round(metrics.get("clip_fraction", 0.0), 4),
                entropy=round(metrics["policy_entropy"], 4),
                staleness=metrics["staleness_mean"],
                tokens_per_s=round(metrics["tokens_per_s"], 1),
                wait_s=round(wait_s, 3),
            )
        return metrics

    def close(self) -> None:
        if self.broadcaster is not None:
            self.broadcaster.close()
            self.broadcaster = None
        if self.replay is not None:
            self.replay.close()
            self.replay = None
        self.metrics.close()


def connection_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean a peer is gone, for the CLI's exit codes."""
    return (ReplayClientError, LearnerStalled)


def describe(summary: LearnerSummary) -> dict[str, Any]:
    return {
        "steps": summary.steps,
        "version": summary.version,
        "trees_trained": summary.trees_trained,
        "stopped_by": summary.stopped_by,
    }
