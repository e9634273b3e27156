"""Our patches of Flower's SecAgg+ (flwr 1.41-1.42, pinned), installed on the client and
the server alike: both sides must run them.

- Masks from the whole key (shared_model/secure_masks.py): Flower's come from 32-bit seeds.
- Masked vectors sent as uint32: Flower's mod reduces each masked coordinate modulo 2^32
  and sends it as int64, so a client uploads twice the bytes the values need (2.2 times a
  plain update's bytes in our benchmark). The mod packs them into uint32 (the modulus is
  2^32: nothing is lost; clients refuse any other modulus at setup), and the workflow widens
  them back to int64 on receipt, before it adds them (its arithmetic, unchanged, is int64).
"""

from __future__ import annotations

import importlib

import numpy as np
from flwr.common import bytes_to_ndarray, ndarray_to_bytes

from shared_model import secure_masks

MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"
WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"


def packed_bytes(masked: np.ndarray) -> bytes:
    """A masked vector's bytes, 4 a coordinate (the mod calls `ndarray_to_bytes` for its
    masked vector only). Values outside [0, 2^32) would not survive: refused."""
    if masked.size and (masked.min() < 0 or masked.max() >= 2**32):
        raise ValueError("a masked vector outside [0, 2^32): the modulus must be 2^32")
    return ndarray_to_bytes(masked.astype(np.uint32))


def widened_array(data: bytes) -> np.ndarray:
    """A masked vector from its bytes, as int64 (the workflow calls `bytes_to_ndarray` for
    masked vectors only, and adds them in int64)."""
    return bytes_to_ndarray(data).astype(np.int64)


def install() -> None:
    """Patch Flower's SecAgg+ mod and workflow (idempotent)."""
    secure_masks.install()
    importlib.import_module(MOD).ndarray_to_bytes = packed_bytes
    importlib.import_module(WORKFLOW).bytes_to_ndarray = widened_array
