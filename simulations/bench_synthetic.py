"""Benchmark: how long the synthetic generator takes for many users.

    python -m simulations.bench_synthetic --users 100000
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from shared_model.synthetic import SyntheticConfig, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000, help="users to generate (default 100000)")
    parser.add_argument("--items", type=int, help="catalog size (default: the population's, as runs get it)")
    args = parser.parse_args()
    config = SyntheticConfig.for_population(args.users)
    if args.items is not None:
        config = dataclasses.replace(config, n_items=args.items)
    start = time.perf_counter()
    dataset = generate(config)
    seconds = time.perf_counter() - start
    per_user = np.bincount(dataset.users, minlength=dataset.n_users)
    print(f"{args.users} users, {config.n_items} items: {len(dataset.users)} interactions "
          f"(median {int(np.median(per_user))} per user) in {seconds:.1f} s")


if __name__ == "__main__":
    main()
