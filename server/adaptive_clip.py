"""Adaptive clipping for DP-FedAvg (Andrew, Thakkar, McMahan and Ramaswamy 2021): the clip
follows a target quantile of the clients' update norms, estimated privately each round.

Each round the server counts the sampled clients whose update norm is <= the current clip
C, centred (each client counts b_i - 1/2), adds N(0, sigma_b^2), divides by the expected
cohort m and adds 1/2 back: a noisy estimate of the unclipped fraction. The clip then takes
a geometric step toward the target quantile gamma: C <- C exp(-eta (fraction - gamma)).
The noisy count is a release: with the update's noise it is accounted as one Gaussian
mechanism (shared_model.privacy.total_noise_multiplier has the derivation), so the
update's own noise multiplier is raised to keep the planned total.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdaptiveClip:
    target_quantile: float  # gamma: the share of updates the clip should leave unclipped
    learning_rate: float  # eta: the clip changes by at most a factor exp(eta) a round
    count_noise: float  # sigma_b: std of the Gaussian on the centred count

    def unclipped_fraction(self, norms: Sequence[float], clip: float, expected_count: float,
                           rng: np.random.Generator) -> float:
        """The noisy share of updates with norm <= clip, in [0, 1] (rng: fresh OS entropy in
        the server; a seeded one only in tests)."""
        centred = sum(1.0 if norm <= clip else 0.0 for norm in norms) - len(norms) / 2
        noisy = (centred + rng.normal(0.0, self.count_noise)) / expected_count + 0.5
        return min(1.0, max(0.0, noisy))

    def next_clip(self, clip: float, unclipped_fraction: float) -> float:
        """The geometric step: the clip grows while too many updates are clipped."""
        return clip * math.exp(-self.learning_rate * (unclipped_fraction - self.target_quantile))
