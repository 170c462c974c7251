"""Demonstrations as token ids and a loss mask, laid out exactly as the actor feeds the policy.

The actor's sequence for one path (actors/chat.py, DESIGN.md section 2) is

    prompt_ids(prompt messages) + turn 1 ids + observation_ids(obs 1) + turn 2 ids + ...

so a demonstration is tokenised the same way, with the same `ChatCodec`:
- the prompt (the system/user messages before the first assistant turn) through the chat template with
  the generation prompt and no tool schemas (as `actors.builders.common.open_recorder` does): mask 0;
- each assistant turn's text encoded on its own (no special tokens added; a special-token string in the
  text stays text), plus the end-of-turn token when the text does not end with one of the protocol's
  stop strings (the actor's turn then ended at an end token, which it keeps): mask 1, so the policy
  learns to emit its stop tags and its end token;
- each tool observation through `ChatCodec.observation_ids`: mask 0.
No chat template runs between turns: the whole response is one assistant message, as in the actor.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from actors.chat import ChatCodec
from ops.demos import Demonstration, check_layout


@dataclass(frozen=True)
class TokenisedDemo:
    """One demonstration as the model sees it: `loss_mask[i]` = 1 where token i is trained."""

    task_id: str
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


class DemoTokeniser:
    """Tokenises demonstrations for one model and one protocol's stop strings."""

    def __init__(self, codec: ChatCodec, stop_strings: Sequence[str]) -> None:
        if not stop_strings or any(not stop for stop in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.codec = codec
        self.stop_strings = tuple(stop_strings)
        eos = codec.tokenizer.eos_token_id
        self.end_id = int(eos) if eos is not None and int(eos) in codec.eos_token_ids else min(codec.eos_token_ids)

    def turn_ids(self, text: str) -> list[int]:
        """A policy turn's ids: its text, and the end token unless the text ends at a stop string."""
        ids = self.codec.observation_ids(text)
        if not text.endswith(self.stop_strings):
            ids.append(self.end_id)
        return ids

    def tokenise(self, demo: Demonstration) -> TokenisedDemo:
        messages = demo.messages
        check_layout(messages)
        start = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
        ids = self.codec.prompt_ids([dict(m) for m in messages[:start]], None)
        mask = [0] * len(ids)
        for message in messages[start:]:
            if message["role"] == "assistant":
                part = self.turn_ids(message["content"])
                mask.extend([1] * len(part))
            else:
                part = self.codec.observation_ids(message["content"])
                mask.extend([0] * len(part))
            ids.extend(part)
        return TokenisedDemo(demo.task_id, tuple(ids), tuple(mask))


@dataclass(frozen=True)
class TokenisedSet:
    """Tokenised demonstrations that fit the context, and how many were dropped for length."""

    demos: tuple[TokenisedDemo, ...]
    dropped_too_long: int

    @property
    def tokens(self) -> int:
        return sum(len(d) for d in self.demos)


def tokenise_all(demos: Iterable[Demonstration], tokeniser: DemoTokeniser, max_tokens: int | None) -> TokenisedSet:
    """Every demonstration tokenised; those longer than `max_tokens` are dropped (counted), never cut."""
    kept: list[TokenisedDemo] = []
    dropped = 0
    for demo in demos:
        tokenised = tokeniser.tokenise(demo)
        if max_tokens is not None and len(tokenised) > max_tokens:
            dropped += 1
            continue
        kept.append(tokenised)
    return TokenisedSet(tuple(kept), dropped)


def split_holdout(
    demos: Sequence[TokenisedDemo], fraction: float, seed: int
) -> tuple[list[TokenisedDemo], list[TokenisedDemo]]:
    """(train, held out): whole tasks are held out (a task's demos never straddle the split), about
    `fraction` of the demonstrations, chosen with `seed`; at least one task each way when there are two."""
    tasks = sorted({demo.task_id for demo in demos})
    random.Random(seed).shuffle(tasks)
    wanted = round(len(demos) * fraction)
    if fraction > 0 and len(tasks) > 1:
        wanted = max(wanted, 1)
    held: set[str] = set()
    count = 0
    per_task: dict[str, int] = {}
    for demo in demos:
        per_task[demo.task_id] = per_task.get(demo.task_id, 0) + 1
    for task in tasks[:-1]:  # the last task always trains
        if count >= wanted:
            break
        held.add(task)
        count += per_task[task]
    train = [demo for demo in demos if demo.task_id not in held]
    heldout = [demo for demo in demos if demo.task_id in held]
    return train, heldout
