"""Learner checkpoints: DeepSpeed state + learner version + sampling state, complete only once marked.

Layout (decided here), one directory per version under `learner.checkpoint_dir`::

    v00000012/
        deepspeed/ds/...        engine.save_checkpoint(tag="ds"): model, optimizer (ZeRO shards per rank)
        learner_state.json      {"version", "step", "trees_trained", "held_trees_file", ...}
        held_trees.bin          trees replay already handed out that wait for their task group (sampling.py framing)
        model/                  the weights as a Hugging Face model directory (plus the source model's tokenizer
                                and generation files), loadable by actors, `at2po eval` and `at2po learner run`
        COMPLETE                written last, after every other file is flushed and fsynced

A directory without COMPLETE (the learner died while writing it) is never resumed from and is removed
by the next successful checkpoint. `keep` complete checkpoints are kept, older ones deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
STATE_FILE = "learner_state.json"
HELD_FILE = "held_trees.bin"
ENGINE_DIR = "deepspeed"
MODEL_DIR = "model"
# What save_pretrained writes (weights by suffix, the rest by name); every other file of the source is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_MODEL_FILE_NAMES = frozenset({"config.json"})
ENGINE_TAG = "ds"
_NAME = re.compile(r"^v(\d{8})$")


@dataclass
class LearnerState:
    """What a resume needs besides the engine: the version counter and sampling bookkeeping."""

    version: int
    step: int
    trees_trained: int = 0
    groups_incomplete: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(version: int) -> str:
    return f"v{version:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def prepare_dir(root: Path, version: int) -> Path:
    """A fresh directory for `version` (a leftover incomplete one is cleared first)."""
    path = root / checkpoint_name(version)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def finish(path: Path, state: LearnerState, held_trees: bytes) -> None:
    """Write the learner's files, fsync everything DeepSpeed wrote, then the marker (rank 0 only)."""
    _write_durable(path / HELD_FILE, held_trees)
    _write_durable(path / STATE_FILE, json.dumps(asdict(state), sort_keys=True).encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        _fsync_file(file)
    for directory in sorted({p.parent for p in path.rglob("*")} | {path}):
        _fsync_dir(directory)
    _write_durable(path / MARKER, b"ok\n")
    _fsync_dir(path)
    _fsync_dir(path.parent)


def export_model(module: Any, source_dir: Path, target: Path) -> None:
    """Save `module` as a Hugging Face model directory, with the tokenizer/chat files of `source_dir`."""
    target.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(target, safe_serialization=True)
    for file in source_dir.iterdir():
        written_by_model = file.name.endswith(_WEIGHT_SUFFIXES) or file.name in _MODEL_FILE_NAMES
        if file.is_file() and not written_by_model and not (target / file.name).exists():
            shutil.copy2(file, target / file.name)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_state(path: Path) -> tuple[LearnerState, bytes]:
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    state = LearnerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    return state, (path / HELD_FILE).read_bytes()


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints and any incomplete ones older than those."""
    done = complete_checkpoints(root)
    if not done:
        return []
    kept = set(done[-keep:])
    newest = done[-1].name
    removed: list[Path] = []
    for path in root.iterdir():
        if not (path.is_dir() and _NAME.match(path.name)) or path in kept:
            continue
        if (path / MARKER).is_file() or path.name < newest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
