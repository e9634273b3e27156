"""The real ClientApp driven in-process, as a SuperNode's runtime would drive it: what the
attacks of a curious server (bench_attacks) and the client tests send and read back."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from shared_model.recommender import build_recommender
from shared_model.settings import RunSettings
from simulations.flower_runner import app_run_config


def client_context(partition: int, partitions: int, **overrides) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition,
                   "num-partitions": partitions}, state=RecordDict(), run_config=app_run_config(**overrides))


def global_state(run_config: dict) -> ArrayRecord:
    """The server's initial adapters for this run config."""
    from client.local_data import simulated_client_data

    settings = RunSettings.from_run_config(run_config)
    texts = simulated_client_data(settings, 0, 1).texts
    torch.manual_seed(0)
    model = build_recommender(texts, settings.model, progress=False)
    return ArrayRecord({k: Array(v.numpy()) for k, v in model.trainable_state().items()})


def deliver(message_type: str, context: Context, content: RecordDict) -> Message:
    """Hand a message to the real ClientApp, as a SuperNode's runtime does."""
    from flwr.supercore.task_identity import TaskIdentity

    from client.client_app import app

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = context.run_id, context.node_id, 1
    return app(Message(content, dst_node_id=context.node_id, message_type=message_type), context)
