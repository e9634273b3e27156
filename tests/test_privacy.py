"""Accountants against published values, the calculator, and a private federated run
through `flwr run` whose ledger the audit reproduces (and whose tampering it catches)."""

import contextlib
import io
import json
import shutil
from types import SimpleNamespace

import pytest

from server.cli import main
from shared_model.privacy import (audit_lower_bound, audit_p_value, epsilon, independent_epsilon,
                                  interaction_epsilon, noise_multiplier)
from simulations.flower_runner import run_flower


def test_rdp_matches_opacus_published_vector():
    # opacus/tests/accountants_test.py: sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> 7.3291
    assert epsilon([(1.5, 0.04, 2250)], 1e-5, "rdp") == pytest.approx(7.3291, abs=1e-4)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_independent_accountants_agree_within_one_percent(accountant):
    events = [(1.1, 0.02, 500), (0.9, 0.05, 120)]
    ours, twin = epsilon(events, 1e-5, accountant), independent_epsilon(events, 1e-5, accountant)
    assert ours == pytest.approx(twin, rel=0.01)


def test_noise_for_a_target_is_the_inverse_of_epsilon():
    z = noise_multiplier(4.0, 0.01, 10_000, 1e-5, "rdp")
    assert epsilon([(z, 0.01, 10_000)], 1e-5, "rdp") <= 4.0
    assert epsilon([(z * 0.98, 0.01, 10_000)], 1e-5, "rdp") > 4.0


def test_per_interaction_epsilon_is_the_mechanism_at_sensitivity_2w_plus_1():
    """The README's old "epsilon 8" row (noise 2.02, rate 1, 10 steps, W = 50): the Gaussian
    with noise multiplier 2.02 / 101, at the same delta, is about 13,000, not 8 x 51. A
    second accountant agrees (PLD, at W = 5: 221 against RDP's 229; at W = 50 PLD takes two
    minutes on 2 cores)."""
    eps = interaction_epsilon([(2.02, 1.0, 10)], 50, 1e-5, "rdp")
    assert eps == pytest.approx(epsilon([(2.02 / 101, 1.0, 10)], 1e-5, "rdp"))
    assert 12_000 < eps < 15_000
    assert interaction_epsilon([(2.02, 1.0, 10)], 5, 1e-5, "pld") == pytest.approx(
        interaction_epsilon([(2.02, 1.0, 10)], 5, 1e-5, "rdp"), rel=0.05)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0])
def test_accountants_refuse_what_is_no_mechanism(bad):
    with pytest.raises(ValueError, match="noise multiplier"):
        epsilon([(bad, 0.5, 10)], 1e-5)
    with pytest.raises(ValueError, match="target epsilon"):
        noise_multiplier(bad, 0.5, 10, 1e-5)


def test_one_run_audit_bound():
    assert audit_lower_bound(1000, 100, 100, 1e-5) == pytest.approx(3.465, abs=0.01)
    assert audit_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance level proves nothing
    assert audit_lower_bound(1000, 100, 90, 1e-5) < audit_lower_bound(1000, 100, 95, 1e-5)
    bound = audit_lower_bound(1000, 100, 90, 1e-5)
    assert audit_p_value(1000, 100, 90, bound, 1e-5) <= 0.05 + 1e-6


def run_cli(*args: str) -> SimpleNamespace:
    """`fedrec` in this process, its output captured (tests/test_cli.py starts the installed
    commands themselves; each start costs seconds)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as error:  # argparse's refusal
            code = error.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_calculator_prints_the_numbers():
    out = run_cli("privacy", "epsilon", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps",
                  "2250", "--delta", "1e-5")
    assert out.returncode == 0 and "epsilon 7.3291" in out.stdout
    out = run_cli("privacy", "lower-bound", "--canaries", "1000", "--guesses", "100", "--correct", "100",
                  "--delta", "1e-5")
    assert "epsilon lower bound 3.46" in out.stdout
    bad = run_cli("privacy", "noise", "--epsilon", "8", "--sample-rate", "1.5", "--steps", "10",
                  "--delta", "1e-5")
    assert bad.returncode == 2 and "--sample-rate" in bad.stderr
    whole = run_cli("privacy", "noise", "--epsilon", "8", "--sample-rate", "1", "--steps", "10",
                    "--delta", "1e-5")
    assert whole.returncode == 0 and "noise multiplier 2.02" in whole.stdout  # one batch of all examples
    pure = run_cli("privacy", "lower-bound", "--canaries", "1000", "--guesses", "100", "--correct", "100",
                   "--delta", "0")
    assert pure.returncode == 0 and "epsilon lower bound 3.4" in pure.stdout  # delta 0: a pure-epsilon claim
    for flag, value in (("--noise-multiplier", "inf"), ("--noise-multiplier", "nan"), ("--noise-multiplier", "0")):
        refused = run_cli("privacy", "epsilon", flag, value, "--sample-rate", "0.5", "--steps", "10",
                          "--delta", "1e-5")
        assert refused.returncode == 2 and flag in refused.stderr


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = {"synthetic-users": 16, "partitioning": "per-user", "num-server-rounds": 3, "eval-every": 3,
              "dp": "example", "dp-expected-rounds": 1, "dp-epsilon": 2.0, "dp-negatives": 16, "dp-sample-rate": 0.5,
              "dp-expected-batch": 20.0, "server-dp": True, "server-dp-sample-rate": 0.75, "output-dir": str(out),
              "run-name": "private", "server-dp-adaptive-clip": True, "server-dp-count-noise": 2.0}
    run = run_flower(config, num_supernodes=16)
    assert run.ok, run.log[-4000:]
    return out / "private"


def test_clients_decline_when_their_budget_is_spent_and_the_run_completes(private_run):
    rounds = [json.loads(line) for line in (private_run / "metrics.jsonl").read_text().splitlines()][1:]
    assert [m["round"] for m in rounds] == [1, 2, 3]
    assert sum(m["declined"] for m in rounds) > 0
    assert rounds[-1]["evaluated on"] == "server (held-out split)"  # clients never evaluate under DP
    summary = json.loads((private_run / "summary.json").read_text())
    example = summary["privacy"]["example"]
    assert example["epsilon"] <= 2.0 * (1 + 1e-9) and example["declined"] > 0
    assert example["delta"] == 1e-5 and example["accountant"] == "rdp" and example["relation"] == "add/remove"
    assert example["per interaction"]["epsilon"] > 10 * example["epsilon"]
    user = summary["privacy"]["user"]
    assert user["epsilon"] == pytest.approx(epsilon([(1.0, 0.75, 3)], 1e-5, "rdp")) and user["mechanism"] == "dp-fedavg"
    # adaptive clipping: the clip used each round is in its metrics line and the server's ledger entry
    server = [json.loads(line) for line in (private_run / "privacy_ledger.jsonl").read_text().splitlines()
              if json.loads(line)["client"] == "server"]
    assert [e["clip"] for e in server] == [m["clip"] for m in rounds] and rounds[0]["clip"] == 1.0
    assert len({m["clip"] for m in rounds}) == 3  # the noisy count moves it every round
    assert all(e["noise-multiplier"] == 1.0 and e["count-noise"] == 2.0 and e["update-noise-multiplier"] > 1.0
               for e in server)
    assert summary["best"]["round"] == 3  # no round is picked on private validation numbers


def audit(folder, out):
    return run_cli("audit", str(folder), "--out", str(out))


def rewrite(folder, change):
    """Apply `change` to the ledger's entries (a list of dicts) in a copy of the run folder."""
    entries = [json.loads(line) for line in (folder / "privacy_ledger.jsonl").read_text().splitlines()]
    lines = change(entries)
    (folder / "privacy_ledger.jsonl").write_text("".join(line + "\n" for line in lines))


def test_audit_reproduces_the_ledger_and_catches_tampering(private_run, tmp_path):
    report_dir = tmp_path / "report"
    ok = audit(private_run, report_dir)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = (report_dir / "privacy_audit.md").read_text()
    entries = [json.loads(line) for line in (private_run / "privacy_ledger.jsonl").read_text().splitlines()]
    worst = max((e for e in entries if e["unit"] == "example"), key=lambda e: e["epsilon"])
    assert f"{worst['epsilon']:.4f}" in report and "None: every claimed epsilon was reproduced" in report
    assert (report_dir / "epsilon_per_client.png").exists() and (report_dir / "user_epsilon.png").exists()
    server = [e for e in entries if e["client"] == "server"]
    assert [e["steps"] for e in server] == [1, 1, 1]  # one aggregation a round, composed over rounds

    trained = next(i for i, e in enumerate(entries) if e["status"] == "trained")
    tampered = {
        "under-reported epsilon": lambda e: e.update(epsilon=e["epsilon"] * 0.9),
        "forged per-interaction epsilon": lambda e: e.update(**{"interaction-epsilon": 8.0}),
        "spent above its budget": lambda e: e.update(budget=e["epsilon"] / 2),
    }
    for name, change in tampered.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(private_run, copy)

        def edit(rows, change=change):
            change(rows[trained])
            return [json.dumps(r) for r in rows]

        rewrite(copy, edit)
        caught = audit(copy, tmp_path / f"{copy.name}-report")
        assert caught.returncode == 1, name
        assert f"| {copy.name} | {trained + 1} |" in (tmp_path / f"{copy.name}-report" / "privacy_audit.md").read_text()


@pytest.mark.parametrize("case", ["nan epsilon", "infinite epsilon", "not an object", "torn line", "empty"])
def test_audit_refuses_unreadable_ledgers_naming_the_line(private_run, tmp_path, case):
    copy = tmp_path / "run"
    shutil.copytree(private_run, copy)
    edits = {
        "nan epsilon": lambda rows: [json.dumps({**rows[0], "epsilon": float("nan")})] + [json.dumps(r) for r in rows[1:]],
        "infinite epsilon": lambda rows: [json.dumps({**rows[0], "epsilon": float("inf")})] + [json.dumps(r) for r in rows[1:]],
        "not an object": lambda rows: ["[1, 2]"] + [json.dumps(r) for r in rows[1:]],
        "torn line": lambda rows: [json.dumps(r) for r in rows] + ['{"client": "3", "rou'],
        "empty": lambda rows: [],
    }
    rewrite(copy, edits[case])
    refused = audit(copy, tmp_path / "report")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "privacy_ledger.jsonl" in refused.stderr and "Traceback" not in refused.stderr
    if case != "empty":
        assert f"privacy_ledger.jsonl:{1 if case != 'torn line' else ''}" in refused.stderr


@pytest.mark.parametrize("overrides, key", [
    ({"dp-epsilon": float("inf")}, "dp-epsilon"),
    ({"dp-delta": float("nan")}, "dp-delta"),
    ({"server-dp": True, "server-dp-noise": 0.0, "partitioning": "per-user", "dp": "example"}, "server-dp-noise"),
    ({"server-dp": True, "dp": "example"}, "server-dp"),  # silos: one user is not one client
    ({"dp": "user", "lora-layers": 2}, "lora-layers"),
    ({"dp-sample-rate": 0.0}, "dp-sample-rate"),
    ({"dp": "none", "server-dp": True, "partitioning": "per-user"}, "id-embeddings"),  # the id table's exact update would reach the server
])
def test_settings_that_are_no_guarantee_are_refused_naming_the_key(overrides, key):
    from conftest import default_run_config
    from shared_model.settings import RunSettings, SettingsError

    with pytest.raises(SettingsError, match=f"'{key}'"):
        RunSettings.from_run_config(default_run_config(**overrides))


def test_the_default_is_private_at_user_level_for_every_user():
    from conftest import default_run_config
    from shared_model.settings import RunSettings

    settings = RunSettings.from_run_config(default_run_config())
    assert settings.dp == "user" and settings.partitioning != "per-user" and settings.dp_epsilon <= 8
    assert settings.dp_delta <= 1 / settings.synthetic_users
    assert settings.dp_expected_rounds >= settings.num_server_rounds  # every silo trains every round, none declines


def test_a_default_private_run_states_its_guarantee_and_cannot_be_resumed(tmp_path):
    config = {"synthetic-users": 200, "num-server-rounds": 2, "dp-expected-rounds": 2, "dp-expected-batch": 100.0,
              "output-dir": str(tmp_path), "run-name": "default-private"}
    run = run_flower(config, num_supernodes=2)
    assert run.ok, run.log[-4000:]
    summary = json.loads((tmp_path / "default-private" / "summary.json").read_text())
    user = summary["privacy"]["user"]
    assert user["epsilon"] <= 8.0 and user["delta"] == 1e-5 and user["accountant"] == "rdp"
    assert "fedrec: privacy: user-level epsilon" in run.log and "against the server" in run.log
    assert "NOT PRIVATE" not in run.log
    again = run_flower({**config, "num-server-rounds": 3}, num_supernodes=2)
    assert not again.ok and "resuming would give every client a fresh budget" in again.log


def test_dp_steps_a_round_are_the_expected_passes_capped_by_local_steps():
    from client.private_round import steps_per_round
    from conftest import default_run_config
    from shared_model.settings import RunSettings

    def steps(**overrides):
        return steps_per_round(RunSettings.from_run_config(default_run_config(**overrides)))

    assert steps(**{"dp-sample-rate": 0.1, "local-steps": 0, "local-epochs": 2}) == 20
    assert steps(**{"dp-sample-rate": 0.1, "local-steps": 4}) == 4  # local-steps is honoured under DP
    assert steps(**{"dp-sample-rate": 0.3, "local-steps": 0}) == 4  # ceil(1 / 0.3): the steps that run are recorded
