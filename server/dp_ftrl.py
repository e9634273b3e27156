"""User-level DP-FTRL (`server-dp-mechanism = "dp-ftrl"`): DP-FedAvg's clipping and
aggregation without sampling, the noise from tree aggregation (Kairouz et al. 2021), for
deployments where clients cannot be Poisson-sampled (devices check in when they can).

Each round takes `clients-per-round` C clients that have not yet taken part in the current
tree (chosen among them at random: the guarantee does not rest on the choice), clips each
update to S, and releases (sum + the round's tree noise) / C, whose prefix sums within a tree
carry popcount(t) nodes' noise; or, with `dp-ftrl-noise = "square-root"`, the noise of the
square-root factorization (shared_model/square_root_noise.py), whose prefix sums carry less
noise at the same epsilon, at the cost of keeping the epoch's draws. `dp-ftrl-step` says what the model does with each release:
"fedadam" (the default) gives it to the server's FedAdam, as DP-FedAvg does: its steps are not
linear in the releases, but with zero updates its model's noise after 50 rounds is 0.036 of
what the same FedAdam makes of independent noise at the same z (tests/test_dp_ftrl.py).
"ftrl" steps by `dp-ftrl-learning-rate` times a heavy-ball velocity (`dp-ftrl-momentum` beta:
beta times the last velocity plus the release; Kairouz et al.'s FTRLM), so that within a tree
the model is its start plus the rate times sum_s beta^(t-s) of the noisy prefix sums (plus
the decaying velocity a previous tree left). Both are post-processing of the releases: no
privacy cost. A tree
ends when fewer than C clients are left that it has not had (about N / C rounds: an epoch
over the population) and a new one starts, with all clients and fresh noise; a resumed run
starts a new tree too (the old tree's noises are not kept). So a client is in at most one
round of a tree, and a tree of T rounds is a Gaussian mechanism on ceil(log2(T + 1)) node
sums at once: per tree, RDP alpha ceil(log2(T + 1)) / (2 z^2), with no amplification; with
the square-root noise, one Gaussian of sensitivity sqrt(sum_{k<T} f_k^2) per epoch. The
ledger records each round's place in its tree (`tree-round`) and what it added: to the tree's
depth (shared_model/privacy.py's `tree_steps`), or to the squared sensitivity
(`square_root_weight`).

Like DP-FedAvg, it protects each user against anyone who sees the models the server
releases, not against the server: it sees every update (secure aggregation is refused).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord

from server.dp_strategy import DPFedAvg
from server.strategy import SeededFedAdam
from shared_model.fresh_randomness import fresh_numpy_generator
from shared_model.settings import FTRL_NOISES, FTRL_STEPS
from shared_model.square_root_noise import SquareRootNoise
from shared_model.tree_aggregation import TreeNoise


MAX_KEPT_NOISE_BYTES = 4 * 2**30  # the square-root noise keeps an epoch's draws: floor(N / C) models' worth


class DPFTRL(DPFedAvg):
    def __init__(self, inner: SeededFedAdam, noise: float, clip: float, cohort: int, learning_rate: float,
                 momentum: float = 0.0, step: str = "fedadam", noise_kind: str = "square-root",
                 randomness: Callable[[], np.random.Generator] = fresh_numpy_generator):
        """cohort: C, the clients a round (all of them if 0 or more than there are);
        learning_rate: the server's step on each release (constant: FTRL's); momentum: beta of
        the heavy-ball velocity the model steps by (0: the release itself); step: "fedadam" (the
        inner optimiser's step on each release) or "ftrl" (learning_rate times the velocity);
        noise_kind: "square-root" or "tree"."""
        if step not in FTRL_STEPS:
            raise ValueError(f"DP-FTRL's step must be one of {FTRL_STEPS}, not {step!r}")
        if noise_kind not in FTRL_NOISES:
            raise ValueError(f"DP-FTRL's noise must be one of {FTRL_NOISES}, not {noise_kind!r}")
        self.noise_kind = noise_kind
        self.learning_rate, self.momentum, self.step_kind = learning_rate, momentum, step
        self.velocity: dict[str, np.ndarray] = {}  # sum_s beta^(t-s) release_s (not checkpointed: a resumed run starts at 0)
        population = len(inner.nodes)
        self.cohort = min(cohort, population) if cohort > 0 else population
        super().__init__(inner, noise, clip, self.cohort / population, None, randomness)
        self.tree_round = 0  # the last round's place in the current tree (0: a new tree starts)
        self.had: set[int] = set()  # the clients the current tree has taken
        self.tree: TreeNoise | SquareRootNoise | None = None

    @property
    def expected_count(self) -> float:
        return float(self.cohort)

    def train_sample(self) -> list[int]:
        """C clients the current tree has not had; a new tree when fewer are left."""
        left = [n for n in self.inner.nodes if n not in self.had]
        if len(left) < self.cohort or self.tree is None:
            self.tree_round, self.had, left = 0, set(), list(self.inner.nodes)
            self.tree = None
        chosen = self.randomness().choice(len(left), size=self.cohort, replace=False)
        nodes = [left[i] for i in sorted(chosen)]
        self.had.update(nodes)
        self.tree_round += 1
        return nodes

    def begin_round(self, arrays: ArrayRecord) -> list[int]:
        nodes = super().begin_round(arrays)
        if self.tree is None:
            shapes = {k: v.shape for k, v in self.current.items()}
            if self.noise_kind == "square-root":
                epoch = len(self.inner.nodes) // self.cohort
                kept = epoch * sum(int(np.prod(s)) for s in shapes.values()) * 8
                if kept > MAX_KEPT_NOISE_BYTES:
                    raise ValueError(f"dp-ftrl-noise = 'square-root' would keep {kept / 2**30:.1f} GiB of noise draws "
                                     f"an epoch ({epoch} rounds of the model's values; "
                                     f"at most {MAX_KEPT_NOISE_BYTES / 2**30:.0f} GiB): raise clients-per-round or "
                                     "use dp-ftrl-noise = 'tree'")
            kind = TreeNoise if self.noise_kind == "tree" else SquareRootNoise
            self.tree = kind(shapes, self.update_noise * self.clip, self.randomness)
        return nodes

    def noisy_average(self, total: dict[str, np.ndarray], norms: np.ndarray, survivors: int = 0
                      ) -> dict[str, np.ndarray]:
        """(the round's clipped sum + its round's share of the tree's, or the factorization's, noise) / C."""
        noise = self.tree.round_noise(self.tree_round)
        return {k: (t + noise[k]) / self.expected_count for k, t in total.items()}

    def step(self, server_round: int, average: dict[str, np.ndarray]) -> ArrayRecord | None:
        """FedAdam's step on the release, or ("ftrl") the model plus the learning rate times the
        velocity: beta times the last one plus the release (plain FTRL when beta is 0)."""
        if self.step_kind == "fedadam":
            return super().step(server_round, average)
        self.velocity = {k: self.momentum * self.velocity[k] + a if k in self.velocity else a for k, a in average.items()}
        return ArrayRecord({k: Array((v + self.learning_rate * self.velocity[k]).astype(v.dtype))
                            for k, v in self.current.items()})

    def release_figures(self) -> dict[str, float]:
        return {**super().release_figures(), "tree round": self.tree_round, "population": len(self.inner.nodes),
                "cohort": self.cohort}
