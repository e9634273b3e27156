"""One federated run's folder: its config, per-round metrics, checkpoint, adapters, summary.

Everything is written atomically and durably (`shared_model.files`), so a crash at any
moment leaves the last complete checkpoint and never half a file; a crash mid-append can
tear only the last metrics line, which resuming drops (with a warning) and rewrites. A run
started with the name of an existing run resumes it from its checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from shared_model.files import JsonLinesError, append_lines, read_jsonl, write_atomic
from shared_model.ledger import LedgerEntry, append_entries
from shared_model.settings import RunSettings, SettingsError
from shared_model.state import load_state, save_state

# Keys that may change when a run is resumed (the rest must match the original run).
RESUMABLE_KEYS = {"num-server-rounds", "run-name", "output-dir", "round-timeout", "eval-every", "server-eval"}


@dataclass
class Checkpoint:
    server_round: int
    arrays: dict[str, np.ndarray]
    best_arrays: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    best: dict  # round and metrics of the best evaluated round so far
    dp_clip: float | None = None  # DP-FedAvg's clip for the next round (it moves under adaptive clipping)


def _to_torch(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}


def saved_round(folder: Path) -> int:
    """The last round a run folder's checkpoint holds (0 if none): for watching a run."""
    path = Path(folder) / "checkpoint.safetensors"
    if not path.exists():
        return 0
    with safe_open(path, framework="pt") as f:
        return int(json.loads(f.metadata()["server_round"]))


class RunFolder:
    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def open(cls, settings: RunSettings, cwd: Path | None = None) -> RunFolder:
        """The run's folder under output-dir: run-name if given (resumed if it exists), else new."""
        base = Path(settings.output_dir)
        if not base.is_absolute():
            base = (cwd or Path.cwd()) / base
        name = settings.run_name or f"fed-{settings.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder = cls(base / name)
        folder.path.mkdir(parents=True, exist_ok=True)
        config_path = folder.path / "config.json"
        if config_path.exists():
            folder._check_same_run(json.loads(config_path.read_text()), settings.to_dict())
        else:
            write_atomic(config_path, json.dumps(settings.to_dict(), indent=2))
        return folder

    def _check_same_run(self, saved: dict, current: dict) -> None:
        differ = sorted(k for k in saved.keys() | current.keys()
                        if k not in RESUMABLE_KEYS and saved.get(k) != current.get(k))
        if differ:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
            raise SettingsError(f"{self.path} holds a run with other settings ({detail}); "
                                f"choose another run-name or use the same settings to resume it")

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.safetensors"

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        tensors = {**_to_torch(ckpt.arrays, "global/"), **_to_torch(ckpt.best_arrays, "best/"),
                   **_to_torch(ckpt.optimizer, "optimizer/")}
        save_state(self.checkpoint_path, tensors,
                   {"server_round": ckpt.server_round, "best": ckpt.best, "dp_clip": ckpt.dp_clip})

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.checkpoint_path.exists():
            return None
        tensors, meta = load_state(self.checkpoint_path)
        return Checkpoint(int(meta["server_round"]), _strip(tensors, "global/"), _strip(tensors, "best/"),
                          _strip(tensors, "optimizer/"), meta["best"], meta.get("dp_clip"))

    def save_adapters(self, name: str, arrays: dict[str, np.ndarray], model_config: dict) -> Path:
        path = self.path / name
        save_state(path, _to_torch(arrays, ""), {"model_config": model_config})
        return path

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def metrics(self) -> list[dict]:
        """The metrics lines; a torn last line (a crash mid-append) is dropped: its round is redone."""
        lines = read_jsonl(self.metrics_path, drop_torn_tail=True)
        for where, value in lines:
            if not (isinstance(value, dict) and isinstance(value.get("round"), int)):
                raise JsonLinesError(f"{where}: expected an object with an integer 'round', found {value!r:.80}")
        return [line.value for line in lines]

    def keep_metrics_up_to(self, server_round: int) -> None:
        """Drop lines of rounds after the checkpoint (written before a crash, to be redone),
        and a torn last line."""
        kept = [m for m in self.metrics() if m["round"] <= server_round]
        write_atomic(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def append_metrics(self, line: dict) -> None:
        append_lines(self.metrics_path, [json.dumps(line)])

    @property
    def ledger_path(self) -> Path:
        return self.path / "privacy_ledger.jsonl"

    def append_ledger(self, entries: list[LedgerEntry]) -> None:
        """The server's privacy ledger: append-only, fsynced each round."""
        append_entries(self.ledger_path, entries)

    def save_pretraining(self, report: dict) -> None:
        """What the public pretraining did (its kept epoch): written once, at the run's start,
        so that the summary of a resumed run (which does not pretrain again) still has it."""
        write_atomic(self.path / "pretraining.json", json.dumps(report, indent=2))

    def pretraining(self) -> dict | None:
        path = self.path / "pretraining.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.path / "summary.json", json.dumps(summary, indent=2))
