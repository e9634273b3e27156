import math

import numpy as np
import torch

from shared_model.metrics import evaluate_scores, target_ranks
from shared_model.splits import EvalCases


def cases(targets, exclude):
    targets = np.array(targets)
    return EvalCases(np.arange(len(targets)), exclude, targets, exclude)


def test_metrics_match_hand_computation():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.1, 0.0],  # target 2: items 0,1 ahead; item 0 excluded -> rank 1
            [0.1, 0.2, 0.3, 0.4, 0.5],  # target 0: 4 ahead -> rank 4
            [0.5, 0.5, 0.1, 0.2, 0.3],  # target 1 tied with 0: ties count against -> rank 1
        ]
    )
    c = cases([2, 0, 1], [np.array([0]), np.array([], dtype=int), np.array([], dtype=int)])
    out = evaluate_scores(scores, c, ks=(1, 2))
    assert out["HR@1"] == 0.0
    assert math.isclose(out["HR@2"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(out["NDCG@2"], (1 / math.log2(3) + 0 + 1 / math.log2(3)) / 3, rel_tol=1e-6)


def test_invalid_scores_never_count_as_hits():
    scores = torch.tensor(
        [
            [float("nan"), 0.0, 0.0],  # NaN target: never a hit
            [float("inf"), 0.0, 0.0],  # +inf target is invalid too
            [0.5, float("nan"), float("inf")],  # NaN / inf elsewhere never outrank the target
        ]
    )
    c = cases([0, 0, 0], [np.array([], dtype=int)] * 3)
    ranks = target_ranks(scores, torch.tensor([0, 0, 0]), torch.zeros(3, 3, dtype=torch.bool))
    assert ranks.tolist() == [3, 3, 0]
    assert evaluate_scores(scores, c, ks=(1,))["HR@1"] == 1 / 3


def test_constant_scorer_earns_nothing():
    c = cases([0, 1], [np.array([], dtype=int)] * 2)
    assert evaluate_scores(torch.zeros(2, 50), c)["HR@10"] == 0.0


def test_sampled_variant_ranks_among_101_candidates():
    n_items = 500
    scores = torch.arange(n_items, dtype=torch.float32).repeat(2, 1)
    c = cases([499, 0], [np.array([1, 2]), np.array([], dtype=int)])
    out = evaluate_scores(scores, c, sampled=True)
    assert out["HR@10 (100 sampled)"] == 0.5  # best item hits, worst item ranks 100th
    excluded_only = evaluate_scores(scores, c)
    assert excluded_only["HR@10"] == 0.5
