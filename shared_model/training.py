"""Local training: batches from item sequences, and plain optimisation steps.

Two views of the same data:
- sequences: each chunk of W+1 items trains W next-item predictions in one causal pass
  (fast; the centralized reference and non-private clients use it);
- examples: each (window of up to W items, next item) pair is one independent example
  (what differential privacy needs: one loss per example, nothing shared in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from shared_model.recommender import Recommender, left_pad, sequence_loss


@dataclass
class TrainConfig:
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 0.0


START = -1  # the empty history before a user's first item
NO_PROFILE = -1
PROFILE_DROPOUT = 0.5  # share of steps a chunk is trained without its profile (users who give none)


@dataclass(frozen=True)
class Chunks:
    """Training chunks of up to W+1 entries, and the text row of each one's owner's
    free-text profile in the model's text tower (NO_PROFILE where there is none)."""

    items: list[np.ndarray]
    profiles: np.ndarray  # [len(items)] int64

    def __len__(self) -> int:
        return len(self.items)


def sequence_chunks(model: Recommender, sequences: list[np.ndarray], profile_rows: np.ndarray | None = None
                    ) -> Chunks:
    """Cut each sequence, after a START marker, into chunks of up to W+1 entries from its
    end, so that every item is a target exactly once; the first is predicted from the
    empty history, which teaches the model a prior for users with no history yet.
    profile_rows [n users]: each user's profile text row (see `add_profiles`)."""
    window, chunks, owners = model.window, [], []
    for user, seq in enumerate(sequences):
        seq = np.concatenate([[START], seq]) if len(seq) else seq
        end = len(seq)
        while end >= 2:
            chunks.append(seq[max(0, end - window - 1) : end])
            owners.append(user)
            end -= window
    if profile_rows is None:
        return Chunks(chunks, np.full(len(chunks), NO_PROFILE, dtype=np.int64))
    return Chunks(chunks, np.asarray(profile_rows, dtype=np.int64)[np.asarray(owners, dtype=np.int64)])


def add_profiles(model: Recommender, profiles: list[str]) -> np.ndarray:
    """Put the distinct profile texts in the model's text tower (past its catalog, so they
    train the LoRA-adapted encoder like item texts); each user's text row."""
    distinct = sorted(set(profiles))
    rows = model.text_tower().add_texts(distinct).numpy()
    row_of = dict(zip(distinct, rows))
    return np.array([row_of[p] for p in profiles], dtype=np.int64)


def sequence_batches(
    chunks: Chunks, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(inputs [B, L], targets [B, L], mask [B, L] of real targets, profile rows [B] or
    None), left-padded, in a shuffled order; an input may be START. A profile is hidden
    with probability PROFILE_DROPOUT, so the model also serves users without one."""
    order = rng.permutation(len(chunks))
    with_profiles = bool((chunks.profiles != NO_PROFILE).any())
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        batch = [chunks.items[i] for i in picked]
        length = max(len(c) for c in batch) - 1
        inputs, mask = left_pad([c[:-1] for c in batch], length)
        targets, _ = left_pad([c[1:] for c in batch], length)
        profiles = None
        if with_profiles:
            shown = np.where(rng.random(len(picked)) < PROFILE_DROPOUT, NO_PROFILE, chunks.profiles[picked])
            profiles = torch.from_numpy(shown)
        yield inputs, targets, mask, profiles


@dataclass(frozen=True)
class Examples:
    """Independent (history window, target) examples, one per predicted interaction."""

    history_ids: torch.Tensor  # [n, W] left-padded
    mask: torch.Tensor  # [n, W]
    targets: torch.Tensor  # [n]

    def __len__(self) -> int:
        return len(self.targets)


def make_examples(model: Recommender, sequences: list[np.ndarray]) -> Examples:
    """One example per interaction: the items before it (the model keeps the last W) -> it."""
    prefixes, targets = [], []
    for seq in sequences:
        for t in range(len(seq)):  # t = 0: the empty history predicts the first item
            prefixes.append(seq[:t])
            targets.append(seq[t])
    history_ids, mask = model.windows(prefixes)
    return Examples(history_ids, mask, torch.as_tensor(np.array(targets, dtype=np.int64)))


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def train_step(model: Recommender, optimizer: torch.optim.Optimizer, batch: Batch) -> float:
    """One optimiser step on one batch of `sequence_batches`; its loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = sequence_loss(model, *batch)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_sequences(
    model: Recommender,
    optimizer: torch.optim.Optimizer,
    chunks: Chunks,
    batch_size: int,
    rng: np.random.Generator,
    max_steps: int | None = None,
) -> tuple[float, int]:
    """One pass over the chunks (or max_steps batches); returns (mean loss, steps)."""
    model.train()
    total, steps = 0.0, 0
    for batch in sequence_batches(chunks, batch_size, rng):
        total += train_step(model, optimizer, batch)
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    return total / max(steps, 1), steps


class EpochReport(NamedTuple):
    epoch: int
    loss: float  # mean training loss of the epoch
    validation: dict[str, float]
    best_epoch: int  # so far, by validation NDCG@10
    best_ndcg: float
    last: bool  # no epoch follows (patience ran out, or the maximum was reached)


def epochs_keeping_best(
    model: Recommender,
    optimizer: torch.optim.Optimizer,
    chunks: Chunks,
    batch_size: int,
    rng: np.random.Generator,
    epochs: int,
    patience: int,
    validate: Callable[[], dict[str, float]],
) -> Iterator[EpochReport]:
    """Train epoch by epoch, validating after each, and report each epoch; stop after
    `patience` epochs without a better validation NDCG@10, or after `epochs`, and leave the
    model at its best epoch's state (after the last report: consume the whole iterator)."""
    best_ndcg, best_epoch, best_state = -1.0, 0, model.trainable_state()
    for epoch in range(1, epochs + 1):
        loss, _ = train_sequences(model, optimizer, chunks, batch_size, rng)
        metrics = validate()
        if metrics["NDCG@10"] > best_ndcg:
            best_ndcg, best_epoch, best_state = metrics["NDCG@10"], epoch, model.trainable_state()
        last = epoch == epochs or epoch - best_epoch >= patience
        yield EpochReport(epoch, loss, metrics, best_epoch, best_ndcg, last)
        if last:
            break
    model.load_trainable_state(best_state)


def local_batches(chunks: Chunks, epochs: int, batch_size: int, rng: np.random.Generator,
                  max_steps: int = 0) -> Iterator[tuple[int, Batch]]:
    """(epoch, batch) in the order a client's local work steps on them: `epochs` shuffled
    passes, at most `max_steps` batches in all when that is positive."""
    steps = 0
    for epoch in range(epochs):
        for batch in sequence_batches(chunks, batch_size, rng):
            yield epoch, batch
            steps += 1
            if max_steps and steps >= max_steps:
                return


def training_positions(sequences: list[np.ndarray]) -> int:
    """A client's weight in FedAvg: its items after each sequence's first."""
    return int(sum(max(len(s) - 1, 0) for s in sequences))


def make_optimizer(model: Recommender, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.trainable_parameters().values(), lr=config.lr, weight_decay=config.weight_decay)


def train_local(
    model: Recommender,
    sequences: list[np.ndarray],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_steps: int = 0,
) -> dict[str, float]:
    """A client's local work: plain SGD over its own sequences for `epochs` passes
    (at most `max_steps` steps in all, when that is positive)."""
    chunks = sequence_chunks(model, sequences)
    optimizer = torch.optim.SGD(model.trainable_parameters().values(), lr=lr)
    torch.manual_seed(seed)
    model.train()
    losses: dict[int, list[float]] = {}
    for epoch, batch in local_batches(chunks, epochs, batch_size, np.random.default_rng(seed), max_steps):
        losses.setdefault(epoch, []).append(train_step(model, optimizer, batch))
    steps = sum(len(v) for v in losses.values())
    return {
        "train-loss": float(np.mean([np.mean(v) for v in losses.values()])) if losses else 0.0,
        "num-examples": training_positions(sequences),
        "steps": steps,
    }
