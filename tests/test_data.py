"""Loaders, splits and partitions on small hand-made files and the synthetic catalog."""

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from shared_model.data import DataError, load_ml100k
from shared_model.partitions import partition_users
from shared_model.splits import cold_item_split, cold_user_split, leave_one_out, user_sequences
from shared_model.synthetic import USERS_PER_ITEM, SyntheticConfig, generate

GENRES = "unknown|0\nAction|1\nComedy|2\n"


def write_ml100k(folder: Path, data: str, items: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.genre").write_text(GENRES, encoding="latin-1")
    default_items = (
        "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n"
        "2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|0\n"
        "3|Café Society (1995)|01-Jan-1995||http://x|0|1|1\n"
        "4|Four Rooms (1995)|01-Jan-1995||http://x|1|0|0\n"
    )
    (folder / "u.item").write_text(items if items is not None else default_items, encoding="latin-1")
    (folder / "u.data").write_text(data, encoding="latin-1")
    return folder


def test_loader_reads_latin1_titles_and_genres(tmp_path):
    ds = load_ml100k(write_ml100k(tmp_path, "1\t1\t5\t100\n1\t3\t4\t101\n2\t2\t3\t50\n"))
    assert ds.catalog.texts[0] == "Toy Story (1995). Genres: Comedy"
    assert ds.catalog.texts[2] == "Café Society (1995). Genres: Action, Comedy"
    assert ds.n_users == 2 and ds.n_items == 4
    assert ds.items.tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    "data, items, message",
    [
        ("1\t1\t5\n", None, "u.data:1: expected 4 tab-separated fields"),
        ("1\t1\t5\t100\n1\tx\t5\t100\n", None, "u.data:2: field 'item id' is not an integer: 'x'"),
        ("1\t1\t5\t100\n1\t9\t5\t100\n", None, "u.data:2: item id 9 is not in"),
        ("1\t1\t5\t100\n", "1|Toy Story|01-Jan-1995||http://x|0|0\n", "u.item:1: expected 8 '|'-separated fields"),
        ("1\t1\t5\t100\n", "one|Toy Story|01-Jan-1995||http://x|0|0|1\n", "u.item:1: field 'movie id'"),
    ],
)
def test_loader_errors_name_file_and_line(tmp_path, data, items, message):
    folder = write_ml100k(tmp_path, data, items)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_ml100k(folder)


ROWS = "196\t1\t3\t881250949\n186\t2\t3\t891717742\n22\t3\t1\t878887116\n"  # GroupLens' own times


@pytest.mark.parametrize(
    "data, message",
    [
        (ROWS + "244\t4\t2\t88", r"u.data:4: the file does not end with a newline: it was cut short "
                                 r"(last line '244\t4\t2\t88')"),
        (ROWS + "244\t4\t2\t880606923", "u.data:4: the file does not end with a newline"),  # cut at the newline
        (ROWS.replace("891717742", "89"), "u.data:2: field 'timestamp' is 89, implausible beside the file's median"),
        (ROWS.replace("\t1\t878887116", "\t0\t878887116"), "u.data:3: field 'rating' is 0, expected 1 to 5"),
    ],
)
def test_a_cut_or_implausible_u_data_is_refused_naming_the_line(tmp_path, data, message):
    with pytest.raises(DataError, match=re.escape(message)):
        load_ml100k(write_ml100k(tmp_path, data))


def test_genuine_u_data_rows_load(tmp_path):
    assert load_ml100k(write_ml100k(tmp_path, ROWS)).timestamps.tolist() == [881250949, 891717742, 878887116]


def test_missing_file_is_named(tmp_path):
    folder = write_ml100k(tmp_path, "1\t1\t5\t100\n")
    (folder / "u.item").unlink()
    with pytest.raises(DataError, match=r"u\.item: file not found"):
        load_ml100k(folder)


def test_split_orders_by_time_and_breaks_ties_with_the_seeded_permutation(tmp_path):
    # user 1: items 1,2 share time 10; item 3 at 5; item 4 at 20 -> test is item 4 (latest).
    rows = ["1\t1\t5\t10", "1\t2\t5\t10", "1\t3\t5\t5", "1\t4\t5\t20", "2\t1\t5\t1", "2\t2\t5\t2"]
    ds = load_ml100k(write_ml100k(tmp_path, "\n".join(rows) + "\n"))
    perm = np.random.default_rng(0).permutation(len(rows))
    first_tied = 0 if perm[0] < perm[1] else 1  # the row with the smaller permutation key comes first
    split = leave_one_out(ds)
    assert split.test[0] == 3  # item id 4 -> index 3
    assert split.valid[0] == 1 - first_tied
    assert split.train[0].tolist() == [2, first_tied]
    assert split.valid[1] == -1 and split.train[1].tolist() == [0, 1]  # fewer than 3: all train
    test = split.cases("test")
    assert test.users.tolist() == [0]
    assert test.histories[0].tolist() == [2, first_tied, 1 - first_tied]


def test_synthetic_is_seeded_and_shaped():
    a, b = generate(SyntheticConfig(n_users=300, seed=3)), generate(SyntheticConfig(n_users=300, seed=3))
    assert np.array_equal(a.items, b.items) and a.catalog.texts == b.catalog.texts
    assert not np.array_equal(a.items, generate(SyntheticConfig(n_users=300, seed=4)).items)
    assert len(a.profiles) == 300 and all(p.startswith("I like") for p in a.profiles)
    sequences = user_sequences(a)
    assert min(len(s) for s in sequences) >= 5
    assert all(len(np.unique(s)) == len(s) for s in sequences)  # an item is met once per user
    counts = np.bincount(a.items, minlength=a.n_items)
    assert counts.max() > 10 * np.median(counts)  # long tail


def test_default_world_is_unchanged():
    """The small world the tests and the quickstart use is pinned: the memory-saving rewrite
    of the generator (a bit per user and item) gives the same interactions as before."""
    a = generate(SyntheticConfig(n_users=300, seed=3))
    assert hashlib.sha256(a.items.tobytes() + a.users.tobytes()).hexdigest()[:16] == "22e1781cfed5caee"
    assert SyntheticConfig.for_population(4000) == SyntheticConfig(n_users=4000)  # the default run's world


def test_population_world_grows_its_catalog_and_is_seeded():
    config = SyntheticConfig.for_population(9_000, seed=1)
    assert (config.n_users, config.n_items) == (9_000, 9_000 // USERS_PER_ITEM)
    a, b = generate(config), generate(config)
    assert np.array_equal(a.items, b.items) and np.array_equal(a.timestamps, b.timestamps)
    assert a.n_items == 900 and len(a.catalog.texts) == 900 and a.n_users == 9_000
    per_user = np.bincount(a.users, minlength=a.n_users)
    assert per_user.min() >= 5 and abs(per_user.mean() - config.mean_history) < 3
    assert all(len(np.unique(s)) == len(s) for s in user_sequences(a)[:500])
    counts = np.bincount(a.items, minlength=a.n_items)
    assert (counts > 0).mean() > 0.95 and counts.max() > 10 * np.median(counts)  # the whole catalog, long-tailed


def test_cold_item_split_removes_cold_items_from_training():
    ds = generate(SyntheticConfig(n_users=300, n_items=200))
    cold = cold_item_split(ds, fraction=0.1, seed=1)
    assert len(cold.cold_items) == 20
    trained = np.concatenate(cold.warm.train + [cold.warm.valid, cold.warm.test])
    assert not np.isin(trained, cold.cold_items).any()
    assert np.isin(cold.cases.targets, cold.cold_items).all()
    assert all(not np.isin(h, cold.cold_items).any() for h in cold.cases.histories)


def test_cold_user_split_holds_users_out_and_cuts_histories():
    ds = generate(SyntheticConfig(n_users=300, n_items=200))
    cold = cold_user_split(ds, fraction=0.1, seed=1)
    assert len(cold.cold_users) == 30
    assert all(len(cold.warm.train[u]) == 0 and cold.warm.test[u] == -1 for u in cold.cold_users)
    for known in range(4):
        cases = cold.cases(known)
        assert all(len(h) == known for h in cases.histories)
        assert cases.profiles is not None and len(cases.profiles) == len(cases)
    first = cold.cases(0)
    assert first.targets[0] == cold.sequences[0][0]


def test_partitions_cover_every_user_once():
    ds = generate(SyntheticConfig(n_users=400, n_items=200))
    sequences = user_sequences(ds)
    for partitioning in ("iid", "dirichlet"):
        parts = partition_users(sequences, ds.catalog, partitioning, num_partitions=8, alpha=0.3)
        assert len(parts) == 8 and all(len(p) for p in parts)
        assert sorted(np.concatenate(parts).tolist()) == list(range(400))
    per_user = partition_users(sequences, ds.catalog, "per-user", num_partitions=0)
    assert len(per_user) == 400 and per_user[7].tolist() == [7]
