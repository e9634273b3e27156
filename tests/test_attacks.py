"""The attacks a curious server would try (simulations/bench_attacks.py), each run against a
private mode and against a non-private (or replayable) control that it beats, so that
every test can fail."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from simulations.bench_attacks import item_readout, membership_audit, replay_error, small_world
from simulations.client_harness import client_context, deliver, global_state
from simulations.flower_runner import app_run_config


@pytest.fixture(scope="module")
def world():
    return small_world()


@pytest.mark.parametrize("replayable", [True, False])
def test_replaying_the_noise_recovers_the_update_only_when_it_is_seeded(world, replayable):
    error = replay_error(world, replayable)
    if replayable:  # the control: noise from a generator the server can rebuild (as seeding from the run seed was)
        assert error < 1e-3
    else:  # the apps' way: fresh OS entropy, nothing to replay
        assert error > 1.0


def test_the_same_round_twice_sends_two_different_noisy_updates():
    """Same run seed, same round, same data: a non-private client sends the same update
    (reproducible), a private one two updates that differ by as much as the update itself."""
    def update(dp):
        context = client_context(0, 2, dp=dp, **{"synthetic-users": 20, "local-steps": 1})
        arrays = global_state(context.run_config)
        reply = deliver(MessageType.TRAIN, context, RecordDict({"arrays": arrays,
                                                               "config": ConfigRecord({"server-round": 1})}))
        return np.concatenate([(a.numpy() - arrays[k].numpy()).ravel() for k, a in reply.content["arrays"].items()])

    assert np.array_equal(update("none"), update("none"))
    first, second = update("user"), update("user")
    assert np.linalg.norm(first - second) > 0.5 * np.linalg.norm(first)


def test_reading_a_users_items_from_the_id_table_works_only_without_dp():
    recall, chance = item_readout(dp="none")
    assert recall > 0.9 and chance < 0.1  # the control: the server reads the user's items off the update
    recall, chance = item_readout(dp=app_run_config()["dp"])
    assert recall < chance + 0.25  # the default private mode: no better than chance


def test_the_membership_audit_sees_leakage_only_without_dp(world):
    # Canary inclusion is seeded here (the benchmark draws it fresh): the control's outcome
    # varied with it (27 to 39 correct of 40), and CI must not fail by chance.
    correct, bound = membership_audit(world, None, epochs=10, inclusion_seed=3)
    assert correct >= 34 and bound > 0.5  # the control: canaries trained on without DP are recognised
    claimed = 2.0
    correct, bound = membership_audit(world, claimed, epochs=10, inclusion_seed=3)
    assert bound <= claimed  # DP-SGD at epsilon 2: the audit proves no more than the claim
