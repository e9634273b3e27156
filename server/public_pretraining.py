"""Pretraining on a consenting cohort: a share of the users agreed to give their data to
the server (in production: opted-in testers, staff), which trains the starting model on it
centrally, with the centralized recipe, before the private federation begins. Their data
is treated as public: no guarantee covers those users, and every run that uses them says
so (log, summary). The other users' guarantee is untouched: nothing of theirs is read.

Simulation only: only there does the server hold users' data.
"""

from __future__ import annotations

import math
from logging import INFO

import numpy as np
from flwr.common import log

from shared_model.metrics import evaluate_scores
from shared_model.recommender import Recommender, score_catalog
from shared_model.settings import RunSettings
from shared_model.splits import leave_one_out
from shared_model.training import TrainConfig, epochs_keeping_best, make_optimizer, sequence_chunks


def consenting_users(n_users: int, share: float, seed: int) -> np.ndarray:
    """Who consented: ceil(share * n) users, a draw from the run seed (who consents is
    public, like their data)."""
    count = math.ceil(share * n_users)
    return np.sort(np.random.default_rng([seed, 0x9B1C]).choice(n_users, size=count, replace=False))


def pretrain_on_public_users(model: Recommender, settings: RunSettings) -> dict:
    """Train `model` on the consenting users' training sequences and keep the epoch whose
    model ranks their validation items best: at most `public-epochs`, stopping after
    `public-patience` epochs without a better one (a fixed count either stops short, as 5
    epochs did at 100,000 users, or overfits a small cohort). What was done, for the log and
    the summary."""
    split = leave_one_out(settings.load_dataset())
    users = consenting_users(len(split.train), settings.public_users, settings.seed)
    valid = split.cases("valid", users)  # their held-out items: as public as the rest of their data
    recipe = TrainConfig()
    chunks = sequence_chunks(model, [split.train[u] for u in users])
    epochs = epochs_keeping_best(model, make_optimizer(model, recipe), chunks, recipe.batch_size,
                                 np.random.default_rng(settings.seed), settings.public_epochs, settings.public_patience,
                                 lambda: evaluate_scores(score_catalog(model, valid.histories), valid))
    report_every = max(1, settings.public_epochs // 10)  # a long pretraining (minutes at 100,000 users) shows progress
    for report in epochs:
        if report.epoch % report_every == 0 or report.last:
            log(INFO, "fedrec: pretraining on the consenting users: epoch %d/%d, loss %.4f, their validation "
                "NDCG@10 %.4f (best %.4f, epoch %d)", report.epoch, settings.public_epochs, report.loss,
                report.validation["NDCG@10"], report.best_ndcg, report.best_epoch)
    return {"users": len(users), "of": len(split.train), "epochs": report.epoch, "best epoch": report.best_epoch,
            "best validation NDCG@10": report.best_ndcg, "final loss": report.loss}
