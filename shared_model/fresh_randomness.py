"""Randomness that privacy rests on: DP noise, Poisson sampling of examples and of
clients, canary inclusion in audits.

Each use draws a new seed from the operating system's entropy (`secrets`), never from the
run seed: the server knows the run seed (it is in config.json), and noise it can replay
protects nothing. The run seed keeps governing what privacy does not rest on
(initialisation, data order, sampled negatives), so non-private runs stay reproducible.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch


def fresh_seed() -> int:
    """63 bits of OS entropy (what a torch generator's seed holds)."""
    return secrets.randbits(63)


def fresh_torch_generator() -> torch.Generator:
    return torch.Generator().manual_seed(fresh_seed())


def fresh_numpy_generator() -> np.random.Generator:
    """numpy's PCG64 seeded with 128 bits of OS entropy."""
    return np.random.default_rng(secrets.randbits(128))
