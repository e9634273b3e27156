"""DP-FedAvg as a wrapper, tested alone: clipping, the noise's size against z S / (q N),
a fixed denominator when clients decline or fail, noise when nobody replies, and Poisson
sampling from fresh randomness."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from server.dp_strategy import DPFedAvg
from server.strategy import SeededFedAdam

NODES = 200
SHAPE = (100, 100)  # 10,000 coordinates: the noise's std is measured to about 1%


@pytest.fixture(autouse=True)
def server_task():
    """Messages are made inside a run, as the ServerApp's runtime sets up."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def wrapper(noise: float, clip: float = 1.0, rate: float = 0.1) -> DPFedAvg:
    inner = SeededFedAdam({n: n for n in range(1, NODES + 1)}, 0, seed=0, server_lr=0.1, half_life=1e9)
    strategy = DPFedAvg(inner, noise, clip, rate)
    strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float32))}), ConfigRecord(), None)
    return strategy


def reply(update: np.ndarray, node: int = 1) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(update.astype(np.float32))}),
                          "metrics": MetricRecord({"weight": 1.0})})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def test_updates_are_clipped_summed_and_divided_by_the_expected_count():
    strategy = wrapper(noise=1e-9, clip=1.0, rate=0.1)
    big, small = np.full(SHAPE, 1.0), np.full(SHAPE, 1e-3)  # norms 100 and 0.1
    average = strategy.noisy_average(*strategy.clipped_sum([reply(big), reply(small)]))["w"]
    expected = (big / np.linalg.norm(big) + small) / (0.1 * NODES)
    assert np.allclose(average, expected, atol=1e-6)


def test_a_decline_or_failure_does_not_change_the_denominator():
    strategy = wrapper(noise=1e-9)
    one = strategy.noisy_average(*strategy.clipped_sum([reply(np.full(SHAPE, 1e-3))]))["w"]
    failed = Message(RecordDict(), dst_node_id=2, message_type=MessageType.TRAIN)
    declined = Message(RecordDict({"metrics": MetricRecord({"declined": 1})}), dst_node_id=3,
                       message_type=MessageType.TRAIN)
    strategy.aggregate_train(1, [reply(np.full(SHAPE, 1e-3)), failed, declined])
    assert np.allclose(one, np.full(SHAPE, 1e-3) / (0.1 * NODES), atol=1e-9)


@pytest.mark.parametrize("replies", [0, 5])
def test_the_noise_has_std_z_s_over_q_n_even_when_nobody_replies(replies):
    z, clip, rate = 2.0, 0.5, 0.1
    strategy = wrapper(noise=z, clip=clip, rate=rate)
    average = strategy.noisy_average(*strategy.clipped_sum([reply(np.zeros(SHAPE)) for _ in range(replies)]))["w"]
    assert np.std(average) == pytest.approx(z * clip / (rate * NODES), rel=0.05)
    assert abs(np.mean(average)) < 5 * z * clip / (rate * NODES) / np.sqrt(average.size)


def test_the_inner_strategy_only_sees_the_noisy_average():
    strategy = wrapper(noise=1.0)
    messages = strategy.configure_train(2, ArrayRecord({"w": Array(np.zeros(SHAPE, dtype=np.float32))}),
                                        ConfigRecord(), grid=None)
    assert messages and all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    stepped, metrics = strategy.aggregate_train(1, [])  # nobody replied: still a (noise-only) step
    assert stepped is not None and not np.allclose(stepped["w"].numpy(), 0.0)
    assert dict(metrics) == {"aggregated": 0, "clip": 1.0, "update noise multiplier": 1.0}  # a fixed clip


def test_poisson_sampling_is_fresh_and_at_the_rate():
    strategy = wrapper(noise=1.0, rate=0.25)
    samples = [strategy.train_sample() for _ in range(40)]
    sizes = [len(s) for s in samples]
    assert np.mean(sizes) == pytest.approx(0.25 * NODES, rel=0.1)
    assert len({tuple(s) for s in samples}) == len(samples)  # not replayed from a seed: every round differs


def test_zero_noise_is_refused():
    with pytest.raises(ValueError, match="noise > 0"):
        wrapper(noise=0.0)
