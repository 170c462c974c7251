"""Test doubles for the actors: a character-level codec, a scripted seeded backend and a search tool.

Test modules import it as `from tests.actors import fakes` (as other test helpers, e.g. tests.support).

- `FakeCodec`: one token per character (id = code point); the prompt is the messages rendered as
  `<|role|>content\\n` lines followed by `<|assistant|>`.
- `FakeBackend`: given a context, counts the searches made so far (after the assistant marker) and
  emits either `<think>…</think><search>…</search>` or an answer turn, chosen with the request's
  seed (probability of searching `search_probs[calls]`, no search once they run out). Log-probs
  and top-k log-probs are seeded random but valid. It records every batch and every
  (context, output) pair, so tests can check batching and token exactness.
- `FakeSearch`: answers every query with one fixed passage.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from actors.generation import Generation, GenerationRequest, SamplingParams
from common.metrics import Counters
from tools_env.env import EpisodeLimits, ToolEnvironment
from tools_env.protocols import get_protocol
from tools_env.rewards import get_reward
from tools_env.task import Task
from tools_env.tools import ToolOutcome

ANSWER = "Quenmoor"
TASK = Task("t1", "Where was Tavrel Ommick born?", (ANSWER,), "synthetic_world")
ASSISTANT = "<|assistant|>"
VOCAB_SIZE = 0x110000


class FakeCodec:
    """Character-level: token id = code point."""

    vocab_size = VOCAB_SIZE

    def prompt_ids(self, messages: list[dict[Any, Any]], tool_schemas: list[dict[Any, Any]] | None) -> list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + ASSISTANT
        return [ord(c) for c in text]

    def observation_ids(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(int(i)) for i in ids)


class FakeSearch:
    """A search tool that answers with a fixed passage and counts its calls."""

    name = "search"

    def __init__(self, text: str = f"Tavrel Ommick was born in {ANSWER}.") -> None:
        self.text = text
        self.calls = 0

    def schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": "search", "description": "d", "parameters": {}}}

    async def execute(self, arguments: Mapping[str, Any]) -> ToolOutcome:
        self.calls += 1
        return ToolOutcome(self.text, latency_s=0.0)


def make_env(max_turns: int = 5, max_tool_calls: int = 3) -> ToolEnvironment:
    return ToolEnvironment(
        get_protocol("arpo"),
        [FakeSearch()],
        get_reward("at2po_em"),
        EpisodeLimits(max_turns=max_turns, max_tool_calls=max_tool_calls),
        counters=Counters(),
    )


class FakeBackend:
    """Scripted, seeded turns; records batches and (context, output) pairs."""

    def __init__(
        self,
        codec: FakeCodec | None = None,
        search_probs: Sequence[float] = (0.9, 0.6, 0.3),
        correct_prob: float = 0.5,
        version: int = 0,
    ) -> None:
        self.codec = codec or FakeCodec()
        self.search_probs = tuple(search_probs)
        self.correct_prob = correct_prob
        self._version = version
        self._lock = threading.Lock()
        self.batch_sizes: list[int] = []
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.samplings: list[SamplingParams] = []

    @property
    def version(self) -> int:
        return self._version

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({0})

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        self._version = version

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        outputs = [self._one(request, sampling) for request in requests]
        with self._lock:
            self.batch_sizes.append(len(requests))
            self.samplings.append(sampling)
            for request, output in zip(requests, outputs, strict=True):
                self.calls.append((tuple(int(i) for i in request.context_ids), tuple(output.token_ids.tolist())))
        return outputs

    def turn_text(self, context: str, rng: np.random.Generator) -> str:
        response = context.split(ASSISTANT, 1)[-1]
        calls = response.count("</search>")
        filler = "x" * int(rng.integers(0, 12))
        if calls < len(self.search_probs) and rng.random() < self.search_probs[calls]:
            return f"<think>look up {calls}{filler}</think><search>query {calls} {int(rng.integers(100))}</search>"
        guess = ANSWER if rng.random() < self.correct_prob else "Elsewhere"
        return f"<think>so{filler}</think><answer>The answer is \\boxed{{{guess}}}</answer>"

    def _one(self, request: GenerationRequest, sampling: SamplingParams) -> Generation:
        context_ids = [int(i) for i in request.context_ids]
        seed = request.seed if request.seed is not None else zlib.crc32(np.asarray(context_ids, np.int64).tobytes())
        rng = np.random.default_rng(seed)
        text = self.turn_text(self.codec.decode(context_ids), rng)
        finish = "stop"
        if len(text) > request.max_new_tokens:
            text, finish = text[: request.max_new_tokens], "length"
        ids = np.asarray([ord(c) for c in text], dtype=np.int32)
        n = len(ids)
        logprobs = rng.uniform(-4.0, -0.01, size=n).astype(np.float32)
        topk = np.zeros((0, 0), dtype=np.float32)
        if sampling.topk_logprobs > 0 and n:
            rows = min(n, sampling.topk_positions)
            k = sampling.topk_logprobs
            probs = rng.dirichlet(np.ones(k + 1), size=rows)[:, :k]  # the rest of the mass is off the top-k
            topk = np.log(np.maximum(-np.sort(-probs, axis=1), 1e-12)).astype(np.float32)
        return Generation(
            token_ids=ids,
            logprobs=logprobs,
            versions=np.full(n, self._version, dtype=np.int32),
            finish=finish,  # type: ignore[arg-type]
            text=text,
            topk_logprobs=topk,
        )


class RecordingBackend:
    """Wraps a real backend and records (context, output) pairs like FakeBackend does."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batch_sizes: list[int] = []
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    @property
    def version(self) -> int:
        return int(self.inner.version)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.inner.eos_token_ids)

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        self.inner.load_weights(state_dict, version)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        outputs = list(self.inner.generate(requests, sampling))
        self.batch_sizes.append(len(requests))
        for request, output in zip(requests, outputs, strict=True):
            self.calls.append((tuple(int(i) for i in request.context_ids), tuple(output.token_ids.tolist())))
        return outputs
