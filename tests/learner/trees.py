"""Random turn trees and a tiny saved policy for the learner tests (no actors/ import: learner tests stand alone)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from common.tree import FinishReason, TurnNode, TurnTree

VOCAB = 300


def random_tree(rng: np.random.Generator, name: str, task: str = "task", levels: int = 3, version: int = 0) -> TurnTree:
    """Root prompt of 4–6 tokens, `levels` turn levels, 1–3 children per node, rewards in [0, 1) on leaves."""
    nodes: list[TurnNode] = [
        TurnNode(0, -1, 0, rng.integers(0, VOCAB, int(rng.integers(4, 7))), [], [], [], FinishReason.PROMPT)
    ]
    frontier = [0]
    next_id = 1
    for level in range(1, levels + 1):
        new_frontier: list[int] = []
        for parent in frontier:
            for _ in range(int(rng.integers(1, 4))):
                new_frontier.append(next_id)
                n_obs = int(rng.integers(0, 4)) if level > 1 else 0
                n_gen = int(rng.integers(1, 5))
                nodes.append(
                    TurnNode(
                        next_id,
                        parent,
                        level,
                        rng.integers(0, VOCAB, n_obs),
                        rng.integers(0, VOCAB, n_gen),
                        -rng.random(n_gen).astype(np.float32) - 4.0,
                        np.full(n_gen, version, dtype=np.int32),
                        FinishReason.ANSWER if level == levels else FinishReason.TOOL_CALL,
                        entropy=float(rng.random() * 2.0),
                        reward=float(rng.random()) if level == levels else None,
                        is_leaf=level == levels,
                    )
                )
                next_id += 1
        frontier = new_frontier
    tree = TurnTree.from_nodes(name, task, "actor", nodes)
    tree.validate()
    return tree


def with_behaviour(tree: TurnTree, logp: float | None = None, version: int | None = None) -> TurnTree:
    """The same tree with every generated token's behaviour log-prob and/or version replaced."""
    nodes = []
    for node in tree.nodes.values():
        n = len(node.token_ids)
        nodes.append(
            replace(
                node,
                logprobs=np.full(n, logp, dtype=np.float32) if logp is not None else node.logprobs,
                versions=np.full(n, version, dtype=np.int32) if version is not None else node.versions,
            )
        )
    return TurnTree.from_nodes(tree.tree_id, tree.task_id, tree.actor_id, nodes)


def tiny_policy(seed: int = 0, initializer_range: float = 0.2) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 (hidden 64, vocabulary `VOCAB`) with tied embeddings, initialised under `seed`."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def save_tiny_policy(directory: Path, seed: int = 0) -> Path:
    """`tiny_policy(seed)` saved as a local model directory (what the learner loads)."""
    tiny_policy(seed).save_pretrained(directory)
    return directory
