"""One round of local DP-SGD under a budget: calibrate the noise once for the planned
participation, decline when the next round would exceed the budget, train, record."""

from __future__ import annotations

import time

from client.privacy_account import DeviceStore, SimulatedStore, spent
from shared_model.dp_training import batches_per_epoch, private_data, train_private
from shared_model.privacy import group_privacy, noise_multiplier
from shared_model.recommender import Recommender
from shared_model.settings import RunSettings


def private_round(model: Recommender, sequences: list, settings: RunSettings, store: SimulatedStore | DeviceStore,
                  server_round: int, seed: int) -> tuple[dict | None, dict]:
    """(training result or None if declined, the ledger entry written for this round)."""
    data = private_data(sequences, model.config.history, settings.dp)
    per_epoch = batches_per_epoch(len(data), settings.batch_size)
    sample_rate, steps = 1.0 / per_epoch, settings.local_epochs * per_epoch
    calibration = store.calibration()
    if calibration is None:  # once per client, for its whole planned participation
        z = noise_multiplier(settings.dp_epsilon, sample_rate, settings.dp_expected_rounds * steps,
                             settings.dp_delta, settings.dp_accountant)
        calibration = {"noise-multiplier": z, "unit": settings.dp, "budget": settings.dp_epsilon,
                       "delta": settings.dp_delta, "accountant": settings.dp_accountant}
        store.save_calibration(calibration)
    z = calibration["noise-multiplier"]
    ledger = store.ledger()
    entry = {"round": server_round, "time": time.time(), "unit": calibration["unit"], "noise-multiplier": z,
             "sample-rate": sample_rate, "steps": steps, "delta": calibration["delta"],
             "accountant": calibration["accountant"], "budget": calibration["budget"]}
    if spent(ledger, entry["delta"], entry["accountant"], (z, sample_rate, steps)) > calibration["budget"] * (1 + 1e-9):
        entry.update(status="declined", steps=0, epsilon=spent(ledger, entry["delta"], entry["accountant"]))
        store.append(entry)
        return None, entry
    result = train_private(model, data, z, settings.dp_max_grad_norm, settings.batch_size, settings.learning_rate,
                           settings.local_epochs, settings.dp_negatives, seed)
    entry.update(status="trained", steps=result["steps"], **{"sample-rate": result["sample-rate"]})
    entry["epsilon"] = spent(ledger + [entry], entry["delta"], entry["accountant"])
    if entry["unit"] == "example":  # one interaction sits in up to W + 1 examples
        group = model.config.history + 1
        entry["group-size"] = group
        entry["group-epsilon"], entry["group-delta"] = group_privacy(entry["epsilon"], entry["delta"], group)
    store.append(entry)  # before the update leaves the client
    return result, entry
