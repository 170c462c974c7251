"""Shared fixtures for the actor tests: the tiny policy directory, built once per session, offline.

`tiny_model_dir` is the fixture other actor tests build on (generation backends, tree builders): a default-shape
`TinyModelSpec` (Qwen2, hidden 128, 2 layers, 4 heads, head_dim 32) with a tokenizer trained on a small sample
of the synthetic world's texts. `tiny_training_texts` is that sample, for tests that re-run the init.
`no_network` makes any socket connection fail, to prove a code path never reaches the network.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actors.tiny_model import TinyModelSpec, init_tiny_model, world_training_texts


@pytest.fixture(scope="session")
def tiny_training_texts() -> list[str]:
    """A small, fixed sample: enough for a useful tokenizer, fast to train on (well under a second)."""
    return world_training_texts(seed=0, n_tasks=200, n_arithmetic=100, max_passages=800)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_training_texts: list[str]) -> Path:
    """A tiny Qwen2 policy directory (model, tokenizer, chat template, generation config)."""
    return init_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", TinyModelSpec(), tiny_training_texts)


class _NetworkBlocked(OSError):
    pass


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every outgoing connection raises, so a test fails loudly if the code under test tries one."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise _NetworkBlocked(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
