"""Pretraining on a consenting cohort (public-users): what it reads, what it does, when it
stops, where it is refused."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from server.public_pretraining import consenting_users, pretrain_on_public_users
from server.server_app import starting_model, undoing_rate
from shared_model.metrics import evaluate_scores
from shared_model.recommender import score_catalog
from shared_model.settings import RunSettings, SettingsError
from shared_model.splits import leave_one_out
from shared_model.training import TrainConfig, epochs_keeping_best, make_optimizer, sequence_chunks
from simulations.flower_runner import app_run_config
from simulations.population import run


def settings_of(**overrides) -> RunSettings:
    config = {"dataset": "synthetic", "synthetic-users": 300, "partitioning": "per-user", "dp": "none",
              "server-dp": True, "id-embeddings": False, **overrides}
    return RunSettings.from_run_config(app_run_config(**config))


def test_consenting_users_are_a_fixed_share_drawn_from_the_seed():
    chosen = consenting_users(1000, 0.01, seed=0)
    assert len(chosen) == 10 and len(set(chosen)) == 10 and chosen.max() < 1000
    assert np.array_equal(chosen, consenting_users(1000, 0.01, seed=0))
    assert not np.array_equal(chosen, consenting_users(1000, 0.01, seed=1))
    assert len(consenting_users(943, 0.01, seed=0)) == 10  # rounded up: a share > 0 is never nobody


def test_pretraining_on_consenting_users_lifts_the_starting_model_and_shows_its_progress(caplog):
    split = leave_one_out(settings_of().load_dataset())
    valid = split.cases("valid")

    def valid_ndcg(model) -> float:
        return evaluate_scores(score_catalog(model.eval(), valid.histories), valid)["NDCG@10"]

    plain = valid_ndcg(starting_model(settings_of()))
    with caplog.at_level(logging.INFO, logger="flwr"):
        pretrained = valid_ndcg(starting_model(settings_of(**{"public-users": 0.3, "public-epochs": 10})))
    progress = [r.getMessage() for r in caplog.records if "pretraining on the consenting users" in r.getMessage()]
    assert [m.split("epoch ")[1].split(",")[0] for m in progress] == [f"{e}/10" for e in range(1, 11)]
    assert all("their validation NDCG@10" in m for m in progress)
    assert pretrained > 2 * plain, (plain, pretrained)  # measured: 0.017 -> 0.050
    assert any("may undo the pretraining" in r.getMessage() for r in caplog.records)  # the default rate, 0.02
    resumed = valid_ndcg(starting_model(settings_of(**{"public-users": 0.3}), pretrain=False))
    assert resumed == plain  # a resumed run starts from its checkpoint: no pretraining again


def test_public_users_are_refused_outside_a_simulation_and_out_of_range():
    with pytest.raises(SettingsError, match="'public-users' needs the consenting users' data"):
        starting_model(settings_of(**{"public-users": 0.1}), simulation=False)
    with pytest.raises(SettingsError, match=r"'public-users' must be in \[0, 1\)"):
        settings_of(**{"public-users": 1.0})
    with pytest.raises(SettingsError, match="'public-epochs' must be at least 1"):
        settings_of(**{"public-epochs": 0})
    with pytest.raises(SettingsError, match="'public-patience' must be at least 1"):
        settings_of(**{"public-patience": 0})


def test_a_fine_tuning_server_rate_draws_no_warning_and_a_large_one_names_the_pretrainings_rate():
    assert "5 times the pretraining's Adam rate (0.004)" in undoing_rate(settings_of())  # the default, 0.02
    assert undoing_rate(settings_of(**{"server-learning-rate": 0.004})) is None
    ftrl = {"server-dp-mechanism": "dp-ftrl", "server-dp-sample-rate": 0.1, "clients-per-round": 30}
    assert undoing_rate(settings_of(**ftrl, **{"dp-ftrl-step": "ftrl"})) is None  # it does not use the rate
    assert undoing_rate(settings_of(**ftrl)) is not None  # FedAdam's step on the releases does


def test_training_stops_after_patience_epochs_without_a_better_validation_and_keeps_the_best_epoch():
    settings = settings_of()
    split = leave_one_out(settings.load_dataset())
    model = starting_model(settings)
    chunks = sequence_chunks(model, split.train[:50])
    scripted = iter([0.10, 0.30, 0.20, 0.25, 0.40])  # epoch 2 is best; patience 2 ends epoch 4
    states = []

    def validate() -> dict[str, float]:
        states.append(model.trainable_state())
        return {"NDCG@10": next(scripted)}

    reports = list(epochs_keeping_best(model, make_optimizer(model, TrainConfig()), chunks, 16,
                                       np.random.default_rng(0), epochs=5, patience=2, validate=validate))
    assert [(r.epoch, r.best_epoch, r.best_ndcg, r.last) for r in reports] == [
        (1, 1, 0.10, False), (2, 2, 0.30, False), (3, 2, 0.30, False), (4, 2, 0.30, True)]
    kept = model.trainable_state()
    assert all(torch.equal(kept[k], states[1][k]) for k in kept)  # epoch 2's model, not the last one
    assert not all(torch.equal(kept[k], states[3][k]) for k in kept)


def test_pretraining_keeps_the_epoch_that_ranks_the_consenting_users_validation_items_best():
    settings = settings_of(**{"public-users": 0.3, "public-epochs": 60, "public-patience": 3})
    split = leave_one_out(settings.load_dataset())
    valid = split.cases("valid", consenting_users(len(split.train), 0.3, settings.seed))
    model = starting_model(settings_of())
    done = pretrain_on_public_users(model, settings)
    assert done["best epoch"] <= done["epochs"] - 3 and done["epochs"] < 60  # stopped early
    kept = evaluate_scores(score_catalog(model, valid.histories), valid)["NDCG@10"]
    assert kept == pytest.approx(done["best validation NDCG@10"], abs=1e-9)


def test_a_runs_summary_names_the_epoch_its_pretraining_kept(tmp_path):
    settings = settings_of(**{"public-users": 0.3, "public-epochs": 60, "public-patience": 3, "num-server-rounds": 1,
                              "output-dir": str(tmp_path), "run-name": "pretrained"})
    folder = run(settings, noise_free=True)
    kept = json.loads((folder.path / "summary.json").read_text())["public users"]["pretraining"]
    assert kept["users"] == 90 and kept["of"] == 300 and kept["best epoch"] < kept["epochs"] < 60
    assert kept == folder.pretraining()  # saved at the start: a resumed run's summary keeps it
