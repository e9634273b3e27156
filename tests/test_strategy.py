"""The strategy's round loop (SeededFedAdam.start) against a scripted grid: one batch of
sends per round for training and one for evaluation, resuming from a round's arrays and
optimiser state gives the uninterrupted run's arrays, and under client DP only updates
that the ledger accounts are aggregated. The ServerApp's start-up query in batches, and its
evaluation on the server in slices of users."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.server_app import ServerSideEvaluation, sampling_keys
from server.strategy import SeededFedAdam
from shared_model.ledger import LedgerEntry
from shared_model.metrics import evaluate_scores, item_counts
from shared_model.recommender import RecommenderConfig, build_recommender, score_catalog
from shared_model.splits import leave_one_out
from shared_model.synthetic import SyntheticConfig, generate

NODES = 4


@pytest.fixture(autouse=True)
def server_task():
    """Messages are made inside a run, as the ServerApp's runtime sets up."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class ScriptedGrid:
    """Each node trains by adding (its key + 1) * 0.01 to every weight and evaluates with
    sums of 1 per user (one user, shown items 0-9); with `ledger` (client DP) node 100 declines."""

    def __init__(self, ledger: bool = False):
        self.batches: list[tuple[str, int]] = []
        self.ledger = ledger

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.batches.append((messages[0].metadata.message_type if messages else "none", len(messages)))
        return [self.reply(m) for m in messages]

    def reply(self, msg: Message) -> Message:
        key = msg.metadata.dst_node_id - 100
        server_round = int(msg.content["config"]["server-round"])
        if msg.metadata.message_type == MessageType.EVALUATE:
            sums = {f"{s}-{m}": 1.0 for s in ("valid", "test") for m in ("HR@10-sum", "NDCG@10-sum", "AUC-sum", "count")}
            shown = np.array([1] * 10 + [0] * 10)
            items = ArrayRecord({"train-interactions": Array(np.ones(20, dtype=np.int64)),
                                 "valid-exposure": Array(shown), "test-exposure": Array(shown)})
            return Message(RecordDict({"metrics": MetricRecord(sums), "items": items}), reply_to=msg)
        content = RecordDict({"metrics": MetricRecord({"weight": 1.0})})
        if not (self.ledger and key == 0):  # node 100 declines under DP
            content["arrays"] = ArrayRecord({k: Array(a.numpy() + (key + 1) * 0.01)
                                             for k, a in msg.content["arrays"].items()})
        if self.ledger:  # node 103 sends an entry for another client
            entry = LedgerEntry(client=str(key) if key != 3 else "9", round=server_round,
                                status="trained" if key else "declined", unit="user", noise_multiplier=1.0,
                                sample_rate=1.0, steps=1 if key else 0, delta=1e-5, accountant="rdp", epsilon=1.0,
                                budget=8.0)
            content["ledger"] = ConfigRecord(entry.to_json())
        return Message(content, reply_to=msg)


def strategy(**kwargs) -> SeededFedAdam:
    return SeededFedAdam({100 + k: k for k in range(NODES)}, 0, seed=0, server_lr=0.1, half_life=10, **kwargs)


def start_arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})


def test_every_round_sends_training_and_evaluation_in_one_batch_each():
    grid = ScriptedGrid()
    result = strategy(eval_rounds={0, 2}).start(grid, start_arrays(), num_rounds=2)
    assert grid.batches == [(MessageType.EVALUATE, NODES), (MessageType.TRAIN, NODES), ("none", 0),
                            (MessageType.TRAIN, NODES), (MessageType.EVALUATE, NODES)]
    evaluated = dict(result.evaluate_metrics_clientapp[2])
    assert evaluated["valid NDCG@10"] == evaluated["test AUC"] == 1.0
    assert evaluated["test coverage@10"] == 0.5 and evaluated["test Gini@10"] == 0.5
    assert not np.allclose(result.arrays["w"].numpy(), 0.0)


def test_a_resumed_run_ends_with_the_uninterrupted_runs_arrays():
    whole = strategy().start(ScriptedGrid(), start_arrays(), num_rounds=3)
    first = strategy()
    after_one = first.start(ScriptedGrid(), start_arrays(), num_rounds=1)
    resumed = strategy()
    resumed.load_optimizer_state(first.optimizer_state())
    grid = ScriptedGrid()
    result = resumed.start(grid, after_one.arrays, num_rounds=3, first_round=2)
    assert [kind for kind, _ in grid.batches].count(MessageType.TRAIN) == 2  # rounds 2 and 3 only
    assert np.array_equal(result.arrays["w"].numpy(), whole.arrays["w"].numpy())


class Recording(SeededFedAdam):
    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.aggregated = sorted(m.metadata.src_node_id for m in replies)
        return super().aggregate_train(server_round, replies)


def test_under_client_dp_only_accounted_updates_are_aggregated():
    recording = Recording({100 + k: k for k in range(NODES)}, 0, seed=0, server_lr=0.1, half_life=10,
                          accounted_only=True)
    recording.start(ScriptedGrid(ledger=True), start_arrays(), num_rounds=1)
    assert recording.aggregated == [101, 102]  # 100 declined; 103's entry names another client
    assert recording.outcome.stats.declined == 1 and len(recording.outcome.stats.entries) == 3


class KeyGrid:
    """Answers the start-up query with the node's key (its id - 100); node 107 fails once."""

    def __init__(self, nodes: int):
        self.nodes, self.batches, self.failed = [100 + k for k in range(nodes)], [], False

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.batches.append(len(messages))
        replies = []
        for msg in messages:
            if msg.metadata.dst_node_id == 107 and not self.failed:
                self.failed = True
                replies.append(Message(Error(code=0, reason="still cleaning up"), reply_to=msg))
            else:
                key = msg.metadata.dst_node_id - 100
                replies.append(Message(RecordDict({"info": ConfigRecord({"sampling-key": key})}), reply_to=msg))
        return replies


def test_start_up_query_asks_in_batches_and_asks_failed_nodes_again():
    grid = KeyGrid(25)
    keys = sampling_keys(grid, timeout=60.0, retry_every=0.0, batch=10)
    assert keys == {100 + k: k for k in range(25)}
    assert grid.batches == [10, 10, 5, 1]  # the failed node, once more


def test_server_side_evaluation_in_slices_equals_the_whole_split_at_once(monkeypatch):
    world = generate(SyntheticConfig(n_users=60, n_items=64))
    torch.manual_seed(0)
    model = build_recommender(world.catalog.texts, RecommenderConfig(lora_layers=0), progress=False)
    split = leave_one_out(world)
    monkeypatch.setattr(ServerSideEvaluation, "SLICE", 16)  # 60 users: 4 slices, the last one short
    sliced = ServerSideEvaluation(split, model, prefix="")({k: v.numpy() for k, v in model.trainable_state().items()})
    for stage in ("valid", "test"):
        cases = split.cases(stage)
        whole = evaluate_scores(score_catalog(model, cases.histories), cases, item_counts(split.train, split.n_items))
        assert len(whole) == 7  # HR, NDCG and the beyond-accuracy metrics, every one equal
        for name, value in whole.items():
            assert sliced[f"{stage} {name}"] == pytest.approx(value, abs=1e-9), name
    assert sliced["test HR@10"] > 0  # a real ranking, not an empty one
