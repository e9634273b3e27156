"""One round of local DP-SGD under a budget: the noise is calibrated once for the planned
participation (from public settings only), the round declines when it would exceed the
budget, trains, and records its spend before the update leaves the client."""

from __future__ import annotations

import math

from client.privacy_account import Store
from shared_model.dp_training import private_data, train_private
from shared_model.ledger import LedgerEntry, events_of
from shared_model.privacy import epsilon, interaction_epsilon, noise_multiplier
from shared_model.recommender import Recommender
from shared_model.settings import RunSettings


def steps_per_round(settings: RunSettings) -> int:
    """local-epochs expected passes at the Poisson rate, capped by local-steps (if set)."""
    steps = settings.local_epochs * math.ceil(1 / settings.dp_sample_rate)
    return min(steps, settings.local_steps) if settings.local_steps else steps


def planned_calibration(settings: RunSettings, client: str) -> dict:
    """Everything the budget was calibrated under: public settings, the same for every
    client of the run (nothing here depends on how much data a client holds)."""
    steps = steps_per_round(settings)
    z = noise_multiplier(settings.dp_epsilon, settings.dp_sample_rate, settings.dp_expected_rounds * steps,
                         settings.dp_delta, settings.dp_accountant)
    return {"client": client, "unit": settings.dp, "budget": settings.dp_epsilon, "delta": settings.dp_delta,
            "accountant": settings.dp_accountant, "noise-multiplier": z, "sample-rate": settings.dp_sample_rate,
            "steps-per-round": steps, "max-grad-norm": settings.dp_max_grad_norm,
            "expected-batch": settings.dp_expected_batch, "window": settings.model.history}


def private_round(model: Recommender, sequences: list, settings: RunSettings, store: Store, server_round: int,
                  client: str) -> tuple[dict | None, LedgerEntry]:
    """(training result, or None if the budget would be exceeded; the ledger entry written).
    A client without data trains too (noise only): declining would release that it has none."""
    with store.lock():  # one round at a time per device: the check and the spend are one step
        calibration = store.calibration(planned_calibration(settings, client))
        ledger = store.ledger()
        step = (calibration["noise-multiplier"], calibration["sample-rate"], calibration["steps-per-round"])
        events = events_of(ledger)
        delta, accountant = calibration["delta"], calibration["accountant"]
        common = dict(client=client, round=server_round, unit=calibration["unit"], noise_multiplier=step[0],
                      sample_rate=step[1], delta=delta, accountant=accountant, budget=calibration["budget"])
        if calibration["unit"] == "example":
            common["window"] = calibration["window"]
        if epsilon(events + [step], delta, accountant) > calibration["budget"] * (1 + 1e-9):
            entry = LedgerEntry(status="declined", steps=0, epsilon=epsilon(events, delta, accountant),
                                **with_interaction(common, events, calibration))
            store.append(entry)
            return None, entry
        data = private_data(model, sequences, calibration["unit"])
        result = train_private(model, data, step[0], calibration["max-grad-norm"], step[1], step[2],
                               calibration["expected-batch"], settings.learning_rate, settings.dp_negatives)
        spent = events + [step]
        entry = LedgerEntry(status="trained", steps=step[2], epsilon=epsilon(spent, delta, accountant),
                            **with_interaction(common, spent, calibration))
        store.append(entry)  # before the update leaves the client
        return result, entry


def with_interaction(common: dict, events: list, calibration: dict) -> dict:
    """Example-level entries also carry the per-interaction epsilon at the same delta."""
    if calibration["unit"] != "example":
        return common
    eps = interaction_epsilon(events, calibration["window"], calibration["delta"], calibration["accountant"])
    return {**common, "interaction_epsilon": eps}
