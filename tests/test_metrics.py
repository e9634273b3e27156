import math

import numpy as np
import torch

from shared_model.metrics import evaluate_scores, item_counts, long_tail, ranking_sums, target_ranks
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
    assert evaluate_scores(scores, c, k=1)["HR@1"] == 0.0
    out = evaluate_scores(scores, c, k=2)
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
    assert evaluate_scores(scores, c, k=1)["HR@1"] == 1 / 3


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


def no_exclusions(targets) -> EvalCases:
    return cases(targets, [np.array([], dtype=int)] * len(targets))


def test_auc_of_perfect_constant_reversed_and_hand_ranked_scorers():
    n_items = 30
    targets = [3, 17, 29]
    perfect = torch.zeros(3, n_items)
    perfect[torch.arange(3), torch.tensor(targets)] = 1.0
    assert evaluate_scores(perfect, no_exclusions(targets))["AUC"] == 1.0
    assert evaluate_scores(torch.zeros(3, n_items), no_exclusions(targets))["AUC"] == 0.0  # ties count against
    assert evaluate_scores(1.0 - perfect, no_exclusions(targets))["AUC"] == 0.0  # the target always last
    # target 2 with items 0 and 1 ahead, item 0 excluded: 1 of the 3 other candidates ahead
    c = cases([2], [np.array([0])])
    assert math.isclose(evaluate_scores(torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0]]), c)["AUC"], 2 / 3)


def test_auc_ranks_non_finite_scores_last():
    scores = torch.tensor([[float("nan"), 0.0, 1.0, 2.0],  # NaN target: 0
                           [0.5, float("nan"), float("inf"), 1.0]])  # NaN and inf below the target: 2 of 3
    assert math.isclose(evaluate_scores(scores, no_exclusions([0, 0]))["AUC"], (0 + 2 / 3) / 2)


def test_a_scorer_that_always_recommends_the_same_ten_items():
    n_items = 50
    popularity = np.arange(n_items)[::-1].copy()  # item 0 is the most popular
    favourites = np.arange(20, 30)  # ranks 20..29 by popularity: all in the long tail (head: items 0-9)
    scores = torch.zeros(4, n_items)
    scores[:, favourites] = 1.0
    out = evaluate_scores(scores, no_exclusions([0, 1, 2, 3]), popularity)
    assert out["coverage@10"] == 10 / n_items
    assert math.isclose(out["Gini@10"], 1 - 10 / n_items)  # the most unequal exposure with 10 items shown
    assert math.isclose(out["popularity@10"], popularity[favourites].mean() / popularity.mean())
    assert out["long-tail@10"] == 1.0
    scores[:, :10] = 2.0  # now the 10 most popular items instead: all head
    head = evaluate_scores(scores, no_exclusions([0, 1, 2, 3]), popularity)
    assert head["long-tail@10"] == 0.0 and head["popularity@10"] > out["popularity@10"]


def test_every_item_shown_equally_has_gini_zero_and_full_coverage():
    n_items = 20  # case i recommends items 10i .. 10i + 9
    scores = torch.zeros(2, n_items)
    scores[0, :10] = scores[1, 10:] = 1.0
    out = evaluate_scores(scores, no_exclusions([0, 10]), np.ones(n_items))
    assert out["coverage@10"] == 1.0 and out["Gini@10"] == 0.0 and out["popularity@10"] == 1.0


def test_top_lists_skip_excluded_and_non_finite_items_and_break_ties_by_index():
    scores = torch.zeros(1, 12)
    scores[0, 0] = 5.0  # excluded: not recommended
    scores[0, 1] = float("nan")  # never recommended
    scores[0, 11] = 1.0
    sums = ranking_sums(scores, cases([11], [np.array([0])]))
    # item 11, then the tied items by index: 2..10 (9 of them)
    assert sums.exposure.tolist() == [0, 0] + [1] * 9 + [1]
    few = torch.full((1, 12), float("nan"))
    few[0, 3] = 1.0
    assert ranking_sums(few, no_exclusions([3])).exposure.sum() == 1  # one finite score: a list of one


def test_long_tail_is_all_but_the_most_popular_fifth_of_the_catalog():
    counts = np.array([5, 9, 0, 9, 1, 1, 3, 2, 0, 7])  # head: 2 items, the 9s
    assert np.flatnonzero(~long_tail(counts)).tolist() == [1, 3]
    assert np.flatnonzero(~long_tail(np.ones(10))).tolist() == [0, 1]  # ties by the lower index
    assert item_counts([np.array([1, 2, 2]), np.array([2])], 4).tolist() == [0, 1, 3, 0]


def test_sums_add_up_over_chunks_and_over_parts_of_the_cases():
    rng = np.random.default_rng(0)
    n, n_items = 37, 60
    exclude = [rng.choice(n_items, size=rng.integers(0, 8), replace=False) for _ in range(n)]
    c = cases(rng.integers(0, n_items, size=n), exclude)
    scores = torch.from_numpy(rng.normal(size=(n, n_items)).astype(np.float32))
    whole = ranking_sums(scores, c)
    for part in (ranking_sums(scores, c, chunk=5),
                 ranking_sums(scores[:20], cases(c.targets[:20], exclude[:20]))
                 + ranking_sums(scores[20:], cases(c.targets[20:], exclude[20:]))):
        assert part.count == whole.count and np.array_equal(part.exposure, whole.exposure)
        assert math.isclose(part.auc, whole.auc) and math.isclose(part.ndcg, whole.ndcg, abs_tol=1e-12)
    assert whole.exposure.sum() == 10 * n
