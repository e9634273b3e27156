"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski 2023).

m canary examples (a history of W random items -> a random target item) are each put into
the training data with probability 1/2 (drawn from OS entropy: the auditor must not be able
to replay the inclusion from a seed, nor the training's noise); one model is trained on it with the clients'
DP-SGD (unit example, Opacus) at each claimed epsilon; then every canary is scored (the log
probability of its target given its history), the top and bottom guesses are "in" and
"out", and the number of correct guesses gives an epsilon lower bound at 95% confidence.
The same run without DP is the control: its bound must be clearly higher, which shows
the audit can see leakage at all.

    python -m simulations.bench_privacy_audit --dataset ml-100k --epsilons 8 4 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shared_model.cli_options import add_dataset_options
from shared_model.datasets import load_dataset
from shared_model.dp_training import private_data
from shared_model.privacy import audit_lower_bound
from shared_model.recommender import RecommenderConfig, build_recommender
from shared_model.splits import leave_one_out
from simulations.canary_audit import canary_scores, guesses, make_canaries, train_audited, with_canaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_options(parser, default="ml-100k")
    parser.add_argument("--users", type=int, default=300, help="users whose examples form the training data")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--guesses-per-side", type=int, default=50)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0],
                        help="claimed example-level epsilons: one DP run each (default 8)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/privacy-audit")
    args = parser.parse_args()

    dataset = load_dataset(args.dataset, args.data_dir)
    split = leave_one_out(dataset)
    config = RecommenderConfig(lora_layers=0, dropout=0.0)
    shape = build_recommender(dataset.catalog.texts, config, progress=False)  # W and the catalog size
    data = private_data(shape, split.train[: args.users], "example")
    ids, targets, included = make_canaries(shape, args.canaries, args.seed)
    train = with_canaries(data, ids, targets, included)
    results = {"dataset": dataset.name, "training examples": len(train), "canaries": args.canaries,
               "included": int(included.sum()), "guesses": 2 * args.guesses_per_side, "delta": args.delta}
    runs = [(f"dp eps{eps:g}", eps) for eps in args.epsilons] + [("control", None)]
    for name, claimed in runs:
        torch.manual_seed(args.seed)
        model = build_recommender(dataset.catalog.texts, config, progress=False)
        started = time.time()
        train_audited(model, train, claimed, args.delta, args.batch_size, args.lr, args.epochs, 64, args.seed)
        made, correct = guesses(canary_scores(model, ids, targets), included, args.guesses_per_side)
        bound = audit_lower_bound(args.canaries, made, correct, args.delta)
        results[name] = {"claimed epsilon": claimed, "correct guesses": correct,
                         "epsilon lower bound (95%)": bound, "seconds": time.time() - started}
        print(name, json.dumps(results[name]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_privacy_audit.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
