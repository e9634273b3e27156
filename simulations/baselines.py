"""Non-neural baselines scored on the same cases: popularity, EASE (Steck 2019) and a
sequence-aware, recency-weighted item-kNN."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from shared_model.metrics import evaluate_scores
from shared_model.splits import EvalCases, LeaveOneOut

EASE_LAMBDAS = (50.0, 100.0, 200.0, 350.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0, 3000.0)


def interaction_matrix(sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    """Binary user-item matrix [n_users, n_items] in float32."""
    matrix = np.zeros((len(sequences), n_items), dtype=np.float32)
    for u, seq in enumerate(sequences):
        matrix[u, seq] = 1.0
    return matrix


def user_counts(sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    """How many users met each item [n_items] in float32 (the column sums of
    interaction_matrix, without building it: 4 GB at 100,000 users and 10,000 items)."""
    met = np.concatenate([np.unique(seq) for seq in sequences] + [np.zeros(0, np.int64)]).astype(np.int64)
    return np.bincount(met, minlength=n_items).astype(np.float32)


def popularity_scores(sequences: list[np.ndarray], n_items: int, cases: EvalCases) -> torch.Tensor:
    return torch.from_numpy(np.tile(user_counts(sequences, n_items), (len(cases), 1)))


def ease_weights(matrix: np.ndarray, lam: float) -> np.ndarray:
    """B = I - P diag(1/diag(P)), P = (X^T X + lam I)^-1, with a zero diagonal."""
    gram = matrix.T.astype(np.float64) @ matrix
    gram[np.diag_indices_from(gram)] += lam
    precision = np.linalg.inv(gram)
    weights = precision / (-np.diag(precision))
    weights[np.diag_indices_from(weights)] = 0.0
    return weights.astype(np.float32)


def ease_scores(weights: np.ndarray, cases: EvalCases) -> torch.Tensor:
    return torch.from_numpy(interaction_matrix(cases.histories, weights.shape[0]) @ weights)


def tune_ease(split: LeaveOneOut, lambdas: tuple[float, ...] = EASE_LAMBDAS) -> tuple[float, dict[float, float]]:
    """The lambda with the best validation NDCG@10 (EASE fitted on train only)."""
    valid = split.cases("valid")
    matrix = interaction_matrix(split.train, split.n_items)
    results = {lam: evaluate_scores(ease_scores(ease_weights(matrix, lam), valid), valid)["NDCG@10"] for lam in lambdas}
    return max(results, key=results.get), results


def ease_test_scores(split: LeaveOneOut, lam: float, cases: EvalCases) -> torch.Tensor:
    """EASE refitted on everything before the test items (train + validation)."""
    histories = [split.prefix(u, "test") for u in range(split.n_users)]
    return ease_scores(ease_weights(interaction_matrix(histories, split.n_items), lam), cases)


@dataclass(frozen=True)
class ItemKnn:
    """Item-to-item similarity from the order of the training sequences, scored against a
    user's recent items (Ludewig and Jannach 2018 found such simple neighbourhood methods
    hard to beat on session data).

    Two items are similar when one follows the other closely: j at `o` <= span places after
    i adds decay^(o-1) to sim(i, j) (and `reverse` times that to sim(j, i)); any two items of
    one user add `together`. sim is divided by sqrt(users of i * users of j). A user's
    score for j sums sim(i, j) over their items i, each weighted 2^(-age / half_life), age
    counted in items from the most recent."""

    span: int = 20
    decay: float = 0.8
    reverse: float = 0.5
    together: float = 0.05
    half_life: float = 4.0

    def similarity(self, sequences: list[np.ndarray], n_items: int) -> np.ndarray:
        """[n_items, n_items] float32, zero diagonal."""
        pairs = np.zeros(n_items * n_items, dtype=np.float64)
        for offset in range(1, self.span + 1):
            weight = self.decay ** (offset - 1)
            before = np.concatenate([seq[:-offset] for seq in sequences if len(seq) > offset] + [np.zeros(0, np.int64)])
            after = np.concatenate([seq[offset:] for seq in sequences if len(seq) > offset] + [np.zeros(0, np.int64)])
            pairs += weight * np.bincount(before * n_items + after, minlength=n_items * n_items)
            if self.reverse:
                pairs += self.reverse * weight * np.bincount(after * n_items + before, minlength=n_items * n_items)
        similarity = pairs.reshape(n_items, n_items).astype(np.float32)
        matrix = interaction_matrix(sequences, n_items)
        if self.together:
            similarity += self.together * (matrix.T @ matrix)
        np.fill_diagonal(similarity, 0.0)
        norm = np.sqrt(np.maximum(matrix.sum(axis=0), 1.0))
        return similarity / norm[:, None] / norm[None, :]

    def scores(self, similarity: np.ndarray, cases: EvalCases) -> torch.Tensor:
        recent = np.zeros((len(cases), similarity.shape[0]), dtype=np.float32)
        for row, history in enumerate(cases.histories):
            age = np.arange(len(history))[::-1]
            np.add.at(recent[row], history, np.power(0.5, age / self.half_life))
        return torch.from_numpy(recent @ similarity)


KNN_GRID = {"span": (5, 20), "reverse": (0.0, 0.5, 1.0), "together": (0.0, 0.05), "half_life": (2.0, 4.0, 8.0)}


def tune_item_knn(split: LeaveOneOut) -> tuple[ItemKnn, float]:
    """The KNN_GRID point with the best validation NDCG@10 (similarities from train only)."""
    valid = split.cases("valid")
    best, best_ndcg, similarities = ItemKnn(), -1.0, {}
    for values in itertools.product(*KNN_GRID.values()):
        knn = ItemKnn(**dict(zip(KNN_GRID, values)))
        key = (knn.span, knn.reverse, knn.together)  # the half-life only weighs the user's items
        if key not in similarities:
            similarities[key] = knn.similarity(split.train, split.n_items)
        ndcg = evaluate_scores(knn.scores(similarities[key], valid), valid)["NDCG@10"]
        if ndcg > best_ndcg:
            best, best_ndcg = knn, ndcg
    return best, best_ndcg


def item_knn_test_scores(split: LeaveOneOut, knn: ItemKnn, cases: EvalCases) -> torch.Tensor:
    """The item-kNN with similarities from everything before the test items (train + validation)."""
    histories = [split.prefix(u, "test") for u in range(split.n_users)]
    return knn.scores(knn.similarity(histories, split.n_items), cases)


def topic_shares(cases: EvalCases, flags: np.ndarray) -> np.ndarray:
    """[n cases, n topics]: the share of each case's known items in each topic (genre)."""
    affinity = np.zeros((len(cases), flags.shape[1]), dtype=np.float32)
    for row, history in enumerate(cases.histories):
        if len(history):
            affinity[row] = flags[history].mean(axis=0)
    return affinity


def genre_popularity_scores(train_sequences: list[np.ndarray], genres: np.ndarray, cases: EvalCases) -> torch.Tensor:
    """Each user's affinity to an item's genres (the share of their known items in each),
    ties broken by popularity; with no known items, popularity alone."""
    counts = user_counts(train_sequences, genres.shape[0])
    tie_break = 1e-3 * counts / max(counts.max(), 1.0)
    flags = genres.astype(np.float32)
    affinity = topic_shares(cases, flags)
    return torch.from_numpy(affinity @ flags.T + tie_break)


def topic_popularity_scores(train_sequences: list[np.ndarray], genres: np.ndarray, cases: EvalCases) -> torch.Tensor:
    """Topic alone: sum over an item's topics of the user's share of known items in the topic
    times the item's share of the topic's meetings (what the user likes and what is popular
    within it; no order, no drift). With no known items, zero everywhere."""
    flags = genres.astype(np.float32)
    within = flags * user_counts(train_sequences, genres.shape[0])[:, None]  # [n_items, n_topics]
    within /= np.maximum(within.sum(axis=0, keepdims=True), 1.0)
    affinity = topic_shares(cases, flags)
    return torch.from_numpy(affinity @ within.T)
