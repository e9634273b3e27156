"""The attacks an honest-but-curious server would run, against each privacy mode and a
control the attack beats (tests/test_attacks.py asserts the same at a smaller scale):

replay:     the server rebuilds a client's noise from what it knows (with seeded noise: the
            run seed) on dummy data of the same size and subtracts it from the update;
            reported: how far the recovered update is from the noise-free one (relative).
readout:    the server ranks the item-id table's rows of one user's update by how much
            they moved and guesses the top |items| as the user's items; reported: recall
            (and chance: |items| / catalog).
membership: the one-run canary audit (Steinke, Nasr and Jagielski 2023): canaries included
            with probability 1/2 (OS entropy), the model trained, the best-scored guessed
            "in"; reported: correct guesses and the epsilon lower bound they prove.

    python -m simulations.bench_attacks --out docs/figures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict

from shared_model.dp_training import private_data, train_private
from shared_model.privacy import audit_lower_bound
from shared_model.recommender import RecommenderConfig, build_recommender
from shared_model.settings import RunSettings
from shared_model.splits import leave_one_out
from shared_model.synthetic import SyntheticConfig, generate
from simulations.canary_audit import canary_scores, guesses, make_canaries, train_audited, with_canaries
from simulations.client_harness import client_context, deliver, global_state


def small_world(users: int = 30, items: int = 120):
    data = generate(SyntheticConfig(n_users=users, n_items=items, seed=5))
    return data, leave_one_out(data)


def fresh_model(world):
    torch.manual_seed(0)
    return build_recommender(world[0].catalog.texts, RecommenderConfig(lora_layers=0), progress=False)


def flat(model) -> torch.Tensor:
    return torch.cat([p.flatten() for p in model.trainable_state().values()])


def one_step(world, users: list[int], noise: float, randomness: np.random.Generator | None) -> torch.Tensor:
    """The adapters after one full-batch DP-SGD step (rate 1) on these users' data."""
    _, split = world
    model = fresh_model(world)
    samples = private_data(model, [split.train[u] for u in users], "user")
    train_private(model, samples, noise, 1.0, sample_rate=1.0, steps=1, expected_batch=len(users), lr=0.5,
                  negatives=16, private_randomness=randomness)
    return flat(model)


def replay_error(world, attacker_can_replay: bool) -> float:
    """||recovered - noise-free update|| / ||noise-free update|| after the server subtracts
    the noise it replayed on dummy data (noise multiplier 1, 8 users)."""
    victim, dummy = list(range(0, 8)), list(range(10, 18))
    generator = (lambda: np.random.default_rng(1234)) if attacker_can_replay else (lambda: None)
    sent = one_step(world, victim, 1.0, generator())
    noise = one_step(world, dummy, 1.0, generator()) - one_step(world, dummy, 0.0, generator())
    truth = one_step(world, victim, 0.0, generator())
    return float((sent - noise - truth).norm() / (truth - flat(fresh_model(world))).norm())


def item_readout(user: int = 0, users: int = 20, **mode) -> tuple[float, float]:
    """(recall of the server's guess of one user's items, recall of chance), from the
    id-table rows of the update that user's client sends in round 1 under `mode`."""
    from client.local_data import simulated_client_data

    config = {"synthetic-users": users, "partitioning": "iid", "local-steps": 8, "lora-layers": 0, **mode}
    context = client_context(user, users, **config)  # iid with one partition per user: one user a client
    arrays = global_state(context.run_config)
    reply = deliver(MessageType.TRAIN, context, RecordDict({"arrays": arrays,
                                                           "config": ConfigRecord({"server-round": 1})}))
    sent = reply.content["arrays"]["item_ids.weight"].numpy()
    moved = np.linalg.norm(sent - arrays["item_ids.weight"].numpy(), axis=1)
    settings = RunSettings.from_run_config(context.run_config)
    items = set(np.concatenate(simulated_client_data(settings, user, users).split.train).tolist())
    guess = set(np.argsort(-moved)[: len(items)].tolist())
    return len(guess & items) / len(items), len(items) / len(moved)


def membership_audit(world, claimed: float | None, canaries: int = 200, per_side: int = 20,
                     epochs: int = 15, inclusion_seed: int | None = None) -> tuple[int, float]:
    """(correct guesses of 2 x per_side, the epsilon lower bound at 99.9% confidence) for
    training without DP (claimed None) or with example-level DP-SGD at `claimed`; canary
    inclusion is fresh unless a test fixes `inclusion_seed`."""
    data, split = world
    model = fresh_model(world)
    real = private_data(model, split.train, "example")
    inclusion = None if inclusion_seed is None else np.random.default_rng(inclusion_seed)
    ids, targets, included = make_canaries(model, canaries, seed=1, inclusion=inclusion)
    train_audited(model, with_canaries(real, ids, targets, included), claimed, 1e-5, 64, 0.5, epochs, 16, seed=0)
    made, correct = guesses(canary_scores(model, ids, targets), included, per_side)
    return correct, audit_lower_bound(canaries, made, correct, 1e-5, confidence=0.999)


MODES = {
    "dp = none (control)": {"dp": "none"},
    "dp = user (default, epsilon 8)": {"dp": "user"},
    "dp = example (epsilon 8)": {"dp": "example", "dp-sample-rate": 1.0, "dp-expected-batch": 40.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5, help="users whose item read-out is averaged (default 5)")
    parser.add_argument("--out", default="runs", help="folder for bench_attacks.json (default runs/)")
    args = parser.parse_args()
    world = small_world()
    result: dict = {"replay (relative error of the recovered update)": {
        "noise seeded (replayable: the old way)": replay_error(world, True),
        "fresh OS entropy (the apps)": replay_error(world, False)}}
    print(json.dumps(result), flush=True)
    readout = {}
    for name, mode in MODES.items():
        recalls = [item_readout(user, **mode) for user in range(args.users)]
        readout[name] = {"recall": float(np.mean([r for r, _ in recalls])),
                         "chance": float(np.mean([c for _, c in recalls]))}
        print(name, json.dumps(readout[name]), flush=True)
    result["item read-out from the id table (one user per client)"] = readout
    membership = {}
    for name, claimed in (("no DP (control)", None), ("DP-SGD, example-level epsilon 8", 8.0),
                          ("DP-SGD, example-level epsilon 2", 2.0)):
        correct, bound = membership_audit(world, claimed)
        membership[name] = {"correct guesses of 40": correct, "epsilon lower bound (99.9%)": bound}
        print(name, json.dumps(membership[name]), flush=True)
    result["membership (one-run canary audit, 200 canaries)"] = membership
    Path(args.out).mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    (Path(args.out) / "bench_attacks.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
