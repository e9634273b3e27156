"""A client's privacy account: its append-only ledger and its calibrated noise, kept across
rounds and restarts (in the simulation's node state, or in files in a device's directory).

The ledger is the single source of truth: the accountant history is read back from it,
and an entry is written (and flushed) before the round's update leaves the client, so a
crash can only over-count a spend, never lose one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from client.device_store import write_json_atomic
from shared_model.privacy import epsilon

History = list[tuple[float, float, int]]


def history_of(ledger: list[dict]) -> History:
    return [(e["noise-multiplier"], e["sample-rate"], e["steps"]) for e in ledger if e["status"] == "trained"]


def spent(ledger: list[dict], delta: float, accountant: str, planned: tuple | None = None) -> float:
    """Epsilon of everything in the ledger (plus a planned round)."""
    return epsilon(history_of(ledger) + ([planned] if planned else []), delta, accountant)


class SimulatedStore:
    """In the simulated node's state: it lives as long as the simulation."""

    def __init__(self, state: RecordDict):
        self.state = state

    def calibration(self) -> dict | None:
        record = self.state.config_records.get("privacy-calibration")
        return json.loads(record["json"]) if record else None

    def save_calibration(self, calibration: dict) -> None:
        self.state.config_records["privacy-calibration"] = ConfigRecord({"json": json.dumps(calibration)})

    def ledger(self) -> list[dict]:
        record = self.state.config_records.get("privacy-ledger")
        return [json.loads(line) for line in record["lines"]] if record else []

    def append(self, entry: dict) -> None:
        lines = [json.dumps(e) for e in self.ledger()] + [json.dumps(entry)]
        self.state.config_records["privacy-ledger"] = ConfigRecord({"lines": lines})


class DeviceStore:
    """Files in the device's directory: state/privacy_calibration.json, state/privacy_ledger.jsonl."""

    def __init__(self, folder: Path):
        self.calibration_path = Path(folder) / "state" / "privacy_calibration.json"
        self.ledger_path = Path(folder) / "state" / "privacy_ledger.jsonl"

    def calibration(self) -> dict | None:
        return json.loads(self.calibration_path.read_text()) if self.calibration_path.exists() else None

    def save_calibration(self, calibration: dict) -> None:
        write_json_atomic(self.calibration_path, calibration)

    def ledger(self) -> list[dict]:
        if not self.ledger_path.exists():
            return []
        return [json.loads(line) for line in self.ledger_path.read_text().splitlines() if line.strip()]

    def append(self, entry: dict) -> None:
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.ledger_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


def store_for(node_config: dict, state: RecordDict) -> SimulatedStore | DeviceStore:
    if node_config.get("data-dir"):
        return DeviceStore(Path(str(node_config["data-dir"])))
    return SimulatedStore(state)
