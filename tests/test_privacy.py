"""Accountants against published values, the calculator, and a private federated run
through `flwr run` whose ledger the audit reproduces (and whose tampering it catches)."""

import json
import math
import subprocess
import sys

import pytest

from shared_model.privacy import (audit_lower_bound, audit_p_value, epsilon, group_privacy, independent_epsilon,
                                  noise_multiplier)
from simulations.flower_runner import run_flower


def test_rdp_matches_opacus_published_vector():
    # opacus/tests/accountants_test.py: sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> 7.3291
    assert epsilon([(1.5, 0.04, 2250)], 1e-5, "rdp") == pytest.approx(7.3291, abs=1e-4)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_independent_accountants_agree_within_one_percent(accountant):
    history = [(1.1, 0.02, 500), (0.9, 0.05, 120)]
    ours, twin = epsilon(history, 1e-5, accountant), independent_epsilon(history, 1e-5, accountant)
    assert ours == pytest.approx(twin, rel=0.01)


def test_noise_for_a_target_is_the_inverse_of_epsilon():
    z = noise_multiplier(4.0, 0.01, 10_000, 1e-5, "rdp")
    assert epsilon([(z, 0.01, 10_000)], 1e-5, "rdp") <= 4.0
    assert epsilon([(z * 0.98, 0.01, 10_000)], 1e-5, "rdp") > 4.0


def test_group_privacy_scales_epsilon_and_caps_delta_even_for_huge_epsilon():
    eps, delta = group_privacy(0.01, 1e-6, 3)
    assert eps == pytest.approx(0.03) and delta == pytest.approx(3 * math.exp(0.02) * 1e-6)
    assert group_privacy(1e6, 1e-5, 51) == (51e6, 1.0)  # e^(50e6) would overflow


def test_one_run_audit_bound():
    assert audit_lower_bound(1000, 100, 100, 1e-5) == pytest.approx(3.465, abs=0.01)
    assert audit_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance level proves nothing
    assert audit_lower_bound(1000, 100, 90, 1e-5) < audit_lower_bound(1000, 100, 95, 1e-5)
    bound = audit_lower_bound(1000, 100, 90, 1e-5)
    assert audit_p_value(1000, 100, 90, bound, 1e-5) <= 0.05 + 1e-6


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True)


def test_calculator_prints_the_numbers():
    out = run_cli("privacy", "epsilon", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps", "2250",
                  "--delta", "1e-5")
    assert out.returncode == 0 and "epsilon 7.3291" in out.stdout
    out = run_cli("privacy", "lower-bound", "--canaries", "1000", "--guesses", "100", "--correct", "100",
                  "--delta", "1e-5")
    assert "epsilon lower bound 3.46" in out.stdout
    bad = run_cli("privacy", "noise", "--epsilon", "8", "--sample-rate", "1.5", "--steps", "10", "--delta", "1e-5")
    assert bad.returncode == 2 and "--sample-rate" in bad.stderr
    whole = run_cli("privacy", "noise", "--epsilon", "8", "--sample-rate", "1", "--steps", "10", "--delta", "1e-5")
    assert whole.returncode == 0 and "noise multiplier 2.02" in whole.stdout  # one batch of all examples


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = {"synthetic-users": 16, "partitioning": "per-user", "num-server-rounds": 3, "eval-every": 3,
              "dp": "example", "dp-expected-rounds": 1, "dp-epsilon": 2.0, "dp-negatives": 16,
              "server-dp": True, "server-dp-sample-rate": 0.75, "output-dir": str(out), "run-name": "private"}
    run = run_flower(config, num_supernodes=16)
    assert run.ok, run.log[-4000:]
    return out / "private"


def test_clients_decline_when_their_budget_is_spent_and_the_run_completes(private_run):
    rounds = [json.loads(line) for line in (private_run / "metrics.jsonl").read_text().splitlines()][1:]
    assert [m["round"] for m in rounds] == [1, 2, 3]
    assert sum(m["declined"] for m in rounds) > 0
    summary = json.loads((private_run / "summary.json").read_text())
    assert summary["privacy"]["example"]["epsilon max"] <= 2.0 * (1 + 1e-9)
    assert summary["privacy"]["example"]["declined"] > 0
    assert summary["privacy"]["user"]["epsilon max"] == pytest.approx(epsilon([(1.0, 0.75, 3)], 1e-5, "rdp"))


def test_audit_reproduces_the_ledger_and_catches_tampering(private_run, tmp_path):
    report_dir = tmp_path / "report"
    ok = run_cli("audit", str(private_run), "--out", str(report_dir))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = (report_dir / "privacy_audit.md").read_text()
    entries = [json.loads(line) for line in (private_run / "privacy_ledger.jsonl").read_text().splitlines()]
    worst = max((e for e in entries if e["unit"] == "example"), key=lambda e: e["epsilon"])
    assert f"{worst['epsilon']:.4f}" in report and "None: every claimed epsilon was reproduced" in report
    assert (report_dir / "epsilon_per_client.png").exists() and (report_dir / "user_epsilon.png").exists()

    trained = next(i for i, e in enumerate(entries) if e["status"] == "trained")
    entries[trained]["epsilon"] *= 0.9  # someone under-reports a spend
    (private_run / "privacy_ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    caught = run_cli("audit", str(private_run), "--out", str(tmp_path / "tampered"))
    assert caught.returncode == 1
    assert "1 disagreement(s)" in caught.stdout
    assert f"| {trained + 1} |" in (tmp_path / "tampered" / "privacy_audit.md").read_text()
