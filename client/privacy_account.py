"""A client's privacy account: its calibration (the noise for its whole budget) and its
append-only ledger, kept across rounds and restarts (in the simulation's node state, or
in files in a device's directory), checked against each other and against the device's
identity.

The ledger is the single source of truth: the accountant events are read back from it,
and an entry is written (and fsynced) before the round's update leaves the client, so a
crash can only over-count a spend, never lose one. Everything fails closed: a calibration
without its ledger, a ledger without its calibration, another device's calibration, a
torn line or changed privacy settings stop the round with a message naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from shared_model.files import JsonLinesError, parse_json_lines, write_atomic
from shared_model.ledger import LedgerEntry, LedgerError, append_entries, read_ledger


class PrivacyAccountError(RuntimeError):
    """The device's privacy state is inconsistent or does not match this run's settings."""


def check_same_calibration(saved: dict, planned: dict, where: str) -> None:
    """Privacy settings may not change under a running budget: that would be a reset."""
    differ = sorted(k for k in saved.keys() | planned.keys() if saved.get(k) != planned.get(k))
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {planned.get(k)!r}" for k in differ)
        raise PrivacyAccountError(
            f"{where}: this client's budget was calibrated with other privacy settings ({detail}); a change "
            f"would start a fresh budget on top of what was spent, so it is refused. Run with the saved settings")


class SimulatedStore:
    """In the simulated node's state: it lives as long as the simulation (a resumed DP
    simulation would lose it, so the server refuses to resume one)."""

    where = "node state"

    def __init__(self, state: RecordDict):
        self.state = state

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        yield  # one ClientApp call per node at a time in the simulation

    def calibration(self, planned: dict) -> dict:
        record = self.state.config_records.get("privacy-calibration")
        if record is None:
            if "privacy-ledger" in self.state.config_records:
                raise PrivacyAccountError(f"{self.where}: a privacy ledger without its calibration")
            self.state.config_records["privacy-calibration"] = ConfigRecord({"json": json.dumps(planned)})
            return planned
        saved = json.loads(record["json"])
        check_same_calibration(saved, planned, self.where)
        return saved

    def ledger(self) -> list[LedgerEntry]:
        record = self.state.config_records.get("privacy-ledger")
        try:
            lines = parse_json_lines(list(record["lines"]) if record else [], f"{self.where} ledger")
        except JsonLinesError as error:
            raise PrivacyAccountError(f"{error}; refusing to train on an unreadable ledger") from None
        return [LedgerEntry.from_json(line.value, line.where) for line in lines]

    def append(self, entry: LedgerEntry) -> None:
        record = self.state.config_records.get("privacy-ledger")
        lines = (list(record["lines"]) if record else []) + [json.dumps(entry.to_json())]
        self.state.config_records["privacy-ledger"] = ConfigRecord({"lines": lines})


class DeviceStore:
    """Files in the device's directory, state/privacy_calibration.json and
    state/privacy_ledger.jsonl, guarded by an exclusive lock on state/privacy.lock that a
    round holds from its budget check to its ledger entry (two ClientApps on one device
    run their rounds one after the other, the second seeing the first's spend)."""

    def __init__(self, folder: Path):
        state = Path(folder) / "state"
        self.calibration_path = state / "privacy_calibration.json"
        self.ledger_path = state / "privacy_ledger.jsonl"
        self.head_path = state / "privacy_ledger_head.json"  # entry count and hash: a truncated ledger shows
        self.lock_path = state / "privacy.lock"
        self.where = str(state)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def calibration(self, planned: dict) -> dict:
        if not self.calibration_path.exists():
            if self.ledger():
                raise PrivacyAccountError(f"{self.ledger_path}: a privacy ledger without its calibration "
                                          f"({self.calibration_path.name} is missing); refusing to train")
            self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
            self.ledger_path.touch()  # first: a calibration never exists without its ledger
            self.write_head()
            write_atomic(self.calibration_path, json.dumps(planned, indent=2))
            return planned
        if not self.ledger_path.exists():
            raise PrivacyAccountError(
                f"{self.calibration_path}: a calibration without its ledger ({self.ledger_path.name} is missing): "
                f"what this device spent is unknown, so it will not train (deleting the ledger is no fresh budget)")
        try:
            saved = json.loads(self.calibration_path.read_text())
        except json.JSONDecodeError as error:
            raise PrivacyAccountError(f"{self.calibration_path}: not JSON: {error}") from None
        check_same_calibration(saved, planned, str(self.calibration_path))
        return saved

    def ledger(self) -> list[LedgerEntry]:
        if self.calibration_path.exists():
            self.check_head()
        try:
            return read_ledger(self.ledger_path)
        except LedgerError as error:
            raise PrivacyAccountError(f"{error}; refusing to train on an unreadable ledger") from None

    def append(self, entry: LedgerEntry) -> None:
        append_entries(self.ledger_path, [entry])
        self.write_head()  # a crash before this leaves one entry more than the head: over-counted, accepted

    def ledger_lines(self) -> list[bytes]:
        return self.ledger_path.read_bytes().splitlines(keepends=True) if self.ledger_path.exists() else []

    def write_head(self) -> None:
        lines = self.ledger_lines()
        write_atomic(self.head_path, json.dumps({"entries": len(lines),
                                                 "sha256": hashlib.sha256(b"".join(lines)).hexdigest()}, indent=2))

    def check_head(self) -> None:
        """The ledger holds at least the entries the head counts, unchanged: a truncated,
        rolled-back or edited ledger is refused (a whole state folder restored from a backup
        is not detectable here)."""
        try:
            head = json.loads(self.head_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as error:
            raise PrivacyAccountError(f"{self.head_path}: unreadable ({error}); refusing to train") from None
        lines = self.ledger_lines()
        if len(lines) < head["entries"] or hashlib.sha256(b"".join(lines[:head["entries"]])).hexdigest() != head["sha256"]:
            raise PrivacyAccountError(f"{self.ledger_path}: {len(lines)} entries, but {head['entries']} were written, "
                                      f"or they were changed since: a truncated or edited ledger is no fresh budget")


Store = SimulatedStore | DeviceStore


def store_for(node_config: dict, state: RecordDict) -> Store:
    if node_config.get("data-dir"):
        return DeviceStore(Path(str(node_config["data-dir"])))
    return SimulatedStore(state)
