"""Saving and loading the trainable (federated) state with safetensors, atomically and durably."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from shared_model.files import write_atomic


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write the tensors (and JSON-able metadata, e.g. the model config) to `path`: a crash
    leaves the previous checkpoint, never half of one.

    An adapters file (one with a `model_config`) holds fp32, the model's own dtype, even when
    the server's arithmetic left fp64 arrays: a served file of half the size, and one
    version id per set of weights. Other files (a resumable checkpoint) keep their dtypes."""
    if "model_config" in (metadata or {}):
        state = {k: v.float() if v.dtype == torch.float64 else v for k, v in state.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    write_atomic(path, save({k: v.contiguous() for k, v in state.items()}, metadata=meta))


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) from a file written by save_state."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    with safe_open(path, framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(path), meta
