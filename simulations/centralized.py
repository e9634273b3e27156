"""The centralized reference: the same model trained on all training data, no federation,
no DP, next to baselines on the same split, in the same run: popularity, EASE, a
sequence-aware item-kNN and a SASRec-style model (the same user tower over an id table).

    python -m simulations.centralized --dataset ml-100k        # --help lists the model's knobs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from shared_model.cli_options import add_data_options, add_model_options, model_config, positive_float, positive_int
from shared_model.data import DataError, Dataset
from shared_model.datasets import load_dataset
from shared_model.metrics import evaluate_scores, item_counts
from shared_model.recommender import Ranker, Recommender, RecommenderConfig, build_recommender, score_catalog
from shared_model.splits import LeaveOneOut, leave_one_out
from shared_model.files import write_atomic
from shared_model.state import save_state
from shared_model.training import TrainConfig, add_profiles, epochs_keeping_best, make_optimizer, sequence_chunks
from simulations.baselines import ease_test_scores, item_knn_test_scores, popularity_scores, tune_ease, tune_item_knn


# The reference recipe, the ablation's best row by validation NDCG@10 (simulations/bench_ablation.py,
# docs/benchmarks.md#the-recipe-one-change-at-a-time): the item-id table at rank 8 (1,682 x 8 times
# 8 x 24: a third of the full table's upload), the training softmax hiding each user's seen items,
# up to 200 epochs with patience 20.
REFERENCE_MODEL = RecommenderConfig(id_rank=8, hide_seen=True)


@dataclass
class CentralizedConfig:
    model: RecommenderConfig = field(default_factory=lambda: REFERENCE_MODEL)
    train: TrainConfig = field(default_factory=TrainConfig)
    epochs: int = 200
    patience: int = 20  # stop after this many epochs without a better validation NDCG@10
    seed: int = 0
    valid_users: int = 0  # validate on a seeded sample of this many users (0: all)
    sasrec_dim: int = 24  # the SASRec-style baseline's width (0: no such baseline)


def sasrec_config(config: CentralizedConfig) -> CentralizedConfig:
    """The SASRec-style baseline (Kang and McAuley 2018): the model's user tower and
    training (its loss too, seen items hidden or not) over a full item-id table alone, no
    text, at its own width (24 and the model's Adam 4e-3 beat 64 at 4e-3 or 1e-3 on
    validation: the ablation's ids-only rows)."""
    model = replace(config.model, item_text=False, id_embeddings=True, id_rank=0, lora_layers=0,
                    dim=config.sasrec_dim)
    return replace(config, model=model)


def user_sample(n_users: int, size: int, seed: int) -> np.ndarray | None:
    """A seeded, sorted sample of `size` users, or None (all) when size is 0 or covers them."""
    if size <= 0 or size >= n_users:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_users, size=size, replace=False))


def train_reference(split: LeaveOneOut, texts: list[str], config: CentralizedConfig, out_dir: Path,
                    progress: bool = True) -> tuple[Recommender, dict]:
    """Train on split.train, keep the best epoch by validation NDCG@10 (written to out_dir)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    valid = split.cases("valid", user_sample(split.n_users, config.valid_users, config.seed))
    popularity = item_counts(split.train, split.n_items)
    model = build_recommender(texts, config.model, progress=progress)
    optimizer = make_optimizer(model, config.train)
    profile_rows = add_profiles(model, split.profiles) if split.profiles and model.text is not None else None  # users' own words
    chunks = sequence_chunks(model, split.train, profile_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_started = time.time()
    epochs = epochs_keeping_best(model, optimizer, chunks, config.train.batch_size, rng, config.epochs, config.patience,
                                 lambda: evaluate_scores(score_catalog(model, valid.histories), valid, popularity))
    bar = tqdm(epochs, desc="centralized", total=config.epochs, disable=not progress)
    with open(out_dir / "metrics.jsonl", "w") as log:
        for report in bar:
            log.write(json.dumps({"epoch": report.epoch, "loss": report.loss,
                                  **{f"valid {k}": v for k, v in report.validation.items()}}) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{report.loss:.3f}", val_ndcg=f"{report.validation['NDCG@10']:.4f}",
                            best=report.best_epoch)
    save_state(out_dir / "best_adapters.safetensors", model.trainable_state(), {"model_config": config.model.to_dict()})
    return model, {"best_epoch": report.best_epoch, "best_valid_NDCG@10": report.best_ndcg,
                   "train_seconds": time.time() - train_started}


def run_centralized(dataset: Dataset, config: CentralizedConfig, out_dir: Path, progress: bool = True) -> dict:
    """Train, keep the best epoch by validation NDCG@10, test it and the baselines."""
    started = time.time()
    split = leave_one_out(dataset)
    test = split.cases("test")
    model, training = train_reference(split, dataset.catalog.texts, config, out_dir, progress)
    lam, _ = tune_ease(split)
    knn, _ = tune_item_knn(split)
    prefixes = [split.prefix(u, "test") for u in range(split.n_users)]
    scores = {
        "model": score_catalog(model, test.histories),
        "popularity": popularity_scores(prefixes, split.n_items, test),
        "ease": ease_test_scores(split, lam, test),
        "item-knn": item_knn_test_scores(split, knn, test),
    }
    baselines = {"ease_lambda": lam, "item_knn": asdict(knn)}
    if config.sasrec_dim:
        sasrec, sasrec_training = train_reference(split, dataset.catalog.texts, sasrec_config(config),
                                                  out_dir / "sasrec", progress)
        scores["sasrec"] = score_catalog(sasrec, test.histories)
        baselines["sasrec"] = {"model": sasrec.config.to_dict(), **sasrec_training}
    popularity = item_counts(split.train, split.n_items)
    results = {}
    for name, s in scores.items():
        results[name] = evaluate_scores(s, test, popularity)
        results[name].update(evaluate_scores(s, test, sampled=True))
    summary = {
        "dataset": dataset.name,
        "config": {"model": config.model.to_dict(), "train": vars(config.train), "epochs": config.epochs,
                   "patience": config.patience, "seed": config.seed, "sasrec_dim": config.sasrec_dim},
        **training,
        "baselines": baselines,
        "test": results,
        "trainable_bytes": model.trainable_bytes(),
        "wall_seconds": time.time() - started,
        "test_users": len(test),
        "top10_latency_ms": top10_latency_ms(model, test.histories[:500]),
    }
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def top10_latency_ms(model: Recommender, histories: list[np.ndarray]) -> dict[str, float]:
    """Median and p99 wall time of one user's top-10 over the catalog, in-process, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one request per core: no thread hand-offs inside a tiny model
    try:
        ranker = Ranker(model)
        for history in histories[:20]:
            ranker.top_k(history, 10)
        times = []
        for history in histories:
            start = time.perf_counter()
            ranker.top_k(history, 10)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"median": 1000 * float(np.median(times)), "p99": 1000 * float(np.percentile(times, 99))}


TABLES = (("HR@10", "NDCG@10", "HR@10 (100 sampled)", "NDCG@10 (100 sampled)"),
          ("AUC", "coverage@10", "popularity@10", "Gini@10", "long-tail@10"))


def format_table(summary: dict) -> str:
    """The test metrics: accuracy, then beyond accuracy (definitions: shared_model.metrics)."""
    lines = []
    for keys in TABLES:
        lines.append(f"{'':12}" + "".join(f"{k:>24}" for k in keys))
        for name, metrics in summary["test"].items():
            lines.append(f"{name:12}" + "".join(f"{metrics[k]:>24.4f}" for k in keys))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.centralized",
        description="Train the recommender centrally, keep the best epoch by validation NDCG@10, and "
        "report test HR@10/NDCG@10 (full ranking and 100 sampled negatives) for it and, from the same "
        "run, popularity, EASE and a sequence-aware item-kNN (both tuned on validation) and a SASRec-style "
        "model (the user tower over item ids alone), with AUC and the top-10 lists' coverage, popularity, Gini "
        "and long-tail share (defined in shared_model/metrics.py). Writes metrics.jsonl, summary.json "
        "and the best adapters.",
    )
    add_data_options(parser)
    add_model_options(parser, REFERENCE_MODEL)
    t, c = TrainConfig(), CentralizedConfig()
    parser.add_argument("--epochs", type=positive_int, default=c.epochs, help=f"at most this many epochs (default "
                        f"{c.epochs})")
    parser.add_argument("--patience", type=positive_int, default=c.patience,
                        help=f"stop after this many epochs without a better validation NDCG@10 (default {c.patience})")
    parser.add_argument("--batch-size", type=positive_int, default=t.batch_size,
                        help=f"sequence chunks per step (default {t.batch_size})")
    parser.add_argument("--lr", type=positive_float, default=t.lr, help=f"Adam learning rate (default {t.lr})")
    parser.add_argument("--sasrec-dim", type=int, default=c.sasrec_dim, metavar="DIM",
                        help="width of the SASRec-style baseline (the user tower over an item-id table alone, "
                        f"the same rate, epochs and patience); 0: skip it (default {c.sasrec_dim})")
    parser.add_argument("--out", default="runs", help="results go to a new folder under this one (default runs/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = CentralizedConfig(
        model=model_config(parser, args),
        train=TrainConfig(batch_size=args.batch_size, lr=args.lr),
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        sasrec_dim=args.sasrec_dim,
    )
    try:
        dataset = load_dataset(args.dataset, args.data_dir, seed=args.seed, synthetic_users=args.synthetic_users)
    except (DataError, FileNotFoundError) as error:
        print(f"centralized: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) / f"centralized-{dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_centralized(dataset, config, out, progress=not args.quiet)
    print(format_table(summary))
    print(json.dumps({k: summary[k] for k in ("best_epoch", "trainable_bytes", "train_seconds", "baselines")}))
    print(f"results: {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
