"""The Flower app through `flwr run` (a real local SuperLink and simulation engine)."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from server.run_folder import saved_round
from simulations.flower_runner import local_superlink_turn, run_flower

CLIENTS = 10
CONFIG = {"num-server-rounds": 3, "eval-every": 1, "local-steps": 6, "simulated-failure-rate": 0.15, "dp": "none",
          "synthetic-users": 2000, "lora-layers": 1}  # the non-private baseline: bit-reproducible, resumable


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run = run_flower({**CONFIG, "output-dir": str(out), "run-name": "full"}, num_supernodes=CLIENTS,
                     cpus_per_client=2)
    assert run.ok, run.log[-4000:]
    return out / "full", run


def test_small_simulation_ends_better_than_it_started(full_run):
    folder, run = full_run
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert metrics[-1]["valid NDCG@10"] > 1.5 * metrics[0]["valid NDCG@10"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["clients"] == CLIENTS
    assert summary["test"]["NDCG@10"] == metrics[-1]["test NDCG@10"]
    for key in ("AUC", "coverage@10", "popularity@10", "Gini@10", "long-tail@10"):  # from the clients' sums
        assert summary["test"][key] == metrics[-1][f"test {key}"] and f"valid {key}" in metrics[-1]
    assert 0 < summary["upload_bytes_per_client_per_round"] <= 256 * 1024
    for name in ("metrics.png", "final_adapters.safetensors", "best_adapters.safetensors"):
        assert (folder / name).stat().st_size > 1000
    assert "[round 3/3]" in run.log and "top-10 coverage" in run.log  # progress and the end reach the user


def test_failing_clients_are_left_out_and_rounds_complete(full_run):
    folder, run = full_run
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][1:]
    assert sum(m["errors"] for m in rounds) > 0
    assert all(m["clients"] - m["left out"] > 0 for m in rounds)
    assert "simulated device failure" in run.log and "left out" in run.log


def test_a_crashed_run_resumes_to_the_same_result_bit_for_bit(full_run, tmp_path):
    """A crashed run resumed from its checkpoint ends with the adapters of an uninterrupted
    run: non-private runs are bit-reproducible, also with two threads per client (the
    gradient of a catalog lookup was summed in parallel in an order that changed with thread
    timing: two fresh runs differed in 31 of 32 tensors)."""
    config = {**CONFIG, "output-dir": str(tmp_path), "run-name": "crashed"}
    folder = tmp_path / "crashed"
    crashed = run_flower(config, num_supernodes=CLIENTS, cpus_per_client=2, crash_when=lambda: saved_round(folder) >= 1)
    assert crashed.status == "crashed"
    assert 1 <= saved_round(folder) < 3
    resumed = run_flower(config, num_supernodes=CLIENTS, cpus_per_client=2)
    assert resumed.ok, resumed.log[-4000:]
    assert "resuming crashed after round" in resumed.log
    expected, got = load_file(full_run[0] / "final_adapters.safetensors"), load_file(folder / "final_adapters.safetensors")
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    rounds = [json.loads(line)["round"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]


def test_a_second_flower_run_on_the_machine_waits_for_the_first(tmp_path):
    """The local SuperLink's port is fixed: while one caller holds its turn (a test worker, a
    benchmark), another blocks instead of failing on the port, and goes once the first ends."""
    lock, entered = tmp_path / "lock", threading.Event()

    def second():
        with local_superlink_turn(lock):
            entered.set()

    with local_superlink_turn(lock):
        waiting = threading.Thread(target=second)
        waiting.start()
        assert not entered.wait(1.0)  # blocked: without the lock it would enter at once
    assert entered.wait(30)
    waiting.join()
