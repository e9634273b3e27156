"""Cold-start quality: items never seen in training, and users with 0-3 known items (or,
on the synthetic catalog, a free-text profile), against popularity and genre-popularity.

Cold items: a seeded 10% of items are removed from all training data; each user who met a
cold item is asked to rank their last cold item among all cold items, from their warm
history. Cold users: a seeded 10% of users are held out of training; each is shown their
first h items (h = 0..3) and asked for the next one, ranked over the whole catalog.

    python -m simulations.bench_cold_start --dataset ml-100k
    python -m simulations.bench_cold_start --dataset synthetic
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from shared_model.cli_options import add_dataset_options, positive_int
from shared_model.datasets import load_dataset
from shared_model.metrics import evaluate_scores
from shared_model.recommender import Recommender, score_catalog
from shared_model.splits import EvalCases, cold_item_split, cold_user_split
from simulations.baselines import genre_popularity_scores, popularity_scores
from simulations.centralized import CentralizedConfig, train_reference


def among(scores: torch.Tensor, items: np.ndarray, cases: EvalCases) -> tuple[torch.Tensor, EvalCases]:
    """Scores restricted to `items` (columns renumbered), and the cases to match."""
    position = {int(i): p for p, i in enumerate(items)}
    renumbered = EvalCases(cases.users, cases.histories, np.array([position[int(t)] for t in cases.targets]),
                           [np.array([], dtype=np.int64)] * len(cases))
    return scores[:, torch.from_numpy(items)], renumbered


def profile_scores(model: Recommender, cases: EvalCases) -> torch.Tensor:
    """Scores when the user tower also reads each user's free-text profile."""
    model.eval()
    with torch.no_grad():
        catalog = model.catalog_vectors()
        ids, mask = model.windows(cases.histories)
        profiles = model.encode_texts(cases.profiles)
        users = model.user_vectors(ids, mask, catalog, profiles, torch.ones(len(cases), dtype=torch.bool))
        return users @ catalog.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_options(parser, default="ml-100k")
    parser.add_argument("--synthetic-users", type=positive_int, default=5000,
                        help="users of the synthetic catalog (10%% are held out as cold users; default 5000)")
    parser.add_argument("--out", default="runs/cold-start", help="where models and results go")
    args = parser.parse_args()
    dataset = load_dataset(args.dataset, args.data_dir, synthetic_users=args.synthetic_users)
    out = Path(args.out) / dataset.name
    config = CentralizedConfig()
    results: dict = {"dataset": dataset.name}

    items = cold_item_split(dataset, fraction=0.1, seed=0)
    model, _ = train_reference(items.warm, dataset.catalog.texts, config, out / "cold-items")
    warm_prefixes = [items.warm.prefix(u, "test") for u in range(items.warm.n_users)]
    candidates = {
        "model": score_catalog(model, items.cases.histories),
        "popularity": popularity_scores(warm_prefixes, dataset.n_items, items.cases),
        "genre-popularity": genre_popularity_scores(warm_prefixes, dataset.catalog.genres, items.cases),
    }
    results["cold items"] = {"cases": len(items.cases), "candidates": len(items.cold_items), **{
        name: evaluate_scores(*among(s, items.cold_items, items.cases)) for name, s in candidates.items()}}
    print(json.dumps(results["cold items"], indent=2), flush=True)

    users = cold_user_split(dataset, fraction=0.1, seed=0)
    model, _ = train_reference(users.warm, dataset.catalog.texts, config, out / "cold-users")
    warm_prefixes = [users.warm.prefix(u, "test") for u in range(users.warm.n_users)]
    results["cold users"] = {}
    for known in range(4):
        cases = users.cases(known)
        scores = {
            "model": score_catalog(model, cases.histories),
            "popularity": popularity_scores(warm_prefixes, dataset.n_items, cases),
            "genre-popularity": genre_popularity_scores(warm_prefixes, dataset.catalog.genres, cases),
        }
        if cases.profiles:
            scores["model + profile"] = profile_scores(model, cases)
        results["cold users"][f"{known} known"] = {"cases": len(cases), **{
            name: evaluate_scores(s, cases) for name, s in scores.items()}}
        print(known, json.dumps(results["cold users"][f"{known} known"]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cold_start.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
