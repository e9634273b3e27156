"""DP-FTRL's square-root noise (`dp-ftrl-noise = "square-root"`): the factorization, the
noise each round's release carries, the strongest attacker against what the ledger
accounts (with the naive one-round claim as the control it breaks), the ledger, the audit,
the calculator and an in-process run."""

import itertools
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.task_identity import TaskIdentity

from conftest import counted_generators
from server.cli import main
from server.dp_ftrl import DPFTRL
from server.privacy_audit import audit_run
from server.run_folder import RunFolder
from server.server_app import record_privacy
from server.strategy import SeededFedAdam
from shared_model.ledger import LedgerEntry, append_entries, read_ledger, tree_lengths
from shared_model.privacy import epsilon, ftrl_events, ftrl_noise_multiplier, noise_multiplier, tree_epsilon
from shared_model.settings import RunSettings, SettingsError
from shared_model.square_root_noise import (SquareRootNoise, coefficients, release_coefficients,
                                            square_root_weight, squared_sensitivity)
from simulations.flower_runner import app_run_config
from simulations.population import run

COORDINATES = 20_000  # independent trials of every statistic below: a mean to about 1%


def factor_matrix(size: int) -> np.ndarray:
    """C: the lower triangular Toeplitz matrix of f_0..f_{size-1}."""
    f = coefficients(size)
    return np.array([[f[i - j] if i >= j else 0.0 for j in range(size)] for i in range(size)])


def test_the_factor_squared_is_the_prefix_sum_matrix_and_releases_telescope():
    factor = factor_matrix(64)
    assert np.allclose(factor @ factor, np.tril(np.ones((64, 64))))
    assert release_coefficients(4) == pytest.approx([1.0, -0.5, -0.125, -0.0625])
    assert squared_sensitivity(50, 50) == pytest.approx(2.3099, abs=1e-4)  # the tree's node count at 50: 6
    assert squared_sensitivity(25, 10) == pytest.approx(2 * squared_sensitivity(10, 10) + squared_sensitivity(5, 5))
    assert sum(square_root_weight(t) for t in range(1, 11)) == pytest.approx(squared_sensitivity(10, 10))


def test_the_releases_add_up_to_the_factor_times_noise_drawn_once_a_round():
    noise = SquareRootNoise({"w": (COORDINATES,)}, 2.0, counted_generators())
    releases = [noise.round_noise(t)["w"] for t in range(1, 9)]
    assert len(noise.draws) == 8 and np.array_equal(noise.round_noise(3)["w"], releases[2])  # drawn once, kept
    f = coefficients(8)
    for t in range(1, 9):  # what t rounds' releases add up to: sum_k f_{t-k} z_k, variance 4 sum_{k<t} f_k^2
        prefix = sum(releases[:t])
        assert np.allclose(prefix, sum(f[t - k] * noise.draws[k - 1]["w"] for k in range(1, t + 1)))
        assert np.var(prefix) == pytest.approx(4.0 * np.sum(f[:t] ** 2), rel=0.05)
    assert np.var(releases[7]) == pytest.approx(4.0 * np.sum(release_coefficients(8) ** 2), rel=0.05)


def attackers_separation(releases: np.ndarray, canary: np.ndarray, std: float) -> float:
    """The strongest attacker's separation, in standard deviations, between a client's canary
    (in round 1) and no canary, per coordinate: it reads y = C x + z back from the releases'
    prefix sums (y = C^-1 P) and projects on the canary's column of C (Neyman-Pearson for a
    Gaussian); measured as the mean gap over the statistic's spread."""
    rounds = releases.shape[0]
    factor = factor_matrix(rounds)
    direction = factor[:, 0] / np.linalg.norm(factor[:, 0])
    def statistic(r: np.ndarray) -> np.ndarray:
        return direction @ np.linalg.solve(factor, np.cumsum(r, axis=0)) / std
    without, with_canary = statistic(releases), statistic(releases + canary)
    return float((with_canary.mean() - without.mean()) / without.std())


def test_the_strongest_attacker_separates_a_client_no_more_than_the_ledger_accounts():
    """A client in round 1 of 32 moves one coordinate by the clip S (= std / z): the ledger's
    events (one Gaussian per round at z / f_{t-1}) account a separation mu = sqrt(sum f^2) / z,
    and the measured one matches it. The control: the claim a naive reading would make (a
    client in one round is one Gaussian at z, by parallel composition) is beaten by ~1.46x:
    the canary stays in every later release's correction."""
    rounds, z, clip = 32, 2.0, 1.0
    noise = SquareRootNoise({"w": (COORDINATES,)}, z * clip, counted_generators())
    releases = np.stack([noise.round_noise(t)["w"] for t in range(1, rounds + 1)])
    canary = np.zeros_like(releases)
    canary[0] = clip
    measured = attackers_separation(releases, canary, z * clip)
    accounted = math.sqrt(sum(1 / (z / math.sqrt(square_root_weight(t))) ** 2 for t in range(1, rounds + 1)))
    naive = 1 / z
    assert measured == pytest.approx(accounted, rel=0.03)
    assert measured > 1.4 * naive
    # the same mu gives the ledger's epsilon: one Gaussian at z / sqrt(sum f^2)
    entries_epsilon = epsilon(ftrl_events(z, rounds, rounds, "square-root"), 1e-5)
    assert entries_epsilon == pytest.approx(epsilon([(1 / accounted, 1.0, 1)], 1e-5), rel=1e-6)


def entry(tree_round: int, steps: int = 1, kind: str | None = "square-root", noise: float = 2.0) -> LedgerEntry:
    return LedgerEntry(client="server", round=tree_round, status="aggregated", unit="user", noise_multiplier=noise,
                       sample_rate=1.0, steps=steps, delta=1e-5, accountant="rdp", epsilon=1.0,
                       tree_round=tree_round, population=100, cohort=10, ftrl_noise=kind)


@pytest.mark.parametrize("epochs", [[10], [10] * 6, [7, 7, 3], [1, 1, 1]])
def test_the_ledgers_per_round_events_give_one_gaussian_an_epoch(epochs):
    events = [entry(t).step() for rounds in epochs for t in range(1, rounds + 1)]
    assert epsilon(events, 1e-5) == pytest.approx(
        tree_epsilon([(rounds, 2.0, "square-root") for rounds in epochs], 1e-5), rel=1e-6)


def test_a_square_root_entry_is_one_step_and_one_kind_a_tree():
    assert entry(3).step() == pytest.approx((2.0 / 0.375, 1.0, 1))  # z / f_2, f_2 = 3/8
    with pytest.raises(ValueError, match="tree-round 3"):
        entry(3, steps=0)  # the tree's count for round 3, not the factorization's
    with pytest.raises(ValueError, match="ftrl-noise 'sqrt'"):
        entry(1, kind="sqrt")
    with pytest.raises(ValueError, match="within a tree"):
        tree_lengths([entry(1), entry(2, steps=1, kind=None)])


def test_the_audit_recomputes_a_square_root_ledger_and_catches_a_tree_claim(tmp_path):
    """Two epochs of 4 rounds at z = 2: the entries' epsilons as the server computes them are
    clean; the same entries claiming the tree's epsilon (a larger z's worth) are caught."""
    for claim, caught in (("square-root", False), ("tree", True)):
        entries, epochs = [], []
        for server_round, tree_round in enumerate([1, 2, 3, 4] * 2, start=1):
            epochs = epochs + [0] if tree_round == 1 else epochs
            epochs[-1] = tree_round
            claimed = tree_epsilon([(t, 2.0, claim) for t in epochs], 1e-5)
            entries.append(LedgerEntry(**{**entry(tree_round).__dict__, "round": server_round, "epsilon": claimed,
                                          "population": 40}))
        append_entries(tmp_path / claim / "privacy_ledger.jsonl", entries)
        assert bool(audit_run(tmp_path / claim).disagreements) == caught


def test_the_calculator_and_the_plan_know_the_square_root_noise(capsys):
    assert main(["privacy", "epsilon", "--noise-multiplier", "3", "--sample-rate", "1", "--steps", "25",
                 "--delta", "1e-6", "--tree-rounds", "10", "--ftrl-noise", "square-root"]) == 0
    expected = tree_epsilon([(10, 3.0, "square-root"), (10, 3.0, "square-root"), (5, 3.0, "square-root")], 1e-6)
    assert f"epsilon {expected:.4f}" in capsys.readouterr().out
    assert main(["privacy", "noise", "--epsilon", "8", "--sample-rate", "1", "--steps", "50", "--delta", "1e-6",
                 "--tree-rounds", "50", "--ftrl-noise", "square-root"]) == 0
    z = ftrl_noise_multiplier(8.0, 50, 50, 1e-6, "rdp", "square-root")
    assert f"noise multiplier {z:.4f}" in capsys.readouterr().out
    assert z == pytest.approx(noise_multiplier(8.0, 1.0, 1, 1e-6) * math.sqrt(2.3099), rel=1e-3)
    assert z < ftrl_noise_multiplier(8.0, 50, 50, 1e-6, "rdp", "tree")
    assert main(["privacy", "plan", "--users", "100000", "--cohort", "1000", "--rounds", "50", "--epsilon", "8",
                 "--delta", "1e-6"]) == 0
    assert 'dp-ftrl-noise = "square-root"' in capsys.readouterr().out


def test_an_epoch_whose_noise_population_or_cohort_changes_is_refused():
    """A varying z would leave a later round's user worse off than the first round's, whom the
    entries account (a forged ledger: the server's z is one per run); a changed population or
    cohort within a tree would make its length unreadable."""
    assert tree_lengths([entry(1), entry(2)]) == [(2, 2.0, "square-root")]
    with pytest.raises(ValueError, match="noise multiplier 1.0 within an epoch"):
        tree_lengths([entry(1, noise=3.0)] + [entry(t, noise=1.0) for t in range(2, 5)])
    changed = LedgerEntry(**{**entry(2).__dict__, "population": 1000})
    with pytest.raises(ValueError, match="population 1000 and cohort 10 within a tree of 100 and 10"):
        tree_lengths([entry(1), changed])


def test_the_real_strategys_releases_leak_no_more_than_its_ledger_claims(tmp_path):
    """The attacker against the real DPFTRL and the server's own ledger entries: 40 clients, 4 a
    round, 25 rounds (two epochs of 10, then 5 rounds of a third), zero updates, clip 0.5. The
    releases are regressed on every noise draw the strategy kept (the real map M: C x release =
    x + M z); the strongest attacker against a client in one round of each epoch (any rounds,
    either sign) separates by mu = sqrt(u' (M M')^-1 u) / z. The ledger's epsilon must be that
    mu's. A new epoch that reused an earlier epoch's draws would make M M' singular; draws at
    another std than z S would fail the variance."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    z, clip, cohort = 2.0, 0.5, 4
    config = {"partitioning": "per-user", "dp": "none", "server-dp": True, "id-embeddings": False,
              "server-dp-mechanism": "dp-ftrl", "dp-ftrl-noise": "square-root", "server-dp-noise": z,
              "server-dp-clip": clip, "clients-per-round": cohort, "output-dir": str(tmp_path), "run-name": "attack"}
    settings = RunSettings.from_run_config(app_run_config(**config))
    inner = SeededFedAdam({n: n for n in range(1, 41)}, 0, seed=0, server_lr=0.1, half_life=1e9)
    strategy = DPFTRL(inner, z, clip, cohort, 1.0, 0.0, "ftrl", "square-root", randomness=counted_generators())
    folder, entries, releases, noises, epochs = RunFolder.open(settings), [], [], [], []
    model = ArrayRecord({"w": Array(np.zeros(4000, dtype=np.float32))})
    for server_round in range(1, 26):
        strategy.begin_round(model)
        if not noises or strategy.tree is not noises[-1]:
            noises.append(strategy.tree)
            epochs.append([])
        epochs[-1].append(server_round - 1)
        figures = strategy.release_figures()  # what aggregate_clipped hands record_privacy
        releases.append(strategy.noisy_average(*strategy.clipped_sum([]))["w"] * cohort)
        record_privacy(folder, settings, server_round, [], entries, figures)
    draws = np.stack([d["w"] for noise in noises for d in noise.draws], axis=1)  # coordinates x draws
    assert [len(e) for e in epochs] == [10, 10, 5] and draws.shape[1] == 25
    assert np.std(draws) == pytest.approx(z * clip, rel=0.01)
    found, *_ = np.linalg.lstsq(draws, np.stack(releases, axis=1), rcond=None)
    mixing = found.T  # rounds x draws
    assert np.allclose(draws @ mixing.T, np.stack(releases, axis=1), atol=1e-9)
    precision = np.linalg.inv(mixing @ mixing.T)
    worst = max(np.sqrt(u @ precision @ u) / z
                for rounds in itertools.product(*epochs)
                for signs in itertools.product((1.0, -1.0), repeat=len(epochs))
                for u in [np.bincount(rounds, weights=signs, minlength=25)])
    claimed = read_ledger(folder.ledger_path)[-1].epsilon
    assert claimed == pytest.approx(epsilon([(1 / worst, 1.0, 1)], settings.dp_delta), rel=1e-3)
    assert entries[-1].epsilon == claimed


def test_a_bad_noise_kind_is_refused_by_name():
    config = {"partitioning": "per-user", "server-dp": True, "server-dp-mechanism": "dp-ftrl", "dp-ftrl-noise": "bl"}
    with pytest.raises(SettingsError, match="run config 'dp-ftrl-noise'"):
        RunSettings.from_run_config(app_run_config(**config))


def test_an_in_process_run_with_square_root_noise_is_accounted_and_audited(tmp_path):
    """20 users, 4 a round, 6 rounds: epochs of 5 rounds, then a new one; the ledger's
    square-root events, the twin's one Gaussian an epoch, and a clean audit."""
    config = {"synthetic-users": 20, "partitioning": "per-user", "dp": "none", "server-dp": True,
              "id-embeddings": False, "server-dp-mechanism": "dp-ftrl", "dp-ftrl-noise": "square-root",
              "clients-per-round": 4, "num-server-rounds": 6, "eval-every": 6, "output-dir": str(tmp_path),
              "run-name": "sqrt"}
    settings = RunSettings.from_run_config(app_run_config(**config))
    folder = run(settings).path
    server = [e for e in read_ledger(folder / "privacy_ledger.jsonl") if e.client == "server"]
    assert [(e.tree_round, e.steps, e.ftrl_noise) for e in server] == [
        (1, 1, "square-root"), (2, 1, "square-root"), (3, 1, "square-root"), (4, 1, "square-root"),
        (5, 1, "square-root"), (1, 1, "square-root")]
    z = settings.server_dp_noise
    assert server[-1].epsilon == pytest.approx(
        tree_epsilon([(5, z, "square-root"), (1, z, "square-root")], settings.dp_delta), rel=1e-6)
    audit = audit_run(folder)
    assert audit.checked == 12 and not audit.disagreements
