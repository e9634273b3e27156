"""A device's data directory: written from a partition, read back as the same split."""

import numpy as np
import pytest

from client.device_store import device_identity, read_device, write_device
from client.local_data import client_data, sampling_key
from shared_model.data import DataError
from shared_model.splits import leave_one_out, user_sequences
from shared_model.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def world():
    return generate(SyntheticConfig(n_users=50, n_items=60, seed=2))


def test_device_holds_only_its_users_and_the_same_split(world, tmp_path):
    write_device(tmp_path, world, np.array([7, 3]))
    device = read_device(tmp_path)
    assert device.n_users == 2 and device.catalog.texts == world.catalog.texts
    assert len(device.users) == len(user_sequences(world)[3]) + len(user_sequences(world)[7])
    mine, everyone = client_data(None, {"data-dir": str(tmp_path)}).split, leave_one_out(world)
    for local, user in enumerate([3, 7]):
        assert np.array_equal(mine.train[local], everyone.train[user])
        assert mine.test[local] == everyone.test[user] and mine.valid[local] == everyone.valid[user]


def test_identity_is_random_and_survives_restarts(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_device(a, world, np.array([1]))
    write_device(b, world, np.array([1]))
    assert device_identity(a) == device_identity(a) == sampling_key({"data-dir": str(a)})
    assert device_identity(a) != device_identity(b)
    assert (a / "state" / "identity.json").exists()


def test_bad_device_files_name_file_and_line(world, tmp_path):
    write_device(tmp_path, world, np.array([1]))
    rows = (tmp_path / "interactions.csv").read_text().splitlines()
    (tmp_path / "interactions.csv").write_text("\n".join(rows[:2] + ["0,999999,5"]) + "\n")
    with pytest.raises(DataError, match=r"interactions\.csv:3: item 999999 is not in"):
        read_device(tmp_path)
    (tmp_path / "interactions.csv").write_text("\n".join(rows[:2] + ["0,x,5"]) + "\n")
    with pytest.raises(DataError, match=r"interactions\.csv:3: expected three integers"):
        read_device(tmp_path)
    with pytest.raises(DataError, match="not a prepared device directory"):
        read_device(tmp_path / "missing")


def test_preparing_a_device_over_a_file_names_the_path(world, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(DataError, match=rf"{taken}: exists and is not a directory"):
        write_device(taken, world, np.array([1]))
    with pytest.raises(DataError, match=rf"{taken / 'device'}: cannot create the device directory"):
        write_device(taken / "device", world, np.array([1]))
    assert taken.read_text() == "mine"


def test_prepare_device_cli_over_a_file_is_an_error_not_a_traceback(tmp_path, capsys):
    from client.cli import main

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    code = main(["prepare", "--synthetic-users", "20", "--partition", "0", "--out", str(taken)])
    assert code == 2
    assert f"error: {taken}: exists and is not a directory" in capsys.readouterr().err


def test_a_torn_catalog_line_names_file_and_line(world, tmp_path):
    write_device(tmp_path, world, np.array([1]))
    lines = (tmp_path / "catalog.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "catalog.jsonl").write_text("".join(lines[:-1]) + lines[-1][:10])
    with pytest.raises(DataError, match=rf"catalog\.jsonl:{len(lines)}: not JSON"):
        read_device(tmp_path)
