"""The datasets by name: the built-in synthetic catalog or MovieLens-100K.

Apart from `data` (the types and MovieLens's files) so that the synthetic generator, which
builds those types, is not imported by the module that defines them."""

from __future__ import annotations

import os

from shared_model.data import Catalog, DataError, Dataset, load_ml100k, ml100k_dir, read_ml100k_catalog
from shared_model.synthetic import SyntheticConfig, generate


def load_catalog(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0,
                 synthetic_users: int = 2000) -> Catalog:
    """Only the public catalog (what a server may hold): item texts and genres."""
    if name == "ml-100k":
        return read_ml100k_catalog(ml100k_dir(data_dir))
    return load_dataset(name, data_dir, seed, synthetic_users).catalog


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0,
                 synthetic_users: int = 2000) -> Dataset:
    """Load a dataset by name: 'synthetic' (built in, the default) or 'ml-100k'."""
    if name == "synthetic":
        return generate(SyntheticConfig.for_population(synthetic_users, seed))
    if name == "ml-100k":
        return load_ml100k(data_dir)
    raise DataError(f"unknown dataset {name!r}: choose 'synthetic' or 'ml-100k'")
