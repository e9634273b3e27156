"""DP-FedAvg through Flower's SecAgg+ (`secure-aggregation = true`): the real workflow, the
real `secaggplus_mod` and our ClientApp, messages delivered in-process (each node with its
own Context, as a SuperNode keeps it). What a client hands the mod is recorded by wrapping
`private_vector`, the function that makes it (it still runs)."""

from __future__ import annotations

import copy
import json
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore.task_identity import TaskIdentity

import client.client_app as client_app
from client.client_app import simulated_failure
from server.server_app import array_record, starting_model
from server.secure_aggregation import SecureAggregation, clipping_range, quantization_range
from shared_model.dp_aggregation import noise_share_std
from shared_model.settings import RunSettings, SettingsError
from simulations.client_harness import client_context, deliver
from simulations.flower_runner import app_run_config, run_flower

USERS = 30
CONFIG = {"synthetic-users": USERS, "partitioning": "per-user", "dp": "none", "server-dp": True,
          "id-embeddings": False, "secure-aggregation": True, "secagg-min-clients": 4, "server-dp-clip": 0.5,
          "server-dp-noise": 1.0, "server-dp-sample-rate": 0.2}


class InProcessGrid:
    """Delivers each message to the real ClientApp of its node; a node in `dead` stops
    answering from the given protocol stage (0: keys, 1: shares, 2: masked vectors, 3: unmask)."""

    def __init__(self, contexts: dict[int, Context], dead: dict[int, int] | None = None):
        self.contexts, self.dead, self.stage = contexts, dead or {}, 0
        self.run = SimpleNamespace(run_id=1)
        self.sent: list[list[Message]] = []
        self.replies: list[list[Message]] = []

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages, replies = list(messages), []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            if self.dead.get(node, 99) <= self.stage:
                replies.append(Message(Error(code=0, reason="node unavailable"), reply_to=msg))
                continue
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node, 1  # the SuperNode's task
            try:  # a copy, as the transport delivers one (the workflow sends one content to every node)
                replies.append(client_app.app(copy.deepcopy(msg), self.contexts[node]))
            except Exception as error:  # a SuperNode replies with the ClientApp's exception
                replies.append(Message(Error(code=0, reason=repr(error)), reply_to=msg))
            TaskIdentity.node_id = 0  # back in the ServerApp's task
        self.sent.append(messages)
        self.replies.append(replies)
        self.stage += 1
        return replies


@pytest.fixture
def recorded(monkeypatch) -> dict[int, dict[str, np.ndarray]]:
    """Each client's vector as handed to secaggplus_mod, by node."""
    made: list[dict[str, np.ndarray]] = []
    real = client_app.private_vector

    def spy(update, settings, rng=None):
        made.append(real(update, settings, rng))
        return made[-1]

    monkeypatch.setattr(client_app, "private_vector", spy)
    return made


def one_round(nodes: int, dead: dict[int, int] | None = None, workflow: type | None = None, **overrides):
    config = {**CONFIG, **overrides}
    settings = RunSettings.from_run_config(app_run_config(**config))
    contexts = {100 + u: client_context(u, USERS, **config) for u in range(nodes)}
    grid = InProcessGrid(contexts, {100 + u: stage for u, stage in (dead or {}).items()})
    arrays = {k: v.numpy() for k, v in starting_model(settings).trainable_state().items()}
    secure = SecureAggregation(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config),
                               settings, USERS)
    secure.workflow = workflow or secure.workflow
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the ServerApp's task
    total, masked = secure.summed(grid, 1, list(contexts), arrays)
    return settings, grid, total, masked


def assert_secure_sum_is_the_plain_sum(total: dict, vectors: list[dict], settings: RunSettings) -> None:
    """Within the quantiser's precision: each client's coordinate rounds by less than
    2c / T (stochastic rounding, unbiased), so the sum by less than n of those."""
    step = 2 * clipping_range(settings) / quantization_range(USERS)
    for name, value in total.items():
        plain = sum(v[name] for v in vectors)
        assert np.abs(value - plain).max() <= len(vectors) * step, name
    # the vectors carry the noise share and are not the sum of bare updates
    std = noise_share_std(settings.server_dp_noise, settings.server_dp_clip, settings.secagg_min_clients)
    assert 0.5 * std < np.std(np.concatenate([v[n].ravel() for v in vectors for n in v])) < 3 * std


def test_the_server_gets_the_sum_of_the_clients_noised_clipped_updates(recorded):
    settings, grid, total, masked = one_round(6)
    assert len(recorded) == len(masked) == 6 and total is not None
    assert_secure_sum_is_the_plain_sum(total, recorded, settings)


def test_no_reply_at_any_stage_holds_a_clients_vector(recorded):
    """What the server receives: keys, encrypted shares, one masked vector a client (int
    arrays, uniform mod 2^32), key shares; never an array record or a float update."""
    _, grid, total, _ = one_round(6)
    for stage in grid.replies:
        for reply in stage:
            assert not reply.has_error() and not any(len(r) for r in reply.content.array_records.values())
    for reply in grid.replies[2]:
        values = np.concatenate([bytes_to_ndarray(b).ravel() for b in
                                 reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        # uniform over [0, 2^32): masked (a quantised vector alone would sit near T / 2 = 2^26)
        assert abs(np.median(values[1:]) / 2**31 - 1) < 0.05 and values.max() > 0.99 * 2**32


def test_a_client_that_dies_after_sharing_its_keys_leaves_the_sum_of_the_others(recorded):
    settings, _, total, masked = one_round(6, dead={2: 2})
    assert len(masked) == 6 and sum(r.has_error() for r in masked) == 1
    assert len(recorded) == 5 and total is not None
    assert_secure_sum_is_the_plain_sum(total, recorded, settings)


@pytest.mark.parametrize("stage", [0, 1], ids=["before sending its public keys", "before sharing its key shares"])
def test_a_client_lost_before_it_shares_its_keys_leaves_the_round(recorded, stage):
    settings, grid, total, masked = one_round(6, dead={2: stage})
    assert len(masked) == len(recorded) == 5 and total is not None
    assert_secure_sum_is_the_plain_sum(total, recorded, settings)
    # the control: Flower 1.42's own workflow asks the survivors for shares of the lost
    # node's key at unmasking; each fails, and the round releases nothing
    _, grid, total, _ = one_round(6, dead={2: stage}, workflow=SecAggPlusWorkflow)
    assert total is None and all(r.has_error() for r in grid.replies[3])


def test_fewer_survivors_than_the_threshold_release_nothing(recorded):
    _, _, total, _ = one_round(5, dead={0: 2, 1: 2})  # 3 survive, m = 4
    assert total is None


def test_a_client_refuses_to_send_a_plain_update_when_secure_aggregation_is_on():
    context = client_context(0, USERS, **CONFIG)
    model = starting_model(RunSettings.from_run_config(app_run_config(**CONFIG)))
    content = RecordDict({"arrays": array_record({k: v.numpy() for k, v in model.trainable_state().items()}),
                          "config": ConfigRecord({"server-round": 1})})
    with pytest.raises(RuntimeError, match="only through SecAgg"):
        deliver(MessageType.TRAIN, context, content)


def test_a_flower_run_aggregates_securely_and_says_against_whom(tmp_path):
    """`flwr run` (10 SuperNodes, every one sampled, 2 rounds, m = 6), clients failing in the
    protocol's training stage on purpose (seeded: 5 in round 1, 4 in round 2): round 1
    releases nothing (5 survivors), round 2 the sum of 6; the metrics count the failures,
    and the privacy summary names the honest-but-curious server."""
    users, failure_rate = 10, 0.25
    config = {**CONFIG, "synthetic-users": users, "server-dp-sample-rate": 1.0, "secagg-min-clients": 6,
              "num-server-rounds": 2, "simulated-failure-rate": failure_rate, "output-dir": str(tmp_path),
              "run-name": "secure"}
    run = run_flower(config, num_supernodes=users)
    assert run.ok, run.log[-3000:]
    settings = RunSettings.from_run_config(app_run_config(**config))
    lines = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    failed = [sum(simulated_failure(settings, server_round, key) for key in range(users)) for server_round in (1, 2)]
    assert failed == [5, 4]
    for line, fails in zip(lines[1:], failed):
        assert (line["clients"], line["errors"], line["left out"]) == (users, fails, fails)
        assert line["upload bytes per client"] > 0
    assert [line["aggregated"] for line in lines[1:]] == [0, 6]
    assert "test NDCG@10" in lines[-1]
    summary = json.loads((tmp_path / "secure" / "summary.json").read_text())
    assert summary["privacy"]["user"]["mechanism"] == "dp-fedavg+secagg"
    assert "honest-but-curious server" in summary["privacy"]["user"]["against"]
    assert "at least 6 clients" in summary["privacy"]["user"]["against"]


@pytest.mark.parametrize("overrides, key", [
    ({"server-dp": False}, "secure-aggregation"),
    ({"dp": "example"}, "secure-aggregation"),
    ({"server-dp-adaptive-clip": True}, "secure-aggregation"),
    ({"secagg-min-clients": 1}, "secagg-min-clients"),
])
def test_what_secure_aggregation_does_not_cover_is_refused_by_name(overrides, key):
    with pytest.raises(SettingsError, match=f"run config '{key}'"):
        RunSettings.from_run_config(app_run_config(**{**CONFIG, **overrides}))
