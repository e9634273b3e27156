"""Local training with differential privacy (Opacus DP-SGD, Poisson sampling).

The unit of privacy is one Opacus sample:
- "example": one (window of up to W items -> next item) example; an interaction also
  sits in the input windows of up to W later examples, so protecting one interaction
  needs group privacy over W + 1 examples (see shared_model.privacy.group_privacy);
- "user" (silos): one user's most recent W + 1 items, all their next-item predictions
  in one sample, so the epsilon covers everything the user contributes.
Each sample's loss uses only its own items and negatives drawn uniformly from the public
catalog, so per-sample gradients are exact (tests/test_dp_training.py checks them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from shared_model.recommender import Recommender, example_loss, left_pad
from shared_model.training import make_examples

UNITS = ("example", "user")


@dataclass(frozen=True)
class PrivateData:
    unit: str
    tensors: TensorDataset

    def __len__(self) -> int:
        return len(self.tensors)


def private_data(sequences: list[np.ndarray], window: int, unit: str) -> PrivateData:
    """One Opacus sample per example, or per user (their last W + 1 items)."""
    if unit == "example":
        examples = make_examples(sequences, window)
        return PrivateData(unit, TensorDataset(examples.history, examples.mask, examples.targets))
    if unit == "user":
        tails = [s[-(window + 1):] for s in sequences if len(s) >= 2]
        inputs, mask = left_pad([t[:-1] for t in tails], window)
        targets, _ = left_pad([t[1:] for t in tails], window)
        return PrivateData(unit, TensorDataset(inputs, mask, targets))
    raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")


def user_loss(model: Recommender, inputs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
              negatives: torch.Tensor) -> torch.Tensor:
    """Per-user loss: the mean sampled-softmax loss over the user's positions; a user's
    negatives [B, N] are drawn for that user alone."""
    width = inputs.shape[1]
    ids = torch.cat([torch.where(mask, inputs, 0), torch.where(mask, targets, 0), negatives], dim=1)
    vectors = model.item_vectors(ids)  # [B, 2W + N, d]
    states = model.user_states(vectors[:, :width], mask)  # [B, W, d]
    positive = (states * vectors[:, width: 2 * width]).sum(-1, keepdim=True)  # [B, W, 1]
    negative = states @ vectors[:, 2 * width:].transpose(1, 2)  # [B, W, N]
    collide = negatives[:, None, :] == targets[..., None]
    logits = torch.cat([positive, negative.masked_fill(collide, float("-inf"))], dim=-1)
    losses = F.cross_entropy(logits.flatten(0, 1), torch.zeros(logits.shape[0] * width, dtype=torch.long),
                             reduction="none").view(-1, width)
    return ((losses * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def sample_loss(model: Recommender, data: PrivateData, batch: list[torch.Tensor], negatives: int,
                generator: torch.Generator) -> torch.Tensor:
    first, mask, last = batch
    sampled = torch.randint(model.n_items, (len(first), negatives), generator=generator)
    if data.unit == "example":
        return example_loss(model, first, mask, last, sampled)
    return user_loss(model, first, mask, last, sampled)


def switch_off_dropout(model: Recommender) -> None:
    """Dropout modules to eval mode (the next `model.train()` restores them): dropout's
    random masks make the clipped per-example gradients of a batch agree less, and under
    DP the batch's sum is all the signal there is against the noise. Only the parameterless
    Dropout modules change mode: Opacus skips per-sample gradients of modules in eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()


def batches_per_epoch(samples: int, batch_size: int) -> int:
    """Opacus's Poisson loader draws each batch at rate 1 / this."""
    return math.ceil(samples / max(1, min(batch_size, samples)))


def train_private(
    model: Recommender,
    data: PrivateData,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    lr: float,
    epochs: int,
    negatives: int,
    seed: int,
) -> dict[str, float]:
    """DP-SGD over the data for `epochs` passes (Poisson sampling at batch_size / n)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(data.tensors, batch_size=max(1, min(batch_size, len(data))), shuffle=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()  # Opacus refuses a module in eval mode (a reused model may have been evaluated)
    from opacus import PrivacyEngine  # on use: a non-private ClientApp process skips its import time

    engine = PrivacyEngine()
    wrapped, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True, noise_generator=generator,
    )
    switch_off_dropout(model)
    losses, steps = [], 0
    try:
        for _ in range(epochs):
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = sample_loss(model, data, batch, negatives, generator)
                loss.backward()
                optimizer.step()  # an empty Poisson batch still steps: noise only
                if len(batch[0]):
                    losses.append(loss.item())
                steps += 1
    finally:
        wrapped.to_standard_module()  # the process's model is reused: drop Opacus's hooks
    return {"train-loss": float(np.mean(losses)) if losses else 0.0, "steps": steps,
            "sample-rate": 1.0 / len(loader), "num-examples": len(data)}


def train_plain(model: Recommender, data: PrivateData, batch_size: int, lr: float, epochs: int, negatives: int,
                seed: int) -> dict[str, float]:
    """The same samples, loss and SGD as `train_private`, without clipping or noise (for
    controls and for measuring what privacy costs)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    switch_off_dropout(model)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = sample_loss(model, data, [t[idx] for t in data.tensors.tensors], negatives, generator)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return {"train-loss": float(np.mean(losses)) if losses else 0.0, "steps": len(losses)}
