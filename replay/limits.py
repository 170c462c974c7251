"""Admission control, the samples-per-insert rate limiter, and the start-time refusal of deadlocks.

Admission (AReaL's rule, DESIGN.md section 3): a lease to start a tree is granted while, after the
grant, `started <= (max_staleness + learner_version + 1) * trees_per_step`, where `started` counts
the trees that completed and were not dropped as stale, plus the trees still growing. Dropped
(stale, expired, rejected) trees give their place back, otherwise a run that loses trees would stop
admitting while the learner waits for trees: a deadlock.

Rate limiter (Reverb's SampleToInsertRatio): with `diff = inserts * spi - samples`, an insert is
allowed while `diff + spi <= max_diff` and a sample of n trees while `diff - n >= min_diff` and at
least `min_size_to_sample` trees were inserted, where `min_diff/max_diff = spi * min_size_to_sample
-/+ error_buffer`. Inserts are throttled at the source: a lease counts as a pending insert, so an
actor that would push the ratio out of the band gets no lease (rather than a refused ack).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ReplayConfig


class DeadlockConfigError(ValueError):
    """A replay configuration that could stop sampling or inserting forever; says why and what to change."""


@dataclass(frozen=True)
class RateLimiter:
    """Reverb-style samples-per-insert band."""

    samples_per_insert: float
    min_size_to_sample: int
    min_diff: float
    max_diff: float

    @classmethod
    def from_config(cls, config: ReplayConfig) -> RateLimiter | None:
        if config.samples_per_insert is None:
            return None
        spi = config.samples_per_insert
        offset = spi * config.min_size_to_sample
        return cls(spi, config.min_size_to_sample, offset - config.error_buffer, offset + config.error_buffer)

    def diff(self, inserts: int, samples: int) -> float:
        return inserts * self.samples_per_insert - samples

    def inserts_allowed(self, inserts_incl_pending: int, samples: int) -> int:
        """How many more inserts (leases) the band allows now."""
        room = self.max_diff - self.diff(inserts_incl_pending, samples)
        return max(0, int(room // self.samples_per_insert))

    def sample_block_reason(self, n: int, inserts: int, samples: int) -> str | None:
        """Why a sample of n trees must wait, or None when it may proceed."""
        if inserts < self.min_size_to_sample:
            return f"rate limiter: {inserts} of min_size_to_sample={self.min_size_to_sample} trees inserted"
        if self.diff(inserts, samples) - n < self.min_diff:
            return (
                f"rate limiter: sampling {n} now would take inserts*spi - samples to "
                f"{self.diff(inserts, samples) - n:.1f}, below {self.min_diff:.1f}; waiting for inserts"
            )
        return None


def admission_capacity(max_staleness: int, learner_version: int, trees_per_step: int) -> int:
    """Most trees that may have been started by now without exceeding the staleness bound."""
    return (max_staleness + learner_version + 1) * trees_per_step


def check_replay_config(config: ReplayConfig, map_size_bytes: int | None = None) -> None:
    """Refuse at start the settings under which sampling or inserting could block forever."""
    problems: list[str] = []
    if config.sampler == "fifo" and config.samples_per_insert is not None:
        problems.append(
            "replay.samples_per_insert is set but replay.sampler='fifo' hands each tree out exactly once: "
            "the ratio is then fixed at 1. Use sampler='uniform' with max_times_sampled for a rate limiter."
        )
    if config.trees_per_step > config.capacity_trees:
        problems.append(
            f"replay.trees_per_step={config.trees_per_step} exceeds replay.capacity_trees={config.capacity_trees}: "
            "a learner batch could never fit in the store."
        )
    limiter = RateLimiter.from_config(config)
    if limiter is not None:
        spi = limiter.samples_per_insert
        if spi < 1:
            problems.append(
                f"replay.samples_per_insert={spi} is below 1: the limiter then waits for {1 / spi:.3g} inserts per "
                "sample, but staleness admission starts only about one new tree per sampled tree, so the two "
                "block each other. Use samples_per_insert >= 1 (or no rate limiter with the fifo sampler)."
            )
        if config.error_buffer < max(1.0, spi):
            problems.append(
                f"replay.error_buffer={config.error_buffer} is below max(1, samples_per_insert)={max(1.0, spi)}: "
                "the band is narrower than one insert, so inserts and samples can block each other."
            )
        if limiter.max_diff < spi * config.min_size_to_sample:
            problems.append(
                "replay.error_buffer is too small for replay.min_size_to_sample: inserts would be blocked before "
                "the min_size_to_sample trees that sampling needs were inserted."
            )
        if limiter.max_diff - limiter.min_diff < config.trees_per_step:
            problems.append(
                f"the rate limiter's band (2 * error_buffer = {limiter.max_diff - limiter.min_diff:.1f}) is narrower "
                f"than one learner batch (replay.trees_per_step={config.trees_per_step}): with inserts blocked at "
                "the top of the band, a whole batch could never be sampled. Raise replay.error_buffer."
            )
        if limiter.max_diff < spi * config.trees_per_step:
            problems.append(
                f"the rate limiter stops inserts at {limiter.max_diff / spi:.1f} unsampled trees (min_size_to_sample + "
                f"error_buffer / samples_per_insert), fewer than one learner batch (replay.trees_per_step="
                f"{config.trees_per_step}): a whole batch could never be ready. Raise replay.error_buffer."
            )
        first_inserts = admission_capacity(config.max_staleness, 0, config.trees_per_step)
        if first_inserts * spi - config.trees_per_step < limiter.min_diff:
            problems.append(
                f"admission lets only {first_inserts} trees start before the first update, but sampling a batch of "
                f"{config.trees_per_step} must leave inserts*spi - samples >= {limiter.min_diff:.1f}: the first batch "
                "could never be sampled. Raise replay.error_buffer or replay.max_staleness."
            )
        if config.max_times_sampled and spi > config.max_times_sampled:
            problems.append(
                f"replay.samples_per_insert={spi} exceeds replay.max_times_sampled={config.max_times_sampled}: "
                "trees retire before the ratio can be met, so samples run dry while inserts stay blocked."
            )
        if config.min_size_to_sample > config.capacity_trees:
            problems.append(
                f"replay.min_size_to_sample={config.min_size_to_sample} exceeds replay.capacity_trees="
                f"{config.capacity_trees}: the store can never hold enough trees to start sampling."
            )
    first_capacity = admission_capacity(config.max_staleness, 0, config.trees_per_step)
    needed = max(config.trees_per_step, config.min_size_to_sample if limiter else 1)
    if first_capacity < needed:
        problems.append(
            f"admission allows only {first_capacity} trees before the first update but sampling needs {needed}: "
            "raise replay.max_staleness or lower replay.min_size_to_sample."
        )
    if map_size_bytes is not None and config.capacity_bytes > 0.9 * map_size_bytes:
        problems.append(
            f"replay.capacity_bytes={config.capacity_bytes} leaves no headroom in the LMDB map of {map_size_bytes} "
            "bytes (replay.map_size_gb); keep capacity_bytes at most 90% of it."
        )
    if problems:
        raise DeadlockConfigError("refusing this replay configuration:\n- " + "\n- ".join(problems))
