"""DP-FedAvg's mechanism as pure functions over stacked updates (dicts of [K, ...] arrays,
one row per client): each update clipped to L2 norm S, the clipped sum, Gaussian noise of
std z S on the sum, divided by the expected count q N.

DPFedAvg (server/dp_strategy.py) feeds them the replies of a Flower round; the in-process
population driver (simulations/population.py) feeds them the updates of its vectorised
clients. Both add the sums of chunks of clients, so neither holds every update at once.
Under secure aggregation each client clips its own update and adds its share of the noise
(client/secure_update.py) and the server only sums. The noise's generator is passed in:
it comes from OS entropy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from shared_model.privacy import binomial_bound

if TYPE_CHECKING:
    from shared_model.settings import RunSettings

Arrays = Mapping[str, np.ndarray]
MODULUS = 2**32  # secure aggregation's: the masked sums are taken modulo it
CLIPPING_SIGMAS = 8.0  # secure aggregation's quantiser range: the clip plus this many noise-share stds
NAMES_KEY = "names"  # secure aggregation: the FitIns config's names of its parameters, comma-separated, in order


def flat_vector(arrays: Arrays) -> np.ndarray:
    """Secure aggregation's layout on the wire: the arrays raveled and joined in their order.
    SecAgg+ quantises, masks and serialises each array of a message on its own (and the
    model has some 30): one array is one pass, one mask a neighbour, one header."""
    return np.concatenate([np.ravel(v) for v in arrays.values()])


def unflattened(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """`flat_vector`'s inverse: the arrays of these names and shapes, in that order; a
    vector of another length is refused."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(f"a secure-aggregation vector of shape {vector.shape}, expected ({sum(sizes)},) "
                         f"for {len(shapes)} arrays")
    parts = np.split(vector, np.cumsum(sizes)[:-1])
    return {name: part.reshape(shape) for (name, shape), part in zip(shapes.items(), parts, strict=True)}


def stacked_updates(current: Arrays, models: Arrays) -> dict[str, np.ndarray]:
    """K clients' updates: their models ([K, ...] per name) minus `current`, in float64."""
    return {k: np.asarray(models[k], dtype=np.float64) - np.asarray(v, dtype=np.float64) for k, v in current.items()}


def update_norms(updates: Arrays) -> np.ndarray:
    """[K]: each stacked update's L2 norm over all its arrays together."""
    squares = sum(np.square(u).reshape(len(u), -1).sum(axis=1) for u in updates.values())
    return np.sqrt(squares)


def clipped_sum(updates: Arrays, clip: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(the sum over K stacked updates of each one scaled to L2 norm <= clip; their norms
    before clipping, [K], which adaptive clipping counts)."""
    norms = update_norms(updates)
    scale = np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))  # a zero update stays zero
    return {k: np.tensordot(scale, u, axes=1) for k, u in updates.items()}, norms


def add_into(total: dict[str, np.ndarray], part: Arrays) -> None:
    """total += part, name by name (the clipped sums of successive chunks of clients)."""
    for k, v in part.items():
        total[k] += v


def noisy_average(total: Arrays, noise_std: float, expected_count: float,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(total + N(0, noise_std^2) per coordinate) / expected_count, names in `total`'s order
    (the draws' order: a generator seeded alike gives the same noise)."""
    return {k: (t + rng.normal(0.0, noise_std, size=t.shape)) / expected_count for k, t in total.items()}


def noise_share_std(noise_multiplier: float, clip: float, min_clients: int) -> float:
    """Under secure aggregation, the std of the noise each client adds to its clipped
    update: z S / sqrt(m), so that the sum of any m or more clients' vectors carries at
    least the accounted N(0, (z S)^2) (n survivors: n / m times its variance)."""
    return noise_multiplier * clip / math.sqrt(min_clients)


def cohort_cap(population: int, sample_rate: float, min_clients: int, tail: float) -> tuple[int, float]:
    """Secure aggregation's cap on a round's cohort, and what its edges cost: (n_max, beta).

    Why: the n survivors' noise shares sum to variance n / m (z S)^2, so the noise would
    reveal n, and n depends on who took part. The server tops the noise up to n_max / m
    (z S)^2 (`top_up_std`) and runs no round whose Poisson sample is above n_max or below m:
    the release's noise no longer depends on n. Given the others' sample O (the other N - 1
    users'), a user's round is then the accounted Poisson-sampled Gaussian (with more,
    data-independent noise) or, whatever the user does, no release, except on two edges
    where the user's own draw decides whether the round runs: O = n_max (one more would
    exceed the cap) and O = m - 1 (one more reaches m). beta = P[O >= n_max] + P[O = m - 1],
    and the guarantee is (epsilon, delta) with the accountant run at delta minus the rounds'
    betas (ledger: `cap-tail`). n_max is the smallest count with P[O >= n_max] <= tail; m
    must keep P[O = m - 1] <= tail too (ValueError, naming the largest m that does).

    Not covered: a round that halts because dropouts left fewer than m survivors (or cut
    their neighbour graph); if the others' survivors were exactly m - 1, the user's own
    survival decided it (docs/privacy.md)."""
    from scipy.stats import binom

    others = population - 1
    cap = binomial_bound(others, sample_rate, tail)[0] + 1  # P[O >= cap] <= tail, the smallest such
    lower = float(binom.pmf(min_clients - 1, others, sample_rate))
    if lower > tail:
        largest = largest_min_clients(population, sample_rate, tail)
        raise ValueError(f"run config 'secagg-min-clients' {min_clients}: with {population} users at server-dp-sample-rate "
                         f"{sample_rate:g} the chance that the other users' sample holds exactly m - 1 (so that one "
                         f"user's draw decides whether a round runs) is {lower:.3g} a round, above {tail:.3g}"
                         + (f"; at most {largest} keeps it below" if largest else "; no m does: sample more users"))
    if min_clients > cap:
        raise ValueError(f"run config 'secagg-min-clients' {min_clients} exceeds the largest cohort secure aggregation "
                         f"runs ({cap} of {population} users at server-dp-sample-rate {sample_rate:g}): no round "
                         "could release a model")
    return cap, cap_edges(population, sample_rate, cap, min_clients)


def cap_edges(population: int, sample_rate: float, cap: int, min_clients: int) -> float:
    """beta of cohort_cap: P[O >= n_max] + P[O = m - 1], O ~ Binomial(N - 1, q) (the audit
    recomputes it from the ledger)."""
    from scipy.stats import binom

    others = population - 1
    return float(binom.sf(cap - 1, others, sample_rate) + binom.pmf(min_clients - 1, others, sample_rate))


def largest_min_clients(population: int, sample_rate: float, tail: float) -> int | None:
    """The largest m (at least 2, below the expected cohort) that cohort_cap accepts:
    P[the other N - 1 users' sample holds exactly m - 1] <= tail. None if no m does."""
    from scipy.stats import binom

    others = population - 1
    below = [m for m in range(2, int(others * sample_rate) + 2) if binom.pmf(m - 1, others, sample_rate) <= tail]
    return max(below, default=None)


def top_up_std(cap: int, survivors: int, noise_multiplier: float, clip: float, min_clients: int) -> float:
    """The std of the noise the server adds to the sum of `survivors` clients' vectors
    (each with its share, `noise_share_std`) so that the sum carries cap / m (z S)^2,
    whatever the number of survivors (see cohort_cap)."""
    if not min_clients <= survivors <= cap:
        raise ValueError(f"{survivors} survivors outside [m, n_max] = [{min_clients}, {cap}]")
    return noise_share_std(noise_multiplier, clip, min_clients) * math.sqrt(cap - survivors)


def clipping_range(settings: RunSettings) -> float:
    """Secure aggregation: per coordinate, what a client's vector can hold (|clipped update|
    <= S, plus its noise share), the range the quantiser keeps."""
    std = noise_share_std(settings.server_dp_noise, settings.server_dp_clip, settings.secagg_min_clients)
    return settings.server_dp_clip + CLIPPING_SIGMAS * std


def reconstruction_threshold(shares: int) -> int:
    """Secure aggregation's t: key shares that reconstruct a secret, a third of the
    neighbourhood (at least 2). Against an honest-but-curious server any t >= 2 would do (it
    asks for each client's private-mask shares or its key shares, never both); a larger t
    only raises what colluding clients would need, and a majority halted about 10% of the
    rounds of 50 clients at 20% dropout (an attacker's review, Monte Carlo: every client
    must keep t live neighbours)."""
    return max(2, math.ceil(shares / 3))
