"""Randomness that privacy rests on: DP noise, Poisson sampling of examples and of
clients, canary inclusion in audits.

Each use draws a new seed from the operating system's entropy (`secrets`), never from the
run seed: the server knows the run seed (it is in config.json), and noise it can replay
protects nothing. The run seed keeps governing what privacy does not rest on
(initialisation, and in non-private runs data order, negatives and client sampling), so
non-private runs stay reproducible.
"""

from __future__ import annotations

import secrets

import numpy as np


def fresh_numpy_generator() -> np.random.Generator:
    """numpy's PCG64 seeded with 128 bits of OS entropy. (Not a torch generator: torch's CPU
    generator keeps only the low 32 bits of its seed, a space a server can search.)"""
    return np.random.default_rng(secrets.randbits(128))
