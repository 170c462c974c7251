"""Demonstrations as tokens: the actor's layout, the loss mask, length drops and the held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.chat import ChatCodec
from common.config import build_config
from ops.demos import Demonstration, make_demonstrations
from ops.sft_data import DemoTokeniser, TokenisedDemo, split_holdout, tokenise_all
from tools_env.protocols import get_protocol


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> ChatCodec:
    from actors.tiny_model import TinyModelSpec, init_tiny_model, world_training_texts

    texts = world_training_texts(seed=0, n_tasks=100, n_arithmetic=20, max_passages=300)
    model_dir = init_tiny_model(tmp_path_factory.mktemp("sft_data_tiny") / "model", TinyModelSpec(), texts)
    return ChatCodec.from_dir(model_dir)


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> list[Demonstration]:
    world = tmp_path_factory.mktemp("sft_data_world") / "world"
    config = build_config({}, [f"tasks.data_dir={json.dumps(str(world))}", "tasks.n_train=30", "tasks.n_test=2"])
    return make_demonstrations(config, 12)


@pytest.fixture(scope="module")
def tokeniser(codec: ChatCodec) -> DemoTokeniser:
    return DemoTokeniser(codec, get_protocol("arpo").stop_strings)


def test_layout_is_the_actors_and_the_mask_covers_exactly_the_policy_turns(
    demos: list[Demonstration], tokeniser: DemoTokeniser, codec: ChatCodec
) -> None:
    for demo in demos:
        tokenised = tokeniser.tokenise(demo)
        start = next(i for i, m in enumerate(demo.messages) if m["role"] == "assistant")
        expected = codec.prompt_ids([dict(m) for m in demo.messages[:start]], None)
        assert tokenised.loss_mask[: len(expected)] == (0,) * len(expected)
        trained_texts: list[str] = []
        for message in demo.messages[start:]:
            if message["role"] == "assistant":
                trained_texts.append(message["content"])
            expected += codec.observation_ids(message["content"])
        # every arpo turn ends at a stop string, so no end token is added and the ids are the plain concatenation
        assert list(tokenised.input_ids) == expected
        trained = [tok for tok, m in zip(tokenised.input_ids, tokenised.loss_mask, strict=True) if m]
        assert codec.decode(trained) == "".join(trained_texts)
        assert tokenised.trained_tokens == len(trained)


def test_a_turn_without_a_stop_string_gets_the_end_token_and_trains_it(tokeniser: DemoTokeniser) -> None:
    demo = Demonstration(
        "t",
        "test",
        False,
        (
            {"role": "user", "content": "What is up?"},
            {"role": "assistant", "content": "I do not know"},
        ),
    )
    tokenised = tokeniser.tokenise(demo)
    assert tokenised.input_ids[-1] == tokeniser.end_id
    assert tokenised.loss_mask[-1] == 1
    assert tokeniser.end_id in tokeniser.codec.eos_token_ids
    assert tokeniser.turn_ids("<search> x </search>")[-1] != tokeniser.end_id


def test_special_token_text_in_a_turn_stays_text(tokeniser: DemoTokeniser) -> None:
    ids = tokeniser.turn_ids("say <|im_end|> </answer>")
    assert tokeniser.end_id not in ids


def test_empty_stop_strings_are_refused(codec: ChatCodec) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        DemoTokeniser(codec, ())
    with pytest.raises(ValueError, match="non-empty"):
        DemoTokeniser(codec, ("</a>", ""))


def test_too_long_demos_are_dropped_and_counted_never_cut(demos: list[Demonstration], tokeniser: DemoTokeniser) -> None:
    lengths = sorted(len(tokeniser.tokenise(demo)) for demo in demos)
    limit = lengths[len(lengths) // 2]
    result = tokenise_all(demos, tokeniser, limit)
    assert all(len(d) <= limit for d in result.demos)
    assert len(result.demos) + result.dropped_too_long == len(demos)
    assert result.dropped_too_long == sum(length > limit for length in lengths)
    assert tokenise_all(demos, tokeniser, None).dropped_too_long == 0


def fake(task_id: str) -> TokenisedDemo:
    return TokenisedDemo(task_id, (1, 2, 3), (0, 1, 1))


def test_holdout_keeps_whole_tasks_apart_and_is_seeded() -> None:
    demos = [fake(f"task{i % 10}") for i in range(40)]
    train, heldout = split_holdout(demos, 0.2, seed=1)
    assert len(train) + len(heldout) == 40
    assert {d.task_id for d in train}.isdisjoint({d.task_id for d in heldout})
    assert len(heldout) == 8
    again = split_holdout(demos, 0.2, seed=1)
    assert [d.task_id for d in again[1]] == [d.task_id for d in heldout]
    others = {tuple(sorted({d.task_id for d in split_holdout(demos, 0.2, seed=s)[1]})) for s in range(2, 8)}
    assert len(others) > 1


def test_holdout_edge_cases() -> None:
    two_tasks = [fake("a"), fake("b")]
    train, heldout = split_holdout(two_tasks, 0.01, seed=0)
    assert len(train) == 1 and len(heldout) == 1  # a positive fraction holds out at least one task
    train, heldout = split_holdout(two_tasks, 0.0, seed=0)
    assert heldout == [] and len(train) == 2
    train, heldout = split_holdout([fake("a"), fake("a")], 0.5, seed=0)
    assert heldout == [] and len(train) == 2  # a single task always trains


def test_tokenised_demos_fit_the_sft_sequence_contract(demos: list[Demonstration], tokeniser: DemoTokeniser) -> None:
    from learner.sft import check_sequences

    result = tokenise_all(demos, tokeniser, None)
    check_sequences([(d.input_ids, d.loss_mask) for d in result.demos])
    assert result.tokens == sum(len(d) for d in result.demos)


def test_demos_from_a_file_tokenise_the_same(
    demos: list[Demonstration], tokeniser: DemoTokeniser, tmp_path: Path
) -> None:
    from ops.demos import read_demos, write_demos

    write_demos(tmp_path / "d.jsonl", demos)
    again = read_demos(tmp_path / "d.jsonl")
    assert [tokeniser.tokenise(d) for d in again] == [tokeniser.tokenise(d) for d in demos]
