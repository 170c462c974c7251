"""Copy pretraining: the curriculum's rows, its validation, and that training teaches a small model to copy."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from learner.copy_pretraining import (
    IGNORE,
    CopyCurriculum,
    CopyVocabulary,
    copy_accuracy,
    copy_batch,
    pretrain_copying,
)
from tests.learner.trees import tiny_policy

SEPARATOR = 0
VOCABULARY = CopyVocabulary.from_ids(range(4, 200), SEPARATOR)


def test_rows_hold_a_span_the_separator_and_the_repeat_with_labels_on_the_repeat_only() -> None:
    curriculum = CopyCurriculum(rows=64, min_span=3, max_span=9)
    input_ids, labels = copy_batch(VOCABULARY, curriculum, torch.Generator().manual_seed(1))
    assert input_ids.shape == labels.shape == (64, 19)
    lengths = set()
    for row, row_labels in zip(input_ids.tolist(), labels.tolist(), strict=True):
        length = row.index(SEPARATOR)
        lengths.add(length)
        assert 3 <= length <= 9
        assert row[length + 1 : 2 * length + 1] == row[:length]
        trained = [i for i, label in enumerate(row_labels) if label != IGNORE]
        assert trained == list(range(length + 2, 2 * length + 1))
        assert all(row_labels[i] == row[i] for i in trained)
        assert all(4 <= token < 200 for i, token in enumerate(row) if i != length)
    assert len(lengths) > 3  # the span length varies, so no fixed offset solves the task


def test_the_same_seed_gives_the_same_rows() -> None:
    curriculum = CopyCurriculum(rows=8)
    first = copy_batch(VOCABULARY, curriculum, torch.Generator().manual_seed(7))
    again = copy_batch(VOCABULARY, curriculum, torch.Generator().manual_seed(7))
    other = copy_batch(VOCABULARY, curriculum, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(
    "fields",
    [{"steps": -1}, {"rows": 0}, {"min_span": 1}, {"min_span": 9, "max_span": 8}, {"lr": 0.0}],
)
def test_bad_curricula_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CopyCurriculum(**fields)  # type: ignore[arg-type]


def test_a_vocabulary_needs_two_ordinary_tokens_besides_the_separator() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        CopyVocabulary.from_ids([SEPARATOR, 5], SEPARATOR)


def _small_model() -> Qwen2ForCausalLM:
    """The learner tests' tiny policy at transformers' usual init scale (theirs is larger, for log-prob tests)."""
    return tiny_policy(initializer_range=0.02)


def test_training_teaches_the_model_to_copy() -> None:
    # A fixed span length is the easy form of the task (a fixed offset): a few hundred steps learn it, which is
    # what a unit test can afford; the default curriculum's varied lengths need induction heads (about 1,000 steps).
    curriculum = CopyCurriculum(steps=300, rows=16, min_span=8, max_span=8, lr=3e-3)
    model = _small_model()
    held_out = copy_batch(VOCABULARY, curriculum, torch.Generator().manual_seed(99))
    before = copy_accuracy(model, *held_out)
    steps_seen: list[int] = []
    report = pretrain_copying(model, VOCABULARY, curriculum, on_step=lambda step, _loss: steps_seen.append(step))
    after = copy_accuracy(model, *held_out)
    assert before < 0.05
    assert after > 0.8 and report.copy_accuracy > 0.8
    assert report.steps == 300 and steps_seen == [100, 200, 300]
    assert report.first_loss is not None and report.last_loss is not None
    assert report.last_loss < report.first_loss / 4
    assert not model.training


def test_zero_steps_leave_the_weights_alone() -> None:
    model = _small_model()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = pretrain_copying(model, VOCABULARY, CopyCurriculum(steps=0))
    assert report.first_loss is None and report.steps == 0
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
