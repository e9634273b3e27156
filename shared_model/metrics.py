"""Ranking metrics: HR@K and NDCG@K by full ranking, and the 100-sampled-negatives variant.

A rank is the number of candidates scored at least as high as the target (ties count
against the target, so a constant scorer earns nothing). Any non-finite score ranks
last: a NaN or infinite target score is never a hit, and a NaN elsewhere never outranks.
"""

from __future__ import annotations

import numpy as np
import torch

from shared_model.splits import EvalCases

def target_ranks(scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among the items not excluded. scores: [n, n_items]."""
    scores = scores.float()
    valid = torch.isfinite(scores) & ~excluded
    target_scores = scores.gather(1, targets[:, None])
    target_ok = torch.isfinite(target_scores[:, 0])
    ahead = (valid & (scores >= target_scores)).sum(dim=1) - 1  # minus the target itself
    return torch.where(target_ok, ahead, torch.full_like(ahead, scores.shape[1]))


def hit_and_ndcg(ranks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-case HR@k and NDCG@k for a single held-out target."""
    hit = (ranks < k).float()
    ndcg = hit / torch.log2(ranks.float() + 2.0)
    return hit, ndcg


def exclusion_mask(cases: EvalCases, n_items: int) -> torch.Tensor:
    """[n, n_items] True where an item is already seen (never the target itself)."""
    mask = torch.zeros(len(cases), n_items, dtype=torch.bool)
    rows = np.repeat(np.arange(len(cases)), [len(e) for e in cases.exclude])
    if len(rows):
        mask[torch.from_numpy(rows), torch.from_numpy(np.concatenate(cases.exclude))] = True
    mask[torch.arange(len(cases)), torch.from_numpy(cases.targets)] = False
    return mask


def sampled_exclusion_mask(cases: EvalCases, n_items: int, negatives: int = 100, seed: int = 0) -> torch.Tensor:
    """Exclude all but `negatives` uniformly sampled unseen items and the target."""
    seen = exclusion_mask(cases, n_items)
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(len(cases), n_items, generator=generator)
    keys[seen] = 2.0
    keys[torch.arange(len(cases)), torch.from_numpy(cases.targets)] = 2.0
    chosen = keys.argsort(dim=1)[:, :negatives]
    mask = torch.ones(len(cases), n_items, dtype=torch.bool)
    mask.scatter_(1, chosen, False)
    mask[torch.arange(len(cases)), torch.from_numpy(cases.targets)] = False
    return mask


def ranking_sums(scores: torch.Tensor, cases: EvalCases, k: int = 10) -> dict[str, float]:
    """Sums (not means) of HR@k and NDCG@k over the cases, and their count: what a client
    reports so that the server's weighted mean equals a mean over all cases."""
    ranks = target_ranks(scores, torch.from_numpy(cases.targets), exclusion_mask(cases, scores.shape[1]))
    hit, ndcg = hit_and_ndcg(ranks, k)
    return {f"HR@{k}-sum": float(hit.double().sum()), f"NDCG@{k}-sum": float(ndcg.double().sum()), "count": len(cases)}


def evaluate_scores(
    scores: torch.Tensor, cases: EvalCases, ks: tuple[int, ...] = (10,), sampled: bool = False
) -> dict[str, float]:
    """Mean HR@k and NDCG@k over the cases; keys like 'HR@10' (or 'HR@10 (100 sampled)')."""
    n_items = scores.shape[1]
    excluded = sampled_exclusion_mask(cases, n_items) if sampled else exclusion_mask(cases, n_items)
    ranks = target_ranks(scores, torch.from_numpy(cases.targets), excluded)
    suffix = " (100 sampled)" if sampled else ""
    out: dict[str, float] = {}
    for k in ks:
        hit, ndcg = hit_and_ndcg(ranks, k)
        out[f"HR@{k}{suffix}"] = float(hit.double().mean()) if len(hit) else 0.0
        out[f"NDCG@{k}{suffix}"] = float(ndcg.double().mean()) if len(ndcg) else 0.0
    return out

