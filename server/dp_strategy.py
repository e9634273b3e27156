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

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.strategy import ResumableLoop, SeededFedAdam
from shared_model.fresh_randomness import fresh_numpy_generator


def clipped_sum(current: dict[str, np.ndarray], replies: list[Message], clip: float) -> dict[str, np.ndarray]:
    """The sum over replies of each update (reply minus current), scaled to L2 norm <= clip."""
    total = {k: np.zeros_like(v, dtype=np.float64) for k, v in current.items()}
    for reply in replies:
        delta = {k: reply.content["arrays"][k].numpy().astype(np.float64) - v for k, v in current.items()}
        norm = np.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for k in total:
            total[k] += scale * delta[k]
    return total


class DPFedAvg(ResumableLoop):
    def __init__(self, inner: SeededFedAdam, noise: float, clip: float, sample_rate: float):
        if not (noise > 0 and clip > 0 and 0 < sample_rate <= 1):
            raise ValueError(f"DP-FedAvg needs noise > 0, clip > 0 and a rate in (0, 1]: {noise}, {clip}, {sample_rate}")
        self.inner, self.noise, self.clip, self.sample_rate = inner, noise, clip, sample_rate
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
        draws = fresh_numpy_generator().random(len(self.inner.nodes))
        return [n for n, draw in zip(self.inner.nodes, draws) if draw < self.sample_rate]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = {k: a.numpy() for k, a in arrays.items()}
        return self.inner.train_messages(server_round, arrays, config, self.train_sample())

    def noisy_average(self, replies: list[Message]) -> dict[str, np.ndarray]:
        total = clipped_sum(self.current, replies, self.clip)
        rng = fresh_numpy_generator()
        return {k: (t + rng.normal(0.0, self.noise * self.clip, size=t.shape)) / self.expected_count
                for k, t in total.items()}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = [r for r in replies if not r.has_error() and "arrays" in r.content]
        average = self.noisy_average(updates)
        arrays = ArrayRecord({k: Array((self.current[k] + average[k]).astype(self.current[k].dtype))
                              for k in self.current})
        noisy = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"weight": 1.0})}), dst_node_id=0,
                        message_type=MessageType.TRAIN)
        stepped, _ = self.inner.aggregate_train(server_round, [noisy])
        return stepped, MetricRecord({"aggregated": len(updates)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
