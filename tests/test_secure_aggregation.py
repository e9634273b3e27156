"""DP-FedAvg through Flower's SecAgg+ (`secure-aggregation = true`): the real workflow, the
real `secaggplus_mod` and our ClientApp, messages delivered in-process (each node with its
own Context, as a SuperNode keeps it). What a client hands the mod is recorded by wrapping
`private_vector`, the function that makes it (it still runs)."""

from __future__ import annotations

import copy
import importlib
import json
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto import shamir
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore.primitives import asymmetric
from flwr.supercore.task_identity import TaskIdentity
from flwr.compat.common.recorddict_compat import fitins_to_recorddict

import client.client_app as client_app
from client.client_app import simulated_failure
from client.secure_update import instructions
from server.privacy_audit import audit_run
from server.server_app import array_record, starting_model
from server.secure_aggregation import SecureAggregation, quantization_range
from shared_model import secagg_patches, secure_masks
from shared_model.secagg_patches import packed_bytes, widened_array
from shared_model.dp_aggregation import (NAMES_KEY, clipped_sum, clipping_range, cohort_cap, flat_vector,
                                         noise_share_std, unflattened)
from shared_model.ledger import LedgerEntry, append_entries, read_ledger
from shared_model.privacy import epsilon, server_epsilon
from shared_model.secure_masks import keyed_masks
from shared_model.settings import RunSettings, SettingsError
from simulations.client_harness import client_context, deliver
from simulations.flower_runner import app_run_config, run_flower

USERS = 30
CONFIG = {"synthetic-users": USERS, "partitioning": "per-user", "dp": "none", "server-dp": True,
          "id-embeddings": False, "secure-aggregation": True, "secagg-min-clients": 4, "server-dp-clip": 0.5,
          "server-dp-noise": 1.0, "server-dp-sample-rate": 1.0}  # every user: no cohort edge (cohort_cap)


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
    secure.workflow = workflow or secure.workflow  # Flower's own, as a control
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the ServerApp's task
    total, masked, _ = secure.summed(grid, 1, list(contexts), arrays)
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


def test_the_model_travels_as_one_flat_vector_that_only_its_own_layout_reads():
    """The wire layout both sides use: names in order, raveled and joined; read back with
    the same shapes it is the same arrays; another length or another model's names are refused."""
    arrays = {"b": np.arange(6.0).reshape(2, 3), "a": np.arange(4.0)}
    flat = flat_vector(arrays)
    assert flat.shape == (10,) and list(flat[:6]) == list(range(6))
    back = unflattened(flat, {k: v.shape for k, v in arrays.items()})
    assert list(back) == ["b", "a"] and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    with pytest.raises(ValueError, match="expected \\(10,\\)"):
        unflattened(flat[:-1], {k: v.shape for k, v in arrays.items()})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the ServerApp's task
    message = Message(fitins_to_recorddict(FitIns(ndarrays_to_parameters([flat]), {NAMES_KEY: "b,a"}), True),
                      dst_node_id=1, message_type=MessageType.TRAIN)
    read, _ = instructions(message, {"a": (4,), "b": (2, 3)})
    assert all(np.array_equal(read[k], arrays[k]) for k in arrays)
    with pytest.raises(ValueError, match="not this model's"):
        instructions(message, {"a": (4,), "c": (2, 3)})


def test_a_server_cannot_slip_a_nan_past_a_clients_clip():
    """A malicious server's attack (an attacker's review of this code): NaN in one row of the
    model it sends. The control shows why it would work: the update's norm is NaN, and the
    clip scales the finite rest by S alone, whatever its norm (3.5 here against S = 0.5). Ours: the client
    refuses such a model, or any non-finite or non-float one, and refuses to send a
    non-finite update."""
    settings = RunSettings.from_run_config(app_run_config(**CONFIG))
    update = {"rows": np.full((10, 5), 1.0), "nan": np.array([np.nan])}
    clipped, norms = clipped_sum({k: v[None] for k, v in update.items()}, settings.server_dp_clip)
    assert np.isnan(norms[0]) and np.linalg.norm(clipped["rows"]) > 5 * settings.server_dp_clip  # the control
    with pytest.raises(ValueError, match="non-finite update"):
        client_app.private_vector(update, settings)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the ServerApp's task
    for vector in (np.array([0.0, np.nan, 1.0]), np.array([0.0, np.inf, 1.0]), np.array([0, 1, 2], dtype=np.int8)):
        message = Message(fitins_to_recorddict(FitIns(ndarrays_to_parameters([vector]), {NAMES_KEY: "w"}), True),
                          dst_node_id=1, message_type=MessageType.TRAIN)
        with pytest.raises(ValueError, match="not finite floating point"):
            instructions(message, {"w": (3,)})


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
        arrays = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        assert {a.dtype for a in arrays} == {np.dtype(np.uint32)}  # 4 bytes a coordinate (Flower's: int64)
        assert [a.ndim for a in arrays] == [1, 1]  # the weight, then the whole update as one flat vector
        values = np.concatenate([a.ravel() for a in arrays])
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


def test_a_ring_cut_in_two_by_dropouts_releases_nothing(recorded, monkeypatch):
    """30 clients on the SecAgg+ ring (neighbourhoods of 11, in node order here), m = 10;
    two runs of 5 ring neighbours die while training: 20 survivors in two arcs of 10 that
    share no mask, each client still with enough live neighbours. Unmasking would give the
    server each arc's sum (an attacker's review rebuilt both from the transcript), so the
    round halts before it. Flower's own workflow, the control, unmasks and releases."""
    monkeypatch.setattr(importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow"),
                        "random", SimpleNamespace(shuffle=list.sort))
    dead = {u: 2 for u in (*range(10, 15), *range(25, 30))}
    _, grid, total, masked = one_round(30, dead=dead, **{"secagg-min-clients": 10})
    assert sum(not r.has_error() for r in masked) == 20 and total is None and len(grid.replies) == 3
    _, grid, total, _ = one_round(30, dead=dead, workflow=SecAggPlusWorkflow, **{"secagg-min-clients": 10})
    assert total is not None and len(grid.replies) == 4


def test_fewer_survivors_than_m_release_nothing(recorded):
    """3 masked vectors, m = 4: the protocol halts before unmasking (no key share is asked for)."""
    _, grid, total, _ = one_round(5, dead={0: 2, 1: 2})
    assert total is None and len(grid.replies) == 3


def secure_aggregation(**overrides) -> SecureAggregation:
    config = {**CONFIG, **overrides}
    settings = RunSettings.from_run_config(app_run_config(**config))
    return SecureAggregation(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config),
                             settings, USERS)


@pytest.mark.parametrize("capped", [True, False], ids=["noise topped up to the cap", "control: no top-up"])
def test_the_released_noise_does_not_say_whether_a_user_took_part(capped):
    """The model users' adversary, made strong: it knows which 6 others took part and that
    every update is 0 (only the noise can speak), and reads the released sum's variance to
    tell whether user u took part too (7 vectors, each with its share from the client's
    own private_vector) or not (6). The control, the sum as it was before the cap (no
    top-up: variance n / m (z S)^2), gives u away in every trial; with the server's top-up
    to the cap's variance, the guesses are no better than chance."""
    secure, settings = secure_aggregation(), RunSettings.from_run_config(app_run_config(**CONFIG))
    share = noise_share_std(settings.server_dp_noise, settings.server_dp_clip, settings.secagg_min_clients)
    rng, others, zero = np.random.default_rng(0), 6, {"w": np.zeros(20_000)}
    right = []
    for trial in range(40):
        took_part = trial % 2 == 0
        n = others + took_part
        total = sum(client_app.private_vector(zero, settings, rng)["w"] for _ in range(n))
        top_up = secure.top_up_std(n) if capped else 0.0
        released = total + rng.normal(0.0, top_up, size=total.shape)
        estimate = np.mean(released ** 2) / share ** 2  # vectors' worth of noise
        right.append((abs(estimate - (others + 1)) < abs(estimate - others)) == took_part)
    assert np.mean(right) <= 0.6 if capped else np.mean(right) == 1.0


def test_the_cohort_cap_and_m_leave_only_charged_edges_where_one_user_decides_a_round():
    """n_max: the smallest count whose upper tail is within the target; m must keep P[the
    others hold exactly m - 1] within it too; beta charges both edges (a sample beyond
    either runs no round). The control: m near the expected cohort, where one user's draw
    decides whether 9% of the rounds run (an attacker's review measured what that gives away)."""
    from scipy.stats import binom

    for users, rate, m, tail in ((100_000, 0.02, 1700, 1e-11), (10, 1.0, 6, 1e-9), (943, 0.1, 40, 1e-8),
                                 (1000, 0.05, 10, 1e-9)):
        cap, beta = cohort_cap(users, rate, m, tail)
        upper = binom.sf(cap - 1, users - 1, rate)
        assert upper <= tail < binom.sf(cap - 2, users - 1, rate) and cap <= users
        assert beta == pytest.approx(upper + binom.pmf(m - 1, users - 1, rate)) and beta <= 2 * tail
    with pytest.raises(ValueError, match=r"'secagg-min-clients' 4: .* is 0.0883 a round.*no m does"):
        cohort_cap(30, 0.2, 4, 1e-9)
    with pytest.raises(ValueError, match="at most 1722 keeps it below"):
        cohort_cap(100_000, 0.02, 1900, 1e-11)
    secure = secure_aggregation()  # every user sampled: no edge
    assert (secure.cap, secure.cap_tail) == (USERS, 0.0)
    assert [secure.runs(n) for n in (3, 4, USERS, USERS + 1)] == [False, True, True, False]
    with pytest.raises(ValueError, match="'secagg-min-clients' 31 exceeds the largest cohort"):
        secure_aggregation(**{"secagg-min-clients": 31})


@pytest.mark.parametrize("forged", [None, "epsilon at the whole delta", "a cap whose edges cost more"])
def test_the_audit_charges_the_cohort_caps_tails_to_delta(tmp_path, forged):
    """Three secure rounds whose caps' tails each spend a quarter of delta (far more than a
    run's, to be visible): the epsilon is the accountant's at delta minus the tails so far.
    Caught: a ledger that claims the smaller epsilon of the whole delta, and one whose cap
    (1,000 users at q = 0.02, cap 21: about half the rounds beyond it) costs more than its tail."""
    delta, tail, entries = 1e-5, 2.5e-6, []
    users, rate = (1000, 0.02) if forged == "a cap whose edges cost more" else (21, 1.0)
    for server_round in (1, 2, 3):
        at = delta if forged == "epsilon at the whole delta" else delta - tail * server_round
        entries.append(LedgerEntry(client="server", round=server_round, status="aggregated", unit="user",
                                   noise_multiplier=1.0, sample_rate=rate, steps=1, delta=delta, accountant="rdp",
                                   epsilon=epsilon([(1.0, rate, server_round)], at), min_survivors=4,
                                   cohort_cap=21, cap_tail=tail, population=users))
    append_entries(tmp_path / "privacy_ledger.jsonl", entries)
    audit = audit_run(tmp_path)
    assert audit.checked == 6 and len(audit.disagreements) == (0 if forged is None else 3)
    assert {d["field"] for d in audit.disagreements} <= {"epsilon" if "epsilon" in (forged or "") else "cap-tail"}


@pytest.mark.parametrize("message_type, refusal", [(MessageType.TRAIN, "only through SecAgg"),
                                                    (MessageType.EVALUATE, "does not evaluate")],
                         ids=["a plain update", "an evaluation (its reply names the items the user trained on)"])
def test_a_client_refuses_what_would_leave_it_in_plain_text(message_type, refusal):
    context = client_context(0, USERS, **CONFIG)
    model = starting_model(RunSettings.from_run_config(app_run_config(**CONFIG)))
    content = RecordDict({"arrays": array_record({k: v.numpy() for k, v in model.trainable_state().items()}),
                          "config": ConfigRecord({"server-round": 1})})
    with pytest.raises(RuntimeError, match=refusal):
        deliver(message_type, context, content)


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
    privacy = json.loads((tmp_path / "secure" / "summary.json").read_text())["privacy"]["user"]
    assert privacy["mechanism"] == "dp-fedavg+secagg" and "server" not in privacy["against"].split("(")[0]
    server = privacy["against the server"]
    assert "honest-but-curious server" in server["adversary"] and "at least 6 clients" in server["adversary"]
    assert server["rounds a user takes part in, at most"] == 2  # every user sampled in both rounds
    assert server["epsilon"] == pytest.approx(epsilon([(settings.server_dp_noise, 1.0, 2)], settings.dp_delta,
                                                      settings.dp_accountant))
    server_entries = [e for e in read_ledger(tmp_path / "secure" / "privacy_ledger.jsonl") if e.client == "server"]
    assert [(e.cohort_cap, e.cap_tail, e.population) for e in server_entries] == [(users, 0.0, users)] * 2
    assert not any("most rounds" in key for line in lines for key in line)  # who took part is the sample's secret
    audit = audit_run(tmp_path / "secure")  # both epsilons recomputed by the twin accountant
    assert audit.checked == 5 and not audit.disagreements  # 2 epsilons, 2 cap edges, against the server


def test_against_the_server_the_bound_on_a_users_rounds_is_public_and_charged():
    """The rounds a user takes part in (Binomial(T, q)) are bounded from T and q alone, at a
    thousandth of delta, which the accountant's delta pays for."""
    from scipy.stats import binom

    eps, rounds = server_epsilon(1.0, 0.01, 300, 1e-6, "rdp")
    assert binom.sf(rounds, 300, 0.01) <= 1e-9 < binom.sf(rounds - 1, 300, 0.01)
    assert eps == pytest.approx(epsilon([(1.0, 1.0, rounds)], 1e-6 - binom.sf(rounds, 300, 0.01)))
    assert server_epsilon(1.0, 1.0, 5, 1e-6, "rdp")[1] == 5  # everyone every round



@pytest.mark.parametrize("overrides, key", [
    ({"server-dp": False}, "secure-aggregation"),
    ({"dp": "example"}, "secure-aggregation"),
    ({"server-dp-adaptive-clip": True}, "secure-aggregation"),
    ({"secagg-min-clients": 1}, "secagg-min-clients"),
])
def test_what_secure_aggregation_does_not_cover_is_refused_by_name(overrides, key):
    with pytest.raises(SettingsError, match=f"run config '{key}'"):
        RunSettings.from_run_config(app_run_config(**{**CONFIG, **overrides}))


def test_masks_come_from_the_whole_key_not_a_32_bit_fold_of_it():
    """Flower 1.42's generator (the control) gives the same mask for two keys whose 4-byte
    words XOR alike (it seeds MT19937 with that XOR: 2^32 seeds to search); ours does not,
    and draws over the whole range. Both SecAgg+ modules use ours once installed (the
    in-process tests above run with it on both sides)."""
    key = bytes(range(32))
    swapped = key[4:8] + key[:4] + key[8:]  # words 0 and 1 exchanged: the same XOR
    shapes = [(3, 5), (1000,)]
    assert all(np.array_equal(a, b) for a, b in zip(pseudo_rand_gen(key, 2**32, shapes),
                                                     pseudo_rand_gen(swapped, 2**32, shapes)))
    ours, other = keyed_masks(key, 2**32, shapes), keyed_masks(swapped, 2**32, shapes)
    assert [m.shape for m in ours] == shapes and not np.array_equal(ours[1], other[1])
    assert all(np.array_equal(a, b) for a, b in zip(ours, keyed_masks(key, 2**32, shapes)))  # a function of the key
    assert 0 <= ours[1].min() and ours[1].max() < 2**32 and abs(np.median(ours[1]) / 2**31 - 1) < 0.1
    secure_masks.install()
    for module in ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                   "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        assert importlib.import_module(module).pseudo_rand_gen is keyed_masks


def test_masked_vectors_travel_in_half_the_bytes_and_only_within_the_modulus():
    """What Flower's mod would send for a masked vector (int64, the control) against ours
    (uint32): half the bytes, the same values back on the server's side as int64."""
    masked = np.random.default_rng(0).integers(0, 2**32, size=10_000, dtype=np.int64)
    ours, flowers = packed_bytes(masked), ndarray_to_bytes(masked)
    assert len(flowers) > 1.95 * len(ours) and np.array_equal(widened_array(ours), masked)
    assert widened_array(ours).dtype == np.int64
    with pytest.raises(ValueError, match="modulus must be 2"):
        packed_bytes(np.array([2**32], dtype=np.int64))


def test_shamir_runs_without_threads_and_reconstructs_from_the_thresholds_shares():
    """Once installed, Flower's `shamir.py` starts no thread pool (the same calls, inline);
    within `threshold_of_the_round(t)` the workflow's `combine_shares` reads only the first
    t shares: t good shares and a corrupted one give the secret, where Flower's, given all,
    (the control) does not; fewer than t are refused."""
    secagg_patches.install()
    secret = bytes(range(40))
    shares = shamir.create_shares(secret, 3, 7)
    assert shamir.ThreadPoolExecutor is secagg_patches.InlineExecutor
    assert shamir.combine_shares(shares[2:5]) == secret  # any 3 of the 7
    workflow = importlib.import_module(secagg_patches.WORKFLOW)
    corrupted = shares[:3] + [shares[3][:4] + bytes(len(shares[3]) - 4)]
    assert recovered(shamir.combine_shares, corrupted) != secret  # Flower's: every share counts
    with secagg_patches.threshold_of_the_round(3):
        assert workflow.combine_shares(corrupted) == secret
        with pytest.raises(ValueError, match="fewer than the threshold 3"):
            workflow.combine_shares(shares[:2])
    assert recovered(workflow.combine_shares, corrupted) != secret  # outside a round: as Flower


def test_a_clients_private_keys_are_kept_and_shared_as_their_32_byte_scalar():
    """Flower's PEM (the control) is 241 bytes on P-256, 16 Shamir chunks; ours is the same
    key in 32 bytes, 3 chunks, read back by the mod and by the workflow (which reads a
    dropped client's key: the dropout tests above run through it); another length is refused."""
    secagg_patches.install()
    mod, workflow = (importlib.import_module(m) for m in (secagg_patches.MOD, secagg_patches.WORKFLOW))
    key, _ = mod.generate_key_pairs()
    ours, flowers = mod.private_key_to_bytes(key), asymmetric.private_key_to_bytes(key)
    assert (len(ours), len(flowers)) == (32, 241)
    for read in (mod.bytes_to_private_key, workflow.bytes_to_private_key):
        assert read(ours).private_numbers() == key.private_numbers()
    assert len(shamir.create_shares(ours, 3, 7)[0]) == 4 + 3 * 16
    with pytest.raises(ValueError, match="of 241 bytes, not 32"):
        workflow.bytes_to_private_key(flowers)


def test_secagg_key_pairs_are_p256_and_agree_while_node_keys_stay_flowers():
    """The mod's key pairs are on P-256 (Flower's control: P-384) and two clients' keys
    agree on one shared key, through Flower's own `generate_shared_key` and public-key
    (de)serialisation; Flower's key pairs elsewhere (node authentication) are untouched."""
    secagg_patches.install()
    mod = importlib.import_module(secagg_patches.MOD)
    (a, a_public), (b, b_public) = mod.generate_key_pairs(), mod.generate_key_pairs()
    assert a.curve.name == "secp256r1" and asymmetric.generate_key_pairs()[0].curve.name == "secp384r1"
    a_public, b_public = (mod.bytes_to_public_key(mod.public_key_to_bytes(k)) for k in (a_public, b_public))
    assert mod.generate_shared_key(a, b_public) == mod.generate_shared_key(b, a_public)
    assert mod.generate_shared_key(a, b_public) != mod.generate_shared_key(a, mod.generate_key_pairs()[1])
    with pytest.raises(ValueError):  # a peer key on another curve (a server relaying Flower's P-384) agrees on nothing
        mod.generate_shared_key(a, asymmetric.generate_key_pairs()[1])


def recovered(combine, shares: list[bytes]) -> bytes | None:
    """The secret a combine function gives, None where the wrong padding gives it away."""
    try:
        return combine(shares)
    except ValueError:
        return None


SETUP = {Key.SAMPLE_NUMBER: 6, Key.SHARE_NUMBER: 9, Key.THRESHOLD: 3, Key.TARGET_RANGE: 2**27, Key.MOD_RANGE: 2**32,
         Key.MAX_WEIGHT: 1.0}


@pytest.mark.parametrize("change", [{Key.THRESHOLD: 2}, {Key.CLIPPING_RANGE: 0.01}, {Key.MAX_WEIGHT: 1000.0},
                                    {Key.SAMPLE_NUMBER: 3}, {Key.MOD_RANGE: 2**20}],
                         ids=["threshold below a third", "clipping range", "weight", "sample below m", "modulus"])
def test_a_client_refuses_protocol_settings_that_would_weaken_what_it_sends(change):
    settings = RunSettings.from_run_config(app_run_config(**CONFIG))
    setup = {Key.STAGE: Stage.SETUP, **SETUP, Key.CLIPPING_RANGE: clipping_range(settings)}
    answer = deliver(MessageType.TRAIN, client_context(0, USERS, **CONFIG),
                     RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)}))
    assert Key.PUBLIC_KEY_1 in answer.content.config_records[RECORD_KEY_CONFIGS]  # the honest setup: keys back
    with pytest.raises(RuntimeError, match="secure aggregation refused"):
        deliver(MessageType.TRAIN, client_context(0, USERS, **CONFIG),
                RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({**setup, **change})}))
