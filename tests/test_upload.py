"""upload-precision = "fp16": a client sends its update, stochastically rounded to fp16 (half
the bytes), and the server aggregates the adapters it trained to within fp16's resolution
of the update; an upload of the wrong precision or shape, or holding a NaN, is left out, not
aggregated."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from conftest import default_run_config
from server.strategy import SeededFedAdam
from shared_model.settings import RunSettings, SettingsError
from shared_model.upload import decode_upload, stochastic_fp16
from simulations.client_harness import client_context, deliver, global_state
from test_strategy import NODES, ScriptedGrid, start_arrays


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbouring_fp16_value():
    rng = np.random.default_rng(0)
    values = (rng.normal(size=4000) * 1e-2).astype(np.float32)
    rounded = np.stack([stochastic_fp16(values, rng) for _ in range(500)]).astype(np.float32)
    nearest = values.astype(np.float16)
    step = np.spacing(np.abs(nearest)).astype(np.float32)
    assert rounded.dtype == np.float32 and np.all(np.abs(rounded - values) <= step)  # the two neighbours only
    assert len(np.unique(rounded[:, 0])) == 2
    bias = np.abs(rounded.mean(axis=0) - values) / step  # nearest rounding: up to half a step, always the same way
    assert bias.mean() < 0.05 and np.abs(nearest.astype(np.float32) - values).mean() / step.mean() > 0.2


def test_an_fp16_client_sends_its_update_in_half_the_bytes():
    replies = {}
    for precision in ("fp32", "fp16"):
        context = client_context(2, 4, dp="none", **{"local-steps": 2, "upload-precision": precision})
        start = global_state(context.run_config)
        replies[precision] = deliver(MessageType.TRAIN, context,
                                     RecordDict({"arrays": start, "config": ConfigRecord({"server-round": 1})}))
    start = {k: a.numpy() for k, a in start.items()}
    trained = {k: a.numpy() for k, a in replies["fp32"].content["arrays"].items()}
    sent = {k: a.numpy() for k, a in replies["fp16"].content["arrays"].items()}
    assert all(a.dtype == np.float16 for a in sent.values())
    assert sum(a.nbytes for a in sent.values()) * 2 == sum(a.nbytes for a in trained.values())
    decoded = decode_upload(sent, start)
    for name, weights in trained.items():  # the same training (same seeds), rounded on the update only
        update = weights - start[name]
        assert np.all(np.abs(decoded[name] - weights) <= 2 * np.spacing(np.abs(update).astype(np.float16)) + 1e-7)
    assert any(np.abs(trained[k] - start[k]).max() > 0 for k in trained)


class Fp16Grid(ScriptedGrid):
    """ScriptedGrid's clients, sending their update in fp16 (node `wrong`: its fp32 adapters)."""

    def __init__(self, wrong: int | None = None):
        super().__init__()
        self.wrong = wrong

    def reply(self, msg):
        reply = super().reply(msg)
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.dst_node_id != self.wrong:
            start = msg.content["arrays"]
            reply.content["arrays"] = ArrayRecord({k: Array((a.numpy() - start[k].numpy()).astype(np.float16))
                                                   for k, a in reply.content["arrays"].items()})
        return reply


class Recording(SeededFedAdam):
    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.aggregated = [m.metadata.src_node_id for m in replies]
        return super().aggregate_train(server_round, replies)


def test_the_server_adds_fp16_updates_to_the_round_model_and_leaves_out_a_wrong_upload():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    keys = {100 + k: k for k in range(NODES)}
    runs = {}
    for name, grid in (("fp32", ScriptedGrid()), ("fp16", Fp16Grid()), ("one wrong", Fp16Grid(wrong=103))):
        runs[name] = Recording(keys, 0, seed=0, server_lr=0.1, half_life=10)
        runs[name].upload_precision = "fp32" if name == "fp32" else "fp16"
        runs[name].result = runs[name].start(grid, start_arrays(), num_rounds=2)
    weights = {name: run.result.arrays["w"].numpy() for name, run in runs.items()}
    assert not np.allclose(weights["fp16"], 0)
    assert np.allclose(weights["fp16"], weights["fp32"], rtol=1e-3)  # updates of 0.01 to 0.04: fp16 holds them
    assert runs["fp16"].aggregated == [100, 101, 102, 103] and runs["one wrong"].aggregated == [100, 101, 102]
    sent = runs["one wrong"].outcome.stats.upload_bytes
    assert sent[:3] == [6, 6, 6] and sent[3] > 6  # three fp16 updates; node 103 sent adapters


class PoisonedGrid(ScriptedGrid):
    """ScriptedGrid's clients (fp32 uploads); node `poisoned` puts a NaN in its adapters."""

    def __init__(self, poisoned: int):
        super().__init__()
        self.poisoned = poisoned

    def reply(self, msg):
        reply = super().reply(msg)
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.dst_node_id == self.poisoned:
            arrays = {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}
            arrays["w"].flat[0] = np.nan
            reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply


def test_one_client_sending_a_nan_is_left_out_and_the_model_stays_finite():
    """A malicious (or broken) client's NaN: left out like a failed client. The control,
    the same run with the check off (every reply aggregated, as Flower's FedAdam does):
    one NaN makes the model NaN."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    keys = {100 + k: k for k in range(NODES)}
    ours, control = (Recording(keys, 0, seed=0, server_lr=0.1, half_life=10) for _ in range(2))
    control.decoded = lambda replies, arrays: replies  # the check off
    for run in (ours, control):
        run.result = run.start(PoisonedGrid(poisoned=102), start_arrays(), num_rounds=2)
    assert ours.aggregated == [100, 101, 103] and np.isfinite(ours.result.arrays["w"].numpy()).all()
    assert not np.allclose(ours.result.arrays["w"].numpy(), start_arrays()["w"].numpy())  # it trained
    assert np.isnan(control.result.arrays["w"].numpy()).any()


def test_fp16_uploads_are_refused_with_secure_aggregation():
    run_config = default_run_config(**{"upload-precision": "fp16", "secure-aggregation": True, "server-dp": True,
                                       "id-embeddings": False})
    with pytest.raises(SettingsError, match="'upload-precision' must be 'fp32' with secure-aggregation"):
        RunSettings.from_run_config(run_config)
    with pytest.raises(SettingsError, match="'upload-precision' must be one of"):
        RunSettings.from_run_config(default_run_config(**{"upload-precision": "int8"}))
