"""Sizing a DP-FedAvg deployment before training (`fedrec privacy plan`): the noise
multiplier that a user-level budget allows, and how large that noise is on the mean update,
in units of the clip norm S, which is what decides whether training learns anything.

Per round DP-FedAvg samples every user with probability q = C / N (C: the expected cohort),
adds N(0, z^2 S^2) per coordinate to the sum of the clipped updates and divides by C. The
noise on the mean then has std z S / C per coordinate and an expected L2 norm of about
z S sqrt(P) / C over P parameters, while a clipped update has norm <= S: the mean of the
updates is buried in noise when that ratio is well above 1.

Against the server the amplification by sampling does not hold: it draws the sample and
knows who took part. With secure aggregation it sees only sums of noised updates, and a
user's epsilon against it is that of a Gaussian at rate 1 over the rounds the user took
part in: about q T of them, more for an unlucky user (the plan, and a run's summary, bound
them from T and q, except with probability a thousandth of delta, which delta pays for:
privacy.server_epsilon). Without secure aggregation the server reads every update: no guarantee.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from shared_model.privacy import (RELATION, epsilon, ftrl_noise_multiplier, noise_multiplier, server_epsilon,
                                  update_noise_multiplier)
from shared_model.square_root_noise import release_coefficients


def round_up(value: float, digits: int = 4) -> float:
    """`value` rounded up to `digits` significant digits: a printed noise multiplier must
    not be below the one that reaches the budget."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


@dataclass(frozen=True)
class Plan:
    users: int
    cohort: float  # expected clients a round
    rounds: int
    epsilon: float  # the user-level target
    delta: float
    accountant: str
    parameters: int  # P: trainable parameters (the update's length)
    sample_rate: float  # q = cohort / users
    noise_multiplier: float  # z, accounted; rounded up to 4 significant digits
    round_epsilon: float  # one round alone, at delta
    count_noise: float | None  # adaptive clipping's sigma_b (None: a fixed clip)
    update_noise_multiplier: float  # z_delta: what the updates get (z without adaptive clipping)
    noise_std: float  # per coordinate of the mean update, in units of S: z_delta / C
    noise_norm: float  # expected L2 norm of the noise on the mean update, in units of S: z_delta sqrt(P) / C
    signal: float  # the mean clipped update's L2 norm, in units of S (given: measured in simulation)
    signal_to_noise: float  # signal / noise_norm: what decides quality
    server_rounds: int  # secure aggregation: the rounds a user takes part in, at most (privacy.server_epsilon)
    server_epsilon: float  # against the server: a Gaussian at rate 1 over server_rounds rounds
    ftrl_noise_multiplier: float  # DP-FTRL's z for the same epsilon: trees of floor(N / C) rounds, no sampling
    ftrl_square_root_noise_multiplier: float  # the same with dp-ftrl-noise = "square-root" (epochs of floor(N / C))
    ftrl_release_noise_std: float  # square-root: per coordinate of a round's release (its mean), in units of S, at most
    relation: str = RELATION

    def to_json(self) -> dict:
        return asdict(self)


SIGNAL = 0.11  # the mean clipped update in units of S, synthetic worlds, clip at a low quantile of the norms


def make_plan(users: int, cohort: float, rounds: int, target_epsilon: float, delta: float, accountant: str,
              parameters: int, count_noise: float | None = None, signal: float = SIGNAL) -> Plan:
    """The plan; ValueError if the numbers are no deployment (its message names the flag)."""
    if not 0 < cohort <= users:
        raise ValueError(f"--cohort {cohort:g} must be in (0, --users {users}]: the expected clients a round")
    q = cohort / users
    z = round_up(noise_multiplier(target_epsilon, q, rounds, delta, accountant))
    update_noise = z
    if count_noise is not None:
        try:
            update_noise = update_noise_multiplier(z, count_noise)
        except ValueError:
            raise ValueError(f"--count-noise {count_noise:g} must exceed half the noise multiplier ({z / 2:g}): "
                             "the count alone would spend the whole budget") from None
    noise_norm = update_noise * math.sqrt(parameters) / cohort
    against_server, taken_part = server_epsilon(z, q, rounds, delta, accountant)
    epoch = int(users // cohort)
    ftrl_tree, ftrl_square_root = (round_up(ftrl_noise_multiplier(target_epsilon, rounds, epoch, delta, accountant,
                                                                  kind)) for kind in ("tree", "square-root"))
    # a release carries sum_k g_k z_k: its std grows over an epoch's rounds towards sqrt(4 / pi) z S / C
    release_factor = math.sqrt(float(np.sum(release_coefficients(min(rounds, epoch)) ** 2)))
    return Plan(users, cohort, rounds, target_epsilon, delta, accountant, parameters, q, z,
                epsilon([(z, q, 1)], delta, accountant), count_noise, update_noise, update_noise / cohort,
                noise_norm, signal, signal / noise_norm, taken_part, against_server, ftrl_tree, ftrl_square_root,
                ftrl_square_root * release_factor / cohort)


def format_plan(plan: Plan) -> str:
    lines = [
        f"DP-FedAvg, user level ({plan.relation} one user, {plan.accountant} accountant, Poisson sampling of "
        f"every user every round)",
        f"  users N                       {plan.users:,}",
        f"  expected cohort C             {plan.cohort:,g}",
        f"  sampling rate q = C / N       {plan.sample_rate:.4g}",
        f"  rounds T                      {plan.rounds:,}",
        f"  noise multiplier z            {plan.noise_multiplier:.4g}   (epsilon {plan.epsilon:g} at delta "
        f"{plan.delta:g} after T rounds)",
        f"  epsilon of one round          {plan.round_epsilon:.4g}   (same delta)",
    ]
    if plan.count_noise is not None:
        lines.append(f"  adaptive clipping             count noise {plan.count_noise:g}: the updates get noise "
                     f"multiplier {plan.update_noise_multiplier:.4g} "
                     f"(+{plan.update_noise_multiplier / plan.noise_multiplier - 1:.2%}), z is accounted")
    z = "z" if plan.count_noise is None else "z_delta"
    lines += [
        f"  noise on the mean update      {plan.noise_std:.3g} S per coordinate ({z} / C; S = the clip norm)",
        f"                                {plan.noise_norm:.3g} S in L2 norm ({z} sqrt(P) / C, P = "
        f"{plan.parameters:,} parameters)",
    ]
    lines.append(f"  signal to noise               {plan.signal_to_noise:.3g}   (the mean clipped update, "
                 f"{plan.signal:g} S, over that noise)")
    verdict = ("at least 1: a round's mean update outweighs its noise" if plan.signal_to_noise >= 1 else
               "below 1: the noise outweighs a round's mean update (a larger cohort, fewer rounds, a larger "
               "epsilon, or a clip nearer the update norms raises it)")
    lines += [f"  -> {verdict}",
              f"  against the server            epsilon {plan.server_epsilon:.4g} with secure-aggregation = true, "
              f"for a user in {plan.server_rounds} rounds",
              "                                (more only with probability a thousandth of delta, charged; it "
              "knows whom it samples: no amplification)",
              "                                (without secure aggregation it reads every update: no guarantee)",
              f"  DP-FTRL instead               noise multiplier {plan.ftrl_noise_multiplier:.4g} for the same epsilon "
              f"(server-dp-mechanism = \"dp-ftrl\": C a round, trees of {int(plan.users // plan.cohort):,} rounds, "
              "each user once a tree, no sampling assumed)",
              f"                                noise multiplier {plan.ftrl_square_root_noise_multiplier:.4g} with "
              "dp-ftrl-noise = \"square-root\" (the square-root factorization: a smaller z, each user once an epoch)",
              f"                                its noise on a round's release: {plan.ftrl_release_noise_std:.3g} S per "
              f"coordinate, {plan.ftrl_release_noise_std / plan.noise_std:.3g} times DP-FedAvg's above",
              "                                (FedAdam divides its steps by the releases' RMS: raise "
              "server-learning-rate with this ratio)"]
    return "\n".join(lines)
