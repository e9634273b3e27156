"""The one-run canary audit (Steinke, Nasr and Jagielski 2023), as the empirical privacy
audit (bench_privacy_audit) and the membership attack (bench_attacks) both run it: make
canaries (a full window of random items -> a random target), each included with
probability 1/2 from OS entropy, train with or without DP-SGD, score the canaries, guess."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import TensorDataset

from shared_model.dp_training import PrivateData, train_plain, train_private
from shared_model.fresh_randomness import fresh_numpy_generator
from shared_model.privacy import noise_multiplier
from shared_model.recommender import Recommender


def make_canaries(model: Recommender, count: int, seed: int, inclusion: np.random.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """`count` canaries (a full window of random items -> a random target), each included
    with probability 1/2, drawn from fresh randomness (whoever audits must not know which);
    a test passes a seeded `inclusion` generator so that its outcome cannot vary by chance."""
    rng = np.random.default_rng(seed)  # the canaries themselves are public
    histories = [rng.choice(model.n_items, size=model.window, replace=False) for _ in range(count)]
    targets = rng.integers(model.n_items, size=count)
    ids, _ = model.windows(histories)
    included = (inclusion or fresh_numpy_generator()).random(count) < 0.5
    return ids, torch.as_tensor(targets), included


def canary_scores(model, ids: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        catalog = model.catalog_vectors()
        users = model.user_vectors(ids, torch.ones_like(ids, dtype=torch.bool), catalog)
        logits = users @ catalog.T
        return (logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]).numpy()


def guesses(scores: np.ndarray, included: np.ndarray, per_side: int) -> tuple[int, int]:
    """Guess "in" for the per_side highest scores and "out" for the per_side lowest."""
    order = np.argsort(-scores)
    correct = included[order[:per_side]].sum() + (~included[order[-per_side:]]).sum()
    return 2 * per_side, int(correct)


def with_canaries(data: PrivateData, ids: torch.Tensor, targets: torch.Tensor, included: np.ndarray) -> PrivateData:
    """The training examples plus the included canaries (a full window -> its target)."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    history_ids, seen, wanted = data.tensors.tensors
    return PrivateData("example", TensorDataset(torch.cat([history_ids, ids[included]]),
                                                torch.cat([seen, mask[included]]),
                                                torch.cat([wanted, targets[included]])))


def train_audited(model, train: PrivateData, claimed: float | None, delta: float, batch_size: int, lr: float,
                  epochs: int, negatives: int, seed: int) -> None:
    """Without DP (claimed None: the control), or example-level DP-SGD calibrated for the
    claimed epsilon over `epochs` expected passes at rate batch_size / examples."""
    if claimed is None:
        train_plain(model, train, batch_size, lr, epochs, negatives, seed)
        return
    rate = batch_size / len(train)
    steps = epochs * math.ceil(1 / rate)
    train_private(model, train, noise_multiplier(claimed, rate, steps, delta), 1.0, rate, steps, batch_size, lr,
                  negatives)
