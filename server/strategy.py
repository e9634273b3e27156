"""FedAdam with reproducible client sampling, a decaying server rate, and round accounting.

Flower's FedAdam (FedAvg weighted by example count, then an Adam step on the server) is
extended, not copied: sampling is seeded per round over clients ordered by a stable key
(node ids change between runs), replies are aggregated in that order (floating-point
sums then do not depend on arrival order), and the optimiser state can be saved and
restored for resuming.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam


class RoundStats:
    """What happened to the messages of one round."""

    def __init__(self, sent: int, replies: list[Message]):
        self.sent = sent
        self.errors = sum(1 for r in replies if r.has_error())
        self.timeouts = sent - len(replies)
        self.ok = [r for r in replies if not r.has_error()]
        self.trained = [r for r in self.ok if "arrays" in r.content]
        self.declined = len(self.ok) - len(self.trained)  # clients whose privacy budget is spent
        self.upload_bytes = [sum(a.numpy().nbytes for a in r.content["arrays"].values()) for r in self.trained]

    @property
    def left_out(self) -> int:
        """Errors and timeouts (declines are answers, counted apart)."""
        return self.sent - len(self.ok)


class SeededFedAdam(FedAdam):
    def __init__(self, keys: dict[int, int], clients_per_round: int, seed: int,
                 server_lr: float, half_life: float):
        super().__init__(eta=server_lr, beta_1=0.9, beta_2=0.99, tau=1e-8, weighted_by_key="weight",
                         min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.nodes = sorted(keys, key=keys.get)  # node ids in the order of their stable keys
        self.keys = keys
        self.clients_per_round = clients_per_round or len(self.nodes)
        self.seed = seed
        self.base_lr = server_lr
        self.half_life = half_life

    def sample(self, server_round: int, count: int, purpose: int = 0) -> list[int]:
        count = min(count, len(self.nodes))
        rng = np.random.default_rng([self.seed, server_round, purpose])
        return [self.nodes[i] for i in sorted(rng.choice(len(self.nodes), size=count, replace=False))]

    def server_lr(self, server_round: int) -> float:
        return self.base_lr * 0.5 ** ((server_round - 1) / self.half_life)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.train_messages(server_round, arrays, config, self.sample(server_round, self.clients_per_round))

    def train_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       nodes: list[int]) -> list[Message]:
        """Training messages to these nodes (a wrapping strategy may choose them)."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=record, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = sorted(replies, key=lambda r: self.keys.get(r.metadata.src_node_id, -1))
        self.eta = self.server_lr(server_round)
        return super().aggregate_train(server_round, ordered)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        state = {}
        for prefix, moments in (("adam-m/", self.m_t), ("adam-v/", self.v_t)):
            state.update({prefix + k: v for k, v in (moments or {}).items()})
        return state

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        m = {k[len("adam-m/"):]: v for k, v in state.items() if k.startswith("adam-m/")}
        v = {k[len("adam-v/"):]: v for k, v in state.items() if k.startswith("adam-v/")}
        self.m_t, self.v_t = (m or None), (v or None)
