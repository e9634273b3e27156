"""FedAdam with reproducible client sampling, a decaying server rate, round accounting and
a resumable round loop.

Flower's FedAdam (FedAvg weighted by example count, then an Adam step on the server) is
extended, not copied: sampling is seeded per round over clients ordered by a stable key
(node ids change between runs), replies are aggregated in that order (floating-point
sums then do not depend on arrival order), and the optimiser state can be saved and
restored for resuming.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, Result, Strategy

from shared_model.ledger import LedgerEntry, LedgerError
from shared_model.metrics import RankingSums, metrics_from_sums
from shared_model.upload import decode_upload

STAGES = ("valid", "test")


def client_entry(reply: Message, keys: dict[int, int], server_round: int) -> LedgerEntry | None:
    """A reply's ledger entry, attributed to the node that sent it (not to whatever client
    the entry names), or None (logged) if it is not a valid client entry."""
    client = str(keys.get(reply.metadata.src_node_id))
    try:
        entry = LedgerEntry.from_json(dict(reply.content["ledger"]), f"client {client}'s entry, round {server_round}")
    except LedgerError as error:
        log(WARNING, "fedrec: %s", error)
        return None
    if entry.client != client or entry.round != server_round:
        log(WARNING, "fedrec: client %s sent an entry for client %s, round %d", client, entry.client, entry.round)
        return None
    return entry


def reply_sums(reply: Message, stage: str) -> RankingSums:
    """A client's evaluation sums for one stage (the reply `client_app.evaluate` builds)."""
    metrics = reply.content["metrics"]
    return RankingSums(int(metrics[f"{stage}-count"]), metrics[f"{stage}-HR@10-sum"], metrics[f"{stage}-NDCG@10-sum"],
                       metrics[f"{stage}-AUC-sum"], reply.content["items"][f"{stage}-exposure"].numpy())


def arrays_bytes(reply: Message) -> int:
    return sum(a.numpy().nbytes for a in reply.content["arrays"].values())


class RoundStats:
    """What happened to the training messages of one round, and which replies may be
    aggregated: under client DP only updates whose spend the ledger records."""

    def __init__(self, sent: int, replies: list[Message], keys: dict[int, int], server_round: int,
                 accounted_only: bool, upload_bytes: Callable[[Message], int] | None = None):
        """upload_bytes: what a trained reply sent (default: its arrays; under secure
        aggregation every answer is a masked vector, counted as trained)."""
        self.sent = sent
        self.errors = sum(1 for r in replies if r.has_error())
        self.timeouts = sent - len(replies)
        self.ok = [r for r in replies if not r.has_error()]
        self.trained = [r for r in self.ok if "arrays" in r.content or upload_bytes is not None]
        self.declined = len(self.ok) - len(self.trained)  # clients whose privacy budget is spent
        self.upload_bytes = [(upload_bytes or arrays_bytes)(r) for r in self.trained]
        self.entries: dict[int, LedgerEntry] = {}  # parsed once: for aggregation and the ledger
        for reply in self.ok:
            if "ledger" in reply.content and (entry := client_entry(reply, keys, server_round)) is not None:
                self.entries[reply.metadata.src_node_id] = entry
        self.aggregated = self.trained if not accounted_only else [
            r for r in self.trained if (e := self.entries.get(r.metadata.src_node_id)) is not None
            and e.status == "trained"]

    @property
    def left_out(self) -> int:
        """Errors and timeouts (declines are answers, counted apart)."""
        return self.sent - len(self.ok)


@dataclass
class RoundOutcome:
    """What the loop saw in one round (round 0: the starting model, no training), for the
    server's record of it."""

    started: float
    stats: RoundStats | None = None
    train_metrics: MetricRecord | None = None
    evaluate_metrics: MetricRecord | None = None


class ResumableLoop(Strategy):
    """Flower's `Strategy.start` in the same shape (configure_train -> send_and_receive ->
    aggregate_train -> configure_evaluate -> send_and_receive -> aggregate_evaluate ->
    evaluate_fn), overridden for what Flower's loop cannot give us:
    - resuming: rounds `first_round`..`num_rounds` from a checkpoint's arrays (FedAdam's
      bias correction, the server rate and the clients' seeds go by the round number);
    - the clients also evaluate the starting model (round 0: the run's baseline);
    - a round's errors, timeouts and declines are counted (`RoundStats`), and only the
      replies it admits are aggregated (under client DP: the accounted updates).
    The round's outcome is kept in `self.outcome` for `evaluate_fn`, the server's record of
    each round (metrics, ledger, checkpoint)."""

    keys: dict[int, int]
    accounted_only: bool
    outcome: RoundOutcome
    upload_precision: str = "fp32"  # what the clients send (shared_model/upload.py)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              first_round: int = 1) -> Result:
        log(INFO, "fedrec: %s, rounds %d to %d", type(self).__name__, first_round, num_rounds)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays = Result(arrays=initial_arrays), initial_arrays
        if first_round == 1:
            self.outcome = RoundOutcome(time.time())
            self.evaluate_round(grid, 0, arrays, evaluate_config, timeout, evaluate_fn, result)
        for server_round in range(first_round, num_rounds + 1):
            self.outcome = RoundOutcome(time.time())
            stats, aggregated, train_metrics = self.train_round(grid, server_round, arrays, train_config, timeout)
            if aggregated is not None:
                result.arrays = arrays = aggregated
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            self.outcome.stats, self.outcome.train_metrics = stats, train_metrics
            self.evaluate_round(grid, server_round, arrays, evaluate_config, timeout, evaluate_fn, result)
        return result

    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float
                    ) -> tuple[RoundStats, ArrayRecord | None, MetricRecord | None]:
        """One round's training: (what happened to its messages, the new model or None,
        the training metrics)."""
        messages = list(self.configure_train(server_round, arrays, config, grid))
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        stats = RoundStats(len(messages), replies, self.keys, server_round, self.accounted_only)
        return stats, *self.aggregate_train(server_round, self.decoded(stats.aggregated, arrays))

    def decoded(self, replies: list[Message], arrays: ArrayRecord) -> list[Message]:
        """The replies holding the adapters each client trained (fp16 updates added to the
        round's global adapters in fp32); an upload of the wrong shape or precision, or
        holding a NaN or an infinity (one such client would make the aggregate, and the
        model, NaN), is dropped, with a warning, as a failed client would be."""
        start, kept = {k: a.numpy() for k, a in arrays.items()}, []
        for reply in replies:
            try:
                received = {k: a.numpy() for k, a in reply.content["arrays"].items()}
                trained = received if self.upload_precision == "fp32" else decode_upload(received, start)
                if not all(np.isfinite(v).all() for v in trained.values()):
                    raise ValueError("it holds NaN or infinite values")
            except ValueError as error:
                client = self.keys.get(reply.metadata.src_node_id)
                log(WARNING, "fedrec: client %s's upload left out: %s", client, error)
                continue
            if self.upload_precision != "fp32":
                reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in trained.items()})
            kept.append(reply)
        return kept

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float,
                  evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None, result: Result) -> None:
        """The clients' evaluation (if the strategy asks any), then the server's."""
        replies = grid.send_and_receive(self.configure_evaluate(server_round, arrays, config, grid), timeout=timeout)
        metrics = self.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            result.evaluate_metrics_clientapp[server_round] = metrics
        self.outcome.evaluate_metrics = metrics
        if evaluate_fn is not None and (on_server := evaluate_fn(server_round, arrays)) is not None:
            result.evaluate_metrics_serverapp[server_round] = on_server


class SeededFedAdam(ResumableLoop, FedAdam):
    """eval_rounds: the rounds whose model the clients evaluate (none in a private run:
    their ranking sums would be releases no epsilon covers); accounted_only: aggregate only
    updates with a ledger entry saying "trained" (client DP)."""

    def __init__(self, keys: dict[int, int], clients_per_round: int, seed: int, server_lr: float, half_life: float,
                 eval_rounds: Collection[int] = (), fraction_evaluate: float = 1.0, accounted_only: bool = False):
        super().__init__(eta=server_lr, beta_1=0.9, beta_2=0.99, tau=1e-8, weighted_by_key="weight",
                         min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.nodes = sorted(keys, key=keys.get)  # node ids in the order of their stable keys
        self.keys = keys
        self.clients_per_round = clients_per_round or len(self.nodes)
        self.seed = seed
        self.base_lr = server_lr
        self.half_life = half_life
        self.eval_rounds = eval_rounds
        self.fraction_evaluate = fraction_evaluate
        self.accounted_only = accounted_only
        self.eval_sent = 0

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
        self.set_current(arrays)
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=record, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def set_current(self, arrays: ArrayRecord) -> None:
        """The model this round's updates start from: FedOpt's aggregate_train steps from it."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = sorted(replies, key=lambda r: self.keys.get(r.metadata.src_node_id, -1))
        self.eta = self.server_lr(server_round)
        return super().aggregate_train(server_round, ordered)

    def step_to(self, server_round: int, model: dict[str, np.ndarray]) -> ArrayRecord | None:
        """FedAdam's step from the current arrays towards one model aggregated elsewhere (DP-FedAvg's
        noisy average, the in-process driver's weighted one), as if a single client had sent it."""
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in model.items()})
        message = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"weight": 1.0})}), dst_node_id=0,
                          message_type=MessageType.TRAIN)
        stepped, _ = self.aggregate_train(server_round, [message])
        return stepped

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """A seeded share of the clients, on evaluation rounds only."""
        nodes = []
        if server_round in self.eval_rounds:
            nodes = self.sample(server_round, int(np.ceil(self.fraction_evaluate * len(self.nodes))), purpose=1)
        self.eval_sent = len(nodes)
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        return [Message(record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Every metric of `shared_model.metrics` per stage, from the clients' sums, exposure
        counts and training interactions (popularity is that of the clients that answered:
        all of them at fraction-evaluate = 1), and how many answered."""
        ok = [r for r in replies if not r.has_error()]
        if not self.eval_sent:
            return None
        out = MetricRecord({"eval clients": len(ok), "eval left out": self.eval_sent - len(ok)})
        if not ok:
            return out
        popularity = sum(r.content["items"]["train-interactions"].numpy() for r in ok)
        for stage in STAGES:
            sums = reply_sums(ok[0], stage)
            for reply in ok[1:]:
                sums += reply_sums(reply, stage)
            out.update({f"{stage} {name}": value for name, value in metrics_from_sums(sums, popularity).items()})
        return out

    def optimizer_state(self) -> dict[str, np.ndarray]:
        state = {}
        for prefix, moments in (("adam-m/", self.m_t), ("adam-v/", self.v_t)):
            state.update({prefix + k: v for k, v in (moments or {}).items()})
        return state

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        m = {k[len("adam-m/"):]: v for k, v in state.items() if k.startswith("adam-m/")}
        v = {k[len("adam-v/"):]: v for k, v in state.items() if k.startswith("adam-v/")}
        self.m_t, self.v_t = (m or None), (v or None)
