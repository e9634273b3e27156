"""DP-FTRL's noise from the square-root factorization of the prefix-sum matrix
(`dp-ftrl-noise = "square-root"`; Henzinger, Upadhyay and Upadhyay 2023, "Almost tight error
bounds on differentially private continual counting"; Fichtenberger, Henzinger and
Upadhyay 2023, "Constant matters"; the matrix mechanism of Denisov, McMahan, Rush, Smith and
Thakurta 2022, "Improved differential privacy for SGD via optimal private linear operators
on adaptive streams").

Why: with each client in at most one round of an epoch (as the tree asks), the prefix sums
S x of the rounds' updates x_1..x_T can be released as C (C x + z), with C the lower
triangular Toeplitz matrix of the coefficients f_k of (1 - u)^(-1/2) (C C = S, the matrix of
ones on and below the diagonal) and z fresh N(0, std^2) per round: the Gaussian mechanism
C x + z, then post-processing. One client's update, in one round j, moves C x by column j of
C, whose squared norm is at most sum_{k<T} f_k^2 (2.31 at T = 50, where the tree's node
count is 6), and the prefix sum of round t carries sum_{k<t} f_k^2 std^2 of noise, against
popcount(t) node variances for the tree: less noise in the model at the same epsilon.
Round t's release is x_t + sum_{k<=t} g_{t-k} z_k, g the coefficients of (1 - u)^(1/2)
(g_0 = 1, then negative): later noises take back part of the earlier ones.

Because C is lower triangular, releasing round t needs only x_1..x_t, so clients may react
to earlier releases (adaptive streams: Denisov et al., Theorem 2.1): the guarantee is that of
one Gaussian with sensitivity sqrt(sum_{k<T} f_k^2) per epoch (`square_root_weight`: what
round t adds to its square). Costs memory: the epoch's noise draws, one model's worth a round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np


def coefficients(count: int) -> np.ndarray:
    """f_0..f_{count-1} of (1 - u)^(-1/2): f_0 = 1, f_k = f_{k-1} (2k - 1) / (2k) (= C(2k, k) / 4^k)."""
    f = np.ones(count)
    for k in range(1, count):
        f[k] = f[k - 1] * (2 * k - 1) / (2 * k)
    return f


def release_coefficients(count: int) -> np.ndarray:
    """g_0..g_{count-1} of (1 - u)^(1/2) = (1 - u) (1 - u)^(-1/2): g_k = f_k - f_{k-1}."""
    f = coefficients(count)
    return np.diff(f, prepend=0.0)


def square_root_weight(epoch_round: int) -> float:
    """f_{t-1}^2: what round t of an epoch adds to the squared sensitivity of the epoch's
    mechanism, for the client that took part in its first round (the worst case), so the
    epoch's first t rounds are one Gaussian with sensitivity sqrt(sum of these)."""
    if epoch_round < 1:
        raise ValueError(f"an epoch's rounds count from 1, not {epoch_round}")
    k = epoch_round - 1  # f_k = Gamma(k + 1/2) / (Gamma(1/2) Gamma(k + 1)): no loop over the epoch
    return math.exp(2 * (math.lgamma(k + 0.5) - math.lgamma(0.5) - math.lgamma(k + 1)))


def squared_sensitivity(rounds: int, epoch_rounds: int) -> float:
    """sum over epochs of sum_{k<T_e} f_k^2 for `rounds` rounds in epochs of `epoch_rounds`:
    the run's mechanism is one Gaussian with noise multiplier z / sqrt(this)."""
    full, rest = divmod(rounds, epoch_rounds)
    return float(full * np.sum(coefficients(epoch_rounds) ** 2) + np.sum(coefficients(rest) ** 2))


class SquareRootNoise:
    """The noises of one epoch: z_k drawn once, when round k is first released, from
    `randomness` (a fresh generator per draw: OS entropy in a run), kept for the rounds after."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], std: float,
                 randomness: Callable[[], np.random.Generator]):
        self.shapes, self.std, self.randomness = dict(shapes), std, randomness
        self.draws: list[dict[str, np.ndarray]] = []

    def round_noise(self, t: int) -> dict[str, np.ndarray]:
        """The noise on round t's release (t from 1): sum_{k<=t} g_{t-k} z_k, drawing the z
        it needs that are not drawn yet (a round that released nothing still has its z)."""
        if t < 1:
            raise ValueError(f"an epoch's rounds count from 1, not {t}")
        while len(self.draws) < t:
            rng = self.randomness()
            self.draws.append({k: rng.normal(0.0, self.std, size=shape) for k, shape in self.shapes.items()})
        g = release_coefficients(t)[::-1]  # g_{t-1} .. g_0, to pair with z_1 .. z_t
        return {k: sum(weight * draw[k] for weight, draw in zip(g, self.draws[:t])) for k in self.shapes}
