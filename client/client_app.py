"""The Flower ClientApp: global adapters in, local training or evaluation, adapters out.

Under a private mode (dp = "example" or "user") a training reply carries only the noised
adapters, a constant weight and the round's ledger entry (public settings and the epsilon
they give); declines say only that. No example counts, losses or evaluation sums leave
the client, and it refuses to evaluate. With dp = "none" a reply carries the exact update
(from which the server can read which items the client's users touched), the example
count and the training loss; an evaluation reply carries ranking sums and counts, each
item's exposure in the users' top-10 lists and each item's training interactions (the
catalog metrics need them; they say outright which items the users touched, which the
exact update already reveals). With secure-aggregation = true a training reply goes through
Flower's SecAgg+: the clipped update plus the client's noise share, masked
(client/secure_update.py).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local_data import ClientData, client_data, sampling_key
from client.privacy_account import store_for
from client.private_round import private_round
from client.secure_update import instructions, private_vector, reply, secure_aggregation_guard
from shared_model.metrics import RankingSums, item_counts, ranking_sums
from shared_model.recommender import Recommender, build_recommender, score_catalog
from shared_model.settings import RunSettings
from shared_model.training import train_local
from shared_model.upload import encode_upload

app = ClientApp()
_MODELS: dict[tuple, Recommender] = {}  # one model per process, reused across calls
_CATALOG: dict = {}  # the last global model's catalog vectors, for evaluation


def settings_of(context: Context) -> RunSettings:
    return RunSettings.from_run_config(context.run_config)


def data_of(settings: RunSettings, context: Context) -> ClientData:
    return client_data(settings, dict(context.node_config))


def process_model(settings: RunSettings, texts: list[str]) -> Recommender:
    """The process's model for this catalog and config (built once, then reused)."""
    config = settings.model
    key = (tuple(sorted(config.to_dict().items())), len(texts), hash(tuple(texts)))
    if key not in _MODELS:
        _MODELS[key] = build_recommender(texts, config, progress=False)
        _MODELS[key].text.save_memory(settings.low_memory)
    return _MODELS[key]


def model_with(settings: RunSettings, texts: list[str], arrays: ArrayRecord) -> Recommender:
    """The process's model, holding the given global state."""
    model = process_model(settings, texts)
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


def simulated_failure(settings: RunSettings, server_round: int, key: int) -> bool:
    """Whether this client fails this round on purpose (simulated-failure-rate), seeded."""
    return np.random.default_rng(round_seed(settings, server_round, key, 1)).random() < settings.simulated_failure_rate


@app.query()
def query(msg: Message, context: Context) -> Message:
    key = sampling_key(dict(context.node_config))
    return Message(RecordDict({"info": ConfigRecord({"sampling-key": key})}), reply_to=msg)


def check_failure(settings: RunSettings, server_round: int, key: int) -> None:
    if simulated_failure(settings, server_round, key):
        raise RuntimeError(f"simulated device failure (simulated-failure-rate={settings.simulated_failure_rate})")


def local_training(model: Recommender, data: ClientData, settings: RunSettings, server_round: int, key: int) -> dict:
    """Plain local SGD (dp = "none"), seeded by round and client: train_local's result."""
    seed = round_seed(settings, server_round, key, 0)  # data order and negatives
    return train_local(model, data.split.train, epochs=settings.local_epochs_in(server_round),
                       batch_size=settings.batch_size, lr=settings.learning_rate, seed=seed,
                       max_steps=settings.local_steps)


def upload(model: Recommender, start: ArrayRecord, settings: RunSettings, server_round: int, key: int
           ) -> ArrayRecord:
    """The reply's arrays at the run's upload-precision (shared_model/upload.py)."""
    trained = {k: v.numpy() for k, v in model.trainable_state().items()}
    rng = np.random.default_rng(round_seed(settings, server_round, key, 2))  # rounding only: no secret
    sent = encode_upload(trained, {k: a.numpy() for k, a in start.items()}, settings.upload_precision, rng)
    return ArrayRecord({k: Array(v) for k, v in sent.items()})


@app.train(mods=[secure_aggregation_guard])
def train(msg: Message, context: Context) -> Message:
    settings = settings_of(context)
    if settings.secure_aggregation:
        return secure_train(msg, context, settings)
    server_round = int(msg.content["config"]["server-round"])
    key = sampling_key(dict(context.node_config))
    check_failure(settings, server_round, key)
    data = data_of(settings, context)
    model = model_with(settings, data.texts, msg.content["arrays"])
    content = RecordDict()
    if settings.dp == "none":
        result = local_training(model, data, settings, server_round, key)
        content["arrays"] = upload(model, msg.content["arrays"], settings, server_round, key)
        content["metrics"] = MetricRecord({"weight": result["num-examples"], "train-loss": result["train-loss"]})
        return Message(content, reply_to=msg)
    store = store_for(dict(context.node_config), context.state)
    result, entry = private_round(model, data.split.train, settings, store, server_round, str(key))
    if result is None:  # the budget is spent: no update, only the decline
        content["metrics"] = MetricRecord({"declined": 1})
    else:
        content["arrays"] = upload(model, msg.content["arrays"], settings, server_round, key)
        content["metrics"] = MetricRecord({"weight": 1.0})  # equal weights: a count would reveal n
    content["ledger"] = ConfigRecord(entry.to_json())
    return Message(content, reply_to=msg)


def secure_train(msg: Message, context: Context, settings: RunSettings) -> Message:
    """Secure aggregation's third stage (client/secure_update.py): local training, then the
    clipped update plus this client's noise share, for secaggplus_mod to mask."""
    data = data_of(settings, context)
    model = process_model(settings, data.texts)
    arrays, config = instructions(msg, {k: tuple(v.shape) for k, v in model.trainable_parameters().items()})
    server_round, key = int(config["server-round"]), sampling_key(dict(context.node_config))
    check_failure(settings, server_round, key)
    model.load_trainable_state({k: torch.from_numpy(v) for k, v in arrays.items()})
    local_training(model, data, settings, server_round, key)
    update = {k: v.numpy() - arrays[k] for k, v in model.trainable_state().items()}
    return reply(msg, private_vector(update, settings), list(arrays))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Ranking sums and top-10 exposure over this client's users, for validation and test
    (not under a private mode, DP-FedAvg included: a one-user client's sums give the rank of
    its held-out item, and its training interactions are in the reply)."""
    settings = settings_of(context)
    if settings.dp != "none" or settings.server_dp:
        raise RuntimeError(f"dp = {settings.dp!r}, server-dp = {str(settings.server_dp).lower()}: federated evaluation "
                           "would release per-user ranks and the items a user trained on, so this client does not "
                           "evaluate (the server evaluates on data that is not the clients')")
    data = data_of(settings, context)
    model = model_with(settings, data.texts, msg.content["arrays"])
    catalog = catalog_vectors(model, msg.content["arrays"])
    sums = {}
    with torch.no_grad():
        for stage in ("valid", "test"):
            cases = data.split.cases(stage)
            sums[stage] = ranking_sums(score_catalog(model, cases.histories, catalog=catalog), cases)
    return Message(evaluation_record(sums, item_counts(data.split.train, data.split.n_items)), reply_to=msg)


def evaluation_record(sums: dict[str, RankingSums], train_counts: np.ndarray) -> RecordDict:
    """An evaluation reply: per stage the sums and count (metrics) and the exposure counts,
    with the training interactions per item (items)."""
    metrics: dict[str, float] = {}
    items = {"train-interactions": train_counts}
    for stage, s in sums.items():
        metrics.update({f"{stage}-count": s.count, f"{stage}-HR@10-sum": s.hits, f"{stage}-NDCG@10-sum": s.ndcg,
                        f"{stage}-AUC-sum": s.auc})
        items[f"{stage}-exposure"] = s.exposure
    metrics["weight"] = metrics["test-count"]
    return RecordDict({"metrics": MetricRecord(metrics), "items": ArrayRecord(
        {name: Array(np.ascontiguousarray(values, dtype=np.int64)) for name, values in items.items()})})
