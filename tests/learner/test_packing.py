"""Tree packing must reproduce the per-path layout exactly: tokens, log-probs, loss and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from common.tree import FinishReason, TurnNode, TurnTree
from learner.credit import compute_credit
from learner.logprobs import token_logprobs
from learner.losses import PolicyLossInput, get_policy_loss, per_path_masses
from learner.packing import (
    PackedBatch,
    pack_trees,
    path_tokens,
    per_path_batch,
    per_path_gather,
    tree_segments,
    unique_tokens,
)
from tests.learner.trees import VOCAB, random_tree


def chain_tree(rng: np.random.Generator) -> TurnTree:
    nodes = [TurnNode(0, -1, 0, rng.integers(0, VOCAB, 5), [], [], [], FinishReason.PROMPT)]
    for depth in (1, 2, 3):
        nodes.append(
            TurnNode(
                depth,
                depth - 1,
                depth,
                rng.integers(0, VOCAB, 2),
                rng.integers(0, VOCAB, 3),
                -rng.random(3).astype(np.float32),
                np.zeros(3, dtype=np.int32),
                FinishReason.ANSWER if depth == 3 else FinishReason.TOOL_CALL,
                reward=1.0 if depth == 3 else None,
                is_leaf=depth == 3,
            )
        )
    return TurnTree.from_nodes("chain", "task", "actor", nodes)


def make_batch(method: str, seed: int) -> tuple[list[TurnTree], list]:
    """Two trees of one prompt; at2po normalises within each tree, so it is called per tree."""
    rng = np.random.default_rng(seed)
    trees = [random_tree(rng, f"t{i}", levels=int(rng.integers(2, 4))) for i in range(2)]
    if method == "at2po":
        credits = [compute_credit("at2po", [tree])[0] for tree in trees]
    else:
        credits = compute_credit(method, trees)
    return trees, credits


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).float().eval()


def path_layouts(trees: list[TurnTree]) -> list[list[int]]:
    """Token ids of every root→leaf path, in per-path order."""
    return [
        [int(t) for node in path for t in np.concatenate([node.obs_ids, node.token_ids])]
        for tree in trees
        for path in tree.paths()
    ]


# ------------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("seed", range(5))
def test_structure_every_path_appears_once_with_its_positions(seed: int) -> None:
    trees, credits = make_batch("at2po", seed)
    packed, ref = pack_trees(trees, credits), per_path_batch(trees, credits)
    gather = per_path_gather(trees)
    assert packed.num_tokens == sum(unique_tokens(t) for t in trees)
    assert ref.num_tokens == sum(path_tokens(t) for t in trees) == gather.numel()
    assert torch.equal(packed.input_ids[gather], ref.input_ids)
    assert torch.equal(packed.position_ids[gather], ref.position_ids)
    assert torch.equal(packed.loss_mask[gather], ref.loss_mask)
    assert torch.equal(packed.behav_logp[gather], ref.behav_logp)
    assert torch.equal(packed.turn_index[gather], ref.turn_index)
    # Every packed token is used by some path (nothing extra is laid out).
    assert set(gather.tolist()) == set(range(packed.num_tokens))

    start = 0
    for ids in path_layouts(trees):
        n = len(ids)
        index = gather[start : start + n]
        assert ref.input_ids[start : start + n].tolist() == ids
        assert ref.position_ids[start : start + n].tolist() == list(range(n))
        for k in range(n):
            # Row of the k-th path token: exactly the path prefix up to and including it.
            assert set(packed.attention[index[k]].nonzero().squeeze(1).tolist()) == set(index[: k + 1].tolist())
            assert set(ref.attention[start + k].nonzero().squeeze(1).tolist()) == set(range(start, start + k + 1))
            expected_prev = int(index[k - 1]) if k else -1
            assert int(packed.prev_index[index[k]]) == expected_prev
        start += n


def test_shared_tokens_have_no_single_sequence_and_turns_are_unique_across_trees() -> None:
    trees, credits = make_batch("grpo", 3)
    packed = pack_trees(trees, credits)
    gather = per_path_gather(trees)
    ref = per_path_batch(trees, credits)
    copies = torch.bincount(gather, minlength=packed.num_tokens)
    assert torch.equal(packed.seq_index >= 0, copies == 1)
    assert torch.equal(packed.seq_index[gather][copies[gather] == 1], ref.seq_index[copies[gather] == 1])
    assert packed.n_trajectories == ref.n_trajectories == sum(len(t.leaves()) for t in trees)
    n_nodes = sum(len(t.nodes) for t in trees)
    assert sorted(set(packed.turn_index.tolist())) == list(range(n_nodes))


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("method", ["at2po", "grpo"])
def test_masses_sum_per_path_masses(method: str, aggregation: str) -> None:
    trees, credits = make_batch(method, 11)
    packed = pack_trees(trees, credits, aggregation)  # type: ignore[arg-type]
    ref = per_path_batch(trees, credits, aggregation)  # type: ignore[arg-type]
    # Per-token advantages of the per-path layout, straight from the credits.
    adv: list[float] = []
    for tree, credit in zip(trees, credits, strict=True):
        for path in tree.paths():
            for node in path:
                a = credit.path_advantages[path[-1].node_id].get(node.node_id, 0.0)
                adv += [0.0] * len(node.obs_ids) + [a] * len(node.token_ids)
    pos, neg = per_path_masses(torch.tensor(adv, dtype=torch.float64), ref.seq_index, ref.loss_mask, aggregation)  # type: ignore[arg-type]
    assert torch.allclose(ref.adv_pos, pos, rtol=1e-12, atol=0) and torch.allclose(ref.adv_neg, neg, rtol=1e-12, atol=0)
    gather = per_path_gather(trees)
    summed_pos = torch.zeros_like(packed.adv_pos).index_add_(0, gather, ref.adv_pos)
    summed_neg = torch.zeros_like(packed.adv_neg).index_add_(0, gather, ref.adv_neg)
    assert torch.allclose(packed.adv_pos, summed_pos, rtol=1e-12, atol=1e-15)
    assert torch.allclose(packed.adv_neg, summed_neg, rtol=1e-12, atol=1e-15)
    assert bool((packed.adv_pos > 0).any()) and bool((packed.adv_neg < 0).any())


def test_unique_tokens_less_than_path_tokens_for_branched_trees() -> None:
    rng = np.random.default_rng(5)
    branched = [random_tree(rng, f"b{i}") for i in range(5)]
    for tree in branched:
        if len(tree.leaves()) > 1:
            assert unique_tokens(tree) < path_tokens(tree)
    assert any(len(t.leaves()) > 1 for t in branched)
    chain = chain_tree(rng)
    assert unique_tokens(chain) == path_tokens(chain) == 5 + 3 * 5


def test_missing_credit_is_refused() -> None:
    trees, credits = make_batch("grpo", 2)
    with pytest.raises(ValueError):
        pack_trees(trees, credits[:1])
    with pytest.raises(ValueError):
        pack_trees(trees[::-1], credits)


# ------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("seed", range(3))
def test_packed_logprobs_equal_per_path_and_separate_forwards(model: Qwen2ForCausalLM, seed: int) -> None:
    trees, credits = make_batch("at2po", seed)
    packed, ref = pack_trees(trees, credits), per_path_batch(trees, credits)
    gather = per_path_gather(trees)
    with torch.no_grad():
        lp_packed = token_logprobs(model, packed, temperature=0.7)
        lp_ref = token_logprobs(model, ref, temperature=0.7)
        torch.testing.assert_close(lp_packed[gather], lp_ref, atol=1e-5, rtol=0)
        # Each path run on its own, with the model's own causal mask, gives the same numbers.
        start = 0
        for ids in path_layouts(trees):
            logits = model(input_ids=torch.tensor([ids])).logits[0].float() / 0.7
            alone = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
            torch.testing.assert_close(lp_ref[start + 1 : start + len(ids)], alone, atol=1e-5, rtol=0)
            assert float(lp_ref[start]) == 0.0
            start += len(ids)
    assert bool((lp_packed < 0).any())


def test_flash_attention_is_refused(model: Qwen2ForCausalLM) -> None:
    trees, credits = make_batch("grpo", 0)
    batch = pack_trees(trees, credits)
    original = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="attn_implementation"):
            token_logprobs(model, batch)
    finally:
        model.config._attn_implementation = original


def test_eager_matches_sdpa(model: Qwen2ForCausalLM) -> None:
    trees, credits = make_batch("grpo", 4)
    batch = pack_trees(trees, credits)
    with torch.no_grad():
        sdpa = token_logprobs(model, batch)
        model.set_attn_implementation("eager")
        try:
            eager = token_logprobs(model, batch)
        finally:
            model.set_attn_implementation("sdpa")
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- loss and gradients


def _loss_and_grads(
    model: Qwen2ForCausalLM, batch: PackedBatch, loss_name: str, delta_prox: torch.Tensor, delta_behav: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, float]]:
    """prox/behav = current logp (detached) + a fixed perturbation, so both layouts see the same ratios."""
    model.zero_grad(set_to_none=True)
    logp = token_logprobs(model, batch)
    inp = PolicyLossInput(
        logp=logp,
        prox_logp=logp.detach() + delta_prox,
        behav_logp=logp.detach() + delta_behav,
        adv_pos=batch.adv_pos,
        adv_neg=batch.adv_neg,
        loss_mask=batch.loss_mask,
        turn_index=batch.turn_index,
        seq_index=batch.seq_index,
    )
    out = get_policy_loss(loss_name)(inp)
    out.loss.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return out.loss.detach(), grads, out.metrics


@pytest.mark.parametrize("stale", [False, True], ids=["on-policy", "stale"])
@pytest.mark.parametrize("loss_name", ["atpo", "ppo"])
@pytest.mark.parametrize("method", ["at2po", "grpo"])
def test_packed_loss_and_gradients_equal_per_path(
    model: Qwen2ForCausalLM, method: str, loss_name: str, stale: bool
) -> None:
    trees, credits = make_batch(method, 21)
    packed, ref = pack_trees(trees, credits), per_path_batch(trees, credits)
    gather = per_path_gather(trees)
    gen = torch.Generator().manual_seed(7)
    if stale:
        # One perturbation per unique token, copied to every path through it: large enough that PPO (ε 0.2)
        # and ATPO (ε 3e-3) clip some tokens and some importance weights pass the cap (5) and are masked.
        delta_prox = 0.3 * torch.randn(packed.num_tokens, generator=gen)
        delta_behav = delta_prox + 1.5 * torch.randn(packed.num_tokens, generator=gen)
    else:
        delta_prox = delta_behav = torch.zeros(packed.num_tokens)
    model.train()
    loss_p, grads_p, metrics = _loss_and_grads(model, packed, loss_name, delta_prox, delta_behav)
    loss_r, grads_r, _ = _loss_and_grads(model, ref, loss_name, delta_prox[gather], delta_behav[gather])
    model.eval()
    if stale:  # the comparison must cover the clipped and the masked branches, not only the plain one
        assert metrics["clip_fraction"] > 0.0 and metrics["is_masked_fraction"] > 0.0, metrics
    else:
        assert metrics["clip_fraction"] == 0.0, metrics
    torch.testing.assert_close(loss_p, loss_r, rtol=1e-5, atol=1e-7)
    assert float(loss_p) != 0.0
    assert any(float(g.abs().max()) > 0 for g in grads_p)
    for (name, _), gp, gr in zip(model.named_parameters(), grads_p, grads_r, strict=True):
        assert_grads_close(gp, gr, name)


def grad_atol(expected: torch.Tensor) -> float:
    """Float32 sums in another order differ by about 1e-6 of the gradient's scale (2e-6 of 1.9 seen on one
    install in an embedding row many tokens share); a wrong weighting differs by 10-40% of it."""
    return max(1e-6, 1e-5 * float(expected.abs().max()))


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=grad_atol(expected), msg=lambda m, n=name: f"{n}: {m}")


def test_gradient_check_can_fail(model: Qwen2ForCausalLM) -> None:
    """Sanity: ignoring the path multiplicity (one path's mass on a shared token) changes the gradients."""
    trees, credits = make_batch("grpo", 21)
    packed, ref = pack_trees(trees, credits), per_path_batch(trees, credits)
    gather = per_path_gather(trees)
    copies = torch.bincount(gather, minlength=packed.num_tokens).double()
    wrong = PackedBatch(
        **{
            **{f: getattr(packed, f) for f in PackedBatch.__dataclass_fields__},
            "adv_pos": packed.adv_pos / copies,
            "adv_neg": packed.adv_neg / copies,
        }
    )
    zeros = torch.zeros(packed.num_tokens)
    _, grads_w, _ = _loss_and_grads(model, wrong, "ppo", zeros, zeros)
    _, grads_r, _ = _loss_and_grads(model, ref, "ppo", zeros[gather], zeros[gather])
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=grad_atol(b)) for a, b in zip(grads_w, grads_r, strict=True))


def test_segments_are_trees_or_paths_and_padding_changes_nothing(model: Qwen2ForCausalLM) -> None:
    """Packed: one segment per tree; per-path: one per path. Trees of different lengths batched together
    (the shorter one padded) give the same log-probs as each tree alone."""
    trees, credits = make_batch("grpo", 31)
    packed = pack_trees(trees, credits)
    assert packed.segment_starts.tolist() == [0, unique_tokens(trees[0])]
    assert packed.segment_attention.shape[0] == 2
    assert per_path_batch(trees, credits).segment_attention.shape[0] == sum(len(t.leaves()) for t in trees)
    assert unique_tokens(trees[0]) != unique_tokens(trees[1])  # so one of them is padded
    with torch.no_grad():
        together = token_logprobs(model, packed)
        alone = torch.cat([token_logprobs(model, pack_trees([t], [c])) for t, c in zip(trees, credits, strict=True)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def _token_delta(batch: PackedBatch, scale: float, phase: float) -> torch.Tensor:
    """A perturbation that depends only on which token it is (turn, position), so every copy gets the same."""
    return scale * torch.sin(batch.turn_index.double() * 7.1 + batch.position_ids.double() * 1.3 + phase).float()


@pytest.mark.parametrize("segment_tokens", [1, 20, 45, 10_000])
@pytest.mark.parametrize("loss_name", ["atpo", "ppo"])
def test_segmented_packing_keeps_loss_and_gradients(
    model: Qwen2ForCausalLM, loss_name: str, segment_tokens: int
) -> None:
    trees, credits = make_batch("at2po", 23)
    segmented, ref = pack_trees(trees, credits, segment_tokens=segment_tokens), per_path_batch(trees, credits)
    results = []
    model.train()
    for batch in (segmented, ref):
        delta_prox = _token_delta(batch, 0.3, 0.0)
        delta_behav = delta_prox + _token_delta(batch, 2.5, 2.0)
        results.append(_loss_and_grads(model, batch, loss_name, delta_prox, delta_behav))
    model.eval()
    (loss_s, grads_s, metrics), (loss_r, grads_r, _) = results
    assert metrics["clip_fraction"] > 0.0 and metrics["is_masked_fraction"] > 0.0, metrics
    torch.testing.assert_close(loss_s, loss_r, rtol=1e-5, atol=1e-7)
    for (name, _), gs, gr in zip(model.named_parameters(), grads_s, grads_r, strict=True):
        assert_grads_close(gs, gr, name)


def test_tree_segments_cover_every_leaf_once_within_budget() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        tree = random_tree(rng, "t", levels=int(rng.integers(2, 5)))
        longest = max(sum(len(n.obs_ids) + len(n.token_ids) for n in p) for p in tree.paths())
        for budget in (1, 15, 40, 100):
            segments = tree_segments(tree, budget)
            leaves = [i for seg in segments for i in seg if tree.nodes[i].is_leaf]
            assert sorted(leaves) == sorted(n.node_id for n in tree.leaves())
            for seg in segments:
                assert seg[0] == tree.root.node_id
                assert all(tree.nodes[i].parent_id in seg for i in seg[1:])  # ancestors come along
                tokens = sum(len(tree.nodes[i].obs_ids) + len(tree.nodes[i].token_ids) for i in seg)
                assert tokens <= max(budget, longest)
        assert (
            tree_segments(tree, None) == [[n.node_id for n in tree.nodes.values() if True]]
            or len(tree_segments(tree, None)) == 1
        )
    whole = tree_segments(tree, 10**9)
    assert len(whole) == 1 and sorted(whole[0]) == sorted(tree.nodes)
