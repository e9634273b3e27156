"""Non-neural baselines scored on the same cases: popularity and EASE (Steck 2019)."""

from __future__ import annotations

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
