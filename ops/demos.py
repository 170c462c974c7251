"""Warm-start demonstrations: scripted oracle episodes played in the real tool environment, as JSONL.

A demonstration is what the actor would see and produce for one task, so the warm start teaches exactly
the layout RL later samples in. It is made by driving the same `ToolEnvironment` the actor uses (built
from the same config: protocol, tools, reward, limits, search index) with scripted policy turns: one
search turn per hop of the task's oracle search path (the oracle query, in the protocol's tool-call
format), each followed by the environment's real observation, then an answer turn with the gold answer.

JSONL format, one demonstration per line::

    {"task_id": str, "source": str, "perfect": bool, "reward": float | null,
     "messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]}

- `messages` opens with the episode's prompt messages exactly as `ToolEnvironment.prompt_messages` gives
  them (system + user; one user message for `search_r1`). Then "assistant" and "tool" alternate, ending
  with an "assistant" turn. An assistant message is one policy turn: its text up to and including the
  protocol's stop string (`</search>`, `</answer>`, ...); a turn that does not end with a stop string
  ended with the end-of-turn token, which is never written in the text (tokenisation adds it, see
  `ops.sft_data`). A tool message is the observation text the environment appended after the turn,
  verbatim (with the protocol's wrapping, e.g. ` <result>\\n...\\n</result>`).
- `source` says who made it: "oracle" for the oracle path with the gold answer, "oracle:<mistake>" for a
  made imperfect one (mistakes below); other producers write their own name.
- `perfect`: it follows the oracle path and answers gold; checked when made (the episode's reward says
  correct, and every hop's observation holds that hop's answer, so no perfect demo teaches a guess).
- `reward`: the score of the episode under the config's reward function, when known.

Demonstration worlds (`sft.demo_worlds`, synthetic world only): the demonstrations are dealt evenly over worlds of
other seeds with fresh names; the run's own training world is among them only with `sft.demos_from_train_world`.
Without it, RL trains on a world the warm start never saw, as the held-out one, so its reward measures the skills
the held-out EM does. Measured with the training world among the demonstration worlds: sampled trees held a
correct leaf in 17 of the first 26 learner steps, while the same policy scored 4.0 held-out EM; on a world it
never saw (same settings otherwise), in 2 of the first 36. Rewarding what was memorised, RL let the queries drop their
relation words and held-out EM fell from 4.0 to 0.5 in 78 steps.
A tiny policy trained on one world memorises its names and cannot copy an unseen name from a question or an
observation. Measured on the held-out world (teacher
forced; the 2-layer tiny policy; 3,000 demonstrations with 3 retrieved pages each), the first turn (question
copied, query written) came out exactly for 2% of the tasks after 10 epochs on one world, and for 45% after 8
epochs on 11 worlds. More worlds for the same number of steps help further: with the embedded default's
2,048-token steps (1,814 of them), 1,500 demonstrations from 10 worlds for 10 epochs gave held-out
demonstration loss 0.43 and 14.5 greedy EM on world 3; 3,000 from 30 worlds for 5 epochs, 0.23 and 27.0.

Imperfect demonstrations (`sft.imperfect_fraction` of them, slots drawn with `sft.seed`) make one
plausible mistake (drawn uniformly from `sft.mistakes`), so that the warm-started policy is not already
perfect and RL has something to learn:
- `wrong_answer`: the oracle searches, then a wrong answer of the right type (the gold answer of another
  training question ending in the same relation);
- `early_answer`: stops searching a hop early and answers with the bridge entity found so far (a 1-hop
  question is answered without any search, with such a guess);
- `vague_query`: on one hop the query is the entity's name without the relation words, and the answer
  that follows is a guess of the right type.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.config import ConfigError, RunConfig
from tools_env.env import StepResult, ToolEnvironment
from tools_env.protocols import SEARCH_TOOL, ProtocolName
from tools_env.scoring import exact_match
from tools_env.task import Task

ROLES = frozenset({"system", "user", "assistant", "tool"})
ORACLE_SOURCE = "oracle"
Mistake = Literal["wrong_answer", "early_answer", "vague_query"]
MISTAKES: tuple[Mistake, ...] = ("wrong_answer", "early_answer", "vague_query")


class DemoFormatError(ValueError):
    """A demonstration record that does not follow the JSONL format (the message says where)."""


@dataclass(frozen=True)
class Demonstration:
    """One demonstrated episode: chat turns with tool calls (assistant) and observations (tool)."""

    task_id: str
    source: str
    perfect: bool
    messages: tuple[Mapping[str, str], ...]
    reward: float | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "task_id": self.task_id,
                "source": self.source,
                "perfect": self.perfect,
                "reward": self.reward,
                "messages": [{"role": m["role"], "content": m["content"]} for m in self.messages],
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Demonstration:
        """Validate a parsed record; roles, types and the assistant/tool alternation are checked."""
        if not isinstance(record, Mapping):
            raise DemoFormatError("a demonstration must be a JSON object")
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DemoFormatError("messages must be a non-empty list")
        parsed: list[dict[str, str]] = []
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise DemoFormatError(f"messages[{index}] is not an object")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise DemoFormatError(f"messages[{index}]: role must be one of {sorted(ROLES)} and content a string")
            parsed.append({"role": str(role), "content": content})
        check_layout(parsed)
        reward = record.get("reward")
        return cls(
            task_id=str(record.get("task_id", "")),
            source=str(record.get("source", "")),
            perfect=bool(record.get("perfect", False)),
            messages=tuple(parsed),
            reward=None if reward is None else float(reward),
        )


def check_layout(messages: Sequence[Mapping[str, str]]) -> None:
    """Prompt (system/user) first, then assistant and tool alternating, ending with assistant."""
    roles = [m["role"] for m in messages]
    start = next((i for i, role in enumerate(roles) if role == "assistant"), None)
    if start is None or start == 0:
        raise DemoFormatError("a demonstration needs prompt messages and then at least one assistant turn")
    if any(role not in ("system", "user") for role in roles[:start]):
        raise DemoFormatError("only system and user messages may come before the first assistant turn")
    for offset, role in enumerate(roles[start:]):
        wanted = "assistant" if offset % 2 == 0 else "tool"
        if role != wanted:
            raise DemoFormatError(
                f"messages[{start + offset}] is {role!r}; after the prompt, assistant and tool alternate"
            )
    if roles[-1] != "assistant":
        raise DemoFormatError("the last message must be an assistant turn")


def write_demos(path: str | Path, demos: Iterable[Demonstration]) -> int:
    """Write JSONL (through a temporary file, so a reader never sees half a file); returns the count."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for demo in demos:
            handle.write(demo.to_json() + "\n")
            count += 1
    tmp.replace(target)
    return count


def read_demos(path: str | Path) -> list[Demonstration]:
    """Read and validate a JSONL file; errors name the line."""
    demos: list[Demonstration] = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                demos.append(Demonstration.from_record(json.loads(line)))
            except (ValueError, DemoFormatError) as error:
                raise DemoFormatError(f"{path}:{number}: {error}") from None
    return demos


# ------------------------------------------------------------------------------------------- turn text


@dataclass(frozen=True)
class TurnWriter:
    """Policy turn texts in a protocol's tags, in the style of the tiny tokenizer's training texts.

    The boxed answer is written `\\boxed{ Name }`, with spaces: byte-level BPE makes " Woden" one token as it
    stands in a retrieved page, but "{Woden" ends in other tokens ("W", "oden"), so copying the answer into
    the box would be a second, harder copy for a small policy to learn.
    """

    protocol: ProtocolName

    def search(self, think: str, query: str) -> str:
        if self.protocol is ProtocolName.TOOL_CALL:
            call = json.dumps({"name": SEARCH_TOOL, "arguments": {"query": query}}, ensure_ascii=False)
            return f"<think> {think} </think>\n<tool_call>\n{call}\n</tool_call>"
        return f"<think> {think} </think>\n<search> {query} </search>"

    def answer(self, think: str, answer: str) -> str:
        if self.protocol is ProtocolName.ARPO:
            return f"<think> {think} </think>\n<answer> \\boxed{{ {answer} }} </answer>"
        return f"<think> {think} </think>\n<answer> {answer} </answer>"


@dataclass(frozen=True)
class Hop:
    """One step of a task's oracle search path."""

    query: str
    entity: str
    answer: str

    @classmethod
    def from_metadata(cls, entry: Mapping[str, Any]) -> Hop:
        return cls(query=str(entry["query"]), entity=str(entry["entity"]), answer=str(entry["answer"]))


@dataclass(frozen=True)
class Search:
    think: str
    query: str


@dataclass(frozen=True)
class Answer:
    think: str
    answer: str


Action = Search | Answer


def oracle_hops(task: Task) -> list[Hop]:
    """The task's oracle search path (empty when the task has none)."""
    oracle = task.metadata.get("oracle") or ()
    try:
        return [Hop.from_metadata(entry) for entry in oracle]
    except (KeyError, TypeError):
        return []


def _search_actions(task: Task, hops: Sequence[Hop]) -> list[Action]:
    """One search per hop; each thought names the entity looked up (not the whole question again: every
    copied token is one more a small policy can get wrong)."""
    actions: list[Action] = []
    for index, hop in enumerate(hops):
        think = (
            f"First I look up {hop.entity}."
            if index == 0
            else (f"I found {hop.entity}. Next I search for {hop.entity}.")
        )
        actions.append(Search(think, hop.query))
    return actions


def _final(answer: str, found: bool = True) -> Answer:
    think = f"I found {answer}. So the answer is {answer}." if found else f"So the answer is {answer}."
    return Answer(think, answer)


def plan_actions(
    task: Task, hops: Sequence[Hop], mistake: Mistake | None, rng: random.Random, guess: str
) -> list[Action]:
    """The scripted turns of one demonstration; `guess` is a wrong answer of the right type."""
    gold = task.golden_answers[0]
    if mistake is None:
        return [*_search_actions(task, hops), _final(gold)]
    if mistake == "wrong_answer":
        return [*_search_actions(task, hops), _final(guess)]
    if mistake == "early_answer":
        if len(hops) == 1:
            return [_final(guess, found=False)]
        stop = rng.randint(1, len(hops) - 1)
        return [*_search_actions(task, hops[:stop]), _final(hops[stop - 1].answer)]
    vague = rng.randrange(len(hops))
    actions = _search_actions(task, hops[: vague + 1])
    last = actions[-1]
    assert isinstance(last, Search)
    actions[-1] = Search(last.think, hops[vague].entity)
    return [*actions, _final(guess)]


class GuessPool:
    """Wrong answers of the right type: gold answers of other questions that end in the same relation."""

    def __init__(self, tasks: Iterable[Task]) -> None:
        self._by_relation: dict[str, list[str]] = defaultdict(list)
        for task in tasks:
            relations = task.metadata.get("relations") or ()
            if relations and task.golden_answers:
                self._by_relation[str(relations[-1])].append(task.golden_answers[0])
        for answers in self._by_relation.values():
            answers[:] = sorted(set(answers))

    def guess(self, task: Task, hops: Sequence[Hop], rng: random.Random) -> str:
        relations = task.metadata.get("relations") or ()
        candidates = self._by_relation.get(str(relations[-1]), []) if relations else []
        wrong = [c for c in candidates if not exact_match(c, task.golden_answers)]
        if wrong:
            return rng.choice(wrong)
        return hops[-1].entity  # no other answer of this type: name the last hop's subject instead


# -------------------------------------------------------------------------------------------- episodes


@dataclass
class DemoStats:
    """What making demonstrations skipped, and why (perfect ones that failed their checks are retried)."""

    made: int = 0
    imperfect: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))


async def play(
    env: ToolEnvironment, task: Task, actions: Sequence[Action], writer: TurnWriter, seed: int
) -> tuple[list[dict[str, str]], StepResult]:
    """Drive one real episode with scripted turns; returns the chat messages and the last step."""
    episode = env.start(task, seed)
    messages = [dict(message) for message in episode.prompt_messages]
    stops = env.protocol.stop_strings
    step: StepResult | None = None
    for action in actions:
        text = (
            writer.search(action.think, action.query)
            if isinstance(action, Search)
            else (writer.answer(action.think, action.answer))
        )
        step = await episode.step(text, "stop" if text.endswith(stops) else "eos")
        messages.append({"role": "assistant", "content": text})
        if step.done:
            break
        messages.append({"role": "tool", "content": step.observation or ""})
    if step is None or not step.done:
        raise RuntimeError(f"task {task.task_id}: the scripted turns did not end the episode")
    return messages, step


def _evidence_found(messages: Sequence[Mapping[str, str]], hops: Sequence[Hop]) -> bool:
    observations = [m["content"] for m in messages if m["role"] == "tool"]
    return len(observations) == len(hops) and all(
        hop.answer in text for hop, text in zip(hops, observations, strict=True)
    )


def _fits(hops: Sequence[Hop], env: ToolEnvironment) -> bool:
    return bool(hops) and len(hops) <= env.limits.max_tool_calls and len(hops) + 1 <= env.limits.max_turns


def _task_cycle(tasks: Sequence[Task], rng: random.Random) -> Iterator[Task]:
    """The tasks in a seeded order, again in a new order once they run out."""
    while True:
        order = list(tasks)
        rng.shuffle(order)
        yield from order


async def make_demonstrations_async(
    tasks: Sequence[Task],
    env: ToolEnvironment,
    n: int,
    n_imperfect: int,
    seed: int,
    stats: DemoStats | None = None,
    mistakes: Sequence[Mistake] = MISTAKES,
) -> list[Demonstration]:
    """`n` demonstrations over `tasks` (cycled in a seeded order), `n_imperfect` of them imperfect, each with a
    mistake drawn uniformly from `mistakes`."""
    stats = stats if stats is not None else DemoStats()
    if SEARCH_TOOL not in env.tool_names:
        raise ConfigError("env.tools: demonstrations of oracle search paths need the search tool")
    usable = [task for task in tasks if task.golden_answers and _fits(oracle_hops(task), env)]
    if not usable:
        raise ConfigError(
            "no task has an oracle search path that fits env.max_tool_calls / env.max_turns "
            "(only the synthetic world's tasks carry one); set sft.demos to a JSONL of demonstrations"
        )
    rng = random.Random(seed)
    imperfect_slots = set(rng.sample(range(n), min(n, n_imperfect)))
    writer = TurnWriter(env.protocol.name)
    pool = GuessPool(tasks)
    source = _task_cycle(usable, rng)
    demos: list[Demonstration] = []
    attempts = 0
    for slot in range(n):
        while True:
            attempts += 1
            if attempts > 4 * n + 100:
                raise RuntimeError(f"gave up making demonstrations: {dict(stats.skipped)} skipped")
            task = next(source)
            hops = oracle_hops(task)
            mistake: Mistake | None = rng.choice(mistakes) if slot in imperfect_slots else None
            actions = plan_actions(task, hops, mistake, rng, pool.guess(task, hops, rng))
            messages, step = await play(env, task, actions, writer, seed=rng.randrange(1 << 31))
            reward = step.reward
            if mistake is None and not (reward is not None and reward.correct and _evidence_found(messages, hops)):
                stats.skipped["perfect_check_failed"] += 1
                continue
            break
        demos.append(
            Demonstration(
                task_id=task.task_id,
                source=ORACLE_SOURCE if mistake is None else f"{ORACLE_SOURCE}:{mistake}",
                perfect=mistake is None,
                messages=tuple(messages),
                reward=None if reward is None else reward.score,
            )
        )
        stats.made += 1
        stats.imperfect += mistake is not None
    return demos


DEMO_WORLD_STRIDE = 1000  # seeds of the extra demonstration worlds: train_seed + k * stride (the test seed skipped)


def demo_world_configs(config: RunConfig) -> list[RunConfig]:
    """The configs whose training splits the demonstrations come from. Other task sources: the run's own. The
    synthetic world: `sft.demo_worlds` worlds of other seeds (each generated beside `tasks.data_dir`, as
    `<data_dir>-demo-worlds/seed<N>`, together with the test world so that no name repeats a held-out one),
    the run's own training world first among them only with `sft.demos_from_train_world`."""
    tasks = config.tasks
    if tasks.source != "synthetic_world":
        return [config]
    configs = [config] if config.sft.demos_from_train_world else []
    root = Path(tasks.data_dir)
    seed = tasks.train_seed
    while len(configs) < config.sft.demo_worlds:
        seed += DEMO_WORLD_STRIDE
        if seed == tasks.test_seed:
            continue
        world = tasks.model_copy(
            update={"train_seed": seed, "data_dir": str(root.with_name(f"{root.name}-demo-worlds") / f"seed{seed}")}
        )
        configs.append(config.model_copy(update={"tasks": world}))
    return configs


def split_count(total: int, parts: int) -> list[int]:
    """`total` dealt over `parts` as evenly as possible, the first parts taking the remainder."""
    return [total // parts + (k < total % parts) for k in range(parts)]


def make_demonstrations(config: RunConfig, n: int | None = None, stats: DemoStats | None = None) -> list[Demonstration]:
    """Demonstrations from the training splits of the demonstration worlds, each played in the environment the
    actor would build for that world; world k uses seed `sft.seed + k` for its choices."""
    from tools_env.factory import build_environment, prepare_tasks

    sft = config.sft
    count = sft.n_demos if n is None else n
    if count < 1:
        raise ConfigError("sft.n_demos: at least one demonstration is needed")
    stats = stats if stats is not None else DemoStats()
    worlds = demo_world_configs(config)
    shares = split_count(count, len(worlds))
    imperfect = split_count(round(count * sft.imperfect_fraction), len(worlds))
    demos: list[Demonstration] = []
    for k, (world, share, n_imperfect) in enumerate(zip(worlds, shares, imperfect, strict=True)):
        if share == 0:
            continue
        splits = prepare_tasks(world)
        env = build_environment(world, splits.corpus_path)
        demos += asyncio.run(
            make_demonstrations_async(splits.train, env, share, n_imperfect, sft.seed + k, stats, tuple(sft.mistakes))
        )
    return demos
