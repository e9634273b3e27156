"""What secure aggregation costs a DP-FedAvg round: seconds and bytes a client sends, with
and without Flower's SecAgg+, through `flwr run` (one simulated SuperNode per user), at
several cohort sizes.

    python -m simulations.bench_secure_aggregation --cohorts 10 50 100 --rounds 6 --repeats 3
    python -m simulations.bench_secure_aggregation --dataset ml-100k --cohorts 50 --rounds 6 --repeats 3

Synthetic (the default): as many users as the cohort, every user every round; a client's
training is tiny (a few short histories), so the protocol's own work dominates. ml-100k:
the 943 MovieLens users, each sampled with probability cohort / 943 (the cohort varies
round to round), with their real histories: the product's own workload.

For each cohort, runs with the same run config but `secure-aggregation`: the plain
DP-FedAvg round (the server clips and adds the noise) and the secure one (each client clips
and adds its noise share; four protocol stages), alternating, --repeats of each. Rounds
2 .. rounds-1 are timed (the first starts the simulation's workers, the last also
evaluates); a mode's figure is the median of its timed rounds over its runs, and the time
ratio that of seconds per client in the round (on ml-100k each round samples its own cohort,
from fresh randomness: a secure run's rounds may be larger than a plain run's). Bytes: what a client sends in a
round, as payload without message framing: the adapters (fp32) in a plain round; public
keys, encrypted key shares, the masked vector (uint32: shared_model/secagg_patches.py) and key
shares in a secure one.
Writes bench_secure_aggregation.json and .png to --out (bench_secure_aggregation_ml-100k.* for
ml-100k).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared_model.cli_options import positive_int  # noqa: E402
from server.secure_aggregation import tail_target  # noqa: E402
from shared_model.data import ML100K_USERS, ml100k_dir  # noqa: E402
from shared_model.dp_aggregation import largest_min_clients  # noqa: E402
from shared_model.settings import RunSettings  # noqa: E402
from simulations.flower_runner import app_run_config, run_flower  # noqa: E402

CONFIG = {"partitioning": "per-user", "dp": "none", "server-dp": True, "id-embeddings": False,
          "server-dp-noise": 1.0, "server-dp-clip": 0.5}


def one_run(cohort: int, secure: bool, rounds: int, out: Path, dataset: str) -> dict:
    name = f"bench-secagg-{dataset}-{cohort}-{'secure' if secure else 'plain'}-{time.strftime('%Y%m%d-%H%M%S')}"
    users = cohort if dataset == "synthetic" else ML100K_USERS
    rate = cohort / users
    config = {**CONFIG, "dataset": dataset, "synthetic-users": max(users, 10), "server-dp-sample-rate": rate,
              "num-server-rounds": rounds, "eval-every": rounds, "secure-aggregation": secure,
              "output-dir": str(out.resolve()), "run-name": name}
    settings = RunSettings.from_run_config(app_run_config(**config))  # m: half the cohort, if the cap's edge allows
    config["secagg-min-clients"] = min(max(2, cohort // 2),
                                       largest_min_clients(users, rate, tail_target(settings)) or cohort)
    if dataset == "ml-100k":
        config["data-dir"] = str(ml100k_dir().resolve())  # the SuperNodes' working folder is not this one
    run = run_flower(config, num_supernodes=users)
    if not run.ok:
        raise SystemExit(f"flwr run failed ({run.status}):\n{run.log[-4000:]}")
    lines = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in lines if 1 < m["round"] < rounds]
    return {"seconds a round": [m["seconds"] for m in timed], "clients a round": [m["clients"] for m in timed],
            "bytes a client sends": float(np.mean([m["upload bytes per client"] for m in timed])),
            "aggregated": [m.get("aggregated") for m in timed], "run": name}


def pooled(cohort: int, runs: list[dict]) -> dict:
    """One mode's runs at one cohort: their timed rounds together, and each run's mean."""
    seconds = [s for run in runs for s in run["seconds a round"]]
    clients = [c for run in runs for c in run["clients a round"]]
    return {"cohort": cohort, "median seconds": float(np.median(seconds)), "seconds a round": seconds,
            "median seconds a client": float(np.median(np.divide(seconds, clients))),
            "mean seconds by run": [float(np.mean(run["seconds a round"])) for run in runs],
            "clients a round": clients,
            "bytes a client sends": float(np.mean([run["bytes a client sends"] for run in runs])),
            "aggregated": [a for run in runs for a in run["aggregated"]], "runs": [run["run"] for run in runs]}


def plot(result: dict, path: Path) -> None:
    fig, (seconds, sent) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, style in (("plain", "-o"), ("secure", "--s")):
        rows = result[mode]
        cohorts = [r["cohort"] for r in rows]
        seconds.plot(cohorts, [r["median seconds"] for r in rows], style, label=mode)
        sent.plot(cohorts, [r["bytes a client sends"] / 1024 for r in rows], style, label=mode)
    seconds.set_ylabel("seconds a round (median of the timed rounds)")
    sent.set_ylabel("KB a client sends a round")
    for ax in (seconds, sent):
        ax.set_xlabel("clients a round (one user each)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"DP-FedAvg with and without SecAgg+, flwr run, {result['dataset']}, {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("synthetic", "ml-100k"), default="synthetic",
                        help="synthetic: as many users as the cohort, all every round; ml-100k: 943 users, each sampled "
                             "with probability cohort / 943 (default synthetic)")
    parser.add_argument("--cohorts", type=positive_int, nargs="+", default=[10, 50, 100],
                        help="clients a round, expected (at least 10; default 10 50 100)")
    parser.add_argument("--rounds", type=positive_int, default=4,
                        help="rounds a run, the first and last untimed (at least 3; default 4)")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="runs of each mode per cohort, plain and secure alternating, their timed rounds pooled "
                             "(rounds on a shared 2-core machine vary by 20%% and more; default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where the runs and the results go")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error(f"--rounds must be at least 3 (the first and last are not timed), not {args.rounds}")
    if min(args.cohorts) < 10:
        parser.error(f"--cohorts must be at least 10 (the synthetic world's smallest), not {min(args.cohorts)}")
    if args.dataset == "ml-100k" and max(args.cohorts) > ML100K_USERS:
        parser.error(f"--cohorts must be at most {ML100K_USERS} with --dataset ml-100k, not {max(args.cohorts)}")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": "2 CPU cores, no GPU", "rounds": args.rounds, "repeats": args.repeats,
                    "dataset": args.dataset, "plain": [], "secure": [],
                    "command": f"python -m simulations.bench_secure_aggregation --dataset {args.dataset} --cohorts "
                               f"{' '.join(map(str, args.cohorts))} --rounds {args.rounds} --repeats {args.repeats}"}
    stem = "bench_secure_aggregation" + ("" if args.dataset == "synthetic" else f"_{args.dataset}")
    for cohort in args.cohorts:
        runs: dict[str, list[dict]] = {"plain": [], "secure": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(one_run(cohort, mode == "secure", args.rounds, args.out, args.dataset))
                print(f"{cohort} clients, {mode}: {np.mean(runs[mode][-1]['seconds a round']):.2f} s a round",
                      flush=True)
        for mode, done in runs.items():
            result[mode].append(pooled(cohort, done))
        plain, secure = result["plain"][-1], result["secure"][-1]
        slower = secure["median seconds a client"] / plain["median seconds a client"]
        print(f"{cohort} clients: median s a round plain {plain['median seconds']:.2f}, secure "
              f"{secure['median seconds']:.2f}; per client in the round: time x{slower:.2f}; "
              f"KB a client {plain['bytes a client sends'] / 1024:.1f} and {secure['bytes a client sends'] / 1024:.1f}: "
              f"bytes x{secure['bytes a client sends'] / plain['bytes a client sends']:.2f}", flush=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{stem}.png")
    print(f"results in {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
