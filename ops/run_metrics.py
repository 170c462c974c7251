"""Read a run's metrics files (one JSON-lines file per role) into progress figures and histories.

Every role appends records `{"ts", "role", "name", ...}` (common/metrics.py) to
`<run>/metrics/<role>.jsonl`. `MetricsTail` reads only what was appended since the last call (a
partial last line is kept for the next read), so the live view can poll cheaply; `RunHistory` keeps
what the report and the summary need.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class MetricsTail:
    """Incremental reader of every `*.jsonl` file in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self.bad_lines = 0

    def read_new(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        if not self.directory.is_dir():
            return records
        for path in sorted(self.directory.glob("*.jsonl")):
            with path.open("rb") as handle:
                handle.seek(self._offsets.get(path, 0))
                data = self._partial.pop(path, b"") + handle.read()
                self._offsets[path] = handle.tell()
            lines = data.split(b"\n")
            if lines[-1]:
                self._partial[path] = lines[-1]
            for line in lines[:-1]:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.bad_lines += 1
                    continue
                if isinstance(record, dict):
                    record.setdefault("source", path.stem)  # which file (role instance) it came from
                    records.append(record)
        return sorted(records, key=lambda r: r.get("ts", 0.0))


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


@dataclass
class RunHistory:
    """Everything the live view, the summary and the report read, accumulated from the records."""

    started_ts: float | None = None
    learner_steps: list[dict[str, Any]] = field(default_factory=list)
    trees: list[dict[str, Any]] = field(default_factory=list)
    replay: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    staleness_counts: Counter[int] = field(default_factory=Counter)

    def add(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            if self.started_ts is None and isinstance(record.get("ts"), int | float):
                self.started_ts = float(record["ts"])
            name = record.get("name")
            if name == "learner_step":
                self.learner_steps.append(record)
                for key, count in (record.get("staleness_counts") or {}).items():
                    self.staleness_counts[int(key)] += int(count)
            elif name == "tree":
                self.trees.append(record)
            elif name == "replay_stats":
                self.replay = record
            elif name == "eval":
                self.evals.append(record)

    # ------------------------------------------------------------------------------ figures

    def rate(self, key: str | None, now: float, window_s: float = 60.0) -> float:
        """Trees (key None) or the sum of `key` per second over the last window_s of tree records."""
        recent = [t for t in self.trees if now - float(t.get("ts", 0.0)) <= window_s]
        if not recent:
            return 0.0
        span = min(window_s, max(1e-9, now - float(self.trees[0]["ts"])))
        total = len(recent) if key is None else sum(_num(t.get(key)) for t in recent)
        return total / span

    def learner_busy_fraction(self) -> float:
        """Share of the learner's wall time spent in updates (vs waiting for trees or publishing)."""
        steps = self.learner_steps
        if len(steps) < 2:
            return math.nan
        busy = sum(_num(s.get("update_seconds")) for s in steps[1:])
        span = float(steps[-1]["ts"]) - float(steps[0]["ts"])
        return busy / span if span > 0 else math.nan

    def staleness(self) -> dict[str, float]:
        counts = self.staleness_counts
        total = sum(counts.values())
        if not total:
            return {"mean": math.nan, "max": math.nan}
        return {"mean": sum(k * v for k, v in counts.items()) / total, "max": float(max(counts))}

    def snapshot(self, now: float) -> dict[str, Any]:
        """The live view's figures."""
        last = self.learner_steps[-1] if self.learner_steps else {}
        recent_rewards = [_num(s.get("reward_mean")) for s in self.learner_steps[-5:]]
        return {
            "elapsed_s": now - self.started_ts if self.started_ts else 0.0,
            "learner_step": last.get("step", 0),
            "learner_version": last.get("version", 0),
            "reward": sum(recent_rewards) / len(recent_rewards) if recent_rewards else math.nan,
            "entropy": _num(last.get("policy_entropy")),
            "staleness_mean": _num(last.get("staleness_mean")),
            "learner_tokens_per_s": _num(last.get("tokens_per_s")),
            "busy_fraction": self.learner_busy_fraction(),
            "trees_per_s": self.rate(None, now),
            "generated_tokens_per_s": self.rate("generated_tokens", now),
            "trees_done": len(self.trees),
            "replay_ready": self.replay.get("ready"),
            "replay_live_trees": self.replay.get("live_trees"),
            "heldout_em": self.evals[-1].get("em") if self.evals else None,
        }
