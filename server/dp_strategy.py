"""User-level DP-FedAvg as a strategy that wraps the server's optimiser strategy (the way
Flower's DifferentialPrivacy* strategies wrap one): Poisson client sampling at rate q over
the whole population, each update clipped to L2 norm S, Gaussian noise of std z S on the
sum, divided by the expected count q N (a fixed denominator: clients that decline or fail
change nothing, and noise is added even when none replies), equal weights. The inner
strategy sees one reply, the noisy average, and only post-processes it (FedAdam's step).
With adaptive clipping (server/adaptive_clip.py) the clip follows a quantile of the update
norms; `noise` stays the accounted total and the updates get the larger `update_noise`.
The mechanism's arithmetic is in shared_model/dp_aggregation.py, shared with the in-process
population driver (simulations/population.py), which calls `aggregate_clipped` with the
clipped sum of its own vectorised clients.

The sampling and the noise come from OS entropy on every round, never from the run seed.
It protects each user (all their data) against anyone who sees the models the server
releases; the server itself sees every client's update, unless `secure` is set: then each
sampled client clips its update and adds its share of the noise, SecAgg+ gives the server
only the sum (server/secure_aggregation.py), and the server adds no noise of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from server.adaptive_clip import AdaptiveClip
from server.secure_aggregation import SecureAggregation
from server.strategy import ResumableLoop, RoundStats, SeededFedAdam
from shared_model.dp_aggregation import add_into, clipped_sum, noisy_average, stacked_updates
from shared_model.fresh_randomness import fresh_numpy_generator
from shared_model.privacy import update_noise_multiplier

CHUNK = 256  # replies stacked at a time: the clipped sum never holds every update at once


class DPFedAvg(ResumableLoop):
    def __init__(self, inner: SeededFedAdam, noise: float, clip: float, sample_rate: float,
                 adaptive: AdaptiveClip | None = None,
                 randomness: Callable[[], np.random.Generator] = fresh_numpy_generator):
        """noise: the accounted noise multiplier z; clip: the clip (the first one, if adaptive);
        randomness: where the sampling and the noise come from, a fresh generator per use:
        OS entropy (always, in a run: a test may pass a seeded one to replay a round)."""
        if not (noise > 0 and clip > 0 and 0 < sample_rate <= 1):
            raise ValueError(f"DP-FedAvg needs noise > 0, clip > 0 and a rate in (0, 1]: {noise}, {clip}, {sample_rate}")
        self.inner, self.noise, self.clip, self.sample_rate = inner, noise, clip, sample_rate
        self.adaptive = adaptive
        self.randomness = randomness
        self.unclipped = float("nan")  # the last round's noisy unclipped fraction (adaptive clipping)
        self.update_noise = noise if adaptive is None else update_noise_multiplier(noise, adaptive.count_noise)
        self.current: dict[str, np.ndarray] = {}
        self.secure: SecureAggregation | None = None  # set by the ServerApp (it needs the run's Context)

    @property
    def keys(self) -> dict[int, int]:
        return self.inner.keys

    @property
    def accounted_only(self) -> bool:
        return self.inner.accounted_only

    @property
    def expected_count(self) -> float:
        return self.sample_rate * len(self.inner.nodes)

    def train_sample(self) -> list[int]:
        """Poisson sampling: every client independently with probability q."""
        draws = self.randomness().random(len(self.inner.nodes))
        return [n for n, draw in zip(self.inner.nodes, draws) if draw < self.sample_rate]

    def begin_round(self, arrays: ArrayRecord) -> list[int]:
        """The round's Poisson sample; updates are taken against `arrays`, and the inner
        strategy steps from them."""
        self.current = {k: a.numpy() for k, a in arrays.items()}
        self.inner.set_current(arrays)
        return self.train_sample()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.train_messages(server_round, arrays, config, self.begin_round(arrays))

    def clipped_sum(self, replies: list[Message]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(the sum of the replies' updates, each clipped to the clip norm; their norms
        before clipping)."""
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in self.current.items()}
        norms = [np.zeros(0)]
        for start in range(0, len(replies), CHUNK):
            chunk = replies[start:start + CHUNK]
            models = {k: np.stack([r.content["arrays"][k].numpy() for r in chunk]) for k in self.current}
            part, chunk_norms = clipped_sum(stacked_updates(self.current, models), self.clip)
            add_into(total, part)
            norms.append(chunk_norms)
        return total, np.concatenate(norms)

    def noisy_average(self, total: dict[str, np.ndarray], norms: np.ndarray, survivors: int = 0
                      ) -> dict[str, np.ndarray]:
        """The round's release: the clipped sum plus noise over the expected count q N and,
        with adaptive clipping, the noisy unclipped fraction, which sets the next round's
        clip (`self.clip`). Under secure aggregation the sum of `survivors` vectors holds
        their noise shares, and the server adds only the top-up to the cohort cap's noise."""
        rng = self.randomness()
        server_noise = self.update_noise * self.clip if self.secure is None else self.secure.top_up_std(survivors)
        average = noisy_average(total, server_noise, self.expected_count, rng)
        if self.adaptive is not None:
            self.unclipped = self.adaptive.unclipped_fraction(norms, self.clip, self.expected_count, rng)
            self.clip = self.adaptive.next_clip(self.clip, self.unclipped)
        return average

    def aggregate_clipped(self, server_round: int, total: dict[str, np.ndarray], norms: np.ndarray,
                          survivors: int = 0) -> tuple[ArrayRecord | None, dict[str, float]]:
        """Everything after the clipped sum (noise, average, next clip, the inner step):
        (the stepped model, the round's public release figures: clip and noise split)."""
        release = self.release_figures()  # before noisy_average moves the clip
        average = self.noisy_average(total, norms, survivors)
        if self.adaptive is not None:
            release |= {"count noise": self.adaptive.count_noise, "unclipped fraction": self.unclipped}
        return self.step(server_round, average), release

    def step(self, server_round: int, average: dict[str, np.ndarray]) -> ArrayRecord | None:
        """The new model from the round's release: the inner strategy's step (FedAdam) on
        the current model plus the noisy average, as if one client had sent it."""
        return self.inner.step_to(server_round, {k: (self.current[k] + average[k]).astype(self.current[k].dtype)
                                                 for k in self.current})

    def release_figures(self) -> dict[str, float]:
        """The round's public DP figures: its clip and the updates' noise multiplier (and,
        under secure aggregation, the cohort cap and the delta its tail spends)."""
        capped = {} if self.secure is None else {"cohort cap": self.secure.cap, "cap tail": self.secure.cap_tail,
                                                 "population": len(self.inner.nodes)}
        return {"clip": self.clip, "update noise multiplier": self.update_noise, **capped}

    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float
                    ) -> tuple[RoundStats, ArrayRecord | None, MetricRecord | None]:
        """Under secure aggregation: the Poisson sample through SecAgg+, the sum stepped as
        any other (no model released when fewer than m clients survive; no round run when
        fewer than m or more than the cohort cap are sampled)."""
        if self.secure is None:
            return super().train_round(grid, server_round, arrays, config, timeout)
        nodes = self.begin_round(arrays)
        ran = self.secure.runs(len(nodes))
        total, replies, sent = self.secure.summed(grid, server_round, nodes, self.current) if ran else (None, [], {})
        stats = RoundStats(len(nodes) if ran else 0, replies, self.keys, server_round, False,
                           lambda reply: sent[reply.metadata.src_node_id])  # all the protocol's stages
        if total is None:
            return stats, None, MetricRecord({"aggregated": 0, **self.release_figures()})
        stepped, release = self.aggregate_clipped(server_round, total, np.zeros(0), len(stats.trained))
        return stats, stepped, MetricRecord({"aggregated": len(stats.trained), **release})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = [r for r in replies if not r.has_error() and "arrays" in r.content]
        stepped, release = self.aggregate_clipped(server_round, *self.clipped_sum(updates))
        return stepped, MetricRecord({"aggregated": len(updates), **release})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
