"""Admission, the samples-per-insert rate limiter, and the refusal of deadlocking configurations.

replay/limits.py states the rules: inserts (leases) are allowed while `diff + spi <= max_diff`, a
sample of n while `diff - n >= min_diff` and `min_size_to_sample` trees were inserted, with
`diff = inserts * spi - samples` and the band `spi * min_size_to_sample -/+ error_buffer`; and
`check_replay_config` refuses at start every setting under which sampling or inserting could block
forever. The cooperative-run tests below drive a store as an eager actor and a learner would, and
call it a deadlock when neither a lease nor a sample can ever succeed again.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from common.config import ReplayConfig
from replay import store as store_module
from replay.limits import DeadlockConfigError, RateLimiter, admission_capacity, check_replay_config
from replay.store import TreeStore

MAP_BYTES = int(0.05 * 1024**3)


def limiter_config(**overrides: Any) -> ReplayConfig:
    """A valid uniform + rate limiter configuration, unless `overrides` break it."""
    fields: dict[str, Any] = {
        "map_size_gb": 0.05,
        "capacity_bytes": 20 * 1024 * 1024,
        "sampler": "uniform",
        "max_times_sampled": 1,
        "samples_per_insert": 1.0,
        "min_size_to_sample": 1,
        "error_buffer": 8.0,
        "trees_per_step": 4,
        "max_staleness": 4,
        "capacity_trees": 1000,
    }
    fields.update(overrides)
    return ReplayConfig(**fields)


def diff(store: TreeStore) -> float:
    stats = store.stats()
    return stats["inserts"] * store.limiter.samples_per_insert - (stats["samples"] + stats["forfeited_samples"])


# ============================================================================ the limiter alone


def test_limiter_is_off_without_samples_per_insert() -> None:
    assert RateLimiter.from_config(ReplayConfig()) is None
    assert RateLimiter.from_config(limiter_config(samples_per_insert=None)) is None


def test_limiter_band_is_centred_on_min_size_to_sample() -> None:
    limiter = RateLimiter.from_config(limiter_config(samples_per_insert=2.0, min_size_to_sample=3, error_buffer=4.0))
    assert limiter is not None
    assert (limiter.min_diff, limiter.max_diff) == (2.0, 10.0)
    assert limiter.diff(5, 3) == 7.0


def test_limiter_inserts_allowed_counts_whole_inserts_that_fit_the_band() -> None:
    limiter = RateLimiter(samples_per_insert=2.0, min_size_to_sample=3, min_diff=2.0, max_diff=10.0)
    assert limiter.inserts_allowed(0, 0) == 5  # 5 * 2 = 10 <= 10
    assert limiter.inserts_allowed(4, 0) == 1
    assert limiter.inserts_allowed(5, 0) == 0
    assert limiter.inserts_allowed(5, 4) == 2
    assert limiter.inserts_allowed(9, 0) == 0  # never negative
    fractional = RateLimiter(samples_per_insert=1.5, min_size_to_sample=1, min_diff=-1.5, max_diff=4.5)
    assert fractional.inserts_allowed(0, 0) == 3
    assert fractional.inserts_allowed(1, 0) == 2


def test_limiter_blocks_samples_below_min_size_and_below_the_band() -> None:
    limiter = RateLimiter(samples_per_insert=2.0, min_size_to_sample=3, min_diff=2.0, max_diff=10.0)
    reason = limiter.sample_block_reason(1, 2, 0)
    assert reason is not None and "min_size_to_sample=3" in reason
    assert limiter.sample_block_reason(4, 3, 0) is None  # 6 - 4 = 2 >= 2
    reason = limiter.sample_block_reason(5, 3, 0)
    assert reason is not None and "waiting for inserts" in reason
    assert limiter.sample_block_reason(2, 3, 2) is None
    assert limiter.sample_block_reason(3, 3, 2) is not None


@pytest.mark.parametrize(
    ("staleness", "version", "per_step", "expected"),
    [(0, 0, 1, 1), (4, 0, 16, 80), (4, 3, 16, 128), (2, 5, 3, 24)],
)
def test_admission_capacity_is_areals_rule(staleness: int, version: int, per_step: int, expected: int) -> None:
    assert admission_capacity(staleness, version, per_step) == expected


# ============================================================================ the limiter in the store


def test_store_limits_leases_and_samples_to_the_band(kit: SimpleNamespace) -> None:
    # spi 2, band [2*2 - 3, 2*2 + 3] = [1, 7]
    config = limiter_config(
        samples_per_insert=2.0, max_times_sampled=2, min_size_to_sample=2, error_buffer=3.0, trees_per_step=2
    )
    store = kit.open(config)
    limiter = store.limiter
    assert (limiter.min_diff, limiter.max_diff) == (1.0, 7.0)
    first = store.grant_leases(kit.ACTOR, 10)
    assert first.tree_ids == ["0", "1", "2"]  # a lease is a pending insert: 3 * 2 <= 7 < 4 * 2
    assert "rate limiter" in first.reason
    assert store.grant_leases(kit.ACTOR, 1).tree_ids == []

    kit.complete(store, "0")
    early = store.sample("s0", 1, 0)
    assert not early.ready and "min_size_to_sample=2" in early.reason
    kit.complete(store, "1", seed=1)
    kit.complete(store, "2", seed=2)
    assert diff(store) == 6
    assert store.sample("s1", 2, 0).ready
    assert diff(store) == 4 >= limiter.min_diff
    assert kit.lease(store, 5) == ["3"]  # (3 + 1) * 2 - 2 = 6 <= 7, one more would be 8
    assert store.sample("s2", 2, 0).ready
    assert diff(store) == 2
    blocked = store.sample("s3", 2, 0)
    assert not blocked.ready and blocked.trees == []
    assert "below 1.0" in blocked.reason and "waiting for inserts" in blocked.reason
    assert store.stats()["samples"] == 4
    assert store.sample("s3", 1, 0).ready  # 2 - 1 = 1 >= 1
    assert diff(store) == 1
    kit.complete(store, "3", seed=3)
    assert diff(store) == 3
    assert store.sample("s4", 2, 0).ready


@dataclass
class RunResult:
    deadlock: str | None
    versions: int
    stats: dict[str, Any]


def cooperative_run(kit: SimpleNamespace, store: TreeStore, steps: int, lease_factor: int = 2) -> RunResult:
    """An eager actor (asks for `lease_factor` batches of leases, completes them at once, with tokens of the
    learner's current version) and a learner (asks for one batch per step, reporting its version).

    Checks the band after every grant and sample; returns where it deadlocked, if it did.
    """
    config = store.config
    limiter = store.limiter
    spi = limiter.samples_per_insert
    turn = kit.turn
    version = 0
    for step in range(steps):
        decision = store.grant_leases(kit.ACTOR, config.trees_per_step * lease_factor)
        stats = store.stats()
        taken = stats["samples"] + stats["forfeited_samples"]
        assert (stats["inserts"] + stats["growing"]) * spi - taken <= limiter.max_diff
        messages = [
            kit.message(
                tree_id,
                0,
                [turn(0, -1, 0), turn(1, 0, 1, leaf=True, reward=1.0, version=store.learner_version)],
                final=True,
            )
            for tree_id in decision.tree_ids
        ]
        kit.ingest_ok(store, messages)
        sample = store.sample(f"r{step}", config.trees_per_step, version)
        if sample.ready:
            assert len(sample.trees) == config.trees_per_step
            assert diff(store) >= limiter.min_diff
            version += 1
            continue
        if decision.tree_ids:
            continue
        # Neither side moved. A version report inside `sample` may have opened admission; look again.
        retry = store.grant_leases(kit.ACTOR, 1)
        if retry.tree_ids:
            kit.ingest_ok(
                store,
                [
                    kit.message(
                        retry.tree_ids[0],
                        0,
                        [turn(0, -1, 0), turn(1, 0, 1, leaf=True, reward=1.0, version=store.learner_version)],
                        final=True,
                    )
                ],
            )
            continue
        if store.sample(f"retry{step}", config.trees_per_step, version).ready:
            version += 1
            continue
        return RunResult(f"step {step}: lease: {retry.reason}; sample: {sample.reason}", version, store.stats())
    return RunResult(None, version, store.stats())


SANE_LIMITER_CONFIGS = {
    "spi1": {"samples_per_insert": 1.0, "error_buffer": 4.0, "trees_per_step": 4, "max_staleness": 2},
    "spi1-min-size": {"min_size_to_sample": 8, "error_buffer": 8.0, "trees_per_step": 4, "max_staleness": 3},
    "spi1-unbounded": {"max_times_sampled": 0, "error_buffer": 6.0, "trees_per_step": 3, "max_staleness": 1},
    "spi2": {
        "samples_per_insert": 2.0,
        "max_times_sampled": 2,
        "min_size_to_sample": 2,
        "error_buffer": 4.0,
        "trees_per_step": 2,
        "max_staleness": 1000,
    },
    "spi1.5": {
        "samples_per_insert": 1.5,
        "max_times_sampled": 2,
        "min_size_to_sample": 3,
        "error_buffer": 3.0,
        "trees_per_step": 3,
        "max_staleness": 1000,
    },
}


@pytest.mark.parametrize("name", sorted(SANE_LIMITER_CONFIGS))
@pytest.mark.parametrize("lease_factor", [1, 2])
def test_an_accepted_configuration_does_not_deadlock(kit: SimpleNamespace, name: str, lease_factor: int) -> None:
    config = limiter_config(**SANE_LIMITER_CONFIGS[name], seed=3)
    check_replay_config(config, MAP_BYTES)
    result = cooperative_run(kit, kit.open(config), steps=40, lease_factor=lease_factor)
    assert result.deadlock is None, result
    assert result.versions >= 20, result


def test_a_batch_taller_than_the_band_is_refused_and_would_deadlock(
    kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inserts stop at 1 + 5/1 = 6 unsampled trees; a batch needs 8 ready ones.
    config = limiter_config(samples_per_insert=1.0, min_size_to_sample=1, error_buffer=5.0, trees_per_step=8)
    with pytest.raises(DeadlockConfigError, match="fewer than one learner batch"):
        check_replay_config(config)
    monkeypatch.setattr(store_module, "check_replay_config", lambda *args, **kwargs: None)
    result = cooperative_run(kit, kit.open(config), steps=5)
    assert result.deadlock is not None and result.versions == 0
    assert "6 completed trees ready, 8 requested" in result.deadlock


def test_an_admission_window_below_the_band_is_refused_and_would_deadlock(
    kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Admission lets 4 trees start; sampling 4 of them would take diff from 4 to 0, below 4 - 2 = 2.
    config = limiter_config(min_size_to_sample=4, error_buffer=2.0, trees_per_step=4, max_staleness=0)
    with pytest.raises(DeadlockConfigError, match="the first batch could never be sampled"):
        check_replay_config(config)
    monkeypatch.setattr(store_module, "check_replay_config", lambda *args, **kwargs: None)
    result = cooperative_run(kit, kit.open(config), steps=5)
    assert result.deadlock is not None and result.versions == 0
    assert "staleness admission" in result.deadlock and "waiting for inserts" in result.deadlock


def test_stale_drops_do_not_exhaust_the_rate_limiter(kit: SimpleNamespace) -> None:
    config = limiter_config(
        samples_per_insert=2.0,
        max_times_sampled=2,
        min_size_to_sample=2,
        error_buffer=4.0,
        trees_per_step=2,
        max_staleness=1,
        seed=0,
    )
    check_replay_config(config, MAP_BYTES)
    result = cooperative_run(kit, kit.open(config), steps=40)
    assert result.deadlock is None, result


def test_samples_per_insert_below_one_is_refused_because_it_deadlocks_under_admission() -> None:
    config = limiter_config(samples_per_insert=0.5, error_buffer=16.0, trees_per_step=4, max_staleness=1, seed=1)
    with pytest.raises(DeadlockConfigError, match=r"samples_per_insert=0\.5 is below 1"):
        check_replay_config(config, MAP_BYTES)


# ============================================================================ refusing deadlocks


REFUSED = {
    "error_buffer below one insert": (
        {"samples_per_insert": 2.0, "max_times_sampled": 2, "error_buffer": 1.5, "trees_per_step": 1},
        "error_buffer=1.5 is below max(1, samples_per_insert)=2.0",
    ),
    "band narrower than a batch": (
        {"min_size_to_sample": 8, "error_buffer": 3.0, "trees_per_step": 8},
        "narrower than one learner batch",
    ),
    "band top below a batch": (
        {"error_buffer": 5.0, "trees_per_step": 8},
        "fewer than one learner batch",
    ),
    "spi above max_times_sampled": (
        {"samples_per_insert": 3.0, "max_times_sampled": 2, "error_buffer": 12.0},
        "samples_per_insert=3.0 exceeds replay.max_times_sampled=2",
    ),
    "min_size_to_sample above capacity": (
        {"min_size_to_sample": 200, "capacity_trees": 100, "max_staleness": 100, "error_buffer": 8.0},
        "min_size_to_sample=200 exceeds replay.capacity_trees=100",
    ),
    "fifo with a rate limiter": (
        {"sampler": "fifo"},
        "sampler='fifo' hands each tree out exactly once",
    ),
    "admission below min_size_to_sample": (
        {"min_size_to_sample": 100, "max_staleness": 0, "error_buffer": 200.0},
        "admission allows only 4 trees before the first update but sampling needs 100",
    ),
    "admission window below the band": (
        {"min_size_to_sample": 4, "error_buffer": 2.0, "max_staleness": 0},
        "the first batch could never be sampled",
    ),
    "batch above capacity_trees": (
        {"trees_per_step": 10, "capacity_trees": 5, "error_buffer": 10.0},
        "trees_per_step=10 exceeds replay.capacity_trees=5",
    ),
    "capacity_bytes without map headroom": (
        {"capacity_bytes": int(0.95 * MAP_BYTES)},
        "leaves no headroom in the LMDB map",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_each_deadlocking_configuration_is_refused_with_its_reason(case: str) -> None:
    overrides, explanation = REFUSED[case]
    config = limiter_config(**overrides)
    with pytest.raises(DeadlockConfigError) as caught:
        check_replay_config(config, MAP_BYTES)
    message = str(caught.value)
    assert message.startswith("refusing this replay configuration:")
    assert explanation in message
    assert isinstance(caught.value, ValueError)


def test_all_problems_are_listed_together() -> None:
    config = limiter_config(sampler="fifo", capacity_bytes=int(0.95 * MAP_BYTES))
    with pytest.raises(DeadlockConfigError) as caught:
        check_replay_config(config, MAP_BYTES)
    lines = [line for line in str(caught.value).splitlines() if line.startswith("- ")]
    assert len(lines) == 2
    assert "sampler='fifo'" in lines[0] and "headroom" in lines[1]


def test_map_headroom_is_only_checked_when_the_map_size_is_known() -> None:
    config = limiter_config(capacity_bytes=int(0.95 * MAP_BYTES))
    check_replay_config(config)
    check_replay_config(limiter_config(capacity_bytes=int(0.9 * MAP_BYTES)), MAP_BYTES)
    with pytest.raises(DeadlockConfigError, match="headroom"):
        check_replay_config(limiter_config(capacity_bytes=int(0.9 * MAP_BYTES) + 1), MAP_BYTES)


SANE = {
    "defaults": ReplayConfig(),
    "fifo": ReplayConfig(sampler="fifo", trees_per_step=16, max_staleness=0),
    "uniform unbounded": ReplayConfig(sampler="uniform", max_times_sampled=0),
    "spi 1": ReplayConfig(sampler="uniform", samples_per_insert=1.0, error_buffer=16.0, trees_per_step=16),
    "spi 2": ReplayConfig(
        sampler="uniform",
        samples_per_insert=2.0,
        max_times_sampled=4,
        min_size_to_sample=16,
        error_buffer=32.0,
        trees_per_step=16,
    ),
    "band exactly one batch": ReplayConfig(
        sampler="uniform", samples_per_insert=1.0, min_size_to_sample=4, error_buffer=4.0, trees_per_step=8
    ),
    "band top exactly one batch": ReplayConfig(
        sampler="uniform", samples_per_insert=1.0, min_size_to_sample=1, error_buffer=7.0, trees_per_step=8
    ),
}


@pytest.mark.parametrize("name", sorted(SANE))
def test_sane_configurations_pass(name: str) -> None:
    config = SANE[name]
    check_replay_config(config, int(config.map_size_gb * 1024**3))


def test_the_store_refuses_a_deadlocking_configuration_at_open(kit: SimpleNamespace) -> None:
    with pytest.raises(DeadlockConfigError, match="headroom"):
        kit.open(kit.config(capacity_bytes=int(0.95 * MAP_BYTES)))
    with pytest.raises(DeadlockConfigError, match="sampler='fifo'"):
        kit.open(kit.config(samples_per_insert=1.0))
