"""A scripted actor process for learner tests: real replay, real weights, a reward the policy can learn.

Run as `python scripted_actor.py CONFIG.toml OUT.jsonl N_TREES`. Each tree is one task: a fixed 4-token
prompt, then `chains` one-turn answers of `turn_tokens` tokens sampled (temperature 1) from the newest
weights the learner published, with their log-probs and version. Reward = the fraction of generated tokens
whose id is below GOOD_BELOW (about 10% by chance at the start). Each finished tree's mean reward is
appended to OUT.jsonl, so the test can see the policy improve. Trees respect replay's leases.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM

from common.config import load_config
from common.replay_client import ActorReplayClient
from common.subtree import SubtreeHeader, encode_subtree
from common.tree import FinishReason, TurnNode
from common.weights import WeightSubscriber

GOOD_BELOW = 30
PROMPT = [5, 17, 42, 7]


def sample_turn(model: torch.nn.Module, n_tokens: int, generator: torch.Generator) -> tuple[list[int], list[float]]:
    ids = list(PROMPT)
    logps: list[float] = []
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            token = int(torch.multinomial(log_probs.exp(), 1, generator=generator))
            ids.append(token)
            logps.append(float(log_probs[token]))
    return ids[len(PROMPT) :], logps


def main() -> None:
    config = load_config(sys.argv[1])
    out = Path(sys.argv[2])
    n_trees = int(sys.argv[3])
    chains, turn_tokens = 6, 6
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(config.model.dir, local_files_only=True).eval()
    subscriber = WeightSubscriber(config.transport)
    client = ActorReplayClient(config.transport.replay_endpoint, "scripted", config.transport, window=8)
    generator = torch.Generator().manual_seed(1)
    version = -1
    done = 0
    while done < n_trees:
        latest = subscriber.latest() or subscriber.wait_for(0, timeout_s=120)
        if latest.version > version:
            state = load_safetensors(subscriber.fetch(latest))
            model.load_state_dict(state, strict=False)
            model.tie_weights()
            version = latest.version
        grant = client.request_leases(1)
        if not grant.tree_ids:
            client.pump(0.2)
            continue
        tree_id = grant.tree_ids[0]
        nodes = [TurnNode(0, -1, 0, PROMPT, [], [], [], FinishReason.PROMPT)]
        rewards = []
        for leaf in range(1, chains + 1):
            tokens, logps = sample_turn(model, turn_tokens, generator)
            reward = sum(t < GOOD_BELOW for t in tokens) / len(tokens)
            rewards.append(reward)
            nodes.append(
                TurnNode(
                    leaf,
                    0,
                    1,
                    [],
                    tokens,
                    logps,
                    [version] * len(tokens),
                    FinishReason.ANSWER,
                    entropy=-sum(logps) / len(logps),
                    reward=reward,
                    is_leaf=True,
                )
            )
        header = SubtreeHeader(tree_id, f"task-{uuid.uuid4().hex[:8]}", "scripted", 0, True)
        client.send_subtree(encode_subtree(header, nodes), tree_id, 0)
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"version": version, "reward": sum(rewards) / len(rewards)}) + "\n")
        done += 1
    client.flush(timeout_s=30)
    client.close()
    subscriber.close()
    time.sleep(0.1)


if __name__ == "__main__":
    main()
