"""The baselines `python -m simulations.centralized` reports beside the model: each one does
what it claims and gives the same figure twice with the same seed."""

import numpy as np
import pytest
import torch

from shared_model.datasets import load_dataset
from shared_model.metrics import evaluate_scores
from shared_model.recommender import RecommenderConfig, build_recommender, score_catalog
from shared_model.splits import leave_one_out, split_sequences
from simulations.baselines import ItemKnn, item_knn_test_scores, tune_item_knn
from simulations.centralized import CentralizedConfig, sasrec_config, train_reference


def test_item_knn_follows_what_came_next_and_weighs_recent_items_more():
    # item 1 is followed by 2 and item 3 by 4, for every user; item 0 is everyone's first
    train = [np.array([0, 1, 2, 5]), np.array([0, 3, 4, 5]), np.array([0, 1, 2]), np.array([0, 3, 4])]
    knn = ItemKnn(span=1, reverse=0.0, together=0.0, half_life=1.0)
    similarity = knn.similarity(train, 6)
    assert similarity[1].argmax() == 2 and similarity[3].argmax() == 4 and similarity[2, 1] == 0  # no reverse
    cases = split_sequences([np.array([3, 1, 9, 9])], 10).cases("valid")  # history [3, 1]: 1 is the recent one
    scores = knn.scores(np.pad(similarity, (0, 4)), cases)[0]
    assert scores[2] > scores[4] > 0


@pytest.fixture(scope="module")
def split():
    return leave_one_out(load_dataset("synthetic", None, seed=0, synthetic_users=300))


def test_item_knn_is_tuned_on_validation_and_gives_one_figure(split):
    test = split.cases("test")
    figures = []
    for _ in range(2):
        knn, valid_ndcg = tune_item_knn(split)
        figures.append((knn, valid_ndcg, evaluate_scores(item_knn_test_scores(split, knn, test), test)["NDCG@10"]))
    assert figures[0] == figures[1]
    popularity_like = ItemKnn(span=1, reverse=0.0, together=0.0, half_life=1.0)
    valid = split.cases("valid")
    assert figures[0][1] >= evaluate_scores(popularity_like.scores(popularity_like.similarity(split.train, split.n_items),
                                                                   valid), valid)["NDCG@10"]


def test_sasrec_reads_ids_alone_and_gives_one_figure_per_seed(split, tmp_path):
    config = sasrec_config(CentralizedConfig(epochs=2, sasrec_dim=16))
    texts = load_dataset("synthetic", None, seed=0, synthetic_users=300).catalog.texts
    test = split.cases("test")
    runs = []
    for run in range(2):
        model, _ = train_reference(split, texts, config, tmp_path / str(run), progress=False)
        runs.append((model.trainable_state(), evaluate_scores(score_catalog(model, test.histories), test)["NDCG@10"]))
    assert model.text is None and "project.weight" not in runs[0][0] and runs[0][0]["item_ids.weight"].shape[1] == 16
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    with pytest.raises(ValueError, match="item-text = false"):
        model.add_items(["a new film"])


def test_an_id_only_model_needs_its_id_table():
    with pytest.raises(ValueError, match="item_text may be false only with id-embeddings"):
        build_recommender(["a"], RecommenderConfig(item_text=False, id_embeddings=False))
