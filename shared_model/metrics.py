"""Ranking metrics: HR@K and NDCG@K by full ranking (and the 100-sampled-negatives variant),
AUC, and what the top-K lists do to the catalog (coverage, popularity, Gini, long tail).

A rank is the number of candidates scored at least as high as the target (ties count
against the target, so a constant scorer earns nothing). Any non-finite score ranks
last: a NaN or infinite target score is never a hit, and a NaN elsewhere never outranks.
The candidates of a case are the items it does not exclude (the target is never excluded).

Beyond accuracy (full ranking only; K = 10 unless told):
- AUC: per case, the share of the other candidates ranked below the target, 1 - rank / N
  with N the other candidates (a non-finite target scores 0; so does a case with N = 0),
  then the mean over cases. Ties count against the target: a constant scorer gets 0, a
  perfect one 1, a random one about 0.5.
- top-K list: a case's K candidates with the highest finite scores, ties at the K-th
  score broken by the lower item index (fewer than K if fewer have a finite score).
  Exposure of an item: the number of lists it is in.
- coverage@K: the share of catalog items in at least one list.
- Gini@K: the Gini coefficient of exposure over all catalog items (0: every item shown
  equally often; 1 - m / n when m of n items share all slots equally).
- popularity@K: the mean, over all recommended slots, of the item's training interactions
  divided by the catalog's mean (1.0: an average item; higher: a bias to popular items).
- long-tail@K: the share of recommended slots filled by long-tail items. The head is the
  20% most popular catalog items by training interactions (the Pareto 80/20 split by item
  count, ties at its edge by the lower item index); the long tail is the other 80%.
Popularity is each item's interaction count in the training part of the split (the
experimenter's view), the same for validation and test.

Per-case sums and per-item exposure counts add up over cases (`RankingSums`): a client
reports them, the server adds them up and, with the summed training interactions, gets
(`metrics_from_sums`) what it would compute over all the cases at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from shared_model.splits import EvalCases

LIST_LENGTH = 10
HEAD_SHARE = 0.2  # of catalog items, by training interactions
CHUNK_ROWS = 1024  # cases scored at once: bounds the [rows, n_items] temporaries


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


def exclusion_mask(exclude: list[np.ndarray], targets: np.ndarray, n_items: int) -> torch.Tensor:
    """[n, n_items] True where an item is already seen (never the target itself)."""
    mask = torch.zeros(len(targets), n_items, dtype=torch.bool)
    rows = np.repeat(np.arange(len(targets)), [len(e) for e in exclude])
    if len(rows):
        mask[torch.from_numpy(rows), torch.from_numpy(np.concatenate(exclude))] = True
    mask[torch.arange(len(targets)), torch.from_numpy(targets)] = False
    return mask


def sampled_exclusion_mask(cases: EvalCases, n_items: int, negatives: int = 100, seed: int = 0) -> torch.Tensor:
    """Exclude all but `negatives` uniformly sampled unseen items and the target."""
    seen = exclusion_mask(cases.exclude, cases.targets, n_items)
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(len(cases), n_items, generator=generator)
    keys[seen] = 2.0
    keys[torch.arange(len(cases)), torch.from_numpy(cases.targets)] = 2.0
    chosen = keys.argsort(dim=1)[:, :negatives]
    mask = torch.ones(len(cases), n_items, dtype=torch.bool)
    mask.scatter_(1, chosen, False)
    mask[torch.arange(len(cases)), torch.from_numpy(cases.targets)] = False
    return mask


def top_k_members(scores: torch.Tensor, excluded: torch.Tensor, k: int) -> torch.Tensor:
    """[n, n_items] True for the items in each case's top-k list (see the module's
    definition): all candidates above the k-th finite score, then the ones tied with it
    by item index, without sorting the whole row."""
    scores = scores.float()
    eligible = torch.isfinite(scores) & ~excluded
    masked = torch.where(eligible, scores, torch.full_like(scores, -math.inf))
    kth = masked.topk(min(k, scores.shape[1]), dim=1).values[:, -1:]
    above = eligible & (masked > kth)
    tied = eligible & (masked == kth)
    room = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1) <= room))


@dataclass
class RankingSums:
    """What adds up over cases, and so over clients: counts, sums of per-case HR@k,
    NDCG@k and AUC, and each item's exposure (how many top-k lists hold it)."""

    count: int
    hits: float
    ndcg: float
    auc: float
    exposure: np.ndarray  # [n_items] int64

    def __add__(self, other: RankingSums) -> RankingSums:
        return RankingSums(self.count + other.count, self.hits + other.hits, self.ndcg + other.ndcg,
                           self.auc + other.auc, self.exposure + other.exposure)


def ranking_sums(scores: torch.Tensor, cases: EvalCases, k: int = LIST_LENGTH, chunk: int = CHUNK_ROWS) -> RankingSums:
    """The sums over these cases, full ranking, computed `chunk` cases at a time."""
    n_items = scores.shape[1]
    total = RankingSums(0, 0.0, 0.0, 0.0, np.zeros(n_items, dtype=np.int64))
    for start in range(0, len(cases), chunk):
        stop = min(start + chunk, len(cases))
        rows, targets = scores[start:stop], cases.targets[start:stop]
        excluded = exclusion_mask(cases.exclude[start:stop], targets, n_items).to(scores.device)
        ranks = target_ranks(rows, torch.from_numpy(targets).to(scores.device), excluded)
        hit, ndcg = hit_and_ndcg(ranks, k)
        others = (~excluded).sum(dim=1) - 1  # candidates besides the target
        auc = (others - ranks.clamp(max=others)).double() / others.clamp(min=1)
        exposure = top_k_members(rows, excluded, k).sum(dim=0).cpu().numpy()
        total += RankingSums(stop - start, float(hit.double().sum()), float(ndcg.double().sum()),
                             float(auc.sum()), exposure.astype(np.int64))
    return total


def item_counts(sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    """Interactions per item in these sequences: the popularity the metrics read."""
    if not sequences:
        return np.zeros(n_items, dtype=np.int64)
    return np.bincount(np.concatenate(sequences).astype(np.int64), minlength=n_items)


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0: all equal; 0 for all zero)."""
    ordered = np.sort(values.astype(np.float64))
    n, total = len(ordered), ordered.sum()
    if n == 0 or total == 0:
        return 0.0
    return float(np.sum((2 * np.arange(1, n + 1) - n - 1) * ordered) / (n * total))


def long_tail(popularity: np.ndarray) -> np.ndarray:
    """[n_items] True for the long tail: all but the HEAD_SHARE most popular items."""
    head = np.argsort(-popularity, kind="stable")[: math.ceil(HEAD_SHARE * len(popularity))]
    tail = np.ones(len(popularity), dtype=bool)
    tail[head] = False
    return tail


def metrics_from_sums(sums: RankingSums, popularity: np.ndarray | None = None,
                      k: int = LIST_LENGTH) -> dict[str, float]:
    """Means and catalog metrics from sums (module docstring); without `popularity`,
    popularity@k and long-tail@k are left out."""
    n, slots = max(sums.count, 1), sums.exposure.sum()
    out = {f"HR@{k}": sums.hits / n, f"NDCG@{k}": sums.ndcg / n, "AUC": sums.auc / n,
           f"coverage@{k}": float((sums.exposure > 0).mean()), f"Gini@{k}": gini(sums.exposure)}
    if popularity is not None:
        mean = popularity.mean()
        out[f"popularity@{k}"] = float(sums.exposure @ popularity / slots / mean) if slots and mean else 0.0
        out[f"long-tail@{k}"] = float(sums.exposure[long_tail(popularity)].sum() / slots) if slots else 0.0
    return out


def evaluate_scores(scores: torch.Tensor, cases: EvalCases, popularity: np.ndarray | None = None,
                    k: int = LIST_LENGTH, sampled: bool = False) -> dict[str, float]:
    """Every metric of an evaluation, keys like 'HR@10', 'AUC', 'Gini@10' (full ranking);
    popularity: training interactions per item (`item_counts`). With sampled=True, HR@k
    and NDCG@k among 100 sampled negatives only, keys like 'HR@10 (100 sampled)'."""
    if not sampled:
        return metrics_from_sums(ranking_sums(scores, cases, k), popularity, k)
    excluded = sampled_exclusion_mask(cases, scores.shape[1])
    hit, ndcg = hit_and_ndcg(target_ranks(scores, torch.from_numpy(cases.targets), excluded), k)
    n = max(len(cases), 1)
    return {f"HR@{k} (100 sampled)": float(hit.double().sum()) / n,
            f"NDCG@{k} (100 sampled)": float(ndcg.double().sum()) / n}
