"""A device's own data directory: the public catalog, the device's users' interactions, and
the state the device keeps across restarts. The ClientApp on a device reads only this.

    DIR/catalog.jsonl       {"id": 50, "text": "Star Wars (1977). Genres: ...", "genres": [...]} per line
    DIR/interactions.csv    user,item,timestamp   (the device's users; items by catalog id)
    DIR/device.json         what the directory holds (written last: a complete directory)
    DIR/state/              what the device writes itself (identity, privacy ledger, budget)
"""

from __future__ import annotations

import csv
import json
import secrets
from pathlib import Path

import numpy as np

from shared_model.data import Catalog, DataError, Dataset
from shared_model.files import JsonLinesError, read_jsonl, write_atomic
from shared_model.splits import protocol_order, split_sequences, user_sequences

FORMAT = 1


def write_device(out: Path, dataset: Dataset, users: np.ndarray) -> Path:
    """Write one device's directory: the catalog and the interactions of `users` only."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory: name a new or a device directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. a parent that is a file
        raise DataError(f"{out}: cannot create the device directory: {error.strerror}") from None
    catalog = dataset.catalog
    with open(out / "catalog.jsonl", "w") as f:
        for i, text in enumerate(catalog.texts):
            genres = [catalog.genre_names[g] for g in np.flatnonzero(catalog.genres[i])]
            f.write(json.dumps({"id": int(catalog.raw_ids[i]), "text": text, "genres": genres}) + "\n")
    sequences = user_sequences(dataset)  # the protocol's order, ties included
    stamps = timestamps_in_order(dataset)
    with open(out / "interactions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "timestamp"])
        for local, user in enumerate(np.sort(users)):
            for item, t in zip(sequences[user], stamps[user]):
                writer.writerow([local, int(catalog.raw_ids[item]), int(t)])
    write_atomic(out / "device.json", json.dumps({"format": FORMAT, "dataset": dataset.name, "users": len(users),
                                                 "genre_names": catalog.genre_names}, indent=2))
    return out


def _read_catalog(path: Path, genre_names: list[str]) -> Catalog:
    ids, texts, flags = [], [], []
    if not path.is_file():
        raise DataError(f"{path}: file not found (prepare the device with `fedrec-device prepare`)")
    try:
        lines = read_jsonl(path)
    except JsonLinesError as error:
        raise DataError(str(error)) from None
    for where, row in lines:
        try:
            ids.append(int(row["id"]))
            texts.append(str(row["text"]))
            flags.append([g in row.get("genres", []) for g in genre_names])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DataError(f"{where}: expected {{\"id\": int, \"text\": str}}: {error!r}") from None
    return Catalog(texts, np.array(flags, dtype=bool).reshape(len(texts), len(genre_names)), genre_names,
                   np.array(ids, dtype=np.int64))


def read_device(folder: Path) -> Dataset:
    """The device's catalog and interactions; errors name the file and line."""
    folder = Path(folder)
    meta_path = folder / "device.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found: {folder} is not a prepared device directory")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT}")
    catalog = _read_catalog(folder / "catalog.jsonl", list(meta.get("genre_names", [])))
    index = {int(raw): i for i, raw in enumerate(catalog.raw_ids)}
    path = folder / "interactions.csv"
    users, items, times = [], [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["user", "item", "timestamp"]:
            raise DataError(f"{path}:1: expected the header user,item,timestamp, found {header}")
        for line_no, row in enumerate(reader, start=2):
            try:
                user, item, stamp = (int(v) for v in row)
            except ValueError:
                raise DataError(f"{path}:{line_no}: expected three integers user,item,timestamp, found {row}") from None
            if item not in index:
                raise DataError(f"{path}:{line_no}: item {item} is not in {folder / 'catalog.jsonl'}")
            users.append(user)
            items.append(index[item])
            times.append(stamp)
    return Dataset(meta.get("dataset", "device"), catalog, np.array(users, dtype=np.int64),
                   np.array(items, dtype=np.int64), np.array(times, dtype=np.int64), int(meta["users"]))


def timestamps_in_order(dataset: Dataset) -> list[np.ndarray]:
    """Each user's timestamps in the order of `user_sequences`."""
    order, bounds = protocol_order(dataset)
    stamps = dataset.timestamps[order]
    return [stamps[bounds[u] : bounds[u + 1]] for u in range(dataset.n_users)]


def device_split(folder: Path):
    """The device's leave-one-out split; its file is in protocol order, so ties keep it."""
    dataset = read_device(folder)
    return dataset.catalog, split_sequences(user_sequences(dataset, seeded_ties=False), dataset.n_items)


def device_identity(folder: Path) -> int:
    """A random key the device keeps for good: the server orders clients by it for
    reproducible sampling, and the privacy ledger is tied to it. It reveals nothing about
    the device's data. Created once, atomically: two ClientApps starting together on a new
    device agree on it (the second finds the first's file)."""
    path = Path(folder) / "state" / "identity.json"
    if not path.exists():
        write_atomic(path, json.dumps({"sampling-key": secrets.randbits(62)}), exclusive=True)
    return int(json.loads(path.read_text())["sampling-key"])
