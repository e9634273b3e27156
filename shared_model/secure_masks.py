"""SecAgg+'s masks from the whole key: a patch of Flower's mask generator (flwr 1.41-1.42).

Flower's `pseudo_rand_gen` folds its 32-byte key into a 32-bit seed (XOR of the key's
4-byte words) for numpy's MT19937: a server that unmasks a round learns every survivor's
private-mask seed and, with the first coordinate of every masked vector known (the weight),
can search the 2^32 seeds of a pairwise mask and read a client's vector when few clients
survive (an attacker's review recovered one client's vector of a 2-client round). Here the
masks are AES-256-CTR keystream under SHA-256 of the whole key, read as 64-bit words
reduced modulo the range (a power of two, as Flower requires: no bias). Client and server
must both use it: `install` replaces the generator in Flower's SecAgg+ mod and workflow,
the only two modules that call it.
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def keyed_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Flower's `pseudo_rand_gen` contract: one int64 array in [0, num_range) per shape."""
    if num_range & (num_range - 1):
        raise ValueError(f"the mask range must be a power of two (unbiased reduction), not {num_range}")
    sizes = [int(np.prod(shape)) for shape in dimensions_list]
    encryptor = Cipher(algorithms.AES(hashlib.sha256(seed).digest()), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * sum(sizes))), dtype=np.uint64) % np.uint64(num_range)
    out, start = [], 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        out.append(words[start:start + size].astype(np.int64).reshape(shape))
        start += size
    return out


def install() -> None:
    """Make Flower's SecAgg+ mod and workflow draw their masks from `keyed_masks`."""
    for module in ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                   "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        importlib.import_module(module).pseudo_rand_gen = keyed_masks
