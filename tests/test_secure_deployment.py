"""Secure aggregation in a real deployment on loopback: flower-superlink with TLS and
SuperNode authentication, four flower-supernode processes, each reading its own device
directory of one user, and `flwr run` with `secure-aggregation = true` (every user sampled,
m = 3). One SuperNode is killed (SIGKILL) as it receives its third training message, SecAgg+'s
stage 2, after it has handed out its key shares: the round goes on without it, unmasks the
other three's sum and releases a model, and the ledger accounts it. The kill follows that
node's own log (polled every 0.2 s), not the run's: the node needs seconds to start the
ClientApp process that would train and mask, so its masked vector cannot get out first.
"""

import json
import time

from client.device_store import write_device
from shared_model.datasets import load_dataset
from shared_model.ledger import read_ledger
from simulations.deployment_runner import Deployment

DEVICES, KILLED = 4, 3
CONFIG = {"dataset": "synthetic", "synthetic-users": 30, "partitioning": "per-user", "num-server-rounds": 1,
          "local-steps": 2, "low-memory": True, "dp": "none", "server-dp": True, "server-dp-sample-rate": 1.0,
          "id-embeddings": False, "secure-aggregation": True, "secagg-min-clients": 3, "round-timeout": 120,
          "run-name": "secure-edge"}


def test_a_node_killed_mid_protocol_leaves_the_others_sum(tmp_path):
    dataset = load_dataset("synthetic", None, seed=0, synthetic_users=CONFIG["synthetic-users"])
    with Deployment(tmp_path / "deploy", port=19393, nodes=DEVICES) as d:
        d.start_superlink()
        for node in range(DEVICES):
            d.register(node)
            d.start_supernode(node, write_device(tmp_path / f"device-{node}", dataset, [node]))
        run_id = d.run({**CONFIG, "output-dir": str(tmp_path / "runs")})
        deadline, next_check = time.time() + 600, 0.0
        while (received := d.log(f"node-{KILLED}").count("Receiving: train message")) < 3:  # stage 2's arriving
            if received < 2 and time.time() > next_check:  # a status call blocks ~1 s: none once stage 1 is on
                assert time.time() < deadline and not d.status(run_id).startswith("finished"), d.run_log(run_id)
                next_check = time.time() + 10
            assert time.time() < deadline, "no third training message in 10 minutes"
            time.sleep(0.2)
        d.kill(f"node-{KILLED}")  # it holds pairwise masks with its neighbours: they must be unmasked out
        status = d.wait(run_id, timeout=600)
        log = d.run_log(run_id)
    assert status == "finished:completed", log[-4000:]
    assert "Secure aggregation completed" in log
    folder = tmp_path / "runs" / "secure-edge"
    round_1 = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][-1]
    assert (round_1["round"], round_1["clients"], round_1["aggregated"], round_1["left out"]) == (1, DEVICES,
                                                                                              DEVICES - 1, 1)
    server = [e for e in read_ledger(folder / "privacy_ledger.jsonl") if e.client == "server"]
    assert [(e.round, e.min_survivors, e.cohort_cap) for e in server] == [(1, 3, DEVICES)]
