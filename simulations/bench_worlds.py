"""Population-scale synthetic worlds: how fast they generate, and whether the task stays
hard and learnable as the population grows.

For each population (default 1,000, 10,000 and 100,000 users, each a world of
`SyntheticConfig.for_population`: 800 items up to 8,000 users, then one item per 10 users),
in a fresh process: generate it (time, peak resident memory of that process), split it
leave-one-out by time, train the non-private model centrally (the reference recipe of
simulations/centralized.py, light head only, capped at --max-steps optimiser steps, best
epoch by validation NDCG@10 on a seeded sample of users) and score it, popularity and
topic-popularity ("topic alone": the user's share of items in each topic times the
item's popularity within the topic; simulations/baselines.py) on the same test cases,
full ranking over all unseen items.

    python -m simulations.bench_worlds                        # 1k, 10k, 100k users
    python -m simulations.bench_worlds --populations 1000 --max-steps 300 --out /tmp/pop

Writes bench_worlds.json and bench_worlds.png in --out (default docs/figures).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from shared_model.cli_options import positive_int  # noqa: E402
from shared_model.metrics import evaluate_scores  # noqa: E402
from shared_model.recommender import RecommenderConfig, score_catalog  # noqa: E402
from shared_model.splits import leave_one_out, user_sequences  # noqa: E402
from shared_model.synthetic import SyntheticConfig, generate  # noqa: E402
from shared_model.training import TrainConfig  # noqa: E402
from simulations.baselines import popularity_scores, topic_popularity_scores  # noqa: E402
from simulations.centralized import CentralizedConfig, train_reference, user_sample  # noqa: E402

MAX_EPOCHS = 60  # the reference recipe's cap


@dataclass(frozen=True)
class BenchSettings:
    max_steps: int  # optimiser steps at most (whole epochs: the epoch count is rounded up)
    eval_users: int  # validation and test on a seeded sample of this many users (0: all)
    id_embeddings: bool
    seed: int


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(n_users: int, bench: BenchSettings) -> dict:
    """One population, in its own process (so that its peak memory is its own)."""
    torch.set_num_threads(1)
    rss_before = peak_rss_bytes()
    started = time.perf_counter()
    config = SyntheticConfig.for_population(n_users, bench.seed)
    dataset = generate(config)
    generation_seconds = time.perf_counter() - started
    generation_rss = peak_rss_bytes()
    lengths = np.array([len(s) for s in user_sequences(dataset)])
    split = leave_one_out(dataset)
    model_config = RecommenderConfig(lora_layers=0, id_embeddings=bench.id_embeddings)
    chunks = sum(math.ceil(len(t) / model_config.history) for t in split.train)  # as training.sequence_chunks cuts
    steps_per_epoch = math.ceil(chunks / TrainConfig().batch_size)
    epochs = min(MAX_EPOCHS, math.ceil(bench.max_steps / steps_per_epoch))
    reference = CentralizedConfig(model=model_config, epochs=epochs, patience=10, seed=bench.seed,
                                  valid_users=bench.eval_users)  # patience 10: the published figures' schedule
    with tempfile.TemporaryDirectory() as out:
        model, training = train_reference(split, dataset.catalog.texts, reference, Path(out), progress=False)
    test = split.cases("test", user_sample(split.n_users, bench.eval_users, bench.seed))
    prefixes = [split.prefix(u, "test") for u in range(split.n_users)]
    scores = {
        "model": score_catalog(model, test.histories),
        "topic-popularity": topic_popularity_scores(prefixes, dataset.catalog.genres, test),
        "popularity": popularity_scores(prefixes, split.n_items, test),
    }
    results = {name: evaluate_scores(s, test) for name, s in scores.items()}
    popular, ours = results["popularity"]["NDCG@10"], results["model"]["NDCG@10"]
    return {
        "users": n_users,
        "items": dataset.n_items,
        "topics": len(dataset.catalog.genre_names),
        "interactions": len(dataset.users),
        "interactions per user (mean)": float(lengths.mean()),
        "interactions per item (mean)": len(dataset.users) / dataset.n_items,
        "generation seconds": generation_seconds,
        "peak RSS after generation (bytes)": generation_rss,
        "peak RSS before generation (bytes; imports)": rss_before,
        "training": {"epochs allowed": epochs, "steps per epoch": steps_per_epoch, **training},
        "test users": len(test),
        "test": results,
        "model NDCG@10 over popularity's": ours / popular if popular else float("inf"),
        "model NDCG@10 over topic-popularity's": ours / results["topic-popularity"]["NDCG@10"],
        "peak RSS of the whole measurement (bytes)": peak_rss_bytes(),
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    users = [r["users"] for r in rows]
    fig, (quality, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("model", "-o"), ("topic-popularity", "--s"), ("popularity", ":^")):
        for metric, color in (("NDCG@10", "tab:blue"), ("HR@10", "tab:orange")):
            quality.plot(users, [r["test"][name][metric] for r in rows], style, color=color, label=f"{name} {metric}")
    quality.set_xscale("log")
    quality.set_xlabel("users (one per device)")
    quality.set_ylabel("test, full ranking")
    quality.set_title("non-private model vs baselines, same run")
    quality.grid(alpha=0.3, which="both")
    quality.legend(fontsize=7)
    cost.plot(users, [r["generation seconds"] for r in rows], "-o", label="generation seconds")
    cost.set_xscale("log")
    cost.set_xlabel("users")
    cost.set_ylabel("seconds")
    twin = cost.twinx()
    twin.plot(users, [r["peak RSS after generation (bytes)"] / 1e9 for r in rows], "-s", color="tab:red",
              label="peak RSS after generation (GB)")
    twin.set_ylabel("GB")
    cost.set_title("generator cost")
    cost.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_worlds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--populations", type=positive_int, nargs="+", default=[1000, 10_000, 100_000],
                        help="users in each world (default 1000 10000 100000)")
    parser.add_argument("--max-steps", type=positive_int, default=2000,
                        help="training budget in optimiser steps (batch 128), rounded up to whole epochs, at most "
                        f"{MAX_EPOCHS} epochs (default 2000: 2 epochs at 100,000 users)")
    parser.add_argument("--eval-users", type=int, default=10_000, metavar="N",
                        help="validate and test on a seeded sample of this many users (0: all; default 10000)")
    parser.add_argument("--no-id-embeddings", dest="id_embeddings", action="store_false",
                        help="train the text-only model (what user-level DP-FedAvg federations train)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the worlds, training and samples (default 0)")
    parser.add_argument("--out", default="docs/figures", help="folder for the JSON and figure (default docs/figures)")
    args = parser.parse_args(argv)
    bench = BenchSettings(args.max_steps, args.eval_users, args.id_embeddings, args.seed)
    rows = []
    for n_users in args.populations:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            row = pool.submit(measure, n_users, bench).result()
        rows.append(row)
        t = row["test"]
        print(f"{n_users} users, {row['items']} items, {row['interactions']} interactions: generated in "
              f"{row['generation seconds']:.1f} s (peak RSS {row['peak RSS after generation (bytes)'] / 1e9:.2f} GB); "
              f"NDCG@10 model {t['model']['NDCG@10']:.4f}, topic-popularity {t['topic-popularity']['NDCG@10']:.4f}, "
              f"popularity {t['popularity']['NDCG@10']:.4f}; HR@10 {t['model']['HR@10']:.4f} / "
              f"{t['topic-popularity']['HR@10']:.4f} / {t['popularity']['HR@10']:.4f}; "
              f"trained {row['training']['train_seconds']:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, 2-core CPU shared with other jobs (busy)"
    command = "python -m simulations.bench_worlds " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = {"command": command.strip(), "machine": machine, "settings": asdict(bench), "populations": rows}
    (out / "bench_worlds.json").write_text(json.dumps(summary, indent=2))
    plot(rows, out / "bench_worlds.png", f"{summary['command']} ({machine})")
    print(f"results: {out / 'bench_worlds.json'}, {out / 'bench_worlds.png'}")


if __name__ == "__main__":
    main()
