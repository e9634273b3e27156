"""User-level DP-FedAvg: Poisson client sampling at rate q, each update clipped to L2 norm
S, Gaussian noise of std z*S on the sum, division by the expected count q*N (a fixed
denominator), equal weights. The server's Adam step then only post-processes the noisy
average. A client that declines or fails contributes nothing; the denominator stays.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from server.strategy import SeededFedAdam


class ClippedNoisySum(FedAvg):
    """FedAvg's averaging step replaced by the DP-FedAvg sum (sits under FedAdam's Adam step)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if "arrays" in r.content]
        current = self.current_arrays
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in current.items()}
        for reply in replies:
            delta = {k: reply.content["arrays"][k].numpy().astype(np.float64) - v for k, v in current.items()}
            norm = np.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
            scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
            for k in total:
                total[k] += scale * delta[k]
        rng = np.random.default_rng([self.seed, server_round, 7])
        expected = self.sample_rate * len(self.nodes)
        noisy = {k: (t + rng.normal(0.0, self.noise * self.clip, size=t.shape)) / expected for k, t in total.items()}
        arrays = ArrayRecord({k: Array((current[k] + noisy[k]).astype(current[k].dtype)) for k in current})
        losses = [float(r.content["metrics"]["train-loss"]) for r in replies]
        return arrays, MetricRecord({"train-loss": float(np.mean(losses)) if losses else float("nan")})


class DPFedAdam(SeededFedAdam, ClippedNoisySum):
    def __init__(self, keys: dict[int, int], seed: int, server_lr: float, half_life: float,
                 noise: float, clip: float, sample_rate: float):
        super().__init__(keys, 0, seed, server_lr, half_life)
        self.noise, self.clip, self.sample_rate = noise, clip, sample_rate

    def train_sample(self, server_round: int) -> list[int]:
        """Poisson sampling: every client independently with probability q."""
        rng = np.random.default_rng([self.seed, server_round, 0])
        return [n for n, draw in zip(self.nodes, rng.random(len(self.nodes))) if draw < self.sample_rate]
