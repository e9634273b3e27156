"""Datasets as plain arrays: a public catalog of item texts and private interactions.

The catalog (item texts, genre flags) is public: every client may hold all of it. The
interactions (user, item, time) are what federation keeps on the devices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ML100K_ENV = "FEDREC_ML100K"
DEFAULT_ML100K_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "ml-100k"


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass(frozen=True)
class Catalog:
    """The public item catalog: one text per item, and its genres (or topics)."""

    texts: list[str]
    genres: np.ndarray  # [n_items, n_genres] bool
    genre_names: list[str]
    raw_ids: np.ndarray  # [n_items] the dataset's own item ids

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Dataset:
    """A catalog plus interactions; users and items are dense 0-based indices."""

    name: str
    catalog: Catalog
    users: np.ndarray  # [n_rows] int64
    items: np.ndarray  # [n_rows] int64
    timestamps: np.ndarray  # [n_rows] int64
    n_users: int
    profiles: list[str] | None = None  # free-text user profiles, where the dataset has them

    @property
    def n_items(self) -> int:
        return len(self.catalog)


ML100K_USERS = 943  # MovieLens-100K's users: one simulated SuperNode each


def ml100k_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The MovieLens-100K folder: the argument, else $FEDREC_ML100K, else ../shared/datasets."""
    if data_dir:
        return Path(data_dir)
    return Path(os.environ.get(ML100K_ENV, DEFAULT_ML100K_DIR))


def _read_lines(path: Path, encoding: str) -> list[str]:
    """The file's lines. Every GroupLens file ends with a newline, so one that does not was
    cut short (a copy or download stopped), even where its last line still parses."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the original GroupLens ml-100k layout; "
                        f"name the folder with data-dir / --data-dir or ${ML100K_ENV})")
    with open(path, encoding=encoding, newline="") as f:
        text = f.read()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        raise DataError(f"{path}:{len(lines)}: the file does not end with a newline: it was cut short "
                        f"(last line {lines[-1]!r}); copy it again")
    return lines


def _int_field(value: str, path: Path, line_no: int, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}:{line_no}: field '{field}' is not an integer: {value!r}") from None


def _read_genre_names(path: Path) -> list[str]:
    names: list[str] = []
    for line_no, line in enumerate(_read_lines(path, "latin-1"), start=1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 2:
            raise DataError(f"{path}:{line_no}: expected 2 '|'-separated fields (genre|index), found {len(parts)}")
        names.append(parts[0])
    return names


def read_ml100k_catalog(folder: Path) -> Catalog:
    genre_names = _read_genre_names(folder / "u.genre")
    path = folder / "u.item"
    n_fields = 5 + len(genre_names)
    ids, texts, flags = [], [], []
    for line_no, line in enumerate(_read_lines(path, "latin-1"), start=1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != n_fields:
            raise DataError(f"{path}:{line_no}: expected {n_fields} '|'-separated fields, found {len(parts)}")
        item_id = _int_field(parts[0], path, line_no, "movie id")
        genre_flags = [_int_field(v, path, line_no, genre_names[i]) == 1 for i, v in enumerate(parts[5:])]
        genres = [genre_names[i] for i, on in enumerate(genre_flags) if on]
        ids.append(item_id)
        texts.append(f"{parts[1]}. Genres: {', '.join(genres)}")
        flags.append(genre_flags)
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate movie ids")
    return Catalog(texts, np.array(flags, dtype=bool), genre_names, np.array(ids, dtype=np.int64))


def _check_timestamps(times: np.ndarray, lines_of: list[int], path: Path) -> None:
    """Unix seconds, none an order of magnitude below the file's median: such a timestamp
    lost digits (a cut or edited line) and would move its rating to the start of its user's
    history, changing the split."""
    if not len(times):
        return
    median = float(np.median(times))
    bad = np.flatnonzero(times < max(median / 10, 0))
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{path}:{lines_of[row]}: field 'timestamp' is {int(times[row])}, implausible beside the "
                        f"file's median {int(median)} (a cut or edited line?)")


def load_ml100k(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load MovieLens-100K from the original GroupLens files; every rating is a positive."""
    folder = ml100k_dir(data_dir)
    catalog = read_ml100k_catalog(folder)
    item_index = {int(raw): i for i, raw in enumerate(catalog.raw_ids)}
    path = folder / "u.data"
    users, items, times, lines_of = [], [], [], []
    for line_no, line in enumerate(_read_lines(path, "latin-1"), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise DataError(
                f"{path}:{line_no}: expected 4 tab-separated fields (user, item, rating, timestamp), found {len(parts)}"
            )
        user = _int_field(parts[0], path, line_no, "user id")
        item = _int_field(parts[1], path, line_no, "item id")
        rating = _int_field(parts[2], path, line_no, "rating")
        stamp = _int_field(parts[3], path, line_no, "timestamp")
        if item not in item_index:
            raise DataError(f"{path}:{line_no}: item id {item} is not in {folder / 'u.item'}")
        if not 1 <= rating <= 5:
            raise DataError(f"{path}:{line_no}: field 'rating' is {rating}, expected 1 to 5")
        users.append(user)
        items.append(item_index[item])
        times.append(stamp)
        lines_of.append(line_no)
    _check_timestamps(np.array(times, dtype=np.int64), lines_of, path)
    raw_users, user_index = np.unique(np.array(users, dtype=np.int64), return_inverse=True)
    return Dataset(
        name="ml-100k",
        catalog=catalog,
        users=user_index.astype(np.int64),
        items=np.array(items, dtype=np.int64),
        timestamps=np.array(times, dtype=np.int64),
        n_users=len(raw_users),
    )
