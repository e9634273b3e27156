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

from shared_model.recommender import Recommender
from shared_model.settings import RunSettings
from shared_model.splits import leave_one_out
from shared_model.training import TrainConfig, make_optimizer, sequence_chunks, train_sequences


def consenting_users(n_users: int, share: float, seed: int) -> np.ndarray:
    """Who consented: ceil(share * n) users, a draw from the run seed (who consents is
    public, like their data)."""
    count = math.ceil(share * n_users)
    return np.sort(np.random.default_rng([seed, 0x9B1C]).choice(n_users, size=count, replace=False))


def pretrain_on_public_users(model: Recommender, settings: RunSettings) -> dict:
    """Train `model` on the consenting users' training sequences for `public-epochs` epochs;
    what was done, for the log and the summary."""
    split = leave_one_out(settings.load_dataset())
    users = consenting_users(len(split.train), settings.public_users, settings.seed)
    recipe = TrainConfig()
    optimizer = make_optimizer(model, recipe)
    chunks = sequence_chunks(model, [split.train[u] for u in users])
    rng = np.random.default_rng(settings.seed)
    report_every = max(1, settings.public_epochs // 10)  # a long pretraining (minutes at 100,000 users) shows progress
    for epoch in range(1, settings.public_epochs + 1):
        loss = train_sequences(model, optimizer, chunks, recipe.batch_size, rng)[0]
        if epoch % report_every == 0 or epoch == settings.public_epochs:
            log(INFO, "fedrec: pretraining on the consenting users: epoch %d/%d, loss %.4f",
                epoch, settings.public_epochs, loss)
    return {"users": len(users), "of": len(split.train), "epochs": settings.public_epochs, "final loss": loss}
