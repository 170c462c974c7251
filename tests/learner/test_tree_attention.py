"""The tree layout (flat row, ancestors' K/V reused) must give each path's own log-probs, loss and gradients."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from learner import tree_attention
from learner.logprobs import token_logprobs, token_logprobs_and_entropy
from learner.packing import pack_trees, per_path_batch, per_path_gather, unique_tokens
from learner.tree_attention import build_tree_plan, runs_and_contexts, supports_tree_attention
from tests.learner.test_packing import _loss_and_grads, _token_delta, assert_grads_close, make_batch, path_layouts
from tests.learner.trees import VOCAB


def _model(architecture: str) -> PreTrainedModel:
    """4 query heads over 2 kv heads (grouped-query attention, as the tiny policy has)."""
    torch.manual_seed(1)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape)).float().eval()  # type: ignore[arg-type]
    if architecture == "qwen3":  # q/k norms inside attention, before the kernel
        return Qwen3ForCausalLM(Qwen3Config(**shape)).float().eval()  # type: ignore[arg-type]
    if architecture == "mistral":
        return MistralForCausalLM(MistralConfig(**shape, sliding_window=None)).float().eval()  # type: ignore[arg-type]
    return Qwen2ForCausalLM(Qwen2Config(**shape)).float().eval()  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3", "mistral"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return _model(request.param)


# ------------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("seed", range(6))
def test_runs_see_exactly_each_tokens_path(seed: int) -> None:
    """Run context + own tokens up to i = the dense mask's row of i (built independently by the masked layout)."""
    trees, credits = make_batch("at2po", seed)
    flat = pack_trees(trees, credits, masks=False)
    dense = pack_trees(trees, credits).attention
    assert flat.segment_attention is None
    assert torch.equal(flat.attention, dense)
    starts, ends, contexts = runs_and_contexts(flat.prev_index.numpy())
    covered = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
    assert covered.tolist() == list(range(flat.num_tokens))  # every token is a query of exactly one run
    assert len(starts) == sum(len(t.leaves()) for t in trees)  # one run per leaf
    for start, end, context in zip(starts, ends, contexts, strict=True):
        assert len(context) == int(flat.position_ids[start])  # context = the path before the run
        for i in range(start, end):
            seen = np.concatenate([context, np.arange(start, i + 1)])
            assert set(seen.tolist()) == set(dense[i].nonzero().squeeze(1).tolist())


def test_plan_places_every_token_once() -> None:
    trees, credits = make_batch("at2po", 4)
    flat = pack_trees(trees, credits, masks=False)
    plan = build_tree_plan(flat.prev_index, "cpu")
    assert len(plan.buckets) > 1
    rows = torch.cat([b.query_index for b in plan.buckets])
    assert torch.equal(rows[plan.output_index], torch.arange(flat.num_tokens))  # output row i holds token i
    assert len(set(plan.output_index.tolist())) == flat.num_tokens


def test_tree_layout_refuses_segments() -> None:
    trees, credits = make_batch("grpo", 0)
    with pytest.raises(ValueError, match="segment_tokens"):
        pack_trees(trees, credits, segment_tokens=30, masks=False)


# ------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("seed", range(3))
def test_tree_logprobs_and_entropy_equal_each_path_alone(model: PreTrainedModel, seed: int) -> None:
    trees, credits = make_batch("at2po", seed)
    flat = pack_trees(trees, credits, masks=False)
    gather = per_path_gather(trees)
    assert flat.num_tokens == sum(unique_tokens(t) for t in trees)
    with torch.no_grad():
        logp, entropy = token_logprobs_and_entropy(model, flat, temperature=0.7)
        start = 0
        for ids in path_layouts(trees):
            index = gather[start : start + len(ids)]
            # The path on its own, with the model's stock causal attention.
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float() / 0.7
            alone = torch.log_softmax(logits, -1)
            picked = alone.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
            torch.testing.assert_close(logp[index[1:]], picked, atol=1e-5, rtol=0)
            torch.testing.assert_close(entropy[index[1:]], -(alone.exp() * alone).sum(-1), atol=1e-5, rtol=0)
            assert float(logp[index[0]]) == 0.0 and float(entropy[index[0]]) == 0.0
            start += len(ids)
    assert model.config._attn_implementation == "sdpa"  # the kernel swap is undone


def test_bucketing_does_not_change_the_numbers(model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """One padded bucket for all runs, or one bucket per run: the same log-probs."""
    trees, credits = make_batch("grpo", 8)
    flat = pack_trees(trees, credits, masks=False)
    results = []
    with torch.no_grad():
        for slack in (1e9, 1.0):
            monkeypatch.setattr(tree_attention, "PADDING_SLACK", slack)
            buckets = build_tree_plan(flat.prev_index, "cpu").buckets
            assert (len(buckets) == 1) == (slack > 1e8)
            results.append(token_logprobs(model, flat))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)


def test_dropping_the_ancestors_is_caught(model: PreTrainedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sanity: runs that do not see their ancestors' keys give other log-probs (the comparison can fail)."""
    trees, credits = make_batch("grpo", 8)
    flat = pack_trees(trees, credits, masks=False)
    with torch.no_grad():
        right = token_logprobs(model, flat)
        real = tree_attention.runs_and_contexts

        def forgetful(prev: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
            starts, ends, contexts = real(prev)
            return starts, ends, [c[:0] for c in contexts]

        monkeypatch.setattr(tree_attention, "runs_and_contexts", forgetful)
        wrong = token_logprobs(model, flat)
    assert not torch.allclose(right, wrong, atol=1e-3)


# ------------------------------------------------------------------------------- loss and gradients


@pytest.mark.parametrize("loss_name", ["atpo", "ppo"])
@pytest.mark.parametrize("method", ["at2po", "grpo"])
def test_tree_loss_and_gradients_equal_per_path(model: PreTrainedModel, method: str, loss_name: str) -> None:
    """Stale tokens, so the clipped and masked branches are covered; the shared prefix's K/V gradients sum."""
    trees, credits = make_batch(method, 21)
    flat, ref = pack_trees(trees, credits, masks=False), per_path_batch(trees, credits)
    results = []
    model.train()
    for batch in (flat, ref):
        delta_prox = _token_delta(batch, 0.3, 0.0)
        delta_behav = delta_prox + _token_delta(batch, 2.5, 2.0)
        results.append(_loss_and_grads(model, batch, loss_name, delta_prox, delta_behav))  # type: ignore[arg-type]
    model.eval()
    (loss_t, grads_t, metrics), (loss_r, grads_r, _) = results
    assert metrics["clip_fraction"] > 0.0 and metrics["is_masked_fraction"] > 0.0, metrics
    # atpo sums turn terms of both signs to ~5e-3: fp32 noise is ~2e-7 here (the masked layout has the same)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in grads_t)
    for (name, _), gt, gr in zip(model.named_parameters(), grads_t, grads_r, strict=True):
        assert_grads_close(gt, gr, name)


# ------------------------------------------------------------------------------------------- support


def test_supported_models_and_fallback() -> None:
    assert all(supports_tree_attention(_model(kind)) for kind in ("qwen2", "llama", "qwen3", "mistral"))
    assert not supports_tree_attention(SimpleNamespace(config=MistralConfig(sliding_window=4096)))  # type: ignore[arg-type]
    sliding = SimpleNamespace(config=Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0))
    assert not supports_tree_attention(sliding)  # type: ignore[arg-type]
    assert not supports_tree_attention(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))  # type: ignore[arg-type]
    trees, credits = make_batch("grpo", 0)
    flat = pack_trees(trees, credits, masks=False)
    unsupported = _model("qwen2")
    unsupported.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="segments"):
        token_logprobs(unsupported, flat)
