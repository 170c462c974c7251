"""The actor keeps going while replay is away: lease requests that time out are counted and asked again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from actors.actor import Actor
from common.config import build_config
from common.replay_client import ReplayTimeout
from common.wire import LeaseGrantMsg
from tests.actors import fakes


class AwayReplay:
    """A link whose lease requests time out `away` times before replay answers (with no trees)."""

    def __init__(self, actor: Actor, away: int) -> None:
        self.actor = actor
        self.away = away
        self.calls: list[tuple[int, list[str]]] = []

    async def leases(self, n: int, renew: Any = (), timeout_s: float = 10.0) -> LeaseGrantMsg:
        self.calls.append((n, list(renew)))
        if len(self.calls) <= self.away:
            raise ReplayTimeout("replay is restarting", waiting_for=f"lease request for {n} tree(s)")
        self.actor.request_stop()
        return LeaseGrantMsg(req=1, tree_ids=[], learner_version=4, lease_ttl_s=60.0, reason="full")


def make_actor(tmp_path: Path) -> Actor:
    config = build_config({"logging": {"metrics_path": str(tmp_path / "actor.jsonl")}, "tree": {"builder": "chain"}})
    return Actor(config, fakes.FakeBackend(), fakes.FakeCodec(), fakes.VOCAB_SIZE, fakes.make_env(), [fakes.TASK])


def test_a_worker_survives_lease_timeouts_and_asks_again(tmp_path: Path) -> None:
    actor = make_actor(tmp_path)
    link = AwayReplay(actor, away=3)
    asyncio.run(actor._worker(link, scheduler=None))  # type: ignore[arg-type]
    assert len(link.calls) == 4  # three timeouts, then the answer
    counters = actor.counters.snapshot()
    assert counters["lease_timeouts"] == 3 and counters["leases_refused"] == 1
    assert actor._learner_version == 4
    actor.metrics.close()


def test_renewals_survive_a_lease_timeout(tmp_path: Path) -> None:
    actor = make_actor(tmp_path)
    actor.config.replay.lease_ttl_s = 3.0  # renew every second
    actor._growing.add("7")
    link = AwayReplay(actor, away=1)
    asyncio.run(asyncio.wait_for(actor._renew_leases(link), timeout=20))  # type: ignore[arg-type]
    assert link.calls == [(0, ["7"]), (0, ["7"])]
    assert actor.counters.snapshot()["lease_timeouts"] == 1
    actor.metrics.close()
