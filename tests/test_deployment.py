"""A real deployment on loopback: flower-superlink with TLS and SuperNode authentication,
flower-supernode processes each reading its own device directory, `flwr run`, `flwr stop`.

One scenario, several checks: four registered SuperNodes start a 2-round run; one of them
is killed (SIGKILL) as training starts; the ServerApp is stopped after round 1's
checkpoint and started again with the same run name, and finishes round 2. A fifth
SuperNode, whose key was never registered, is refused.
"""

import json
import time
from pathlib import Path

import pytest

from client.device_store import write_device
from server.run_folder import saved_round
from shared_model.datasets import load_dataset
from shared_model.partitions import partition_users
from shared_model.splits import user_sequences
from simulations.deployment_runner import CONNECTION, Deployment

USERS, DEVICES = 300, 4  # device 3 is the one that dies
UNREGISTERED = DEVICES  # the key index of the refused SuperNode
CONFIG = {"dataset": "synthetic", "synthetic-users": USERS, "partitioning": "iid", "num-server-rounds": 2,
          "eval-every": 2, "local-steps": 6, "low-memory": True, "lora-layers": 1, "dp": "none",
          "run-name": "edge"}  # as devices run it (the non-private baseline: the test checks the model improves)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    dataset = load_dataset("synthetic", None, seed=0, synthetic_users=USERS)
    parts = partition_users(user_sequences(dataset), dataset.catalog, "iid", DEVICES, seed=0)
    devices = [write_device(root / f"device-{i}", dataset, parts[i]) for i in range(DEVICES)]
    folder = root / "runs" / "edge"
    config = {**CONFIG, "output-dir": str(root / "runs")}
    with Deployment(root / "deploy", nodes=DEVICES + 1) as d:
        d.start_superlink()
        for i, device in enumerate(devices):
            d.register(i)
            d.start_supernode(i, device)
        refused = d.start_supernode(UNREGISTERED, devices[0])
        first = d.run(config)
        wait_for(lambda: folder.joinpath("metrics.jsonl").exists() and metrics(folder), 300, "round 0's evaluation")
        d.kill(f"node-{DEVICES - 1}")  # the device dies as training starts
        wait_for(lambda: saved_round(folder) >= 1, 400, "round 1's checkpoint")
        d.stop_run(first)
        wait_for(lambda: d.status(first).startswith("finished"), 60, "the stopped run")
        second = d.run(config)  # the ServerApp starts again from the checkpoint
        status = d.wait(second, timeout=600)
        yield {"root": root, "folder": folder, "devices": devices, "deployment": d, "refused": refused,
               "first": (first, d.status(first)), "second": (second, status, d.run_log(second))}


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tls_authenticated_supernodes_complete_a_run_that_improves(deployment):
    run_id, status, log = deployment["second"]
    assert status == "finished:completed", log[-4000:]
    lines = metrics(deployment["folder"])
    assert [m["round"] for m in lines] == [0, 1, 2]
    assert lines[0]["eval clients"] == DEVICES and lines[-1]["eval clients"] == DEVICES - 1
    assert lines[-1]["test NDCG@10"] > 2 * lines[0]["test NDCG@10"]
    summary = json.loads((deployment["folder"] / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["upload_bytes_per_client_per_round"] > 0


def test_each_device_keeps_its_own_identity_in_its_directory(deployment):
    keys = [json.loads((d / "state" / "identity.json").read_text())["sampling-key"] for d in deployment["devices"]]
    assert len(set(keys)) == DEVICES


def test_a_supernode_with_an_unregistered_key_is_refused(deployment):
    refused = deployment["refused"]
    assert refused.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in deployment["deployment"].log(f"node-{UNREGISTERED}")


def test_a_supernode_killed_mid_run_does_not_stop_the_run(deployment):
    round_1 = metrics(deployment["folder"])[1]
    assert round_1["clients"] == DEVICES and round_1["left out"] == 1
    assert round_1["clients"] - round_1["left out"] == DEVICES - 1


def test_a_restarted_serverapp_continues_from_its_checkpoint(deployment):
    first_id, first_status = deployment["first"]
    assert first_status == "finished:stopped"
    _, _, log = deployment["second"]
    assert "resuming edge after round 1" in log
    assert "[round 1/2]" not in log and "[round 2/2]" in log  # round 1 is not redone


def test_commands_right_after_the_superlink_starts_wait_for_it(tmp_path):
    """`flwr` commands retry while the SuperLink is unavailable, up to a deadline: a
    `flwr supernode register` issued while the SuperLink is still starting succeeds (it used
    to fail at random with "Connection to the SuperLink is unavailable")."""
    with Deployment(tmp_path, port=19293, nodes=1) as d:
        with pytest.raises(RuntimeError, match="unavailable for 3 s"):
            d.cli("ls", CONNECTION, ready_within=3)  # nothing listens yet
        d.start_superlink()
        assert d.register(0) > 0
        assert d.processes["superlink"].poll() is None
