"""Random but valid turn trees and their subtree messages, for the replay benchmark and tests.

Shapes resemble AT2PO trees: a prompt root, first turns as its children, and later turns branching
off earlier ones; leaves end in an answer and carry a reward.
"""

from __future__ import annotations

import numpy as np

from common.subtree import SubtreeHeader, encode_subtree
from common.tree import FinishReason, TurnNode, TurnTree


def random_tree(
    rng: np.random.Generator,
    tree_id: str,
    task_id: str = "task",
    actor_id: str = "actor",
    n_nodes: int = 8,
    tokens_per_turn: int = 128,
    obs_tokens: int = 32,
    prompt_tokens: int = 64,
    version: int = 0,
    vocab: int = 32_000,
) -> TurnTree:
    """A complete tree of `n_nodes` nodes (root included, at least 2)."""
    n_nodes = max(2, n_nodes)
    parents = [-1, 0] + [int(rng.integers(0, i)) for i in range(2, n_nodes)]
    has_child = set(parents[1:])
    depth = [0] * n_nodes
    nodes = [
        TurnNode(
            node_id=0,
            parent_id=-1,
            depth=0,
            obs_ids=rng.integers(0, vocab, prompt_tokens, dtype=np.int32),
            token_ids=np.zeros(0, np.int32),
            logprobs=np.zeros(0, np.float32),
            versions=np.zeros(0, np.int32),
            finish_reason=FinishReason.PROMPT,
        )
    ]
    for node_id in range(1, n_nodes):
        parent = parents[node_id]
        depth[node_id] = depth[parent] + 1
        leaf = node_id not in has_child
        logprobs = -rng.exponential(1.0, tokens_per_turn).astype(np.float32)
        nodes.append(
            TurnNode(
                node_id=node_id,
                parent_id=parent,
                depth=depth[node_id],
                obs_ids=rng.integers(0, vocab, obs_tokens if parent != 0 else 0, dtype=np.int32),
                token_ids=rng.integers(0, vocab, tokens_per_turn, dtype=np.int32),
                logprobs=logprobs,
                versions=np.full(tokens_per_turn, version, np.int32),
                finish_reason=FinishReason.ANSWER if leaf else FinishReason.TOOL_CALL,
                entropy=float(-logprobs.mean()) if tokens_per_turn else float("nan"),
                topk_logprobs=-rng.exponential(1.0, (min(4, tokens_per_turn), 5)).astype(np.float32),
                tool_call=None if leaf else '{"name": "search", "arguments": {"query": "q"}}',
                reward=float(rng.integers(0, 2)) if leaf else None,
                is_leaf=leaf,
            )
        )
    return TurnTree.from_nodes(tree_id, task_id, actor_id, nodes)


def tree_messages(tree: TurnTree, nodes_per_message: int = 4) -> list[bytes]:
    """Encode a tree as consecutive subtree messages (seq 0.., the last one final)."""
    ordered = [tree.nodes[i] for i in sorted(tree.nodes)]
    chunks = [ordered[i : i + nodes_per_message] for i in range(0, len(ordered), nodes_per_message)]
    return [
        encode_subtree(
            SubtreeHeader(tree.tree_id, tree.task_id, tree.actor_id, seq=seq, final=seq == len(chunks) - 1), chunk
        )
        for seq, chunk in enumerate(chunks)
    ]
