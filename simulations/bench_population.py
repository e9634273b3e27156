"""Seconds per DP-FedAvg round with large cohorts: the in-process driver
(simulations/population.py, vectorised clients) on a synthetic population, beside what
`flwr run` costs per client (one SuperNode per user, a small federation, every client
every round, rounds without evaluation).

    python -m simulations.bench_population --users 100000 --cohorts 1000 10000

Both paths train with the run config's defaults plus what user-level DP-FedAvg over
one-user clients needs (partitioning per-user, dp none, server-dp, no id table); the
cohort sets server-dp-sample-rate = cohort / users. The `flwr run` part starts a local
SuperLink on Flower's fixed ports: where others may run one too, run the bench in a private
network namespace (`unshare -n sh -c 'ip link set lo up; python -m ...'`), or pass
--flower-users 0 to skip it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from shared_model.cli_options import positive_int
from shared_model.settings import RunSettings
from simulations.flower_runner import app_run_config, parse_overrides, run_flower
from simulations.population import PATH, Population, add_driver_options, machine

DP_FEDAVG = {"partitioning": "per-user", "dp": "none", "server-dp": True, "id-embeddings": False}


def in_process(users: int, cohort: int, rounds: int, chunk: int | None, overrides: dict, device: str) -> dict:
    config = app_run_config(**{**DP_FEDAVG, "synthetic-users": users, "server-dp-sample-rate": cohort / users,
                               **overrides})
    started = time.time()
    population = Population(RunSettings.from_run_config(config), chunk, device=device)
    set_up = time.time() - started
    arrays, seconds, sampled = population.initial_arrays(), [], []
    for server_round in range(1, rounds + 1):
        started = time.time()
        arrays, counts = population.train_round(server_round, arrays)
        seconds.append(time.time() - started)
        sampled.append(counts["clients"])
    return {"path": f"{PATH} on {device}", "users": users, "expected cohort": cohort, "sampled per round": sampled,
            "seconds per round": seconds, "ms per client": 1000 * sum(seconds) / sum(sampled),
            "set-up seconds (data, model, strategy)": set_up,
            "peak resident memory of the process so far (GB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def flower(users: int, rounds: int, out: Path, overrides: dict) -> dict:
    """Every client every round (rate 1); rounds 2..rounds-1 are timed (the first warms the
    client processes up, the last evaluates)."""
    name = f"bench-population-flower-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {**DP_FEDAVG, "synthetic-users": users, "server-dp-sample-rate": 1.0, "num-server-rounds": rounds,
              "eval-every": rounds, "output-dir": str(out.resolve()), "run-name": name, **overrides}
    run = run_flower(config, num_supernodes=users)
    if not run.ok:
        raise SystemExit(f"flwr run failed ({run.status}):\n{run.log[-4000:]}")
    lines = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    timed = [m["seconds"] for m in lines if 1 < m["round"] < rounds]
    return {"path": "flwr run", "users": users, "sampled per round": users, "timed rounds seconds": timed,
            "ms per client": 1000 * float(np.mean(timed)) / users,
            "peak resident memory of the whole simulation (GB)": run.peak_rss_bytes / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000, help="synthetic population (default 100,000)")
    parser.add_argument("--cohorts", type=int, nargs="+", default=[1000, 10_000],
                        help="expected clients a round, each timed on its own (default 1000 10000)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds timed per cohort (default 2)")
    add_driver_options(parser)
    parser.add_argument("--flower-users", type=int, default=30,
                        help="users (SuperNodes) of the `flwr run` comparison; 0 skips it (default 30)")
    parser.add_argument("--flower-rounds", type=int, default=5,
                        help="rounds of that run, the first and last untimed (default 5)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other run-config override, for both paths")
    parser.add_argument("--out", default="runs", help="where bench_population.json (and the flwr run) go")
    args = parser.parse_args()
    bad = [c for c in args.cohorts if not 0 < c <= args.users]
    if bad:
        parser.error(f"--cohorts must be between 1 and --users ({args.users}), not {bad}")
    if args.flower_users and args.flower_rounds < 3:
        parser.error(f"--flower-rounds must be at least 3 (the first and last are not timed), not {args.flower_rounds}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.set)
    result = {"machine": f"{machine(args.device)}; torch threads 1",
              "in-process": [in_process(args.users, c, args.rounds, args.chunk, overrides, args.device)
                             for c in args.cohorts]}
    if args.flower_users:
        result["flwr run"] = flower(args.flower_users, args.flower_rounds, out, overrides)
    print(json.dumps(result, indent=2))
    (out / "bench_population.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
