"""The Flower ClientApp: global adapters in, local training or evaluation, adapters out.

A reply carries only the trainable adapter tensors and scalar metrics (sums and counts):
never interactions, item ids or user ids.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local_data import ClientData, client_data, sampling_key
from client.privacy_account import store_for
from client.private_round import private_round
from shared_model.metrics import ranking_sums
from shared_model.recommender import Recommender, build_recommender, score_catalog
from shared_model.settings import RunSettings
from shared_model.training import train_local

app = ClientApp()
_MODELS: dict[tuple, Recommender] = {}  # one model per process, reused across calls
_CATALOG: dict = {}  # the last global model's catalog vectors, for evaluation


def settings_of(context: Context) -> RunSettings:
    return RunSettings.from_run_config(context.run_config)


def data_of(settings: RunSettings, context: Context) -> ClientData:
    return client_data(settings, dict(context.node_config))


def model_with(settings: RunSettings, texts: list[str], arrays: ArrayRecord) -> Recommender:
    """The process's model for this catalog and config, holding the given global state."""
    config = settings.model_config()
    key = (tuple(sorted(config.to_dict().items())), len(texts), hash(tuple(texts)))
    if key not in _MODELS:
        _MODELS[key] = build_recommender(texts, config, progress=False)
        _MODELS[key].text.save_memory(settings.low_memory)
    model = _MODELS[key]
    model.load_trainable_state(arrays.to_torch_state_dict())
    return model


def catalog_vectors(model: Recommender, arrays: ArrayRecord) -> torch.Tensor:
    """The catalog's item vectors under these global adapters, computed once per process
    for all the clients that evaluate the same global model."""
    digest = hashlib.sha1()
    for name in sorted(arrays.keys()):
        digest.update(name.encode() + arrays[name].data)
    key = digest.hexdigest()
    if _CATALOG.get("key") != key:
        model.eval()
        with torch.no_grad():
            _CATALOG.update(key=key, vectors=model.catalog_vectors())
    return _CATALOG["vectors"]


def round_seed(settings: RunSettings, server_round: int, key: int, purpose: int) -> int:
    return int(np.random.SeedSequence([settings.seed, server_round, key, purpose]).generate_state(1)[0])


@app.query()
def query(msg: Message, context: Context) -> Message:
    key = sampling_key(dict(context.node_config))
    return Message(RecordDict({"info": ConfigRecord({"sampling-key": key})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = settings_of(context)
    server_round = int(msg.content["config"]["server-round"])
    key = sampling_key(dict(context.node_config))
    if np.random.default_rng(round_seed(settings, server_round, key, 1)).random() < settings.simulated_failure_rate:
        raise RuntimeError(f"simulated device failure (simulated-failure-rate={settings.simulated_failure_rate})")
    data = data_of(settings, context)
    model = model_with(settings, data.texts, msg.content["arrays"])
    seed = round_seed(settings, server_round, key, 0)
    if settings.dp == "none":
        result = train_local(model, data.split.train, epochs=settings.local_epochs, batch_size=settings.batch_size,
                             lr=settings.learning_rate, seed=seed, max_steps=settings.local_steps)
        ledger = None
    else:
        store = store_for(dict(context.node_config), context.state)
        result, ledger = private_round(model, data.split.train, settings, store, server_round, seed)
    content = RecordDict()
    if result is None:  # the budget is spent: no update, but say so
        content["metrics"] = MetricRecord({"num-examples": 0, "declined": 1})
    else:
        content["arrays"] = ArrayRecord(model.trainable_state())
        content["metrics"] = MetricRecord({"num-examples": result["num-examples"], "train-loss": result["train-loss"]})
    if ledger is not None:
        content["ledger"] = ConfigRecord({k: v for k, v in ledger.items() if k != "time"})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """HR@10 and NDCG@10 sums over this client's users, for validation and test."""
    settings = settings_of(context)
    data = data_of(settings, context)
    model = model_with(settings, data.texts, msg.content["arrays"])
    catalog = catalog_vectors(model, msg.content["arrays"])
    metrics: dict[str, float] = {}
    with torch.no_grad():
        for stage in ("valid", "test"):
            cases = data.split.cases(stage)
            sums = ranking_sums(score_catalog(model, cases.histories, catalog=catalog), cases)
            metrics.update({f"{stage}-{name}": value for name, value in sums.items()})
    metrics["num-examples"] = metrics["test-count"]
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
