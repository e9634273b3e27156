"""Local training with differential privacy (Opacus DP-SGD, Poisson sampling).

The unit of privacy is one Opacus sample:
- "example": one (window of up to W items -> next item) example; an interaction also
  sits in the input windows of up to W later examples, so one interaction is protected
  only weakly (see shared_model.privacy.interaction_epsilon);
- "user" (silos): one user's most recent W + 1 items, all their next-item predictions
  in one sample, so the epsilon covers everything the user contributes.
Each sample's loss uses only its own items and negatives drawn uniformly from the public
catalog, so per-sample gradients are exact (tests/test_dp_training.py checks them).

What a step releases depends on the data only through the clipped gradients: the Poisson
rate, the number of steps and the number the noisy sum is divided by are public settings
(dividing by the realised batch or by the client's size would release that size, and the
add/remove accounting would no longer hold). The noise, the Poisson draws and each sample's
negatives come from one numpy generator seeded with 128 bits of OS entropy
(shared_model.fresh_randomness): torch's CPU generator keeps only the low 32 bits of a
seed, few enough for a server to search. Each sample's negatives are fresh draws of its
own, so no sample's loss depends on which others were sampled. The noise is Opacus's
secure sampler (the sum of four Gaussians, halved) against floating-point attacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from shared_model.fresh_randomness import fresh_numpy_generator
from shared_model.recommender import Recommender, example_loss, seen_candidates
from shared_model.training import make_examples

UNITS = ("example", "user")


@dataclass(frozen=True)
class PrivateData:
    unit: str
    tensors: TensorDataset

    def __len__(self) -> int:
        return len(self.tensors)


def private_data(model: Recommender, sequences: list[np.ndarray], unit: str) -> PrivateData:
    """One Opacus sample per example, or per user (their last W + 1 items; W is the model's)."""
    if unit == "example":
        examples = make_examples(model, sequences)
        return PrivateData(unit, TensorDataset(examples.history_ids, examples.mask, examples.targets))
    if unit == "user":
        tails = [s[-(model.window + 1):] for s in sequences if len(s) >= 2]
        inputs, mask = model.windows([t[:-1] for t in tails])
        targets, _ = model.windows([t[1:] for t in tails])
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
    if model.config.hide_seen:
        collide = collide | seen_candidates(inputs, mask, negatives)
    logits = torch.cat([positive, negative.masked_fill(collide, float("-inf"))], dim=-1)
    losses = F.cross_entropy(logits.flatten(0, 1), torch.zeros(logits.shape[0] * width, dtype=torch.long),
                             reduction="none").view(-1, width)
    return ((losses * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def sample_loss(model: Recommender, data: PrivateData, batch: list[torch.Tensor], negatives: torch.Tensor
                ) -> torch.Tensor:
    """Mean loss of a batch of samples, each against its own catalog negatives [B, N]."""
    first, mask, last = batch
    if data.unit == "example":
        return example_loss(model, first, mask, last, negatives)
    return user_loss(model, first, mask, last, negatives)


def switch_off_dropout(model: Recommender) -> None:
    """Dropout modules to eval mode (the next `model.train()` restores them): dropout's
    random masks make the clipped per-example gradients of a batch agree less, and under
    DP the batch's sum is all the signal there is against the noise. Only the parameterless
    Dropout modules change mode: Opacus skips per-sample gradients of modules in eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()


def check_private_model(model: Recommender) -> None:
    """Opacus's per-sample gradients are right only where every trainable layer sees the
    examples as its leading dimension: LoRA on the top encoder layer does (its inputs are
    a sample's own items), but a second LoRA layer sees [batch x items, ...] rows."""
    if model.config.lora_layers >= 2:
        raise ValueError(f"DP-SGD supports lora-layers 0 or 1, not {model.config.lora_layers}: with LoRA on more "
                         "than the top encoder layer Opacus's per-sample gradients would be wrong")


def gaussian_like(reference: torch.Tensor, std: float, randomness: np.random.Generator, secure: bool) -> torch.Tensor:
    """N(0, std^2) noise shaped like the reference; secure: Opacus's floating-point-safe
    sampler (the sum of four draws, halved; Holohan and Braghin 2021, section 5.1)."""
    draws = 4 if secure else 1
    total = sum(randomness.standard_normal(tuple(reference.shape)) for _ in range(draws))
    return torch.as_tensor(total * (std / math.sqrt(draws)), dtype=reference.dtype)


def private_optimizer(optimizer: torch.optim.Optimizer, noise_multiplier: float, max_grad_norm: float,
                      expected_batch: float, randomness: np.random.Generator, secure_noise: bool):
    """Opacus's DPOptimizer (clipping, summing, scaling by the expected batch) with its noise
    drawn from a numpy generator instead of a torch one (checked against opacus 1.6)."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class FreshNoiseDPOptimizer(DPOptimizer):
        def add_noise(self) -> None:  # DPOptimizer.add_noise, with the noise from `randomness`
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = gaussian_like(p.summed_grad, self.noise_multiplier * self.max_grad_norm, randomness,
                                      secure_noise)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    return FreshNoiseDPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                 expected_batch_size=expected_batch, loss_reduction="mean")


def train_private(
    model: Recommender,
    data: PrivateData,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    expected_batch: float,
    lr: float,
    negatives: int,
    private_randomness: np.random.Generator | None = None,
    secure_noise: bool = True,
) -> dict[str, float]:
    """`steps` DP-SGD steps, each on a Poisson sample of the data at `sample_rate`, the sum
    of clipped per-sample gradients plus N(0, (z C)^2) divided by `expected_batch`. With no
    data every step is noise only (a client's size is not released by declining).

    private_randomness: the generator of the Poisson draws, negatives and noise; None (always,
    in the apps) draws a fresh one from OS entropy. Tests pass a seeded one as the control
    that shows what an adversary who can replay it would learn. secure_noise=False (one
    Gaussian draw per coordinate, open to floating-point attacks) only to measure its cost."""
    check_private_model(model)
    from opacus import GradSampleModule  # on use: a non-private ClientApp process skips its import time

    randomness = private_randomness or fresh_numpy_generator()
    model.train()  # Opacus refuses a module in eval mode (a reused model may have been evaluated)
    wrapped = GradSampleModule(model, loss_reduction="mean")
    optimizer = private_optimizer(torch.optim.SGD(model.trainable_parameters().values(), lr=lr),
                                  noise_multiplier, max_grad_norm, expected_batch, randomness, secure_noise)
    switch_off_dropout(model)
    losses = []
    try:
        for _ in range(steps):
            picked = torch.from_numpy(randomness.random(len(data)) < sample_rate)  # Poisson sampling
            batch = [t[picked] for t in data.tensors.tensors]
            sampled = torch.from_numpy(randomness.integers(model.n_items, size=(len(batch[0]), negatives)))
            optimizer.zero_grad(set_to_none=True)
            loss = sample_loss(model, data, batch, sampled)
            loss.backward()
            optimizer.step()  # an empty Poisson batch still steps: noise only
            if len(batch[0]):
                losses.append(loss.item())
    finally:
        wrapped.to_standard_module()  # the process's model is reused: drop Opacus's hooks
    return {"train-loss": float(np.mean(losses)) if losses else 0.0, "steps": steps, "sample-rate": sample_rate}


def train_plain(model: Recommender, data: PrivateData, batch_size: int, lr: float, epochs: int, negatives: int,
                seed: int) -> dict[str, float]:
    """The same samples, loss and SGD as `train_private`, without clipping or noise (for
    controls and for measuring what privacy costs)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.trainable_parameters().values(), lr=lr)
    model.train()
    switch_off_dropout(model)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            sampled = torch.randint(model.n_items, (len(idx), negatives), generator=generator)
            loss = sample_loss(model, data, [t[idx] for t in data.tensors.tensors], sampled)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return {"train-loss": float(np.mean(losses)) if losses else 0.0, "steps": len(losses)}
