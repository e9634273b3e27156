"""Benchmarks of the federated simulation (each one real `flwr run`, unless --in-process).

quality: MovieLens-100K, one simulated SuperNode per user (943), ~10% of them a round, no
         DP. Reports final and best test NDCG@10, the rounds needed to reach 95% of the
         centralized model's test NDCG@10, seconds per round and upload per client. With
         --in-process, the same federation through simulations.population (the same
         computation without Flower's processes, tested against them; fp32 uploads only;
         several run at once, where `flwr run`s take turns at the SuperLink's port), for
         sweeping a recipe.
    python -m simulations.bench_federated quality --centralized runs/centralized-ml-100k-*/summary.json

default: the app's default run (`flwr run .`: private, user-level DP-SGD in 2 silos) beside
         the same run with dp = "none" and popularity on the same split: NDCG@10, the
         share of the non-private lift over popularity it keeps, wall time, epsilon. With
         --epsilons, a user-level frontier (and silo_frontier.png), e.g. on MovieLens-100K:
    python -m simulations.bench_federated default
    python -m simulations.bench_federated default --epsilons 0.5 1 2 4 8 --repeats 1 --set dataset=ml-100k

privacy: MovieLens-100K as in quality, without DP and with example-level DP-SGD on every
         client at each epsilon (delta 1e-5 per client); the same config otherwise. With
         --user-level, the DP runs also run DP-FedAvg on the server (user-level epsilon),
         and one run has that alone. Saves privacy_utility.png (NDCG@10 against epsilon).
         Each DP client takes one Poisson step a round at rate 1 (all its examples).
    python -m simulations.bench_federated privacy --epsilons 8 4 1

compare: several quality runs' test NDCG@10 against the round, in one figure and one JSON
         (each row: a name and a bench_quality.json, whose run folder holds the curve).
    python -m simulations.bench_federated compare --out docs/figures/federated_ml100k_recipes \
        fp16=/tmp/fed-fp16/bench_quality.json fp32=/tmp/fed-fp32/bench_quality.json

scale:   the synthetic catalog with many per-user clients (default 10,000, 100 a round):
         seconds per round and peak resident memory of all the simulation's processes.
    python -m simulations.bench_federated scale --clients 10000

Every benchmark's JSON holds the final test metrics beyond accuracy too (AUC, and the
top-10 lists' coverage, popularity, Gini and long-tail share: shared_model/metrics.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from shared_model.cli_options import positive_float, positive_int  # noqa: E402
from shared_model.data import ML100K_USERS, ml100k_dir  # noqa: E402
from shared_model.files import read_jsonl  # noqa: E402
from shared_model.settings import RunSettings, SettingsError  # noqa: E402
from simulations import population  # noqa: E402
from simulations.flower_runner import app_run_config, parse_overrides, run_flower  # noqa: E402



def read_metrics(folder: Path) -> list[dict]:
    return [line.value for line in read_jsonl(folder / "metrics.jsonl")]


def quality(args: argparse.Namespace) -> dict:
    centralized = json.loads(Path(args.centralized).read_text())["test"]["model"]["NDCG@10"]
    name = f"bench-ml100k-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {"dataset": "ml-100k", "data-dir": str(ml100k_dir().resolve()), "partitioning": "per-user", "clients-per-round": args.clients_per_round,
              "num-server-rounds": args.rounds, "eval-every": args.eval_every, "local-steps": 0,
              "output-dir": str(Path(args.out).resolve()), "run-name": name, **parse_overrides(args.set)}
    if args.in_process:
        torch.set_num_threads(args.threads)
        try:
            folder = population.run(RunSettings.from_run_config(app_run_config(**config))).path
        except SettingsError as error:
            raise SystemExit(f"bench_federated quality --in-process: {error}") from None
    else:
        run = run_flower(config, num_supernodes=ML100K_USERS, cpus_per_client=1, echo=args.echo)
        if not run.ok:
            raise SystemExit(f"federated run failed ({run.status}):\n{run.log[-4000:]}")
        folder = Path(args.out) / name
    metrics, summary = read_metrics(folder), json.loads((folder / "summary.json").read_text())
    evaluated = [m for m in metrics if "test NDCG@10" in m and m["round"] > 0]
    reached = next((m["round"] for m in evaluated if m["test NDCG@10"] >= 0.95 * centralized), None)
    trained = [m for m in metrics if m["round"] > 0]
    train_seconds = [m["seconds"] for m in trained if m["round"] % args.eval_every]  # rounds without evaluation
    result = {
        "centralized test NDCG@10": centralized,
        **{f"final test {k}": v for k, v in summary["test"].items()},
        "final / centralized": summary["test"]["NDCG@10"] / centralized,
        "best round (by validation)": summary["best"]["round"],
        "best-round test NDCG@10": summary["best"]["test"]["NDCG@10"],
        "rounds to 95% of centralized": reached,
        "seconds per training round (median)": sorted(train_seconds)[len(train_seconds) // 2] if train_seconds else None,
        "upload bytes per client per round": summary["upload_bytes_per_client_per_round"],
        "run folder": str(folder),
        "path": summary["path"],
    }
    plot_quality(evaluated, centralized, Path(args.out) / "federated_ml100k.png")
    return result


def plot_quality(evaluated: list[dict], centralized: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [m["round"] for m in evaluated]
    ax.plot(rounds, [m["test NDCG@10"] for m in evaluated], "-o", markersize=3, label="federated, test")
    ax.plot(rounds, [m["valid NDCG@10"] for m in evaluated], "--", label="federated, validation")
    ax.axhline(centralized, color="black", label="centralized, test")
    ax.axhline(0.95 * centralized, color="grey", linestyle=":", label="95% of centralized")
    ax.set_xlabel("round (94 of 943 clients each)")
    ax.set_ylabel("NDCG@10, full ranking")
    ax.set_title("MovieLens-100K, one client per user, FedAdam, no DP")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(rows: list[str], out: Path) -> dict:
    """NAME=bench_quality.json rows: one JSON (each row's result, its run config and its
    test and validation NDCG@10 by round) and one figure (test NDCG@10 by round)."""
    result: dict = {}
    for row in rows:
        name, sep, path = row.partition("=")
        if not sep or not name:
            raise SystemExit(f"bench_federated compare: {row!r}: give NAME=path/to/bench_quality.json")
        try:
            quality_result = json.loads(Path(path).read_text())
            folder = Path(quality_result["run folder"])
            config = json.loads((folder / "config.json").read_text())
            metrics = read_metrics(folder)
        except (OSError, ValueError, KeyError) as error:
            raise SystemExit(f"bench_federated compare: {name}: {error}") from None
        result[name] = {**quality_result, "run config": config,
                        "by round": [{k: m[k] for k in ("round", "valid NDCG@10", "test NDCG@10")}
                                     for m in metrics if "test NDCG@10" in m]}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in result.items():
        curve = row["by round"]
        ax.plot([m["round"] for m in curve], [m["test NDCG@10"] for m in curve], "-o", markersize=3, label=name)
    ax.axhline(next(iter(result.values()))["centralized test NDCG@10"], color="black", label="centralized, test")
    ax.set_xlabel("round (94 of 943 clients each)")
    ax.set_ylabel("test NDCG@10, full ranking")
    ax.set_title("MovieLens-100K, one client per user, no DP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return result


def default(args: argparse.Namespace) -> dict:
    """The default run (or the same at each of --epsilons, in --silos silos), the same
    without DP, and popularity on the same split; each private run's share of the
    non-private lift over popularity."""
    from shared_model.metrics import evaluate_scores, item_counts
    from shared_model.data import DataError
    from shared_model.settings import RunSettings, SettingsError
    from shared_model.splits import leave_one_out
    from simulations.baselines import popularity_scores
    from simulations.flower_runner import app_run_config

    overrides = parse_overrides(args.set)
    if overrides.get("dataset") == "ml-100k" and not overrides.get("data-dir"):
        overrides["data-dir"] = str(ml100k_dir().resolve())  # the SuperNodes' working folder differs
    try:
        settings = RunSettings.from_run_config(app_run_config(**overrides))
        split = leave_one_out(settings.load_dataset())  # the runs' own data
    except (KeyError, SettingsError, DataError) as error:
        raise SystemExit(f"bench_federated default: --set: {error}") from None
    if "dp-expected-batch" not in overrides:  # the noisy sum is divided by a silo's expected batch
        overrides["dp-expected-batch"] = settings.dp_sample_rate * len(split.train) / args.silos
    stamp = time.strftime("%Y%m%d-%H%M%S")
    levels = [(f"epsilon {eps:g}", {"dp-epsilon": eps}) for eps in args.epsilons] or [("default", {})]
    runs = [(f"private ({level}), run {i + 1}", dp) for level, dp in levels for i in range(args.repeats)]
    rows = {}
    for index, (name, dp) in enumerate(runs + [("non-private", {"dp": "none"})]):
        run_name = f"bench-default-{index}-{stamp}"
        started = time.time()
        run = run_flower({"output-dir": str(Path(args.out).resolve()), "run-name": run_name, **overrides, **dp},
                         num_supernodes=args.silos, echo=args.echo)
        wall = time.time() - started
        if not run.ok:
            raise SystemExit(f"run {run_name} failed ({run.status}):\n{run.log[-4000:]}")
        summary = json.loads((Path(args.out) / run_name / "summary.json").read_text())
        rows[name] = {**{f"test {k}": v for k, v in summary["test"].items()},
                      "wall seconds (flwr run, start to end)": wall, "privacy": summary["privacy"],
                      "run folder": str(Path(args.out) / run_name)}
        print(name, json.dumps(rows[name]), flush=True)
    cases = split.cases("test")
    rows["popularity"] = {f"test {k}": v for k, v in
                          evaluate_scores(popularity_scores(split.train, split.n_items, cases), cases,
                                          item_counts(split.train, split.n_items)).items()}
    base = rows["popularity"]["test NDCG@10"]
    lift = rows["non-private"]["test NDCG@10"] - base
    for name, row in rows.items():
        if name.startswith("private"):  # each run draws fresh noise: the repeats show its spread
            row["share of the non-private lift over popularity"] = (row["test NDCG@10"] - base) / lift
    if len(args.epsilons) > 1:
        plot_silo_frontier(rows, settings.dataset, args.silos, Path(args.out) / "silo_frontier.png")
    return {"overrides": args.set, "silos": args.silos, "dp-expected-batch": overrides["dp-expected-batch"],
            "runs": rows}


def plot_silo_frontier(rows: dict, dataset: str, silos: int, path: Path) -> None:
    """Test NDCG@10 of every private run (and their mean) against its user-level epsilon,
    with the non-private run and popularity as lines."""
    runs: dict[float, list[float]] = {}
    for name, row in rows.items():
        if name.startswith("private"):
            runs.setdefault(row["privacy"]["user"]["epsilon"], []).append(row["test NDCG@10"])
    epsilons = sorted(runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epsilons, [sum(runs[e]) / len(runs[e]) for e in epsilons], "-", label="user-level DP-SGD in the silos (mean)")
    ax.plot([e for e in epsilons for _ in runs[e]], [v for e in epsilons for v in runs[e]], "o", color="tab:blue",
            markersize=4, label="each run (fresh noise)")
    ax.axhline(rows["non-private"]["test NDCG@10"], color="black", label="no DP (same run)")
    ax.axhline(rows["popularity"]["test NDCG@10"], color="grey", linestyle=":", label="popularity")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("user-level epsilon spent (against the server)")
    ax.set_ylabel("test NDCG@10, full ranking")
    ax.set_title(f"{dataset}, {silos} silos")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def privacy(args: argparse.Namespace) -> dict:
    """One run per privacy level, same seed and config; NDCG@10 and the ledger's epsilons."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = {"dataset": "ml-100k", "data-dir": str(ml100k_dir().resolve()), "partitioning": "per-user",
            "clients-per-round": args.clients_per_round, "num-server-rounds": args.rounds,
            "eval-every": args.eval_every, "local-steps": 0, "output-dir": str(Path(args.out).resolve()),
            "dp-delta": 1e-5, "dp-expected-rounds": args.expected_rounds, "dp-sample-rate": 1.0,
            "dp-expected-batch": 100.0, "lora-layers": 0, **parse_overrides(args.set)}
    table = []
    user_level = {"server-dp": True} if args.user_level else {}
    alone = {"dp": "none", "id-embeddings": False, **user_level}  # the server sees exact updates: no id table
    levels = [("none", {"dp": "none"})] + ([("user-level-only", alone)] if user_level else [])
    levels += [(f"eps{eps:g}", {"dp": "example", "dp-epsilon": float(eps), **user_level}) for eps in args.epsilons]
    for level, dp in levels:
        name = f"bench-privacy-{level}-{stamp}"
        eps = dp.get("dp-epsilon")
        run = run_flower({**base, **dp, "run-name": name}, num_supernodes=ML100K_USERS, echo=args.echo)
        if not run.ok:
            raise SystemExit(f"run {name} failed ({run.status}):\n{run.log[-4000:]}")
        summary = json.loads((Path(args.out) / name / "summary.json").read_text())
        example = summary["privacy"].get("example", {})
        interaction = example.get("per interaction", {})
        table.append({
            "run": name, "target epsilon per client": eps,
            **{f"final test {k}": v for k, v in summary["test"].items()},
            "best-round test NDCG@10": summary["best"]["test"]["NDCG@10"] if summary["best"]["round"] else None,
            "client epsilon max (example level)": example.get("epsilon"),
            "per-interaction epsilon (sensitivity (2W+1) C, same delta)": interaction.get("epsilon"),
            "declined client rounds": example.get("declined", 0),
            "user epsilon": summary["privacy"].get("user", {}).get("epsilon"),
        })
        print(json.dumps(table[-1]), flush=True)
    plain = table[0]["final test NDCG@10"]
    for row in table:
        row["of non-private"] = row["final test NDCG@10"] / plain if plain else None
    plot_privacy(table, Path(args.out) / "privacy_utility.png")
    return {"rounds": args.rounds, "clients per round": args.clients_per_round, "overrides": args.set, "runs": table}


def plot_privacy(table: list[dict], path: Path) -> None:
    """Final test NDCG@10 against the example-level epsilon per client (log scale), with
    the non-private run and 85% of it as lines."""
    plain = table[0]["final test NDCG@10"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, user_level in (("example-level DP-SGD on every client", False),
                              ("DP-SGD and user-level DP-FedAvg", True)):
        points = sorted((r["target epsilon per client"], r["final test NDCG@10"]) for r in table
                        if r["target epsilon per client"] and bool(r["user epsilon"]) == user_level)
        if points:
            ax.plot(*zip(*points), "-o", label=label)
    ax.axhline(plain, color="black", label="no DP")
    ax.axhline(0.85 * plain, color="grey", linestyle=":", label="85% of no DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon per client (delta 1e-5, unit = one example)")
    ax.set_ylabel("final test NDCG@10, full ranking")
    ax.set_title("MovieLens-100K, 943 per-user clients, 94 a round")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scale(args: argparse.Namespace) -> dict:
    name = f"bench-scale-{args.clients}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {"dataset": "synthetic", "synthetic-users": args.clients, "partitioning": "per-user",
              "clients-per-round": args.clients_per_round, "num-server-rounds": args.rounds,
              "eval-every": args.rounds, "fraction-evaluate": args.fraction_evaluate, "local-steps": 0,
              "output-dir": str(Path(args.out).resolve()), "run-name": name, **parse_overrides(args.set)}
    started = time.time()
    run = run_flower(config, num_supernodes=args.clients, cpus_per_client=1, echo=args.echo)
    if not run.ok:
        raise SystemExit(f"scale run failed ({run.status}):\n{run.log[-4000:]}")
    metrics = read_metrics(Path(args.out) / name)
    train_seconds = [m["seconds"] for m in metrics if 0 < m["round"] < args.rounds]
    return {
        "clients": args.clients,
        "clients per round": [m["clients"] for m in metrics if m["round"] > 0],  # Poisson under server-dp
        "seconds per round": [m["seconds"] for m in metrics if m["round"] > 0],  # the last one evaluates
        "seconds per round (median, rounds without evaluation)": sorted(train_seconds)[len(train_seconds) // 2],
        "peak resident memory of the whole simulation (GB)": run.peak_rss_bytes / 1e9,
        "wall seconds (start-up, handshake, rounds, teardown)": time.time() - started,
        **{f"final {k} (sampled clients)": v for k, v in metrics[-1].items() if k.startswith("test ")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    d = sub.add_parser("default", help="the default private run beside the same run without DP and popularity")
    d.add_argument("--repeats", type=positive_int, default=3,
                   help="private runs per epsilon (each with fresh noise; default 3)")
    d.add_argument("--epsilons", type=positive_float, nargs="+", default=[],
                   help="user-level epsilons, one set of private runs each (default: the run config's "
                        "dp-epsilon); with several, also silo_frontier.png")
    d.add_argument("--silos", type=positive_int, default=2,
                   help="SuperNodes, the users split among them (default 2); dp-expected-batch follows "
                        "unless --set gives it")
    q = sub.add_parser("quality", help="ml-100k, 943 per-user clients, against the centralized reference")
    q.add_argument("--centralized", required=True,
                   help="summary.json of `python -m simulations.centralized --dataset ml-100k`")
    q.add_argument("--rounds", type=int, default=200)
    q.add_argument("--clients-per-round", type=int, default=94)
    q.add_argument("--eval-every", type=int, default=10)
    q.add_argument("--in-process", action="store_true",
                   help="run the federation through simulations.population instead of `flwr run` (the same "
                        "computation in one process, a few minutes a run on 2 cores, several at once; fp32 "
                        "uploads only)")
    q.add_argument("--threads", type=positive_int, default=1, help="--in-process: torch threads (default 1)")
    pv = sub.add_parser("privacy", help="ml-100k utility without DP and at several example-level epsilons")
    pv.add_argument("--rounds", type=int, default=60)
    pv.add_argument("--clients-per-round", type=int, default=94)
    pv.add_argument("--eval-every", type=int, default=10)
    pv.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 1.0])
    pv.add_argument("--expected-rounds", type=int, default=10,
                    help="rounds a client plans to join (noise is calibrated for them; default 10)")
    pv.add_argument("--user-level", action="store_true",
                    help="DP runs also run user-level DP-FedAvg on the server (server-dp-* keys)")
    s = sub.add_parser("scale", help="many per-user clients on the synthetic catalog")
    s.add_argument("--clients", type=int, default=10_000)
    s.add_argument("--clients-per-round", type=int, default=100)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--fraction-evaluate", type=float, default=0.01)
    c = sub.add_parser("compare", help="several quality runs in one figure and one JSON")
    c.add_argument("rows", nargs="+", metavar="NAME=BENCH_QUALITY_JSON")
    c.add_argument("--out", required=True, type=Path,
                   help="the figure and the JSON, as OUT.png and OUT.json (e.g. docs/figures/federated_ml100k_recipes)")
    for p in (d, q, pv, s):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other run-config override, e.g. --set learning-rate=0.5")
        p.add_argument("--out", default="runs", help="where run folders and the figure go (default runs/)")
        p.add_argument("--echo", action="store_true", help="show the run's log as it goes")
    args = parser.parse_args()
    if args.bench == "compare":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = compare(args.rows, args.out)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        print(f"{args.out.with_suffix('.png')}, {args.out.with_suffix('.json')}")
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = {"default": default, "quality": quality, "privacy": privacy, "scale": scale}[args.bench](args)
    print(json.dumps(result, indent=2))
    (Path(args.out) / f"bench_{args.bench}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
