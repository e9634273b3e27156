"""Where to put DP-FedAvg's clip: the clients' update norms and what survives the noise.

A round's noisy mean update is (sum of clipped updates + N(0, (z S)^2 I)) / C for an expected
cohort C: the noise's L2 norm is z S sqrt(d) / C whatever the updates, while the signal, the
mean of the clipped updates, is at most S and shrinks when the updates disagree. Their ratio
(signal to noise, SNR, at z = 1 and C = 1,000 here; it scales as C / z) decides quality, and
it depends on the clip S relative to the update norms: a clip above most norms adds noise for
nothing. This trains a sample of one-user clients from the starting model (the in-process
driver's vectorised `train_local`, the run config's local training) and prints the norm
quantiles and the SNR at several clips (the sample's mean stands for a cohort's: sample about
as many clients as a round has).

Simulation only, for choosing S (and the local training) before a private run: the norms
are the users' private data, and a deployment learns them only through adaptive clipping's
noisy count.

    python -m simulations.bench_update_norms --users 10000
    python -m simulations.bench_update_norms --users 10000 --set local-epochs=3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from shared_model.dp_aggregation import clipped_sum, stacked_updates, update_norms
from shared_model.settings import RunSettings, SettingsError
from simulations.flower_runner import app_run_config, parse_overrides
from simulations.population import Population

QUANTILES = (0.05, 0.25, 0.5, 0.9)


def update_matrix(population: Population, users: list[int]) -> dict[str, np.ndarray]:
    """The sampled users' first-round updates from the starting model, stacked."""
    arrays = population.initial_arrays()
    parts = [stacked_updates(arrays, models) for _, models in population.client_models(1, arrays, users)]
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def signal_to_noise(updates: dict[str, np.ndarray], clip: float, cohort: float, noise: float = 1.0) -> dict:
    """The mean clipped update's L2 norm over the noise's on the mean, z S sqrt(d) / C."""
    total, norms = clipped_sum(updates, clip)
    dims = sum(int(np.prod(u.shape[1:])) for u in updates.values())
    signal = float(np.sqrt(sum(np.square(t).sum() for t in total.values()))) / len(norms)
    noise_norm = noise * clip * np.sqrt(dims) / cohort
    return {"clip": clip, "clipped share": float(np.mean(norms > clip)), "mean update norm": signal,
            "noise norm": noise_norm, "SNR": signal / noise_norm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10000, help="synthetic world's users (default: %(default)s)")
    parser.add_argument("--sample", type=int, default=1000, help="clients trained (default: %(default)s)")
    parser.add_argument("--cohort", type=float, default=1000.0,
                        help="expected cohort C of the SNR (default: %(default)s; SNR scales as C / z)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override (repeatable), e.g. --set local-epochs=3")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if not 0 < args.sample <= args.users:
        parser.error(f"--sample must be between 1 and --users ({args.users}), not {args.sample}")
    if args.cohort <= 0:
        parser.error(f"--cohort must be positive, not {args.cohort}")
    overrides = parse_overrides(args.set)
    config = {"dataset": "synthetic", "synthetic-users": args.users, "partitioning": "per-user", "dp": "none",
              "server-dp": True, "id-embeddings": False, **overrides}
    try:
        settings = RunSettings.from_run_config(app_run_config(**config))
    except (KeyError, SettingsError) as error:
        parser.error(f"--set: {error}")
    torch.set_num_threads(1)
    population = Population(settings)
    step = len(population.train) // args.sample
    updates = update_matrix(population, list(range(0, step * args.sample, step)))
    norms = update_norms(updates)
    quantiles = {f"{q:g}": float(np.quantile(norms, q)) for q in QUANTILES}
    clips = [settings.server_dp_clip, *quantiles.values()]
    rows = [signal_to_noise(updates, clip, args.cohort) for clip in clips]
    print(f"{args.users:,} users, {len(norms)} clients, {' '.join(args.set) or 'the default local training'}: "
          f"update norms at quantiles " + ", ".join(f"{q}: {v:.3f}" for q, v in quantiles.items()))
    print("clip S   clipped   |mean clipped update|   noise on the mean (z = 1)   SNR")
    for row in rows:
        print(f"{row['clip']:6.3f}   {row['clipped share']:7.0%}   {row['mean update norm']:21.4f}   "
              f"{row['noise norm']:25.4f}   {row['SNR']:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"users": args.users, "sample": len(norms), "cohort": args.cohort,
                                        "set": overrides, "norm quantiles": quantiles, "clips": rows}, indent=2))


if __name__ == "__main__":
    main()
