"""Privacy accounting: epsilon of accountant events (noise multiplier, sample rate, steps),
the noise for a target epsilon, the split of that noise under adaptive clipping, the
per-interaction epsilon of example-level DP-SGD, and the one-run audit lower bound.

One neighbouring relation everywhere: add/remove one unit (an example or a user). Every
accountant below computes it (Opacus RDP and PRV, dp-accounting RDP and PLD by default).
Nothing a private client releases depends on how many units it holds (sample rate, steps
and the normaliser of the noisy sum are public settings), so add/remove is the right one.

Like an Opacus accountant's `history`, the events are a plain list of (noise_multiplier,
sample_rate, steps) entries (easy to persist and audit). Accountants, by name:
  rdp  Opacus's RDP accountant       (independent twin: dp-accounting's RDP)
  prv  Opacus's PRV accountant       (independent twin: dp-accounting's PLD)
  pld  dp-accounting's PLD           (independent twin: Opacus's PRV)
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import numpy as np

from shared_model.square_root_noise import squared_sensitivity


Events = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)
RELATION = "add/remove"
ACCOUNTANTS = ("rdp", "prv", "pld")
TWIN = {"rdp": "dp-accounting-rdp", "prv": "pld", "pld": "prv"}
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders


def _dp_event(events: Iterable[tuple[float, float, int]]):
    import dp_accounting  # imported on use: it brings absl, which logs every record twice

    events = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), int(steps))
        for z, q, steps in events if steps > 0]
    return dp_accounting.ComposedDpEvent(events)


@functools.lru_cache(maxsize=65536)
def _rdp_per_step(sample_rate: float, noise: float) -> tuple[float, ...]:
    """Opacus's RDP curve of one step over RDP_ORDERS. RDP adds up over steps, and this
    curve is the costly part (about 0.5 s at large sample rates), so a client that checks
    its budget every round computes it once."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=sample_rate, noise_multiplier=noise, steps=1, orders=RDP_ORDERS))


def check_step(noise: float, sample_rate: float, steps: int) -> None:
    """An event the accountants can take: a finite positive noise multiplier, a rate
    in (0, 1] and a whole number of steps (zero noise or infinities are no mechanism)."""
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise multiplier must be a finite positive number, not {noise}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], not {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be 0 or more, not {steps}")


def epsilon(events: Events, delta: float, accountant: str = "rdp") -> float:
    """Epsilon after the events (0 when nothing was spent)."""
    events = tuple((float(z), float(q), int(t)) for z, q, t in events if int(t) > 0)
    for z, q, t in events:
        check_step(z, q, t)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    events = merged_unsampled(events)
    return _epsilon(events, float(delta), accountant) if events else 0.0


def merged_unsampled(events: tuple[tuple[float, float, int], ...]) -> tuple[tuple[float, float, int], ...]:
    """The events with every rate-1 Gaussian step composed into one, at z = (sum t / z^2)^(-1/2):
    exact for every accountant here (Gaussians compose to a Gaussian), and what keeps a long
    DP-FTRL run's accounting (one distinct event a round with the square-root noise) from
    growing with the rounds in time and in the cache."""
    sampled = tuple(event for event in events if event[1] < 1.0)
    precision = sum(t / z**2 for z, q, t in events if q == 1.0)
    return sampled + ((precision ** -0.5, 1.0, 1),) if precision else sampled


@functools.lru_cache(maxsize=4096)
def _epsilon(events: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """A client asks twice a round (may the next round run? what was spent?) with the same
    events, and clients with as many examples share event lists; PRV and PLD take a tenth of
    a second or more per call, which made a DP round several times slower."""
    # Opacus is imported on use: seconds of start-up that a non-private ClientApp process skips
    if accountant == "rdp":  # what Opacus's RDPAccountant computes, with its per-step curves cached
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(np.asarray(_rdp_per_step(q, z)) * t for z, q, t in events)
        return float(get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0])
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        acc.history = list(events)  # Opacus's own name for its events
        return float(acc.get_epsilon(delta))
    if accountant == "pld":
        from dp_accounting import pld as dp_pld

        acc = dp_pld.PLDAccountant()
        acc.compose(_dp_event(events))
        return float(acc.get_epsilon(delta))
    if accountant == "dp-accounting-rdp":
        from dp_accounting import rdp as dp_rdp

        acc = dp_rdp.RdpAccountant(RDP_ORDERS)
        acc.compose(_dp_event(events))
        return float(acc.get_epsilon(delta))
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, not {accountant!r}")


SERVER_TAIL_SHARE = 1e-3  # of delta: the chance a user takes part in more rounds than the bound says


def binomial_bound(trials: int, rate: float, tail: float) -> tuple[int, float]:
    """(k, beta): the smallest k that Binomial(trials, rate) exceeds with probability
    beta <= tail (the rounds a Poisson-sampled user takes part in; the others' sample under
    secure aggregation's cohort cap)."""
    from scipy.stats import binom

    k = min(trials, int(binom.isf(tail, trials, rate)))
    while k > 0 and binom.sf(k - 1, trials, rate) <= tail:  # isf's float rounding, either way
        k -= 1
    while binom.sf(k, trials, rate) > tail:
        k += 1
    return k, float(binom.sf(k, trials, rate))


def server_epsilon(noise: float, rate: float, rounds: int, delta: float, accountant: str) -> tuple[float, int]:
    """Secure aggregation's epsilon against the honest-but-curious server, which knows whom
    it sampled (no amplification): (epsilon, k). Each round a user takes part in is a
    Gaussian with multiplier z at rate 1 (it sees only sums carrying the full noise); a
    user takes part in at most k of the `rounds` (binomial_bound, at a thousandth of
    delta) except with probability beta, which the accountant's delta pays for. From public
    figures only: the rounds each user actually took part in are the sample's secret."""
    k, beta = binomial_bound(rounds, rate, SERVER_TAIL_SHARE * delta)
    return epsilon([(noise, 1.0, k)], delta - beta, accountant), k


def tree_steps(tree_round: int) -> int:
    """What round t of a DP-FTRL tree adds to its accountant events: Gaussian steps at rate
    1 and the tree's noise multiplier. A tree of T rounds, one client in at most one round,
    is one Gaussian mechanism on ceil(log2(T + 1)) node sums (shared_model/tree_aggregation.py),
    RDP alpha ceil(log2(T + 1)) / (2 z^2): that many Gaussian steps at rate 1 (same RDP
    curve), one more each time t reaches a power of two, none otherwise."""
    if tree_round < 1:
        raise ValueError(f"a tree's rounds count from 1, not {tree_round}")
    return int(tree_round).bit_length() - int(tree_round - 1).bit_length()


def ftrl_steps(rounds: int, tree_rounds: int) -> int:
    """The accountant steps (Gaussian, rate 1) of `rounds` DP-FTRL rounds in trees of
    `tree_rounds` rounds each (server/dp_ftrl.py: floor(N / C) for N clients, C a round)."""
    full, rest = divmod(rounds, tree_rounds)
    return full * int(tree_rounds).bit_length() + int(rest).bit_length()


def ftrl_events(noise: float, rounds: int, tree_rounds: int, kind: str = "tree") -> Events:
    """The accountant events of `rounds` DP-FTRL rounds at noise multiplier z in trees (epochs)
    of `tree_rounds`: the trees' Gaussian steps at rate 1, or ("square-root") one Gaussian at
    z / sqrt(the run's squared sensitivity), what the ledger's per-round events compose to."""
    if kind == "tree":
        return [(noise, 1.0, ftrl_steps(rounds, tree_rounds))]
    return [(noise / math.sqrt(squared_sensitivity(rounds, tree_rounds)), 1.0, 1)]


def ftrl_noise_multiplier(target_epsilon: float, rounds: int, tree_rounds: int, delta: float,
                          accountant: str = "rdp", kind: str = "tree") -> float:
    """DP-FTRL's z for `target_epsilon` after `rounds` rounds in trees (epochs) of `tree_rounds`:
    `ftrl_events` at z = 1 is one event (scale, 1, steps), a Gaussian whose noise multiplier is
    z times scale, so z is the steps' noise multiplier over that scale."""
    (scale, _, steps), = ftrl_events(1.0, rounds, tree_rounds, kind)
    return noise_multiplier(target_epsilon, 1.0, steps, delta, accountant) / scale


def tree_epsilon(trees: list[tuple[int, float, str]], delta: float) -> float:
    """Epsilon of DP-FTRL's trees (epochs) by RDP, each from one dp-accounting event: the tree
    aggregation event for a tree, one Gaussian of sensitivity sqrt(sum_{k<T} f_k^2) for the
    square-root noise (zero-out neighbours: a user's updates replaced by none, which is
    add/remove for sums over a fixed normaliser): the audit's independent twin of the
    ledger's per-round events. trees: (rounds, noise multiplier, "tree" or "square-root")."""
    import dp_accounting
    from dp_accounting import rdp as dp_rdp

    acc = dp_rdp.RdpAccountant(RDP_ORDERS, dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for rounds, noise, kind in trees:
        acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(noise, rounds) if kind == "tree" else
                    dp_accounting.GaussianDpEvent(noise / math.sqrt(squared_sensitivity(rounds, rounds))))
    return float(acc.get_epsilon(delta))


def independent_epsilon(events: Events, delta: float, accountant: str) -> float:
    """The same epsilon from a second implementation (for audits)."""
    return epsilon(events, delta, TWIN[accountant])


@functools.lru_cache(maxsize=4096)  # pure, and clients with equal data sizes ask the same
def noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                     accountant: str = "rdp", tolerance: float = 0.005) -> float:
    """The smallest noise multiplier whose epsilon after `steps` is at most the target."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be a finite positive number, not {target_epsilon}")
    low, high = 0.0, 1.0
    while epsilon([(high, sample_rate, steps)], delta, accountant) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {steps} steps")
    while high - low > tolerance * high:
        middle = (low + high) / 2
        if epsilon([(middle, sample_rate, steps)], delta, accountant) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


def total_noise_multiplier(update_noise: float, count_noise: float) -> float:
    """The noise multiplier z that DP-FedAvg with adaptive clipping is accounted at, from the
    update's noise multiplier z_delta and the std sigma_b of the noise on the centred count:
    z^-2 = z_delta^-2 + (2 sigma_b)^-2 (Andrew, Thakkar, McMahan and Ramaswamy 2021,
    "Differentially private learning with adaptive clipping", Theorem 1).

    Why: a round releases, from one Poisson sample of clients, the sum of updates clipped to
    C plus N(0, z_delta^2 C^2 I) and the count sum_i (b_i - 1/2) plus N(0, sigma_b^2), where
    b_i = 1 if client i's update norm is <= C. Divide the first by z_delta C and the second
    by sigma_b: the pair is one sum over clients of v_i = (clipped update_i / (z_delta C),
    (b_i - 1/2) / sigma_b) plus N(0, I). Adding or removing one client moves it by v_i, with
    |v_i|^2 <= z_delta^-2 + (2 sigma_b)^-2 = z^-2: one Gaussian mechanism of noise multiplier
    z on the same Poisson sample, so a round is the event (z, q, 1). The count is centred at
    1/2 (as in the paper and TF Privacy's QuantileEstimatorQuery) because that makes its
    add/remove sensitivity 1/2; an uncentred count (sensitivity 1) would need
    z^-2 = z_delta^-2 + sigma_b^-2. The next clip depends only on released values, and the
    accountants compose adaptively chosen mechanisms."""
    for name, value in (("update noise multiplier", update_noise), ("count noise", count_noise)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite positive number, not {value}")
    return (update_noise ** -2 + (2 * count_noise) ** -2) ** -0.5


def update_noise_multiplier(total_noise: float, count_noise: float) -> float:
    """z_delta, the noise multiplier on the updates that leaves the planned total z for a
    count noise sigma_b (see total_noise_multiplier): (z^-2 - (2 sigma_b)^-2)^(-1/2), finite
    only if sigma_b > z / 2."""
    if not (math.isfinite(total_noise) and total_noise > 0):
        raise ValueError(f"noise multiplier must be a finite positive number, not {total_noise}")
    if not (math.isfinite(count_noise) and 2 * count_noise > total_noise):
        raise ValueError(f"count noise {count_noise} must exceed half the noise multiplier ({total_noise / 2:g}): "
                         f"the count alone would spend the whole budget")
    return (total_noise ** -2 - (2 * count_noise) ** -2) ** -0.5


def interaction_epsilon(events: Events, window: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon for one interaction under example-level DP-SGD, from the mechanism itself.

    One interaction is the target of one example and sits in the input windows of up to W
    later ones: removing it removes one example and changes W others, each change moving
    the clipped sum by up to 2C, so the sum moves by up to (2W + 1) C. Each step is then a
    Gaussian mechanism with noise multiplier z / (2W + 1); sampling amplification is not
    claimed (the 2W + 1 examples are not one Poisson-sampled unit), so the rate is taken
    as 1. Same delta as the example-level figure (a group bound's delta grows to 1)."""
    group = 2 * window + 1
    return epsilon([(z / group, 1.0, t) for z, _, t in events], delta, accountant)


def audit_p_value(canaries: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """P[at least `correct` right guesses out of `guesses`] under (eps, delta)-DP, with each
    of `canaries` canaries included independently with probability 1/2 (Steinke, Nasr and
    Jagielski 2023, "Privacy auditing with one (1) training run")."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError("need 0 <= correct <= guesses <= canaries")
    from scipy import stats

    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomised response
    beta = stats.binom.sf(correct - 1, guesses, q)
    alpha, tail = 0.0, 0.0
    for i in range(1, correct + 1):
        tail += stats.binom.pmf(correct - i, guesses, q)
        alpha = max(alpha, tail / i)
    return min(1.0, beta + alpha * delta * 2 * canaries)


def audit_lower_bound(canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that the guesses reject at this confidence (0 if none)."""
    if audit_p_value(canaries, guesses, correct, 0.0, delta) >= 1 - confidence:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(canaries, guesses, correct, high, delta) < 1 - confidence:
        low, high = high, 2 * high
        if high > 1e3:
            return high
    while high - low > 1e-6:
        middle = (low + high) / 2
        if audit_p_value(canaries, guesses, correct, middle, delta) < 1 - confidence:
            low = middle
        else:
            high = middle
    return low
