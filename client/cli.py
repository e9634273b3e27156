"""The `fedrec-device` command: what a device needs before its SuperNode starts (the
server side's tools are `fedrec`, server/cli.py; client and server never import each other)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared_model.cli_options import add_data_options, positive_int, run_command


def cmd_prepare(args: argparse.Namespace) -> int:
    from client.device_store import write_device
    from shared_model.datasets import load_dataset
    from shared_model.partitions import partition_users
    from shared_model.splits import user_sequences

    dataset = load_dataset(args.dataset, args.data_dir, seed=args.seed, synthetic_users=args.synthetic_users)
    parts = partition_users(user_sequences(dataset), dataset.catalog, args.partitioning, args.num_partitions,
                            seed=args.seed)
    if not 0 <= args.partition < len(parts):
        raise ValueError(f"--partition must be between 0 and {len(parts) - 1}, not {args.partition}")
    folder = write_device(Path(args.out), dataset, parts[args.partition])
    print(f"{folder}: {len(parts[args.partition])} user(s) of {dataset.name}, partition {args.partition} "
          f"of {len(parts)} ({args.partitioning})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrec-device",
        description="An edge device of the federated recommender: prepare its data directory, then start "
        "its SuperNode with node config data-dir=<that folder> (see README, Deployment).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser(
        "prepare", help="write one device's data directory from a dataset partition",
        description="Write the public catalog and one partition's interactions into a folder that a "
        "SuperNode's ClientApp reads (node config data-dir). For demos and tests: on a real device the "
        "interactions are the user's own.",
    )
    add_data_options(prepare)
    prepare.add_argument("--partitioning", choices=["per-user", "iid", "dirichlet"], default="per-user",
                         help="one user per device (default) or silos")
    prepare.add_argument("--num-partitions", type=positive_int, default=1,
                         help="number of silos (ignored for per-user)")
    prepare.add_argument("--partition", type=int, required=True, help="which partition (0-based)")
    prepare.add_argument("--out", required=True, help="the device's data directory")
    prepare.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), "fedrec-device")


if __name__ == "__main__":
    sys.exit(main())
