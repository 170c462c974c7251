"""A checkpoint counts only once its marker is written; pruning keeps the newest complete ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner import checkpoint
from learner.checkpoint import LearnerState


def write(root: Path, version: int, complete: bool = True) -> Path:
    path = checkpoint.prepare_dir(root, version)
    (path / checkpoint.ENGINE_DIR).mkdir()
    (path / checkpoint.ENGINE_DIR / "weights.bin").write_bytes(b"w" * 10)
    if complete:
        checkpoint.finish(path, LearnerState(version=version, step=version * 2, trees_trained=7), b"held")
    return path


def test_round_trip_and_marker(tmp_path: Path) -> None:
    path = write(tmp_path, 3)
    state, held = checkpoint.read_state(path)
    assert state == LearnerState(version=3, step=6, trees_trained=7)
    assert held == b"held"
    assert (path / checkpoint.MARKER).is_file()
    assert not list(path.glob("*.tmp"))


def test_incomplete_checkpoints_are_never_latest(tmp_path: Path) -> None:
    write(tmp_path, 1)
    half = write(tmp_path, 2, complete=False)
    (half / checkpoint.STATE_FILE).write_text('{"version": 2, "step": 4}')  # state written, marker not yet
    assert checkpoint.latest(tmp_path) == tmp_path / "v00000001"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.read_state(half)
    assert checkpoint.latest(tmp_path / "missing") is None


def test_prune_keeps_newest_complete_and_drops_stale_partials(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        write(tmp_path, version)
    write(tmp_path, 0, complete=False)  # older partial: garbage
    write(tmp_path, 9, complete=False)  # newer partial: may be in progress, kept
    (tmp_path / "notes").mkdir()
    removed = checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["v00000000", "v00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "v00000002", "v00000003", "v00000009"]


def test_prepare_dir_clears_a_leftover(tmp_path: Path) -> None:
    path = write(tmp_path, 4, complete=False)
    (path / "junk").write_text("x")
    fresh = checkpoint.prepare_dir(tmp_path, 4)
    assert list(fresh.iterdir()) == []


class SavesWeightsAndConfig:
    """Writes what `save_pretrained` writes: weights and config.json."""

    def save_pretrained(self, target: Path, safe_serialization: bool = True) -> None:
        (target / "model.safetensors").write_bytes(b"new weights")
        (target / "config.json").write_text('{"new": true}')


def test_export_keeps_the_tokenizer_files_and_the_new_weights(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name, text in {
        "model.safetensors": "old weights",
        "model.safetensors.index.json": "{}",
        "config.json": '{"old": true}',
        "tokenizer.json": "{}",
        "tokenizer_config.json": '{"eos_token": "<|im_end|>"}',
        "generation_config.json": "{}",
        "chat_template.jinja": "template",
    }.items():
        (source / name).write_text(text)
    checkpoint.export_model(SavesWeightsAndConfig(), source, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert (out / "config.json").read_text() == '{"new": true}'
    assert (out / "tokenizer_config.json").read_text() == '{"eos_token": "<|im_end|>"}'
    assert {"tokenizer.json", "generation_config.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors.index.json").exists()  # an old shard index would point at old shards
