"""Secure aggregation in a real deployment on loopback: flower-superlink with TLS and
SuperNode authentication, four flower-supernode processes, each reading its own device
directory of one user, and `flwr run` with `secure-aggregation = true` (every user sampled,
m = 3). One SuperNode is killed (SIGKILL) once every client has handed out its key shares
(SecAgg+'s stage 1): the round goes on without it, unmasks the other three's sum and
releases a model, and the ledger accounts it.
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
        deadline = time.time() + 600
        while f"SecAgg+: {DEVICES} clients handed out their key shares" not in (log := d.run_log(run_id)):
            assert time.time() < deadline and not d.status(run_id).startswith("finished"), log[-4000:]
            time.sleep(1)
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
