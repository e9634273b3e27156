"""A device's privacy budget cannot be reset or overspent: its calibration, ledger and
identity are checked against each other, a broken ledger fails closed naming the file and
line, changed settings are refused, and two ClientApps racing on one device spend once."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from client.device_store import write_device
from client.privacy_account import PrivacyAccountError
from conftest import default_run_config
from shared_model.settings import RunSettings
from simulations.client_harness import deliver, global_state

USERS = 20
PRIVATE = {"synthetic-users": USERS, "dp": "user", "dp-expected-rounds": 2, "dp-expected-batch": 1.0}


@pytest.fixture
def device(tmp_path) -> Path:
    settings = RunSettings.from_run_config(default_run_config(**PRIVATE))
    return write_device(tmp_path / "device", settings.load_dataset(), np.array([3, 4]))


def train(device: Path, server_round: int, **overrides):
    config = default_run_config(**{**PRIVATE, **overrides})
    context = Context(run_id=1, node_id=5, node_config={"data-dir": str(device)}, state=RecordDict(),
                      run_config=config)
    return deliver(MessageType.TRAIN, context, RecordDict({"arrays": global_state(config),
                                                       "config": ConfigRecord({"server-round": server_round})}))


def test_the_ledger_records_each_round_and_the_budget_runs_out(device):
    statuses = [dict(train(device, r).content["ledger"])["status"] for r in (1, 2, 3)]
    assert statuses == ["trained", "trained", "declined"]
    lines = (device / "state" / "privacy_ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]


def test_deleting_the_ledger_is_no_fresh_budget(device):
    train(device, 1)
    (device / "state" / "privacy_ledger.jsonl").unlink()
    with pytest.raises(PrivacyAccountError, match="calibration without its ledger"):
        train(device, 2)


def test_deleting_the_calibration_is_no_fresh_budget_either(device):
    train(device, 1)
    (device / "state" / "privacy_calibration.json").unlink()
    with pytest.raises(PrivacyAccountError, match="ledger without its calibration"):
        train(device, 2)


@pytest.mark.parametrize("how", ["emptied", "last entry dropped", "edited"])
def test_a_truncated_or_edited_ledger_is_no_fresh_budget(device, how):
    train(device, 1)
    train(device, 2)
    path = device / "state" / "privacy_ledger.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    changed = {"emptied": [], "last entry dropped": lines[:1],
               "edited": [lines[0].replace('"round": 1', '"round": 7')] + lines[1:]}[how]
    path.write_text("".join(changed))
    with pytest.raises(PrivacyAccountError, match="truncated or edited ledger"):
        train(device, 3)


def test_a_torn_ledger_line_fails_closed_naming_the_file_and_line(device):
    train(device, 1)
    with open(device / "state" / "privacy_ledger.jsonl", "a") as f:
        f.write('{"client": "1", "round": 2, "sta')  # a crash mid-write
    with pytest.raises(PrivacyAccountError, match=r"privacy_ledger.jsonl:2: not JSON"):
        train(device, 2)


@pytest.mark.parametrize("change", [{"dp-epsilon": 1.0}, {"dp-delta": 1e-6}, {"dp": "example"},
                                    {"dp-accountant": "pld"}])
def test_changed_privacy_settings_are_refused_not_a_reset(device, change):
    train(device, 1)
    key = next(iter(change))
    saved = {"dp-epsilon": "budget", "dp-delta": "delta", "dp": "unit", "dp-accountant": "accountant"}[key]
    with pytest.raises(PrivacyAccountError, match=f"other privacy settings .*{saved}"):
        train(device, 2, **change)


def test_another_devices_calibration_is_refused(device):
    train(device, 1)
    identity = device / "state" / "identity.json"
    identity.write_text(json.dumps({"sampling-key": 12345}))  # the state of another device, or a new identity
    with pytest.raises(PrivacyAccountError, match="client"):
        train(device, 2)


RACER = """
import sys, json
sys.path.insert(0, {tests!r})
from test_privacy_account import train
from pathlib import Path
reply = train(Path({device!r}), 1, **{{"dp-expected-rounds": 1}})
print(json.dumps(dict(reply.content["ledger"])["status"]))
"""


def test_two_clientapps_racing_on_one_device_spend_its_budget_once(device):
    """Started together, both reach the budget check; the lock makes the second see the
    first's spend (without it both trained: epsilon 10.2 on a budget of 8)."""
    script = RACER.format(tests=str(Path(__file__).parent), device=str(device))
    racers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    outcomes = [racer.communicate(timeout=300) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), outcomes
    statuses = sorted(json.loads(out.strip().splitlines()[-1]) for out, _ in outcomes)
    assert statuses == ["declined", "trained"], outcomes
    ledger = [json.loads(line) for line in (device / "state" / "privacy_ledger.jsonl").read_text().splitlines()]
    assert max(e["epsilon"] for e in ledger) <= ledger[0]["budget"] * (1 + 1e-9)
