"""User-level DP-FedAvg as a strategy that wraps the server's optimiser strategy (the way
Flower's DifferentialPrivacy* strategies wrap one): Poisson client sampling at rate q over
the whole population, each update clipped to L2 norm S, Gaussian noise of std z S on the
sum, divided by the expected count q N (a fixed denominator: clients that decline or fail
change nothing, and noise is added even when none replies), equal weights. The inner
strategy sees one reply, the noisy average, and only post-processes it (FedAdam's step).

The sampling and the noise come from OS entropy on every round, never from the run seed.
It protects each user (all their data) against anyone who sees the models the server
releases; the server itself sees every client's update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.dp_aggregation import add_into, clipped_sum, noisy_average, stacked_updates
from server.strategy import ResumableLoop, SeededFedAdam
from shared_model.fresh_randomness import fresh_numpy_generator

CHUNK = 256  # replies stacked at a time: the clipped sum never holds every update at once


class DPFedAvg(ResumableLoop):
    """randomness: where the sampling and the noise come from, a fresh generator per use;
    OS entropy (always, in a run: a test may pass a seeded one to replay a round)."""

    def __init__(self, inner: SeededFedAdam, noise: float, clip: float, sample_rate: float,
                 randomness: Callable[[], np.random.Generator] = fresh_numpy_generator):
        if not (noise > 0 and clip > 0 and 0 < sample_rate <= 1):
            raise ValueError(f"DP-FedAvg needs noise > 0, clip > 0 and a rate in (0, 1]: {noise}, {clip}, {sample_rate}")
        self.inner, self.noise, self.clip, self.sample_rate = inner, noise, clip, sample_rate
        self.randomness = randomness
        self.current: dict[str, np.ndarray] = {}

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

    def clipped_sum(self, replies: list[Message]) -> dict[str, np.ndarray]:
        """The sum of the replies' updates, each clipped to the clip norm."""
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in self.current.items()}
        for start in range(0, len(replies), CHUNK):
            chunk = replies[start:start + CHUNK]
            models = {k: np.stack([r.content["arrays"][k].numpy() for r in chunk]) for k in self.current}
            add_into(total, clipped_sum(stacked_updates(self.current, models), self.clip))
        return total

    def noisy_average(self, total: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The clipped sum plus N(0, z^2 S^2) noise, over the expected count q N."""
        return noisy_average(total, self.noise * self.clip, self.expected_count, self.randomness())

    def step(self, server_round: int, average: dict[str, np.ndarray]) -> ArrayRecord | None:
        """The inner strategy's step, from the current model, on the noisy average update:
        the one reply it sees."""
        arrays = ArrayRecord({k: Array((self.current[k] + average[k]).astype(self.current[k].dtype))
                              for k in self.current})
        noisy = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"weight": 1.0})}), dst_node_id=0,
                        message_type=MessageType.TRAIN)
        stepped, _ = self.inner.aggregate_train(server_round, [noisy])
        return stepped

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = [r for r in replies if not r.has_error() and "arrays" in r.content]
        stepped = self.aggregate_clipped(server_round, self.clipped_sum(updates))
        return stepped, MetricRecord({"aggregated": len(updates)})

    def aggregate_clipped(self, server_round: int, total: dict[str, np.ndarray]) -> ArrayRecord | None:
        """Everything after the clipped sum (noise, average, the inner step): what the
        in-process population driver hands its own clipped sum to."""
        return self.step(server_round, self.noisy_average(total))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
