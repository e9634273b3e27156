"""Saving and loading the trainable (federated) state with safetensors, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write the tensors (and JSON-able metadata, e.g. the model config) to `path` atomically.

    An adapters file (one with a `model_config`) holds fp32, the model's own dtype, even when
    the server's arithmetic left fp64 arrays: a served file of half the size, and one
    version id per set of weights. Other files (a resumable checkpoint) keep their dtypes."""
    path = Path(path)
    if "model_config" in (metadata or {}):
        state = {k: v.float() if v.dtype == torch.float64 else v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({k: v.contiguous() for k, v in state.items()}, partial, metadata=meta)
    os.replace(partial, path)


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) from a file written by save_state."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    with safe_open(path, framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(path), meta
