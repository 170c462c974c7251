"""Training diagnostics that need the tree structure: AT²PO's turn-KL entropy (Eq. 13).

H_turn of a trajectory i with N_i ≥ 2 generated turns: with KL_{i,j} the KL mass of turn j and
KL_{i,seq} = Σ_j KL_{i,j}, take p = softmax_j(KL_{i,j} / KL_{i,seq}) and report H(p) / log N_i (1 = the
update spreads evenly over the turns). The reference code averages it over trajectories
(`actor/turn_kl_entropy`); the paper reports it settling near 0.62–0.66.

Decided here: the per-token KL is the K3 estimate exp(d) − 1 − d with d = log π_θ − log π_behav (the
sampler-to-trainer divergence; it is non-negative token by token, so KL_{i,seq} > 0 unless every token
agrees, in which case the trajectory is skipped). Trajectories with fewer than two generated turns have no
turn distribution and are skipped; `turn_kl_entropy` returns the per-trajectory values, callers average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from common.tree import TurnTree
from learner.packing import turn_ids


def turn_kl_masses(kl_per_token: Tensor, turn_index: Tensor, loss_mask: Tensor, n_turns: int) -> Tensor:
    """Σ of the token KL over each turn's loss tokens, indexed by the batch's dense turn id."""
    masses = torch.zeros(n_turns, dtype=torch.float64, device=kl_per_token.device)
    mask = loss_mask.bool()
    masses.index_add_(0, turn_index[mask], kl_per_token.detach()[mask].double())
    return masses


def turn_kl_entropy(trees: Sequence[TurnTree], turn_masses: Tensor) -> list[float]:
    """Normalised turn-KL entropy of every trajectory (root→leaf path) with ≥ 2 generated turns."""
    ids = turn_ids(trees)
    masses = turn_masses.detach().double().cpu()
    out: list[float] = []
    for tree, tree_ids in zip(trees, ids, strict=True):
        for path in tree.paths():
            turns = [tree_ids[node.node_id] for node in path if node.parent_id >= 0 and len(node.token_ids) > 0]
            if len(turns) < 2:
                continue
            kl = masses[turns]
            total = float(kl.sum())
            if not total > 0.0:
                continue
            p = torch.softmax(kl / total, dim=0)
            entropy = float(-(p * p.clamp_min(1e-300).log()).sum())
            out.append(entropy / math.log(len(turns)))
    return out
