"""Adaptive clipping (Andrew et al. 2021) in DP-FedAvg: the clip converges to the target
quantile of the update norms, the noise is split so that the accounted total holds, the
ledger records the total with its parts and the audit recomputes them, a resumed run keeps
the clip, and bad run-config values are refused naming the key."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from conftest import default_run_config
from server.adaptive_clip import AdaptiveClip
from server.cli import main
from server.dp_strategy import DPFedAvg
from server.privacy_audit import audit_run
from server.run_folder import Checkpoint, RunFolder
from server.server_app import make_strategy, record_privacy, resume
from shared_model.ledger import read_ledger
from shared_model.privacy import total_noise_multiplier, update_noise_multiplier
from shared_model.settings import RunSettings, SettingsError

NODES = 200
SHAPE = (100, 100)
ADAPTIVE = {"server-dp": True, "dp": "none", "partitioning": "per-user", "id-embeddings": False,
            "server-dp-adaptive-clip": True, "server-dp-noise": 1.0, "server-dp-count-noise": 2.0,
            "server-dp-sample-rate": 0.1, "server-dp-clip": 1.0}


@pytest.fixture(autouse=True)
def server_task():
    """Messages are made inside a run, as the ServerApp's runtime sets up."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.mark.parametrize("target, start", [(0.5, 100.0), (0.5, 0.01), (0.9, 1.0)])
def test_the_clip_converges_to_the_target_quantile_of_the_norms(target, start):
    norms = np.random.default_rng(1).lognormal(0.0, 1.0, 1000)  # a fixed set of update norms
    rule = AdaptiveClip(target_quantile=target, learning_rate=0.2, count_noise=50.0)  # sigma_b = m / 20
    rng, clip, clips = np.random.default_rng(2), start, []  # a seeded generator only here, in the test
    for _ in range(300):
        clip = rule.next_clip(clip, rule.unclipped_fraction(norms, clip, 1000.0, rng))
        clips.append(clip)
    low, high = np.quantile(norms, [target - 0.05, target + 0.05])
    assert low < np.median(clips[-100:]) < high
    assert np.mean(norms <= clips[-1]) == pytest.approx(target, abs=0.1)


def test_the_count_is_centred_and_noised():
    rule = AdaptiveClip(0.5, 0.2, count_noise=1e-9)
    rng = np.random.default_rng(0)
    assert rule.unclipped_fraction([0.5, 2.0, 3.0, 0.1], 1.0, 4.0, rng) == pytest.approx(0.5)
    assert rule.unclipped_fraction([0.5, 0.1], 1.0, 4.0, rng) == pytest.approx(0.75)  # (2 - 1) / 4 + 1 / 2
    noisy = AdaptiveClip(0.5, 0.2, count_noise=10.0)
    draws = [noisy.unclipped_fraction([0.5] * 50 + [2.0] * 50, 1.0, 100.0, rng) for _ in range(2000)]
    assert np.std(draws) == pytest.approx(10.0 / 100, rel=0.1)


def test_the_noise_split_keeps_the_accounted_total():
    z_update = update_noise_multiplier(1.0, 5.0)
    assert z_update == pytest.approx((1 - 1 / 100) ** -0.5)
    assert total_noise_multiplier(z_update, 5.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="count noise"):
        update_noise_multiplier(1.0, 0.5)  # sigma_b = z / 2: the update's noise would be infinite


def wrapper(count_noise: float = 2.0, clip: float = 1.0) -> DPFedAvg:
    settings = RunSettings.from_run_config(default_run_config(**ADAPTIVE | {"server-dp-count-noise": count_noise,
                                                                           "server-dp-clip": clip}))
    _, strategy = make_strategy(settings, {n: n for n in range(1, NODES + 1)})
    strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float32))}), ConfigRecord(), None)
    return strategy


def reply(update: np.ndarray) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(update.astype(np.float32))}),
                          "metrics": MetricRecord({"weight": 1.0})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_dp_fedavg_adds_the_larger_update_noise_and_moves_the_clip():
    strategy = wrapper(count_noise=0.6, clip=0.5)  # z_delta = (1 - 1 / 1.44)^-1/2 = 1.81
    assert strategy.update_noise == pytest.approx(update_noise_multiplier(1.0, 0.6))
    average = strategy.noisy_average(*strategy.clipped_sum([reply(np.zeros(SHAPE)) for _ in range(5)]))["w"]
    assert np.std(average) == pytest.approx(strategy.update_noise * 0.5 / (0.1 * NODES), rel=0.05)
    strategy = wrapper(count_noise=1e-3 + 0.5)
    small = [reply(np.full(SHAPE, 1e-4)) for _ in range(20)]  # norms 0.01 <= clip 1: all unclipped
    _, metrics = strategy.aggregate_train(1, small)
    assert metrics["clip"] == 1.0 and strategy.clip < 1.0  # too few clipped: the clip shrinks
    assert metrics["count noise"] == pytest.approx(0.501) and metrics["update noise multiplier"] > 1.0


def test_the_ledger_accounts_the_total_and_the_audit_recomputes_the_split(tmp_path):
    settings = RunSettings.from_run_config(default_run_config(**ADAPTIVE | {"output-dir": str(tmp_path),
                                                                           "run-name": "adaptive"}))
    folder = RunFolder.open(settings)
    _, strategy = make_strategy(settings, {n: n for n in range(1, NODES + 1)})
    server_entries, releases = [], []
    for server_round in (1, 2):
        strategy.configure_train(server_round, ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float32))}),
                                 ConfigRecord(), None)
        _, metrics = strategy.aggregate_train(server_round, [reply(np.full(SHAPE, 1e-2)) for _ in range(10)])
        releases.append(dict(metrics))
        record_privacy(folder, settings, server_round, [], server_entries, releases[-1])
    first, second = read_ledger(folder.ledger_path)
    assert first.noise_multiplier == 1.0 and first.count_noise == 2.0  # the total z is what is accounted
    assert first.update_noise_multiplier == pytest.approx(update_noise_multiplier(1.0, 2.0))
    assert (first.clip, second.clip) == (1.0, strategy.adaptive.next_clip(1.0, releases[0]["unclipped fraction"]))
    audit = audit_run(folder.path)
    assert not audit.disagreements
    assert main(["audit", str(folder.path)]) == 0

    lines = folder.ledger_path.read_text().splitlines()  # a server that added the unadjusted noise
    lines[1] = lines[1].replace(f'"update-noise-multiplier": {first.update_noise_multiplier}',
                                '"update-noise-multiplier": 1.0')
    folder.ledger_path.write_text("\n".join(lines) + "\n")
    audit = audit_run(folder.path)
    assert [d["field"] for d in audit.disagreements] == ["noise-multiplier"]
    assert audit.disagreements[0]["recomputed"] == pytest.approx(total_noise_multiplier(1.0, 2.0))
    assert main(["audit", str(folder.path)]) == 1


def test_a_resumed_run_keeps_the_clip(tmp_path):
    settings = RunSettings.from_run_config(default_run_config(**ADAPTIVE | {"output-dir": str(tmp_path),
                                                                           "run-name": "resumed"}))
    folder = RunFolder.open(settings)
    optimizer, strategy = make_strategy(settings, {n: n for n in range(1, NODES + 1)})
    strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float32))}), ConfigRecord(), None)
    strategy.aggregate_train(1, [reply(np.full(SHAPE, 1.0)) for _ in range(20)])  # norms 100: the clip grows
    assert strategy.clip > 1.0
    folder.save_checkpoint(Checkpoint(1, {"w": np.zeros(SHAPE)}, {}, optimizer.optimizer_state(), {"round": 1},
                                      strategy.clip))
    optimizer2, restarted = make_strategy(settings, {n: n for n in range(1, NODES + 1)})
    assert restarted.clip == 1.0
    resume(folder.load_checkpoint(), optimizer2, restarted)
    assert restarted.clip == strategy.clip


@pytest.mark.parametrize("overrides, key", [
    ({"server-dp": False}, "server-dp-adaptive-clip"),
    ({"server-dp-count-noise": 0.0}, "server-dp-count-noise"),
    ({"server-dp-count-noise": 0.5}, "server-dp-count-noise"),  # = z / 2: z_delta infinite
    ({"server-dp-count-noise": float("nan")}, "server-dp-count-noise"),
    ({"server-dp-target-quantile": 1.0}, "server-dp-target-quantile"),
    ({"server-dp-target-quantile": 0.0}, "server-dp-target-quantile"),
    ({"server-dp-clip-learning-rate": 0.0}, "server-dp-clip-learning-rate"),
    ({"server-dp-adaptive-clip": "yes"}, "server-dp-adaptive-clip"),
])
def test_bad_adaptive_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(SettingsError, match=f"'{key}'"):
        RunSettings.from_run_config(default_run_config(**ADAPTIVE | overrides))
