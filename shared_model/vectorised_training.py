"""`train_local` for many one-user clients at once: the same batches, the same loss and
the same plain SGD steps, with each client's parameters a row of stacked tensors and the
gradient vectorised over clients by torch.func (vmap of grad).

Each client's batches come from `local_batches` with the client's own seed, exactly as its
`train_local` would take them; step s of every client is padded to one shape (more left
padding, empty chunks: they change no real position's state and add nothing to the loss),
and a client with fewer steps gets an empty batch (zero gradient: its parameters stay).
The loss is `masked_sequence_loss`, `sequence_loss` without data-dependent shapes. Dropout
masks are drawn per client by vmap: the same distribution as a client's, not its draws;
with dropout 0 a client's result equals its `train_local`'s to float tolerance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from shared_model.recommender import Recommender, masked_sequence_loss
from shared_model.training import Batch, local_batches, sequence_chunks

Stacked = dict[str, torch.Tensor]  # parameter name -> [K, ...], one row per client


def client_batches(model: Recommender, sequences: list[np.ndarray], seed: int, epochs: int, batch_size: int,
                   max_steps: int) -> list[Batch]:
    """The batches `train_local(model, sequences, ..., seed=seed)` steps on, in order."""
    chunks = sequence_chunks(model, sequences)
    return [batch for _, batch in local_batches(chunks, epochs, batch_size, np.random.default_rng(seed), max_steps)]


def padded_step(batches: Sequence[Batch | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's batches of K clients (None: no step) as (inputs, targets, mask) [K, B, L],
    left-padded to the longest and filled with empty chunks to the largest."""
    real = [b for b in batches if b is not None]
    size = max((len(b[0]) for b in real), default=1)
    length = max((b[0].shape[1] for b in real), default=1)
    inputs = torch.zeros(len(batches), size, length, dtype=torch.long)
    targets = torch.zeros_like(inputs)
    mask = torch.zeros(inputs.shape, dtype=torch.bool)
    for k, batch in enumerate(batches):
        if batch is None:
            continue
        if batch[3] is not None:
            raise ValueError("vectorised local training takes no profiles (train_local gives none)")
        rows, width = batch[0].shape
        inputs[k, :rows, length - width:], targets[k, :rows, length - width:], mask[k, :rows, length - width:] = (
            batch[0], batch[1], batch[2])
    return inputs, targets, mask


def vectorised_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels that vmap of grad may use on `device`. On CUDA the math kernel:
    the fused kernels have no vmap batching rule for their backward, and the per-client
    fallback does not replay the forward's dropout, so a client steps on the gradient of
    another mask (measured on an H200, 100,000 users, dropout 0.2: the largest update norm
    3 -> 2,950 -> 9e7 -> NaN by round 10; with the math kernel 3 to 15 through 49 rounds,
    and faster). On the CPU the default kernel's gradients match its forward (tested)."""
    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cuda" else contextlib.nullcontext()


def train_clients(model: Recommender, start: dict[str, torch.Tensor], batches: Sequence[list[Batch]],
                  lr: float) -> Stacked:
    """Each client's parameters after plain SGD at rate `lr` from `start` over its own
    batches (from `client_batches`): [K, ...] per trainable parameter, on the device of
    `start` and the model."""
    model.train()
    of_params = _MaskedLoss(model)

    def loss(params: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        return functional_call(of_params, {f"model.{n}": p for n, p in params.items()}, (inputs, targets, mask))

    # every client starts from `start`: the first step batches only the data (the catalog's
    # vectors are computed once, not per client), later steps the clients' own parameters
    first = vmap(grad(loss), in_dims=(None, 0, 0, 0), randomness="different")
    later = vmap(grad(loss), randomness="different")
    params = {n: p.detach() for n, p in start.items()}
    device = next(iter(params.values())).device  # the model's and `start`'s: the batches join them there
    steps = max((len(b) for b in batches), default=0)
    with vectorised_attention(device):
        for step in range(steps):
            inputs, targets, mask = (t.to(device) for t in padded_step([b[step] if step < len(b) else None
                                                                          for b in batches]))
            grads = (later if step else first)(params, inputs, targets, mask)
            params = {n: p - lr * grads[n] for n, p in params.items()}
    if not steps:
        params = {n: p.expand(len(batches), *p.shape).clone() for n, p in params.items()}
    return params


class _MaskedLoss(nn.Module):
    """`masked_sequence_loss` of a model as a module's forward, for torch.func.functional_call."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_sequence_loss(self.model, inputs, targets, mask)
