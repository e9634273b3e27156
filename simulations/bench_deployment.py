"""Benchmark of an edge deployment on loopback: a TLS SuperLink with SuperNode
authentication and D SuperNodes (one MovieLens-100K user each, by default), every one a
separate process tree with its own device directory.

Reports, per device: the peak resident memory of its SuperNode together with its
SuperExec and ClientApp processes (sampled every 0.5 s), the time from starting the
SuperNode to its connection and to the end of the first round it took part in, and the
bytes a device receives and sends per training round (the adapters each way).

    python -m simulations.bench_deployment --dataset ml-100k --devices 3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from client.device_store import write_device
from shared_model.data import ml100k_dir
from shared_model.datasets import load_dataset
from shared_model.files import read_jsonl
from shared_model.partitions import partition_users
from shared_model.splits import user_sequences
from simulations.deployment_runner import Deployment
from simulations.flower_runner import parse_overrides, processes_of, total_rss


class MemoryWatch(threading.Thread):
    """Peak summed RSS and PSS of each device's processes (all that carry its FLWR_HOME),
    and the largest single process (the ClientApp)."""

    def __init__(self, homes: dict[str, Path]):
        super().__init__(daemon=True)
        self.homes = homes
        self.peak = {kind: {name: 0 for name in homes} for kind in ("rss", "pss", "largest process rss")}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for name, home in self.homes.items():
                procs = processes_of(home)
                for kind, value in (("rss", total_rss(procs)), ("pss", total_rss(procs, proportional=True)),
                                    ("largest process rss", max((total_rss([p]) for p in procs), default=0))):
                    self.peak[kind][name] = max(self.peak[kind][name], value)
            self.done.wait(0.5)


def connected_after(log: str) -> bool:
    return re.search(r"SuperNode ID: \d+", log) is not None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["synthetic", "ml-100k"], default="ml-100k")
    parser.add_argument("--devices", type=int, default=3, help="SuperNodes, one user each (default 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other run-config override, e.g. --set lora-layers=0")
    parser.add_argument("--out", default="runs/bench-deployment", help="folder for the results and logs")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = str(ml100k_dir().resolve()) if args.dataset == "ml-100k" else ""
    dataset = load_dataset(args.dataset, data_dir or None, seed=0)
    parts = partition_users(user_sequences(dataset), dataset.catalog, "per-user", 1)
    root = Path(tempfile.mkdtemp(prefix="deployment-", dir=out))
    devices = [write_device(root / f"device-{i}", dataset, parts[i]) for i in range(args.devices)]
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = out / name
    config = {"dataset": args.dataset, "data-dir": data_dir, "partitioning": "per-user",
              "num-server-rounds": args.rounds, "eval-every": args.rounds, "local-steps": 0,
              "output-dir": str(out), "run-name": name, **parse_overrides(args.set)}
    with Deployment(root / "deploy", nodes=args.devices) as d:
        d.start_superlink()
        for i in range(args.devices):
            d.register(i)
        watch = MemoryWatch({f"node-{i}": d.node_home(i) for i in range(args.devices)})
        watch.start()
        started = time.time()
        for i, device in enumerate(devices):
            d.start_supernode(i, device)
        connected: dict[str, float] = {}
        while len(connected) < args.devices and time.time() - started < 300:
            for i in range(args.devices):
                if f"node-{i}" not in connected and connected_after(d.log(f"node-{i}")):
                    connected[f"node-{i}"] = time.time() - started
            time.sleep(0.2)
        run_id = d.run(config)
        first_round = None
        while first_round is None and time.time() - started < 1200:
            rounds = [line.value["round"] for line in read_jsonl(folder / "metrics.jsonl", drop_torn_tail=True)]
            if 1 in rounds:
                first_round = time.time() - started
            time.sleep(0.5)
        status = d.wait(run_id, timeout=1800)
        watch.done.set()
        watch.join()
    if status != "finished:completed":
        raise SystemExit(f"the run ended {status}; logs in {root / 'deploy'}")
    metrics = [line.value for line in read_jsonl(folder / "metrics.jsonl")]
    trained = [m for m in metrics if m["round"] > 0]
    adapters = json.loads((folder / "summary.json").read_text())["trainable_bytes"]
    result = {
        "command": "python -m simulations.bench_deployment " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": "2 CPU cores",
        "devices": args.devices, "dataset": args.dataset, "rounds": args.rounds,
        **{f"peak {kind} per device (MB)": {k: round(v / 2**20) for k, v in peaks.items()}
           for kind, peaks in watch.peak.items()},
        "seconds from SuperNode start to connected": connected,
        "seconds from SuperNode start to first round finished": first_round,
        "seconds per round": [m["seconds"] for m in trained],
        "bytes received per device per round (adapters)": adapters,
        "bytes sent per device per round (adapters)": trained[0]["upload bytes per client"],
        "final test NDCG@10 (these few users)": metrics[-1].get("test NDCG@10"),
    }
    (out / f"bench_deployment{'-' + '-'.join(args.set) if args.set else ''}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
