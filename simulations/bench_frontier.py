"""The privacy-utility frontier of user-level DP-FedAvg, by population size.

For each population (synthetic worlds of 1k, 10k and 100k users and MovieLens-100K, one
user per client) and each user-level epsilon, the noise multiplier that reaches it at
`--delta` after `--rounds` rounds of Poisson sampling with expected cohort `--cohort`
(`fedrec privacy plan` computes the same), then the federation trained with it: test
NDCG@10 and HR@10 (full ranking) and the beyond-accuracy metrics of the final model. In the
same run and on the same split: the same federation without noise (same sampling and
clipping: the cost of the noise alone) and popularity. "Lift kept" is (DP - popularity) /
(no noise - popularity), the share of what the model learns beyond popularity that
survives the noise.

Every federation runs through the in-process driver (simulations.population: the server's
DP-FedAvg code and the clients' training, vectorised; tests/test_population.py shows it
computes what `flwr run` computes). Results merge into the JSON by variant, population and
epsilon, so the frontier can run in parts (e.g. `--populations 100000 --epsilons 1,8`); the
figure is redrawn from everything in the JSON. `--jobs 2` runs two federations at once (one
core each). A variant measures one mechanism alone: the
same federations with run-config overrides (`--variant adaptive-clip --set
server-dp-adaptive-clip=true`), each with its own noise-free reference.

    python -m simulations.bench_frontier                      # the whole baseline frontier
    python -m simulations.bench_frontier --populations ml-100k --epsilons 8
    python -m simulations.bench_frontier --variant public-1pct --set public-users=0.01 --populations 100000
    python -m simulations.bench_frontier --variant dp-ftrl --set server-dp-mechanism=dp-ftrl --populations 10000
    python -m simulations.bench_frontier --variant unamplified --unamplified --populations 10000

DP-FTRL (`--set server-dp-mechanism=dp-ftrl`) takes `--cohort` clients a round, each user at
most once a tree, its noise calibrated from its trees (no amplification; with `--set
dp-ftrl-noise=square-root`, from the square-root factorization's one Gaussian an epoch); `--unamplified`
calibrates DP-FedAvg's noise as if every user took part in every round (no sampling
assumption): the two answers for a server whose sampling cannot be trusted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared_model.cli_options import positive_int  # noqa: E402
from shared_model.metrics import evaluate_scores, item_counts  # noqa: E402
from shared_model.privacy import ftrl_noise_multiplier, noise_multiplier  # noqa: E402
from shared_model.settings import RunSettings, SettingsError  # noqa: E402
from shared_model.splits import LeaveOneOut, leave_one_out  # noqa: E402
from simulations.baselines import popularity_scores  # noqa: E402
from simulations.flower_runner import app_run_config, parse_overrides  # noqa: E402
from simulations.population import add_driver_options, machine, run  # noqa: E402

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
POPULATIONS = ("1000", "10000", "100000", "ml-100k")
FIGURES = Path("docs/figures")


def population_config(population: str) -> dict:
    """The run-config keys that choose the population's data."""
    if population == "ml-100k":
        return {"dataset": "ml-100k"}
    return {"dataset": "synthetic", "synthetic-users": int(population)}


def population_split(population: str) -> LeaveOneOut:
    """The population's data, split as every evaluation splits it (its user count sets the
    sampling rate), loaded once per population."""
    return leave_one_out(RunSettings.from_run_config(app_run_config(**population_config(population))).load_dataset())


def settings_for(population: str, args: argparse.Namespace, run_name: str, noise: float, users: int) -> RunSettings:
    """A per-user DP-FedAvg run of this population of `users` (its sampling rate gives the
    expected cohort), with the variant's run-config overrides (`--set`)."""
    rate = min(1.0, args.cohort / users)
    overrides = {**population_config(population), "partitioning": "per-user", "dp": "none", "server-dp": True,
                 "id-embeddings": False, "server-dp-sample-rate": rate, "clients-per-round": min(args.cohort, users),
                 "server-dp-noise": noise,
                 "server-dp-clip": args.clip, "num-server-rounds": args.rounds, "eval-every": args.rounds,
                 "dp-delta": args.delta, "output-dir": str(args.runs), "run-name": run_name, **args.set}
    return RunSettings.from_run_config(app_run_config(**overrides))


def calibrated_noise(base: RunSettings, eps: float, args: argparse.Namespace, users: int) -> float:
    """The noise multiplier for user-level `eps` after `--rounds` rounds: DP-FedAvg's with
    amplification by Poisson sampling (at the run's rate), or without it (`--unamplified`:
    every round a Gaussian at rate 1, as if every user took part in every round); DP-FTRL's
    from its trees (`server-dp-mechanism=dp-ftrl`: no amplification, each user once a tree,
    with the run's `dp-ftrl-noise`)."""
    if base.server_dp_mechanism == "dp-ftrl":
        return ftrl_noise_multiplier(eps, args.rounds, users // min(args.cohort, users), args.delta,
                                     base.dp_accountant, base.dp_ftrl_noise)
    rate = 1.0 if args.unamplified else base.server_dp_sample_rate
    return noise_multiplier(eps, rate, args.rounds, args.delta, base.dp_accountant)


def final_test_metrics(folder: Path) -> dict[str, float]:
    """The final model's test metrics, from the run's last evaluated metrics line."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [line for line in lines if "test NDCG@10" in line][-1]
    return {key[len("test "):]: value for key, value in last.items() if key.startswith("test ")}


def popularity_metrics(split: LeaveOneOut) -> dict[str, float]:
    cases = split.cases("test")
    return evaluate_scores(popularity_scores(split.train, split.n_items, cases), cases,
                           item_counts(split.train, split.n_items))


def federation(settings: RunSettings, chunk: int | None, noise_free: bool,
               device: str) -> tuple[dict[str, float], float]:
    """One federation in a worker process: (its final test metrics, seconds)."""
    torch.set_num_threads(1)
    started = time.time()
    return final_test_metrics(run(settings, chunk, noise_free, device).path), time.time() - started


def run_population(population: str, args: argparse.Namespace, stamp: str, out: dict,
                   save: Callable[[], None], pool: Executor) -> None:
    """Popularity and the noise-free federation (unless `out`, this population's earlier
    results, holds them), and one DP federation per epsilon, run by `pool` (`--jobs` at a
    time) and merged into `out`; `save` after each federation (a long frontier stopped
    midway keeps what it measured)."""
    split = population_split(population)
    users = len(split.train)
    name = f"frontier-{stamp}-{args.variant}-{population}"
    base = settings_for(population, args, f"{name}-no-noise", 1.0, users)
    if "no noise" not in out:
        out.update(users=users, popularity=popularity_metrics(split))
        out.setdefault("epsilon", {})  # epsilons measured before a crash keep (their lift waits for the reference)
        out["sample rate"] = base.server_dp_sample_rate
    work = ({pool.submit(federation, base, args.chunk, True, args.device): ("no noise", None)}
            if "no noise" not in out else {})
    for eps in args.epsilons:
        z = calibrated_noise(base, eps, args, users)
        settings = settings_for(population, args, f"{name}-eps{eps:g}", z, users)
        work[pool.submit(federation, settings, args.chunk, False, args.device)] = (f"{eps:g}", z)
    for done in as_completed(work):
        key, z = work[done]
        metrics, seconds = done.result()
        if z is None:
            out["no noise"] = {**metrics, "seconds": seconds}
        else:
            out["epsilon"][key] = {"noise multiplier": z, **metrics, "seconds": seconds}
        for found in out["epsilon"].values():  # an epsilon may finish before the noise-free reference
            found["lift kept"] = lift_kept(found, out) if "no noise" in out else None
        save()
        print(f"{population}: {'no noise' if z is None else f'epsilon {key} (z {z:.3f})'}: test NDCG@10 "
              f"{metrics['NDCG@10']:.4f} ({seconds / 60:.1f} min)", flush=True)
    no_noise, floor = out["no noise"]["NDCG@10"], out["popularity"]["NDCG@10"]
    for key, found in sorted(out["epsilon"].items(), key=lambda item: float(item[0])):
        kept = found["lift kept"]
        print(f"{population}: epsilon {key}: test NDCG@10 {found['NDCG@10']:.4f}, lift kept "
              f"{'n/a' if kept is None else f'{kept:.0%}'} (no noise {no_noise:.4f}, popularity {floor:.4f})")


def lift_kept(metrics: dict, population: dict) -> float | None:
    """(DP - popularity) / (no noise - popularity), in NDCG@10; None where the noise-free
    federation does not beat popularity (there is no lift to keep)."""
    floor = population["popularity"]["NDCG@10"]
    lift = population["no noise"]["NDCG@10"] - floor
    return (metrics["NDCG@10"] - floor) / lift if lift > 0 else None


STYLES = ("-o", "--s", "-.^", ":v", "--D", "-.x", ":*", "-P")  # one per variant, in the JSON's order (cycled)


def plot(results: dict, path: Path) -> None:
    """One colour per population, one line style per variant; each population's no-noise
    and popularity references as horizontal lines (the baseline's, else the first variant's)."""
    fig, (ndcg, kept) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    populations = sorted({p for v in results["variants"].values() for p in v["populations"]},
                         key=lambda p: (p == "ml-100k", int(p) if p.isdigit() else 0))
    ndcg.set_xlim(0.35, 11.5)  # the default epsilons, whatever has run so far
    kept.set_xlim(0.35, 11.5)
    variants = sorted(results["variants"].items(), key=lambda item: item[0] != "baseline")
    referenced = set()
    for index, (variant, found_variant) in enumerate(variants):
        style = STYLES[index % len(STYLES)]
        for population, found in found_variant["populations"].items():
            color = colors[populations.index(population) % len(colors)]
            points = sorted((float(e), r) for e, r in found["epsilon"].items())
            if not points:  # saved after its noise-free reference, before any epsilon
                continue
            label = (f"{population} ({found['users']:,} users)" if population == "ml-100k"
                     else f"{found['users']:,} users") + ("" if variant == "baseline" else f", {variant}")
            ndcg.plot([e for e, _ in points], [r["NDCG@10"] for _, r in points], style, color=color, label=label)
            lifts = [(e, r["lift kept"]) for e, r in points if r["lift kept"] is not None]
            kept.plot([e for e, _ in lifts], [100 * k for _, k in lifts], style, color=color, label=label)
            if population not in referenced and "no noise" in found:  # an epsilon may finish first
                referenced.add(population)
                ndcg.axhline(found["no noise"]["NDCG@10"], color=color, linestyle="--", linewidth=0.8)
                ndcg.axhline(found["popularity"]["NDCG@10"], color=color, linestyle=":", linewidth=0.8)
    for ax in (ndcg, kept):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"user-level epsilon (delta {results['delta']:g})")
        ax.grid(alpha=0.3)
    ndcg.set_ylabel("test NDCG@10 (lines: no noise --, popularity ..)")
    kept.set_ylabel("lift over popularity kept (%)")
    kept.axhline(90, color="grey", linewidth=0.8)
    ndcg.legend(fontsize=7)
    ftrl = any(v["set"].get("server-dp-mechanism") == "dp-ftrl" for v in results["variants"].values())
    fig.suptitle(f"{'DP-FedAvg and DP-FTRL' if ftrl else 'DP-FedAvg'}, expected cohort {results['cohort']}, "
                 f"{results['rounds']} rounds, {results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--populations", default=",".join(POPULATIONS),
                        help="synthetic user counts and/or 'ml-100k' (default: %(default)s)")
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS),
                        help="user-level epsilons (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=1e-6, help="delta of every epsilon (default: %(default)s)")
    parser.add_argument("--cohort", type=positive_int, default=1000,
                        help="expected clients per round, q N (capped at the population; default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=50, help="rounds per federation (default: %(default)s)")
    parser.add_argument("--clip", type=float, default=1.0, help="L2 clip of a client's update (default: %(default)s)")
    parser.add_argument("--variant", default="baseline",
                        help="name under which these federations' results are kept (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override for every federation of the variant (repeatable), e.g. "
                             "--variant adaptive-clip --set server-dp-adaptive-clip=true, or --variant "
                             "public-1pct --set public-users=0.01 (a consenting 1%% treated as public)")
    parser.add_argument("--unamplified", action="store_true",
                        help="calibrate DP-FedAvg's noise without amplification by sampling (a Gaussian at rate 1 every "
                             "round: what holds when the sampling cannot be trusted); name the variant to say so")
    add_driver_options(parser)
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="federations run at once, one process and one core each (default: %(default)s); "
                             "memory: about 5 GB each for the 100,000-user world")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the run folders go")
    parser.add_argument("--out", type=Path, default=FIGURES, help="where frontier.json and frontier.png go")
    args = parser.parse_args()
    args.epsilons_text = args.epsilons
    try:
        args.epsilons = [float(e) for e in args.epsilons.split(",")]
    except ValueError:
        parser.error(f"--epsilons: numbers separated by commas, not {args.epsilons!r}")
    args.set = parse_overrides(args.set)
    try:
        app_run_config(**args.set)
    except KeyError as error:
        parser.error(f"--set: {error}")
    populations = args.populations.split(",")
    for population in populations:
        if population != "ml-100k" and not population.isdigit():
            parser.error(f"--populations: {population!r} is neither a user count nor 'ml-100k'")
    try:  # a variant the run config refuses fails here, not after the first population
        for population in populations:
            settings_for(population, args, "check", 1.0, args.cohort)
    except SettingsError as error:
        parser.error(f"--set: {error}")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "frontier.json"
    results = json.loads(path.read_text()) if path.exists() else {"variants": {}}
    if results["variants"] and (results["cohort"], results["rounds"], results["delta"]) != (
            args.cohort, args.rounds, args.delta):
        parser.error(f"{path} holds a frontier with cohort {results['cohort']}, rounds {results['rounds']}, delta "
                     f"{results['delta']}: use those or another --out")
    variant = results["variants"].setdefault(args.variant, {"set": args.set, "unamplified": args.unamplified,
                                                            "populations": {}})
    if (variant["set"], variant.get("unamplified", False)) != (args.set, args.unamplified):
        parser.error(f"{path}: variant {args.variant!r} was run with --set {variant['set']}"
                     f"{' --unamplified' if variant.get('unamplified') else ''}, not {args.set}"
                     f"{' --unamplified' if args.unamplified else ''}")
    if results["variants"] and results.get("machine", machine(args.device)) != machine(args.device):
        parser.error(f"{path} holds a frontier measured on {results['machine']}, not {machine(args.device)}: "
                     "use another --out")
    results.update(cohort=args.cohort, rounds=args.rounds, delta=args.delta, machine=machine(args.device),
                   command=f"python -m simulations.bench_frontier --cohort {args.cohort} --rounds {args.rounds} "
                           f"--delta {args.delta:g} --clip {args.clip:g} (populations, epsilons and variants in "
                           f"parts: see each population's 'commands')")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    def save() -> None:
        path.write_text(json.dumps(results, indent=2))
        plot(results, args.out / "frontier.png")

    # spawned workers: a forked one would inherit torch's thread pools mid-use
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for population in populations:
            found = variant["populations"].setdefault(population, {})
            found.setdefault("commands", []).append(
                f"--variant {args.variant} " + "".join(f"--set {k}={v} " for k, v in args.set.items())
                + f"--populations {population} --epsilons {args.epsilons_text}")
            run_population(population, args, stamp, found, save, pool)
    print(f"results in {path} and {args.out / 'frontier.png'}")


if __name__ == "__main__":
    main()
