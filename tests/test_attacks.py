"""The attacks a curious server would try, each run against a private mode and against a
non-private (or replayable) control that it beats, so that every test can fail."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict

from conftest import default_run_config
from shared_model.dp_training import private_data, train_private
from shared_model.recommender import RecommenderConfig, build_recommender
from shared_model.settings import RunSettings
from shared_model.splits import leave_one_out
from shared_model.synthetic import SyntheticConfig, generate
from test_client_payload import context_for, global_arrays, send


@pytest.fixture(scope="module")
def world():
    data = generate(SyntheticConfig(n_users=30, n_items=120, seed=5))
    return data, leave_one_out(data)


def start(world):
    torch.manual_seed(0)
    return build_recommender(world[0].catalog.texts, RecommenderConfig(lora_layers=0), progress=False)


def flat(model):
    return torch.cat([p.flatten() for p in model.trainable_state().values()])


def one_step(world, users, noise, randomness):
    """The adapters after one full-batch DP-SGD step (rate 1) on these users' data."""
    _, split = world
    model = start(world)
    samples = private_data([split.train[u] for u in users], model.config.history, "user")
    train_private(model, samples, noise, 1.0, sample_rate=1.0, steps=1, expected_batch=len(users), lr=0.5,
                  negatives=16, seed=3, private_randomness=randomness)
    return flat(model)


def replay_error(world, attacker_can_replay: bool) -> float:
    """The server replays the noise on dummy data of the same size and subtracts it:
    how far is what it recovers from the victim's noise-free update (relative)?"""
    victim, dummy = list(range(0, 8)), list(range(10, 18))
    generator = (lambda: torch.Generator().manual_seed(1234)) if attacker_can_replay else (lambda: None)
    sent = one_step(world, victim, 1.0, generator())
    noise = one_step(world, dummy, 1.0, generator()) - one_step(world, dummy, 0.0, None)
    truth = one_step(world, victim, 0.0, None)
    return float((sent - noise - truth).norm() / (truth - flat(start(world))).norm())


@pytest.mark.parametrize("replayable", [True, False])
def test_replaying_the_noise_recovers_the_update_only_when_it_is_seeded(world, replayable):
    error = replay_error(world, replayable)
    if replayable:  # the control: noise drawn from a generator the server can rebuild (as seeding from the run seed was)
        assert error < 1e-3
    else:  # the apps' way: fresh OS entropy, nothing to replay
        assert error > 1.0


def test_the_same_round_twice_sends_two_different_noisy_updates():
    """Same run seed, same round, same data: a non-private client sends the same update
    (reproducible), a private one two updates that differ by as much as the update itself."""
    def update(dp):
        context = context_for(0, 2, dp=dp, **{"synthetic-users": 20, "lora-layers": 0, "local-steps": 1})
        arrays = global_arrays(context.run_config)
        reply = send(MessageType.TRAIN, context, RecordDict({"arrays": arrays,
                                                            "config": ConfigRecord({"server-round": 1})}))
        return np.concatenate([(a.numpy() - arrays[k].numpy()).ravel() for k, a in reply.content["arrays"].items()])

    assert np.array_equal(update("none"), update("none"))
    first, second = update("user"), update("user")
    assert np.linalg.norm(first - second) > 0.5 * np.linalg.norm(first)


def item_readout_recall(dp: str, user: int = 0) -> tuple[float, float]:
    """Rank the id-table rows of one user's update by how much they moved; the top |items|
    are the server's guess of the user's items. (recall of the guess, recall of chance)"""
    users = 20
    context = context_for(user, users, dp=dp, **{"synthetic-users": users, "partitioning": "iid", "local-steps": 8,
                                                 "lora-layers": 0})
    arrays = global_arrays(context.run_config)
    reply = send(MessageType.TRAIN, context, RecordDict({"arrays": arrays,
                                                        "config": ConfigRecord({"server-round": 1})}))
    moved = np.linalg.norm(reply.content["arrays"]["item_ids.weight"].numpy() - arrays["item_ids.weight"].numpy(),
                           axis=1)
    settings = RunSettings.from_run_config(context.run_config)
    data = settings.load_dataset()
    from client.local_data import simulated_client_data

    items = set(np.concatenate(simulated_client_data(settings, user, users).split.train).tolist())
    guess = set(np.argsort(-moved)[: len(items)].tolist())
    return len(guess & items) / len(items), len(items) / data.n_items


def test_reading_a_users_items_from_the_id_table_works_only_without_dp():
    recall, chance = item_readout_recall("none")
    assert recall > 0.9 and chance < 0.1  # the control: the server reads the user's items off the update
    recall, chance = item_readout_recall(default_run_config()["dp"])
    assert recall < chance + 0.25  # the default private mode: no better than chance
