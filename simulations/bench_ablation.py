"""Ablation of the model's recipe, centralized on MovieLens-100K: one row per change.

Every row trains the centralized reference (`simulations.centralized`: best epoch by
validation NDCG@10, tested by the DESIGN.md protocol, seed 0) with one change from `BASE`,
and reports validation and test NDCG@10 and HR@10, the best epoch, the training time and
the bytes of the federated state (what a client uploads in fp32). Rows merge into the JSON
by name, so the table can be built in parts; `--jobs 2` trains two rows at once (one thread
each).

    python -m simulations.bench_ablation                          # every row
    python -m simulations.bench_ablation --rows base dim-48 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

from shared_model.cli_options import positive_int
from shared_model.data import ml100k_dir
from shared_model.files import write_atomic

BASE = {"epochs": 200, "patience": 20, "model.dim": 24, "model.id_rank": 0, "model.lora_layers": 1}  # the
# recipe before the ablation (the reference's defaults were then the model's: 60 epochs, patience 10)
ROWS: dict[str, tuple[str, dict]] = {  # name: (the change, overrides of BASE: "epochs", "model.dim", "train.lr")
    "base": ("the earlier recipe (dim 24, 2 blocks, history 50, dropout 0.2, LoRA rank 2 on 1 layer, text + "
             "ids, Adam 4e-3, batch 128), at most 200 epochs, patience 20", {}),
    "epochs-60": ("at most 60 epochs, patience 10 (the earlier schedule)", {"epochs": 60, "patience": 10}),
    "dim-48": ("width 48", {"model.dim": 48}),
    "dim-64": ("width 64", {"model.dim": 64}),
    "dim-48-id-rank-12": ("width 48, the id table at rank 12 (1,682 x 12, then 12 x 48)",
                          {"model.dim": 48, "model.id_rank": 12}),
    "id-rank-8": ("the id table at rank 8 (1,682 x 8, then 8 x 24)", {"model.id_rank": 8}),
    "dim-48-id-rank-6": ("width 48, the id table at rank 6", {"model.dim": 48, "model.id_rank": 6}),
    "dim-48-id-rank-24": ("width 48, the id table at rank 24", {"model.dim": 48, "model.id_rank": 24}),
    "dim-64-id-rank-16": ("width 64, the id table at rank 16", {"model.dim": 64, "model.id_rank": 16}),
    "ffn-4": ("feed-forward 4x the width", {"model.ffn": 4}),
    "layers-1": ("one transformer block", {"model.layers": 1}),
    "history-100": ("history window 100", {"model.history": 100}),
    "dropout-0.1": ("dropout 0.1", {"model.dropout": 0.1}),
    "dropout-0.4": ("dropout 0.4", {"model.dropout": 0.4}),
    "lr-2e-3": ("Adam 2e-3", {"train.lr": 2e-3}),
    "lr-1e-3": ("Adam 1e-3", {"train.lr": 1e-3}),
    "weight-decay": ("Adam weight decay 1e-5 (L2 on every federated weight)", {"train.weight_decay": 1e-5}),
    "ids-only": ("items from the id table alone (no text): SASRec-style at the same width",
                 {"model.item_text": False, "model.lora_layers": 0}),
    "text-only": ("items from their text alone (no id table)", {"model.id_embeddings": False}),
    "no-lora": ("no LoRA adapters (the frozen encoder's text vectors, projected)", {"model.lora_layers": 0}),
    "ids-only-dim-64": ("ids only (SASRec-style), width 64", {"model.item_text": False, "model.lora_layers": 0,
                                                              "model.dim": 64}),
    "id-rank-8-no-lora": ("the id table at rank 8, no LoRA adapters", {"model.id_rank": 8, "model.lora_layers": 0}),
    "dim-48-id-rank-8-no-lora": ("width 48, the id table at rank 8, no LoRA adapters",
                                 {"model.dim": 48, "model.id_rank": 8, "model.lora_layers": 0}),
    "dim-48-id-rank-12-no-lora": ("width 48, the id table at rank 12, no LoRA adapters",
                                  {"model.dim": 48, "model.id_rank": 12, "model.lora_layers": 0}),
    "no-lora-layers-1-heads-1": ("no LoRA adapters, one block with one head (the federated recipe's tower)",
                                 {"model.lora_layers": 0, "model.layers": 1, "model.heads": 1}),
    "hide-seen": ("the training softmax leaves out the items a user already had (`hide-seen`)",
                  {"model.hide_seen": True}),
    "id-rank-8-hide-seen": ("the id table at rank 8 (the reference), hiding seen items",
                            {"model.id_rank": 8, "model.hide_seen": True}),
    "ids-only-hide-seen": ("ids only (SASRec-style), hiding seen items",
                           {"model.item_text": False, "model.lora_layers": 0, "model.hide_seen": True}),
    "no-lora-layers-1-heads-1-hide-seen": ("the federated recipe's tower, hiding seen items",
                                           {"model.lora_layers": 0, "model.layers": 1, "model.heads": 1,
                                            "model.hide_seen": True}),
}
FIGURES = Path("docs/figures")


def row_config(name: str):
    """The CentralizedConfig of a row: BASE with the row's overrides."""
    from simulations.centralized import CentralizedConfig

    config, sections = CentralizedConfig(), {}
    for key, value in {**BASE, **ROWS[name][1]}.items():
        section, _, field = key.rpartition(".")
        if section:
            sections.setdefault(section, {})[field] = value
        else:
            config = replace(config, **{field: value})
    return replace(config, **{s: replace(getattr(config, s), **fields) for s, fields in sections.items()})


def run_row(name: str, data_dir: str | None, out: Path, threads: int) -> dict:
    """Train one row and test it: the row's figures."""
    import torch

    from shared_model.datasets import load_dataset
    from shared_model.metrics import evaluate_scores
    from shared_model.recommender import score_catalog
    from shared_model.splits import leave_one_out
    from simulations.centralized import train_reference

    torch.set_num_threads(threads)
    dataset = load_dataset("ml-100k", data_dir, seed=0)
    split = leave_one_out(dataset)
    config = row_config(name)
    model, training = train_reference(split, dataset.catalog.texts, config, out / name, progress=False)
    test = split.cases("test")
    metrics = evaluate_scores(score_catalog(model, test.histories), test)
    return {"change": ROWS[name][0], "overrides": ROWS[name][1], **training,
            "test NDCG@10": metrics["NDCG@10"], "test HR@10": metrics["HR@10"],
            "federated_bytes": model.trainable_bytes(), "threads": threads}


def format_rows(results: dict) -> str:
    names = [r for r in ROWS if r in results]
    width = max(map(len, names), default=3) + 2
    lines = [f"{'row':{width}}{'valid NDCG@10':>14}{'test NDCG@10':>14}{'test HR@10':>12}{'epoch':>7}{'train s':>9}"
             f"{'bytes':>10}  change"]
    for name in names:
        r = results[name]
        lines.append(f"{name:{width}}{r['best_valid_NDCG@10']:>14.4f}{r['test NDCG@10']:>14.4f}{r['test HR@10']:>12.4f}"
                     f"{r['best_epoch']:>7}{r['train_seconds']:>9.0f}{r['federated_bytes']:>10}  {r['change']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_ablation", description=__doc__.split("\n\n")[0]
                                     + " Rows: " + ", ".join(ROWS) + ".")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                        help="the rows to train (default: all); the others keep their figures in the JSON")
    parser.add_argument("--jobs", type=positive_int, default=1, help="rows trained at once (default 1: two threads)")
    parser.add_argument("--data-dir", default=None, help="MovieLens-100K's folder (default: FEDREC_ML100K or "
                        "../shared/datasets/ml-100k)")
    parser.add_argument("--runs", type=Path, default=Path("runs/ablation"), help="each row's run folder goes here")
    parser.add_argument("--out", type=Path, default=FIGURES, help="ablation_ml100k.json goes here "
                        "(default docs/figures)")
    args = parser.parse_args(argv)
    if not (ml100k_dir(args.data_dir) / "u.data").is_file():
        parser.error(f"MovieLens-100K not found at {ml100k_dir(args.data_dir)}: pass --data-dir or set FEDREC_ML100K")
    from simulations.population import machine

    command = " ".join(["python -m simulations.bench_ablation", *(argv if argv is not None else sys.argv[1:])])
    path = args.out / "ablation_ml100k.json"
    results = json.loads(path.read_text())["rows"] if path.exists() else {}
    threads = 2 if args.jobs == 1 else 1
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_row, name, args.data_dir, args.runs, threads): name for name in args.rows}
        for future in as_completed(futures):
            name = futures[future]
            results[name] = {**future.result(), "command": command, "machine": machine("cpu")}
            args.out.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"base": BASE, "rows": results}, indent=2))
            print(f"{name}: test NDCG@10 {results[name]['test NDCG@10']:.4f}", flush=True)
    print(format_rows(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
