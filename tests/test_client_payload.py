"""What a client sends: only adapter tensors and scalar metrics, never data."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app
from client.local_data import simulated_client_data
from conftest import default_run_config
from shared_model.recommender import build_recommender
from shared_model.settings import RunSettings


def context_for(partition: int, partitions: int, **overrides) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition,
                   "num-partitions": partitions}, state=RecordDict(), run_config=default_run_config(**overrides))


def global_arrays(run_config: dict) -> ArrayRecord:
    settings = RunSettings.from_run_config(run_config)
    data = simulated_client_data(settings, 0, 4)
    torch.manual_seed(0)
    model = build_recommender(data.texts, settings.model_config(), progress=False)
    return ArrayRecord({k: Array(v.numpy()) for k, v in model.trainable_state().items()})


def send(message_type: str, context: Context, content: RecordDict) -> Message:
    """Deliver a message to the real ClientApp, as a SuperNode's runtime does."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = context.run_id, context.node_id, 1
    return app(Message(content, dst_node_id=context.node_id, message_type=message_type), context)


def test_train_reply_carries_only_adapters_and_scalars():
    context = context_for(2, 4, **{"local-steps": 2})
    arrays = global_arrays(context.run_config)
    reply = send(MessageType.TRAIN, context,
                 RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}))
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    sent = reply.content["arrays"]
    assert isinstance(sent, ArrayRecord) and set(sent.keys()) == set(arrays.keys())
    for name in sent.keys():  # the same adapter tensors, changed by training, nothing else
        assert sent[name].numpy().dtype == np.float32 and sent[name].shape == arrays[name].shape
    assert any(not np.array_equal(sent[k].numpy(), arrays[k].numpy()) for k in sent.keys())
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord) and set(metrics.keys()) == {"num-examples", "train-loss"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    # the client's own data does not appear in the reply in any form
    settings = RunSettings.from_run_config(context.run_config)
    data = simulated_client_data(settings, 2, 4)
    assert metrics["num-examples"] == sum(len(s) - 1 for s in data.split.train if len(s) > 1)


def test_evaluate_reply_is_sums_and_counts():
    context = context_for(1, 4)
    reply = send(MessageType.EVALUATE, context, RecordDict({"arrays": global_arrays(context.run_config)}))
    assert set(reply.content.keys()) == {"metrics"}
    metrics = reply.content["metrics"]
    expected = {f"{s}-{m}" for s in ("valid", "test") for m in ("HR@10-sum", "NDCG@10-sum", "count")}
    assert set(metrics.keys()) == expected | {"num-examples"}
    assert 0 <= metrics["test-NDCG@10-sum"] <= metrics["test-HR@10-sum"] <= metrics["test-count"]


def test_query_reply_is_only_the_sampling_key():
    reply = send(MessageType.QUERY, context_for(3, 4), RecordDict({"query": ConfigRecord({"ask": "sampling-key"})}))
    assert dict(reply.content["info"]) == {"sampling-key": 3}


def test_private_client_reports_its_ledger_and_declines_when_the_budget_is_spent():
    context = context_for(0, 40, dp="example", **{"dp-expected-rounds": 2, "dp-epsilon": 4.0, "synthetic-users": 80})
    arrays = global_arrays(context.run_config)
    replies = [send(MessageType.TRAIN, context, RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": r})})) for r in (1, 2, 3)]
    first, second, third = (dict(r.content["ledger"]) for r in replies)
    assert first["status"] == second["status"] == "trained" and third["status"] == "declined"
    assert first["unit"] == "example" and first["accountant"] == "rdp" and first["delta"] == 1e-5
    assert 0 < first["epsilon"] < second["epsilon"] <= 4.0 * (1 + 1e-9)
    assert first["group-size"] == 51 and first["group-epsilon"] == pytest.approx(51 * first["epsilon"])
    assert "arrays" in replies[1].content and "arrays" not in replies[2].content
    assert replies[2].content["metrics"]["declined"] == 1
    assert set(replies[0].content["metrics"].keys()) == {"num-examples", "train-loss"}
