"""What differential privacy costs a client in time: one round of local training on the
same client data, with Opacus DP-SGD (per-sample gradients, clipping, noise, Poisson
sampling) and without (the same samples, loss, batch size and SGD). Also what fresh
randomness costs: DP-SGD with its noise and Poisson draws from OS entropy and the secure
Gaussian sampler (the apps' way) against a seeded generator with plain Gaussian draws.

    python -m simulations.bench_opacus_overhead --dataset ml-100k --clients 40
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from shared_model.cli_options import add_dataset_options
from shared_model.datasets import load_dataset
from shared_model.dp_training import private_data, train_plain, train_private
from shared_model.recommender import RecommenderConfig, build_recommender
from shared_model.splits import leave_one_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_options(parser, default="ml-100k")
    parser.add_argument("--clients", type=int, default=40, help="one client per user, the first N users")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=64)
    parser.add_argument("--lora-layers", type=int, default=RecommenderConfig().lora_layers,
                        help="encoder layers with LoRA (0: only the light head trains)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a simulated client has one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset, args.data_dir)
    split = leave_one_out(dataset)
    model = build_recommender(dataset.catalog.texts, RecommenderConfig(lora_layers=args.lora_layers), progress=False)
    start_state = model.trainable_state()
    times = {"dp": [], "dp seeded": [], "plain": []}
    for user in range(args.clients):
        data = private_data(model, [split.train[user]], "example")
        rate = min(1.0, args.batch_size / len(data))
        for name in ("plain", "dp seeded", "dp"):
            model.load_trainable_state(start_state)
            started = time.perf_counter()
            if name == "plain":
                train_plain(model, data, args.batch_size, 0.5, 1, args.negatives, user)
            else:
                seeded = name == "dp seeded"
                train_private(model, data, 1.0, 1.0, rate, math.ceil(1 / rate), args.batch_size, 0.5, args.negatives,
                              private_randomness=np.random.default_rng(user) if seeded else None,
                              secure_noise=not seeded)
            times[name].append(time.perf_counter() - started)
    result = {name: {"median seconds": float(np.median(t)), "mean seconds": float(np.mean(t))}
              for name, t in times.items()}
    result["dp / plain (medians)"] = result["dp"]["median seconds"] / result["plain"]["median seconds"]
    result["fresh / seeded randomness (medians)"] = result["dp"]["median seconds"] / result["dp seeded"]["median seconds"]
    result["fresh / seeded randomness (median of per-client ratios)"] = float(
        np.median(np.array(times["dp"]) / np.array(times["dp seeded"])))  # robust to the machine's drift
    result["clients"], result["lora layers"] = args.clients, args.lora_layers
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
