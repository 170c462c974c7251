"""Tree builders against the real ToolEnvironment with a scripted backend: shapes, tokens, entropy, budgets."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.builders import (
    ArpoConfig,
    At2poConfig,
    Budget,
    BuiltTree,
    ChainConfig,
    TreeBuildError,
    TreeGrpoConfig,
    TreeJob,
    builder_names,
    get_builder,
    make_builder,
    open_recorder,
)
from actors.builders.arpo import ArpoBuilder, branch_probability
from actors.builders.at2po import At2poBuilder, expansion_scores, select_top_k
from actors.builders.chain import ChainBuilder
from actors.builders.common import SEED_RNG, TokenLedger, derive_seed
from actors.builders.tree_grpo import RNG_SELECT, TreeGrpoBuilder
from actors.generation import Generation, SamplingParams
from actors.scheduler import GenerationScheduler
from actors.tree_recorder import ROOT_ID, TreeRecorder, topk_entropy_sum
from common.subtree import SubtreeHeader, assemble_tree, encode_subtree
from common.tree import FinishReason, TurnTree
from tests.actors import fakes

CODEC = fakes.FakeCodec()
SAMPLING = SamplingParams()


def build(builder: Any, backend: Any = None, seed: int = 3, budget: Budget | None = None, **kw: Any) -> BuiltTree:
    backend = backend or fakes.FakeBackend()

    async def main() -> BuiltTree:
        async with GenerationScheduler(backend, SAMPLING) as scheduler:
            return await builder.build(
                TreeJob(fakes.TASK, fakes.make_env(), scheduler, CODEC, SAMPLING, seed, budget, **kw)
            )

    return asyncio.run(main())


def path_context(tree: TurnTree, node_id: int) -> list[int]:
    """What the model saw before generating `node_id`: the path's obs+tokens, then the node's obs."""
    ids: list[int] = []
    path = tree.path_to(node_id)
    for node in path[:-1]:
        ids += node.obs_ids.tolist() + node.token_ids.tolist()
    return ids + path[-1].obs_ids.tolist()


def check_tokens_exact(tree: TurnTree, backend: Any) -> None:
    """Every non-root node is exactly one backend call: the path's context in, the node's tokens out."""
    expected = Counter(
        (tuple(path_context(tree, n.node_id)), tuple(n.token_ids.tolist()))
        for n in tree.nodes.values()
        if n.node_id != tree.root.node_id
    )
    assert expected == Counter(backend.calls)
    prompt = CODEC.prompt_ids(fakes.make_env().start(fakes.TASK).prompt_messages, None)
    assert tree.root.obs_ids.tolist() == prompt
    for node in tree.nodes.values():
        if node.depth >= 2:
            assert CODEC.decode(node.obs_ids).startswith(" <result>")
        elif node.depth == 1:
            assert node.obs_ids.size == 0


def check_tree(built: BuiltTree, backend: Any) -> None:
    tree = built.tree
    tree.validate(complete=True)
    check_tokens_exact(tree, backend)
    leaves = tree.leaves()
    assert built.leaves == len(leaves)
    assert built.generated_tokens == sum(len(n.token_ids) for n in tree.nodes.values())
    assert built.stats["tokens_per_leaf"] == pytest.approx(built.generated_tokens / len(leaves))
    kids = tree.children()
    for node in tree.nodes.values():
        if node.finish_reason is FinishReason.ANSWER:
            assert node.is_leaf and not kids[node.node_id]  # answer turns are never expanded
        if node.is_leaf:
            assert node.reward is not None
        assert node.tool_call is None or '"name": "search"' in node.tool_call
        if node.node_id != tree.root.node_id:
            assert node.entropy == pytest.approx(float(-node.logprobs.astype(np.float64).mean()), rel=1e-5)
    # The same tree survives the wire.
    message = encode_subtree(
        SubtreeHeader(tree.tree_id, tree.task_id, tree.actor_id, 0, True), list(tree.nodes.values())
    )
    again = assemble_tree([message])
    assert all(again.nodes[i].equals(tree.nodes[i]) for i in tree.nodes)


# ----------------------------------------------------------------------------------------- shapes


def test_chain_grows_g_independent_trajectories_batched() -> None:
    backend = fakes.FakeBackend()
    built = build(ChainBuilder(ChainConfig(chains=8)), backend)
    check_tree(built, backend)
    tree = built.tree
    assert built.leaves == 8
    assert len(tree.children()[tree.root.node_id]) == 8
    assert all(len(k) <= 1 for i, k in tree.children().items() if i != tree.root.node_id)  # chains do not fork
    assert backend.batch_sizes[0] == 8  # the first turns of all chains were generated together
    assert max(backend.batch_sizes) > 1


def test_tree_grpo_m1_n2_l1_gives_three_leaves_with_new_children() -> None:
    backend = fakes.FakeBackend()
    builder = TreeGrpoBuilder(TreeGrpoConfig(trees=1, expansions=2, rounds=1))
    built = build(builder, backend)
    check_tree(built, backend)
    assert built.leaves == 3 and built.stats["expansions"] == 2
    assert builder.trees_per_task == 1 and TreeGrpoBuilder().trees_per_task == 2
    # The first chain is the root's first child; every expansion added a child to a non-leaf node.
    tree = built.tree
    first_chain = {n.node_id for n in tree.path_to(min(n.node_id for n in tree.leaves()))}
    added = [n for n in tree.nodes.values() if n.node_id not in first_chain]
    origins = {n.parent_id for n in added if n.parent_id in first_chain}
    assert origins and all(not tree.nodes[o].is_leaf for o in origins)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_grpo_is_seeded(seed: int) -> None:
    builder = TreeGrpoBuilder(TreeGrpoConfig(trees=1, expansions=3, rounds=2))
    a, b = build(builder, seed=seed), build(builder, seed=seed)
    assert a.leaves == b.leaves == 7
    assert all(a.tree.nodes[i].equals(b.tree.nodes[i]) for i in a.tree.nodes)


def test_at2po_m10_l2_k6_gives_22_leaves_and_siblings_share_the_parent_context() -> None:
    backend = fakes.FakeBackend()
    built = build(At2poBuilder(At2poConfig(initial_chains=10, rounds=2, expansions=6)), backend)
    check_tree(built, backend)
    assert built.leaves == 22 and built.stats["expansions"] == 12
    tree = built.tree
    kids = tree.children()
    contexts: dict[int, set[tuple[int, ...]]] = {}
    for node in tree.nodes.values():
        if node.node_id != tree.root.node_id:
            contexts.setdefault(node.parent_id, set()).add(tuple(path_context(tree, node.node_id)))
    forks = [p for p, k in kids.items() if len(k) > 1 and p != tree.root.node_id]
    assert forks, "expansions should have made siblings below the root"
    for parent in forks:
        obs = {tuple(tree.nodes[c].obs_ids.tolist()) for c in kids[parent]}
        assert len(obs) == 1 and len(contexts[parent]) == 1  # identical obs_ids and context up to them
    # Backend-side check: the siblings' requests had the very same context.
    by_context = Counter(ctx for ctx, _ in backend.calls)
    assert any(count > 1 for ctx, count in by_context.items() if len(ctx) > len(tree.root.obs_ids))


def grow_with_recorder(builder: Any, seed: int) -> TreeRecorder:
    recorder = open_recorder(fakes.TASK, fakes.make_env(), CODEC, seed)

    async def main() -> None:
        async with GenerationScheduler(fakes.FakeBackend(), SAMPLING) as scheduler:
            await builder.build(
                TreeJob(fakes.TASK, fakes.make_env(), scheduler, CODEC, SAMPLING, seed, recorder=recorder)
            )

    asyncio.run(main())
    return recorder


def expansion_parents(before: TreeRecorder, after: TreeRecorder) -> Counter[int]:
    """Parents of the nodes the expansion round added (the first phase is identical under one seed)."""
    old = {n.node_id for n in before.nodes()}
    assert all(before.node(i).same_tokens(after.node(i)) for i in old)
    return Counter(n.parent_id for n in after.nodes() if n.node_id not in old and n.parent_id in old)


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_at2po_expands_the_top_k_scored_nodes_as_siblings(variant: str) -> None:
    base = At2poConfig(initial_chains=6, rounds=0, expansions=4, variant=variant)  # type: ignore[arg-type]
    before = grow_with_recorder(At2poBuilder(base), seed=11)
    after = grow_with_recorder(At2poBuilder(dataclasses.replace(base, rounds=1)), seed=11)
    chosen = select_top_k(expansion_scores(before, 0.05, variant), 4)  # type: ignore[arg-type]
    assert any(c != ROOT_ID for c in chosen)
    expected = Counter(ROOT_ID if c == ROOT_ID else before.parent(c) for c in chosen)
    assert expansion_parents(before, after) == expected


def test_tree_grpo_continues_the_uniformly_chosen_nodes_as_children() -> None:
    base = TreeGrpoConfig(trees=1, expansions=5, rounds=0)
    before = grow_with_recorder(TreeGrpoBuilder(base), seed=4)
    after = grow_with_recorder(TreeGrpoBuilder(dataclasses.replace(base, rounds=1)), seed=4)
    rng = random.Random(derive_seed(4, SEED_RNG, RNG_SELECT))
    chosen = rng.choices(before.expandable(), k=5)
    assert len(before.expandable()) > 1
    assert expansion_parents(before, after) == Counter(chosen)


def test_at2po_repeats_the_best_candidate_when_only_the_root_is_expandable() -> None:
    backend = fakes.FakeBackend(search_probs=())  # every turn answers: no node but the root can be expanded
    built = build(At2poBuilder(At2poConfig(initial_chains=2, rounds=2, expansions=3)), backend)
    check_tree(built, backend)
    assert built.leaves == 2 + 2 * 3
    assert len(built.tree.children()[ROOT_ID]) == 8


def make_recorder_tree() -> TreeRecorder:
    """root -> a (tool call, H=1.0) -> b (answer leaf, H=9.0); root -> c (tool call, H=0.5) -> d (tool call, H=2.0)."""
    recorder = TreeRecorder("t", "task", "actor", [1, 2, 3])

    def gen(entropy: float) -> Generation:
        return Generation(
            token_ids=np.asarray([5, 6], dtype=np.int32),
            logprobs=np.asarray([-entropy, -entropy], dtype=np.float32),
            versions=np.zeros(2, dtype=np.int32),
            finish="stop",
            text="..",
        )

    a = recorder.add_turn(ROOT_ID, [], gen(1.0), FinishReason.TOOL_CALL, "{}")
    recorder.set_continuation(a, [7])
    b = recorder.add_turn(a, [7], gen(9.0), FinishReason.ANSWER)
    recorder.mark_leaf(b, 1.0)
    c = recorder.add_turn(ROOT_ID, [], gen(0.5), FinishReason.TOOL_CALL, "{}")
    recorder.set_continuation(c, [8])
    d = recorder.add_turn(c, [8], gen(2.0), FinishReason.TOOL_CALL, "{}")
    recorder.set_continuation(d, [9])
    return recorder


def test_at2po_scores_code_and_paper_variants() -> None:
    recorder = make_recorder_tree()
    a, b, c, d = 1, 2, 3, 4
    assert recorder.node(b).finish_reason is FinishReason.ANSWER
    code = expansion_scores(recorder, alpha=0.05, variant="code")
    assert set(code) == {ROOT_ID, a, c, d}  # the answer leaf b is never a candidate, despite H=9
    assert code[ROOT_ID] == pytest.approx(-0.05 * 1)  # H(root)=0, its own 2 children -> penalty 1
    assert code[a] == pytest.approx(1.0 - 0.05 * 1)  # parent root has 2 children
    assert code[d] == pytest.approx(2.0)  # only child of c
    paper = expansion_scores(recorder, alpha=0.05, variant="paper")
    assert paper[ROOT_ID] == pytest.approx(-0.1) and paper[d] == pytest.approx(2.0 - 0.05)
    assert select_top_k(code, 2) == [d, a]
    assert select_top_k({5: 1.0, 3: 1.0}, 5) == [3, 5, 3, 5, 3]  # ties by id, ranking repeated


def test_arpo_reaches_m_paths_in_both_variants() -> None:
    for variant in ("code", "paper"):
        backend = fakes.FakeBackend()
        config = ArpoConfig(paths=6, initial_chains=3, vocab_size=fakes.VOCAB_SIZE, variant=variant)
        built = build(ArpoBuilder(config), backend)
        check_tree(built, backend)
        assert built.leaves == 6
        tree = built.tree
        for node in tree.nodes.values():
            if node.node_id != tree.root.node_id:
                assert node.topk_logprobs.shape == (min(20, len(node.token_ids)), 10)
        assert all(s.topk_logprobs == 10 and s.topk_positions == 20 for s in backend.samplings)
        # Branches are new children of nodes that received a tool result.
        for parent, kids in tree.children().items():
            if len(kids) > 1 and parent != tree.root.node_id:
                assert tree.nodes[parent].tool_call is not None


def test_arpo_tops_up_with_fresh_chains_when_nothing_branches() -> None:
    backend = fakes.FakeBackend(search_probs=())  # no tool calls, so no branching points
    built = build(ArpoBuilder(ArpoConfig(paths=5, initial_chains=2, vocab_size=fakes.VOCAB_SIZE)), backend)
    check_tree(built, backend)
    assert built.leaves == 5 and built.stats["topups"] == 3
    assert len(built.tree.children()[ROOT_ID]) == 5


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_arpo_branching_follows_alpha(variant: str) -> None:
    """α = 0 (β = 0) never branches: every path is a fresh chain; α = 1 always branches: one chain suffices."""
    never = ArpoConfig(paths=5, initial_chains=1, alpha=0.0, beta=0.0, vocab_size=fakes.VOCAB_SIZE, variant=variant)  # type: ignore[arg-type]
    always = dataclasses.replace(never, alpha=1.0)
    backend = fakes.FakeBackend(search_probs=(1.0, 1.0, 1.0))  # three tool calls before every answer
    built = build(ArpoBuilder(never), backend)
    check_tree(built, backend)
    assert built.leaves == 5 and len(built.tree.children()[ROOT_ID]) == 5 and built.stats.get("branched", 0) == 0
    backend = fakes.FakeBackend(search_probs=(1.0, 1.0, 1.0))
    built = build(ArpoBuilder(always), backend)
    check_tree(built, backend)
    assert built.leaves == 5 and len(built.tree.children()[ROOT_ID]) == 1 and built.stats["branched"] == 4


def test_arpo_needs_a_vocabulary_size() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build(ArpoBuilder(ArpoConfig(paths=2, initial_chains=1)))


def test_branch_probability_is_clipped() -> None:
    assert branch_probability(0.5, 0.2, 0.0) == 0.5
    assert branch_probability(0.5, 0.2, 1.0) == pytest.approx(0.7)
    assert branch_probability(0.5, 0.2, 10.0) == 1.0 and branch_probability(0.5, 0.2, -10.0) == 0.0


# ---------------------------------------------------------------------------------------- entropy


def test_recorded_entropies_match_a_direct_computation() -> None:
    backend = fakes.FakeBackend()
    recorder = open_recorder(fakes.TASK, fakes.make_env(), CODEC, 0, vocab_size=fakes.VOCAB_SIZE)
    config = ArpoConfig(paths=4, initial_chains=2, vocab_size=fakes.VOCAB_SIZE)

    async def main() -> BuiltTree:
        async with GenerationScheduler(backend, SAMPLING) as scheduler:
            return await ArpoBuilder(config).build(
                TreeJob(fakes.TASK, fakes.make_env(), scheduler, CODEC, SAMPLING, 0, recorder=recorder)
            )

    built = asyncio.run(main())
    for node in built.tree.nodes.values():
        if node.node_id == ROOT_ID:
            assert recorder.turn_entropy(ROOT_ID) == 0.0
            continue
        direct = -sum(math.exp(float(v)) * float(v) for row in node.topk_logprobs for v in row)
        assert recorder.topk_entropy(node.node_id) == pytest.approx(direct, rel=1e-9)
        assert recorder.arpo_entropy(node.node_id) == pytest.approx(direct / math.log(fakes.VOCAB_SIZE), rel=1e-9)
        mean_nll = -sum(float(v) for v in node.logprobs) / len(node.logprobs)
        assert recorder.turn_entropy(node.node_id) == pytest.approx(mean_nll, rel=1e-5)
    assert topk_entropy_sum(np.zeros((0, 0), dtype=np.float32)) == 0.0


# ---------------------------------------------------------------------------------------- budgets


def test_per_turn_limit_cuts_turns_and_the_environment_scores_them() -> None:
    backend = fakes.FakeBackend()
    built = build(ChainBuilder(ChainConfig(chains=4)), backend, budget=Budget(max_new_tokens=10))
    check_tree(built, backend)
    assert all(len(n.token_ids) <= 10 for n in built.tree.nodes.values())
    assert {n.finish_reason for n in built.tree.leaves()} == {FinishReason.LENGTH}


def test_tree_token_budget_is_never_exceeded_and_cut_paths_end_as_rewarded_leaves() -> None:
    for builder in (
        ChainBuilder(ChainConfig(chains=8)),
        At2poBuilder(At2poConfig(initial_chains=4, rounds=2, expansions=3)),
        TreeGrpoBuilder(TreeGrpoConfig(trees=1, expansions=4, rounds=2)),
    ):
        backend = fakes.FakeBackend()
        built = build(builder, backend, budget=Budget(max_new_tokens=60, max_tree_tokens=300))
        check_tree(built, backend)
        assert built.generated_tokens <= 300


def test_budget_cut_after_a_tool_call_closes_the_node_as_a_leaf() -> None:
    backend = fakes.FakeBackend(search_probs=(1.0, 1.0, 1.0))
    built = build(ChainBuilder(ChainConfig(chains=1)), backend, budget=Budget(max_new_tokens=100, max_tree_tokens=100))
    check_tree(built, backend)
    (leaf,) = built.tree.leaves()
    assert built.stats.get("leaves_cut_by_budget", 0) + (leaf.finish_reason is FinishReason.LENGTH) >= 1
    assert built.generated_tokens <= 100


def test_context_limit_and_an_impossible_budget() -> None:
    prompt_len = len(CODEC.prompt_ids(fakes.make_env().start(fakes.TASK).prompt_messages, None))
    backend = fakes.FakeBackend()
    built = build(ChainBuilder(ChainConfig(chains=2)), backend, budget=Budget(max_context_tokens=prompt_len + 120))
    check_tree(built, backend)
    assert all(
        len(path_context(built.tree, leaf.node_id)) + len(leaf.token_ids) <= prompt_len + 120
        for leaf in built.tree.leaves()
    )
    with pytest.raises(TreeBuildError):
        build(ChainBuilder(ChainConfig(chains=2)), budget=Budget(max_context_tokens=prompt_len))


def test_token_ledger_reserves_and_settles() -> None:
    ledger = TokenLedger(100)
    assert ledger.reserve(60) == 60 and ledger.reserve(60) == 40 and ledger.reserve(5) == 0
    ledger.settle(60, 10)
    assert ledger.reserve(100) == 50 and not ledger.exhausted
    ledger.settle(40, 40)
    ledger.settle(50, 50)
    assert ledger.exhausted and TokenLedger(None).reserve(7) == 7


# -------------------------------------------------------------------------------------- streaming


def test_streamed_nodes_assemble_into_the_built_tree() -> None:
    backend = fakes.FakeBackend()
    recorder = open_recorder(fakes.TASK, fakes.make_env(), CODEC, 5, tree_id="tree-1", actor_id="a1")
    batches: list[list[Any]] = []

    async def main() -> BuiltTree:
        async with GenerationScheduler(backend, SAMPLING) as scheduler:
            task = asyncio.ensure_future(
                At2poBuilder(At2poConfig(initial_chains=4, rounds=1, expansions=2)).build(
                    TreeJob(fakes.TASK, fakes.make_env(), scheduler, CODEC, SAMPLING, 5, recorder=recorder)
                )
            )
            while not task.done():
                if nodes := recorder.take_new_nodes():
                    batches.append(nodes)
                await asyncio.sleep(0)
            built = await task
            if nodes := recorder.take_new_nodes():
                batches.append(nodes)
            return built

    built = asyncio.run(main())
    assert len(batches) > 1, "nodes should stream while the tree grows"
    seen: list[int] = [n.node_id for batch in batches for n in batch]
    assert sorted(seen) == sorted(built.tree.nodes)  # every node exactly once
    position = {node_id: i for i, node_id in enumerate(seen)}
    for node in built.tree.nodes.values():
        if node.node_id != ROOT_ID:
            assert position[node.parent_id] < position[node.node_id]  # parents first
    messages = [
        encode_subtree(SubtreeHeader("tree-1", fakes.TASK.task_id, "a1", seq, seq == len(batches) - 1), batch)
        for seq, batch in enumerate(batches)
    ]
    assembled = assemble_tree(messages)
    assert all(assembled.nodes[i].equals(built.tree.nodes[i]) for i in built.tree.nodes)
    # Every streamed prefix is a valid partial tree.
    for end in range(1, len(batches) + 1):
        partial = TurnTree.from_nodes("tree-1", "t1", "a1", [n for batch in batches[:end] for n in batch])
        partial.validate(complete=False)


def test_recorder_refuses_inconsistent_turns() -> None:
    recorder = make_recorder_tree()
    gen = Generation(np.asarray([1], np.int32), np.asarray([-1.0], np.float32), np.zeros(1, np.int32), "stop", "x")
    with pytest.raises(ValueError, match="observation"):
        recorder.add_turn(3, [1, 2], gen, FinishReason.TOOL_CALL)  # children of c start with c's obs [8]
    with pytest.raises(ValueError, match="continuation"):
        recorder.add_turn(2, [], gen, FinishReason.ANSWER)  # b is a leaf
    with pytest.raises(ValueError):
        recorder.mark_leaf(ROOT_ID, 0.0)
    with pytest.raises(ValueError):
        recorder.mark_leaf(1, 0.0)  # a has a child
    assert recorder.child_context_ids(4) == [1, 2, 3, 5, 6, 8, 5, 6, 9]
    assert recorder.can_close(4)
    recorder.claim(4)
    assert not recorder.can_close(4)
    recorder.release(4)
    recorder.mark_leaf(4, -1.0)
    recorder.tree(complete=True)


# --------------------------------------------------------------------------------------- registry


def test_registry_names_aliases_and_options() -> None:
    assert builder_names() == ["arpo", "at2po", "chain", "tree-grpo"]
    assert get_builder("grpo") is ChainBuilder and get_builder("tree_grpo") is TreeGrpoBuilder
    builder = make_builder("at2po", initial_chains=3, variant="paper")
    assert isinstance(builder, At2poBuilder) and builder.config.variant == "paper"
    with pytest.raises(ValueError, match="unknown tree builder"):
        get_builder("beam")
    with pytest.raises(ValueError, match="no option"):
        make_builder("chain", chainz=3)
    with pytest.raises(ValueError):
        make_builder("at2po", variant="other")


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(7, 1, i) for i in range(100)}) == 100
    assert 0 <= derive_seed(2**40, 5) < 2**63


# ------------------------------------------------------------------------- with the real tiny policy


def test_builders_with_the_tiny_policy_and_chat_codec(tiny_model_dir: Path) -> None:
    """End to end on the CPU policy: real token ids, real log-probs, same invariants."""
    from actors.backend_torch import TorchBackend
    from actors.chat import ChatCodec
    from actors.policy_model import load_policy

    policy = load_policy(tiny_model_dir)
    codec = ChatCodec.from_policy(policy)
    backend = fakes.RecordingBackend(TorchBackend(policy.model, policy.tokenizer, seed=0))
    vocab = len(policy.tokenizer)
    builders = [
        At2poBuilder(At2poConfig(initial_chains=2, rounds=1, expansions=2)),
        ArpoBuilder(ArpoConfig(paths=3, initial_chains=2, vocab_size=vocab)),
    ]

    async def main() -> list[BuiltTree]:
        async with GenerationScheduler(backend, SAMPLING) as scheduler:
            return list(
                await asyncio.gather(
                    *(
                        b.build(
                            TreeJob(
                                fakes.TASK, fakes.make_env(), scheduler, codec, SAMPLING, i, Budget(max_new_tokens=16)
                            )
                        )
                        for i, b in enumerate(builders)
                    )
                )
            )

    at2po, arpo = asyncio.run(main())
    assert at2po.leaves == 4 and arpo.leaves == 3
    expected = Counter(
        (tuple(path_context(built.tree, n.node_id)), tuple(n.token_ids.tolist()))
        for built in (at2po, arpo)
        for n in built.tree.nodes.values()
        if n.depth > 0
    )
    assert expected == Counter(backend.calls)
    assert max(backend.batch_sizes) > 1  # the two trees' branches were batched together
    for built in (at2po, arpo):
        built.tree.validate(complete=True)
        assert all(len(n.token_ids) <= 16 for n in built.tree.nodes.values())
