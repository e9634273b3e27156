"""What a client sends: without DP, adapter tensors and scalar metrics; under a private
mode, only the noised adapters, a constant weight and its ledger entry."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, MetricRecord, RecordDict

from client.client_app import local_training
from client.device_store import write_device
from client.local_data import simulated_client_data
from conftest import default_run_config
from server.server_app import starting_model
from shared_model.settings import RunSettings, SettingsError
from shared_model.training import sequence_chunks
from simulations.client_harness import client_context, deliver, global_state


def test_train_reply_carries_only_adapters_and_scalars():
    context = client_context(2, 4, dp="none", **{"local-steps": 2})
    arrays = global_state(context.run_config)
    reply = deliver(MessageType.TRAIN, context,
                 RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}))
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    sent = reply.content["arrays"]
    assert isinstance(sent, ArrayRecord) and set(sent.keys()) == set(arrays.keys())
    for name in sent.keys():  # the same adapter tensors, changed by training, nothing else
        assert sent[name].numpy().dtype == np.float32 and sent[name].shape == arrays[name].shape
    assert any(not np.array_equal(sent[k].numpy(), arrays[k].numpy()) for k in sent.keys())
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord) and set(metrics.keys()) == {"weight", "train-loss"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    # the client's own data does not appear in the reply in any form
    settings = RunSettings.from_run_config(context.run_config)
    data = simulated_client_data(settings, 2, 4)
    assert metrics["weight"] == sum(len(s) - 1 for s in data.split.train if len(s) > 1)  # the exact count


def test_evaluate_reply_is_sums_counts_and_per_item_counts():
    context = client_context(1, 4, dp="none")
    reply = deliver(MessageType.EVALUATE, context, RecordDict({"arrays": global_state(context.run_config)}))
    assert set(reply.content.keys()) == {"metrics", "items"}
    metrics = reply.content["metrics"]
    expected = {f"{s}-{m}" for s in ("valid", "test") for m in ("HR@10-sum", "NDCG@10-sum", "AUC-sum", "count")}
    assert set(metrics.keys()) == expected | {"weight"}
    assert 0 <= metrics["test-NDCG@10-sum"] <= metrics["test-HR@10-sum"] <= metrics["test-count"]
    assert 0 < metrics["test-AUC-sum"] < metrics["test-count"]
    items = reply.content["items"]  # non-private only: which items the users touched, and what they were shown
    data = simulated_client_data(RunSettings.from_run_config(context.run_config), 1, 4)
    assert set(items.keys()) == {"train-interactions", "valid-exposure", "test-exposure"}
    assert items["train-interactions"].numpy().sum() == sum(len(s) for s in data.split.train)
    assert items["test-exposure"].numpy().sum() == 10 * metrics["test-count"]


def test_query_reply_is_only_the_sampling_key():
    reply = deliver(MessageType.QUERY, client_context(3, 4), RecordDict({"query": ConfigRecord({"ask": "sampling-key"})}))
    assert dict(reply.content["info"]) == {"sampling-key": 3}


def test_a_private_client_does_not_evaluate():
    context = client_context(1, 4, dp="user")
    with pytest.raises(RuntimeError, match="would release per-user ranks"):  # the SuperNode reports it as an error
        deliver(MessageType.EVALUATE, context, RecordDict({"arrays": global_state(context.run_config)}))


def test_private_client_reports_its_ledger_and_declines_when_the_budget_is_spent():
    context = client_context(0, 40, dp="example", **{"dp-expected-rounds": 2, "dp-epsilon": 4.0, "synthetic-users": 80,
                                                  "dp-sample-rate": 0.5, "dp-expected-batch": 20.0})
    arrays = global_state(context.run_config)
    replies = [deliver(MessageType.TRAIN, context, RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": r})})) for r in (1, 2, 3)]
    first, second, third = (dict(r.content["ledger"]) for r in replies)
    assert first["status"] == second["status"] == "trained" and third["status"] == "declined"
    assert first["unit"] == "example" and first["accountant"] == "rdp" and first["delta"] == 1e-5
    assert first["relation"] == "add/remove" and first["sample-rate"] == 0.5 and first["steps"] == 2
    assert 0 < first["epsilon"] < second["epsilon"] <= 4.0 * (1 + 1e-9)
    assert first["window"] == 50 and first["interaction-epsilon"] > 10 * first["epsilon"]
    assert "arrays" in replies[1].content and "arrays" not in replies[2].content
    assert dict(replies[2].content["metrics"]) == {"declined": 1}
    assert dict(replies[0].content["metrics"]) == {"weight": 1.0}  # no example count, no loss
    assert set(replies[0].content.keys()) == {"arrays", "metrics", "ledger"}


def test_a_private_client_without_data_sends_noise_like_any_other(tmp_path):
    """A device whose one user has a single interaction has no user-level sample to train on;
    declining would tell the server so, so it sends a noise-only update and records it."""
    settings = RunSettings.from_run_config(default_run_config(**{"synthetic-users": 20}))
    write_device(tmp_path, settings.load_dataset(), np.array([0]))
    rows = (tmp_path / "interactions.csv").read_text().splitlines()
    (tmp_path / "interactions.csv").write_text("\n".join(rows[:1] + rows[-1:]) + "\n")
    context = Context(run_id=1, node_id=7, node_config={"data-dir": str(tmp_path)}, state=RecordDict(),
                      run_config=default_run_config(dp="user", **{"synthetic-users": 20}))
    reply = deliver(MessageType.TRAIN, context, RecordDict({"arrays": global_state(context.run_config),
                                                        "config": ConfigRecord({"server-round": 1})}))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics", "ledger"}
    assert dict(reply.content["metrics"]) == {"weight": 1.0} and reply.content["ledger"]["status"] == "trained"


def test_early_rounds_take_early_local_epochs_passes_then_local_epochs():
    settings = RunSettings.from_run_config(default_run_config(**{
        "synthetic-users": 20, "dp": "none", "early-rounds": 2, "early-local-epochs": 3, "local-steps": 0,
        "batch-size": 1}))
    model, data = starting_model(settings), simulated_client_data(settings, 1, 4)
    chunks = len(sequence_chunks(model, data.split.train))  # one step a chunk a pass
    steps = [local_training(model, data, settings, server_round, key=1)["steps"] for server_round in (1, 2, 3)]
    assert steps == [3 * chunks, 3 * chunks, chunks]


def test_early_rounds_are_refused_under_local_dp():
    """A DP-SGD round's steps are planned (and accounted) alike in every round."""
    with pytest.raises(SettingsError, match="'early-rounds'"):
        RunSettings.from_run_config(default_run_config(**{"dp": "user", "early-rounds": 5}))
