"""Command-line options that the commands of both sides (`fedrec`, `fedrec-device`) and the
experiments share: checked numbers, the dataset, and the model's knobs, which come from
RecommenderConfig's fields (the one schema) so that flags, help and bounds cannot drift."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import Field, fields
from typing import Callable

from shared_model.data import DataError
from shared_model.recommender import Bounds, ConfigError, RecommenderConfig

TYPES = {"int": int, "float": float, "str": str}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite positive number, not {text}")
    return value


def add_dataset_options(parser: argparse.ArgumentParser, default: str = "synthetic") -> None:
    """--dataset and --data-dir, as every command and benchmark reads them."""
    parser.add_argument("--dataset", choices=["synthetic", "ml-100k"], default=default,
                        help=f"built-in synthetic catalog or MovieLens-100K (default {default})")
    parser.add_argument("--data-dir", help="folder with the GroupLens ml-100k files "
                        "(default: $FEDREC_ML100K, else ../shared/datasets/ml-100k)")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The dataset options, the synthetic dataset's size and the seed."""
    add_dataset_options(parser)
    parser.add_argument("--synthetic-users", type=positive_int, default=2000,
                        help="users of the built-in synthetic dataset (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data generation and training (default 0)")


def flag(name: str) -> str:
    """A RecommenderConfig field's flag: --lora-rank for lora_rank (as its run-config key)."""
    return "--" + name.replace("_", "-")


def bounded(f: Field) -> Callable[[str], object]:
    """The argparse type of a numeric field: parse, then check the field's bounds."""
    convert, bounds = TYPES[f.type], f.metadata["bounds"]

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {convert.__name__}, not {text!r}") from None
        if bounds is not None and value not in bounds:
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {text}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type in its own errors
    return parse


def add_model_options(parser: argparse.ArgumentParser, defaults: RecommenderConfig = RecommenderConfig()) -> None:
    """One flag per RecommenderConfig field, with its help, bounds and default."""
    group = parser.add_argument_group("model")
    for f in fields(RecommenderConfig):
        default = getattr(defaults, f.name)
        bounds: Bounds | None = f.metadata["bounds"]
        shown = f"default {default!r}" + (f"; {bounds}" if bounds is not None else "")
        help_text = f"{f.metadata['help']} ({shown})".replace("%", "%%")
        if f.type == "bool":
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(flag(f.name), type=bounded(f), default=default, metavar=f.type.upper(),
                               help=help_text)


def model_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RecommenderConfig:
    """The RecommenderConfig of parsed model options; a cross-field error (dim and heads)
    exits like argparse's own, naming the flag."""
    try:
        return RecommenderConfig(**{f.name: getattr(args, f.name) for f in fields(RecommenderConfig)})
    except ConfigError as error:
        parser.error(f"argument {flag(error.name)}: {error.message}, not {error.value!r}")


def run_command(args: argparse.Namespace, prog: str) -> int:
    """Run the parsed command (args.func); bad input (data, files, values) is one line that
    names the command, exit status 2, never a traceback."""
    try:
        return args.func(args)
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"{prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
