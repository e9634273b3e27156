"""Files survive crashes: replacements are durable and whole, a killed writer's temporary
file does not outlive the next write, and a torn JSON Lines tail is dropped only where that
is safe (a run's metrics on resume), never in the middle of a file."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from server.run_folder import Checkpoint, RunFolder
from shared_model import files
from shared_model.files import JsonLinesError, read_jsonl, write_atomic
from shared_model.state import load_state, save_state


@pytest.fixture
def synced(monkeypatch) -> list[tuple[str, str]]:
    """What was fsynced and renamed, in order: ("fsync", path) and ("replace", target)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return events


def test_a_checkpoint_is_fsynced_then_renamed_then_its_folder_fsynced(tmp_path, synced):
    save_state(tmp_path / "ckpt.safetensors", {"w": torch.ones(3)}, {"server_round": 4})
    kinds = [(kind, Path(p).name) for kind, p in synced]
    assert kinds[0][0] == "fsync" and kinds[0][1].startswith(".ckpt.safetensors.tmp-")  # the data, before the rename
    assert kinds[1:] == [("replace", "ckpt.safetensors"), ("fsync", tmp_path.name)]  # then the rename, made durable
    tensors, meta = load_state(tmp_path / "ckpt.safetensors")
    assert tensors["w"].tolist() == [1.0, 1.0, 1.0] and meta == {"server_round": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_run_state_and_device_state_writes_fsync_their_folder(tmp_path, synced):
    from client.privacy_account import DeviceStore

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.save_checkpoint(Checkpoint(1, {"a": np.ones(2, np.float32)}, {}, {}, {"round": 1}))
    folder.write_summary({"rounds": 1})
    DeviceStore(tmp_path / "device").calibration({"epsilon": 1.0})
    folder_syncs = [Path(p).name for kind, p in synced if kind == "fsync" and Path(p).is_dir()]
    assert folder_syncs.count("run") >= 2 and folder_syncs.count("state") >= 2  # head and calibration


def writer_killed_before_its_rename(target: Path) -> None:
    """A process that writes `target` and is killed (SIGKILL) between the write and the rename."""
    code = ("import os, sys, time; from shared_model import files; "
            "os.replace = lambda *a: (print('written', flush=True), time.sleep(60)); "
            "files.write_atomic(sys.argv[1], b'new')")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_writer_killed_mid_write_leaves_a_temp_file_that_the_next_write_removes(tmp_path):
    write_atomic(tmp_path / "head.json", "old")
    writer_killed_before_its_rename(tmp_path / "head.json")
    (orphan,) = [p for p in tmp_path.iterdir() if p.name != "head.json"]
    assert orphan.name.startswith(".head.json.tmp-")
    assert (tmp_path / "head.json").read_text() == "old"  # the crash left the old file whole
    write_atomic(tmp_path / "other.json", "x")  # any later write into the folder cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "other.json"]


def test_a_running_writers_temp_file_is_left_alone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".a.json.tmp-{sleeper.pid}-00ff"
        live.write_text("half")
        write_atomic(tmp_path / "b.json", "x")
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_exclusive_write_keeps_the_first_file(tmp_path):
    assert write_atomic(tmp_path / "id.json", "first", exclusive=True)
    assert not write_atomic(tmp_path / "id.json", "second", exclusive=True)
    assert (tmp_path / "id.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.json"]


def test_a_private_file_is_never_readable_by_others(tmp_path):
    write_atomic(tmp_path / "key.pem", b"secret", private=True)
    assert (tmp_path / "key.pem").stat().st_mode & 0o077 == 0


def test_a_torn_line_is_an_error_naming_file_and_line_unless_it_is_a_droppable_tail(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    with pytest.raises(JsonLinesError, match=rf"{path}:3: not JSON"):
        read_jsonl(path)
    with caplog.at_level(logging.WARNING):
        assert [line.value for line in read_jsonl(path, drop_torn_tail=True)] == [{"round": 1}, {"round": 2}]
    assert f"{path}:3: dropping a torn last line" in caplog.text
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
    with pytest.raises(JsonLinesError, match=rf"{path}:2: not JSON"):
        read_jsonl(path, drop_torn_tail=True)  # in the middle: not a crash mid-append


def run_folder_with_metrics(tmp_path: Path, text: str) -> RunFolder:
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.metrics_path.write_text(text)
    return folder


def test_resuming_drops_a_torn_last_metrics_line_with_a_warning(tmp_path, caplog):
    lines = "".join(json.dumps({"round": r, "loss": 1.0}) + "\n" for r in range(3))
    folder = run_folder_with_metrics(tmp_path, lines + '{"round": 3, "lo')  # killed mid-append
    with caplog.at_level(logging.WARNING):
        folder.keep_metrics_up_to(2)
    assert "metrics.jsonl:4: dropping a torn last line" in caplog.text
    assert folder.metrics_path.read_text() == lines  # truncated: the next append starts a whole line
    folder.append_metrics({"round": 3, "loss": 0.5})
    assert [m["round"] for m in folder.metrics()] == [0, 1, 2, 3]


def test_resuming_refuses_a_torn_metrics_line_in_the_middle(tmp_path):
    folder = run_folder_with_metrics(tmp_path, '{"round": 0}\n{"round": 1, "lo\n{"round": 2}\n')
    with pytest.raises(JsonLinesError, match=r"metrics\.jsonl:2: not JSON"):
        folder.keep_metrics_up_to(2)
    folder.metrics_path.write_text('{"round": 0}\n["not", "a", "round"]\n')
    with pytest.raises(JsonLinesError, match=r"metrics\.jsonl:2: expected an object with an integer 'round'"):
        folder.keep_metrics_up_to(2)


def test_a_torn_ledger_line_is_never_dropped(tmp_path):
    from shared_model.ledger import LedgerError, read_ledger

    path = tmp_path / "privacy_ledger.jsonl"
    path.write_text('{"client": "server", "rou')
    with pytest.raises(LedgerError, match=rf"{path}:1: not JSON"):
        read_ledger(path)


def test_appends_wait_for_fsync(tmp_path, synced):
    files.append_lines(tmp_path / "new" / "log.jsonl", ['{"a": 1}'])
    assert [(k, Path(p).name) for k, p in synced] == [("fsync", "log.jsonl"), ("fsync", "new")]
    assert (tmp_path / "new" / "log.jsonl").read_text() == '{"a": 1}\n'
