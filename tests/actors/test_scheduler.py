"""The generation scheduler: batching of concurrent requests, order, errors, the worker thread, close."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from actors.generation import Generation, GenerationRequest, SamplingParams
from actors.scheduler import GenerationScheduler, SchedulerClosedError
from tests.actors import fakes

SAMPLING = SamplingParams()


class EchoBackend:
    """Returns one token per request: its seed. Records batch sizes and the generating thread."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()

    version = 0
    eos_token_ids = frozenset({0})

    def load_weights(self, state_dict: Any, version: int) -> None:
        self.threads.add(threading.get_ident())

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        self.threads.add(threading.get_ident())
        self.batches.append([int(r.seed or 0) for r in requests])
        if self.fail:
            raise RuntimeError("backend exploded")
        return [
            Generation(
                token_ids=np.asarray([r.seed], dtype=np.int32),
                logprobs=np.asarray([-0.5], dtype=np.float32),
                versions=np.zeros(1, dtype=np.int32),
                finish="length",
                text=str(r.seed),
            )
            for r in requests
        ]


def request(seed: int) -> GenerationRequest:
    return GenerationRequest(context_ids=[1, 2, 3], max_new_tokens=1, seed=seed)


def test_concurrent_requests_arrive_as_few_batches_and_each_gets_its_own_result() -> None:
    backend = fakes.FakeBackend()

    async def main() -> list[Generation]:
        async with GenerationScheduler(backend, SAMPLING, max_batch=64) as scheduler:
            gens = await asyncio.gather(
                *(scheduler.generate(GenerationRequest([ord("a")] * (i + 1), 50, seed=i)) for i in range(20))
            )
            assert scheduler.stats.requests == 20 and scheduler.stats.batches == len(backend.batch_sizes)
            return gens

    gens = asyncio.run(main())
    assert sum(backend.batch_sizes) == 20
    assert len(backend.batch_sizes) <= 3, backend.batch_sizes
    # Every waiter got the generation of its own context (the fake records context -> output pairs).
    produced = dict(backend.calls)
    for i, gen in enumerate(gens):
        assert produced[tuple([ord("a")] * (i + 1))] == tuple(gen.token_ids.tolist())


def test_max_batch_splits_and_results_resolve_in_order() -> None:
    backend = EchoBackend()

    async def main() -> tuple[list[Generation], GenerationScheduler]:
        scheduler = GenerationScheduler(backend, SAMPLING, max_batch=8)
        try:
            return list(await asyncio.gather(*(scheduler.generate(request(i)) for i in range(20)))), scheduler
        finally:
            scheduler.close()

    gens, scheduler = asyncio.run(main())
    assert [len(b) for b in backend.batches] == [8, 8, 4]
    assert [b for batch in backend.batches for b in batch] == list(range(20))  # FIFO
    assert [int(g.token_ids[0]) for g in gens] == list(range(20))
    assert dict(scheduler.stats.batch_sizes) == {8: 2, 4: 1}
    assert scheduler.stats.snapshot()["max_batch_size"] == 8


def test_different_sampling_never_shares_a_batch() -> None:
    backend = fakes.FakeBackend()
    topk = SamplingParams(topk_logprobs=3)

    async def main() -> None:
        async with GenerationScheduler(backend, SAMPLING) as scheduler:
            await asyncio.gather(
                *(
                    scheduler.generate(GenerationRequest([97, i], 40, seed=i), topk if i % 2 else None)
                    for i in range(10)
                )
            )

    asyncio.run(main())
    assert sorted(backend.batch_sizes) == [5, 5]
    assert {s.topk_logprobs for s in backend.samplings} == {0, 3}


def test_backend_errors_reach_every_waiter_of_the_batch_and_the_scheduler_recovers() -> None:
    backend = EchoBackend(fail=True)

    async def main() -> list[Any]:
        async with GenerationScheduler(backend, SAMPLING) as scheduler:
            results = await asyncio.gather(*(scheduler.generate(request(i)) for i in range(5)), return_exceptions=True)
            backend.fail = False
            again = await scheduler.generate(request(7))
            assert int(again.token_ids[0]) == 7
            assert scheduler.stats.failed_batches >= 1
            return results

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)


def test_generation_runs_off_the_event_loop_on_one_thread() -> None:
    """The backend blocks until a coroutine on the loop releases it: only possible if it runs elsewhere."""
    released = threading.Event()

    class Blocking(EchoBackend):
        def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
            assert released.wait(timeout=10), "the event loop was blocked by generate"
            return super().generate(requests, sampling)

    backend = Blocking()

    async def tool_call() -> None:
        await asyncio.sleep(0)
        released.set()

    async def main() -> None:
        async with GenerationScheduler(backend, SAMPLING) as scheduler:
            await asyncio.gather(scheduler.generate(request(1)), tool_call())
            await scheduler.generate(request(2))
            await scheduler.call_in_worker(backend.load_weights, {}, 1)

    asyncio.run(main())
    assert len(backend.threads) == 1 and threading.get_ident() not in backend.threads


def test_close_fails_waiters_and_refuses_new_requests() -> None:
    started = threading.Event()
    finish = threading.Event()

    class Slow(EchoBackend):
        def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
            started.set()
            finish.wait(timeout=10)
            return super().generate(requests, sampling)

    async def main() -> None:
        scheduler = GenerationScheduler(Slow(), SAMPLING, max_batch=1)
        first = asyncio.ensure_future(scheduler.generate(request(1)))
        second = asyncio.ensure_future(scheduler.generate(request(2)))
        while not started.is_set():
            await asyncio.sleep(0.001)
        scheduler.close()
        finish.set()
        for waiter in (first, second):
            with pytest.raises(SchedulerClosedError):
                await waiter
        with pytest.raises(SchedulerClosedError):
            await scheduler.generate(request(3))

    asyncio.run(main())


def test_a_scheduler_survives_a_new_event_loop() -> None:
    backend = EchoBackend()
    scheduler = GenerationScheduler(backend, SAMPLING)

    async def one(seed: int) -> int:
        return int((await scheduler.generate(request(seed))).token_ids[0])

    assert asyncio.run(one(1)) == 1
    assert asyncio.run(one(2)) == 2
    scheduler.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        GenerationScheduler(EchoBackend(), SAMPLING, max_batch=0)
    with pytest.raises(ValueError):
        GenerationScheduler(EchoBackend(), SAMPLING, gather_window_s=-1)
