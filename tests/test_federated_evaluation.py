"""The clients' evaluation (sums, exposure counts, training interactions), aggregated by the
server's strategy, gives the numbers the server computes over the whole split at once."""

import math

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType
from flwr.supercore.task_identity import TaskIdentity

from server.server_app import ServerSideEvaluation
from server.strategy import SeededFedAdam
from shared_model.recommender import build_recommender
from shared_model.settings import RunSettings
from shared_model.splits import leave_one_out
from simulations.client_harness import client_context, deliver

USERS = 16  # one client per user


def test_client_sums_aggregate_to_the_server_side_evaluation():
    contexts = [client_context(p, USERS, dp="none", partitioning="per-user", **{"synthetic-users": USERS})
                for p in range(USERS)]
    settings = RunSettings.from_run_config(contexts[0].run_config)
    torch.manual_seed(0)
    model = build_recommender(settings.load_catalog().texts, settings.model, progress=False)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in model.trainable_state().items()})
    strategy = SeededFedAdam({100 + p: p for p in range(USERS)}, 0, seed=0, server_lr=0.1, half_life=10,
                             eval_rounds={0})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the server's side makes messages
    messages = list(strategy.configure_evaluate(0, arrays, ConfigRecord(), grid=None))
    assert len(messages) == USERS
    replies = [deliver(MessageType.EVALUATE, contexts[m.metadata.dst_node_id - 100], m.content) for m in messages]
    federated = dict(strategy.aggregate_evaluate(0, replies))
    on_server = ServerSideEvaluation(leave_one_out(settings.load_dataset()), model, prefix="")(
        {k: a.numpy() for k, a in arrays.items()})

    assert federated["eval clients"] == USERS
    metrics = [k for k in on_server if k.startswith(("valid ", "test "))]
    assert {"test AUC", "test coverage@10", "test Gini@10", "test popularity@10", "test long-tail@10"} <= set(metrics)
    assert set(metrics) <= set(federated)
    for key in metrics:
        assert math.isclose(federated[key], on_server[key], rel_tol=1e-6, abs_tol=1e-9), key
    assert 0 < federated["test coverage@10"] < 1 and 0 < federated["test AUC"] < 1
    assert federated["test Gini@10"] > 0  # the untrained model is no constant scorer: the comparison has content
