"""Our patches of Flower's SecAgg+ (flwr 1.41-1.42, pinned), installed on the client and
the server alike: both sides must run them.

- Masks from the whole key (shared_model/secure_masks.py): Flower's come from 32-bit seeds.
- Masked vectors sent as uint32: Flower's mod reduces each masked coordinate modulo 2^32
  and sends it as int64, so a client uploads twice the bytes the values need (2.2 times a
  plain update's bytes in our benchmark). The mod packs them into uint32 (the modulus is
  2^32: nothing is lost; clients refuse any other modulus at setup), and the workflow widens
  them back to int64 on receipt, before it adds them (its arithmetic, unchanged, is int64).
- Shamir's sharing without threads: Flower's `shamir.py` starts a thread pool for every
  secret it splits or combines, to run pycryptodome's pure-Python `Shamir` on each 16-byte
  chunk; under the GIL the threads add start-up and switching, not speed. The same calls
  run one after another (`InlineExecutor`); the shares are the same.
- Reconstruction from the threshold's number of shares: Flower's workflow hands
  `combine_shares` every share it collected (up to the neighbourhood's size), while
  pycryptodome's `Shamir.combine` asks for exactly the threshold's number (any that many
  determine the polynomial; Lagrange's cost grows with the square of the number given).
  `_SecAggPlus.unmask_stage` (server/secure_aggregation.py) names the threshold
  (`threshold_of_the_round`); without it, every share is used, as Flower does.
- Key agreement on P-256 instead of P-384: each client agrees a key with every neighbour
  twice a round (ECDH with `cryptography`, as Flower's), and on P-384 that was the largest
  part of a client's protocol work (0.61 ms an agreement against 0.09 on P-256, whose
  OpenSSL code is optimised; 24 a round at 50 clients). P-256 is NIST's 128-bit-security
  curve (SP 800-57: acceptable beyond 2030), P-384 192-bit; the keys live for one round
  and protect masks and shares whose symmetric parts (AES-256, SHA-256, Fernet's
  AES-128) are at 128 bits or more. Only the SecAgg+ mod's key pairs change: node
  authentication keeps Flower's keys.
- Private keys as their 32-byte scalar: the mod keeps its keys, and Shamir-shares its
  first one, as PKCS8 PEM (241 bytes on P-256, 306 on P-384: 16 or 20 chunks of 16 to
  split, each into a share per neighbour); the scalar is 3 chunks with the padding. The same key through
  `cryptography`'s own functions (`private_numbers`, `derive_private_key`); the workflow
  reads a dropped client's reconstructed key the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.crypto import shamir

from shared_model import secure_masks

MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"
WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
CURVE = ec.SECP256R1()  # the SecAgg+ key pairs' curve (Flower's: SECP384R1)
SCALAR_BYTES = 32  # a P-256 private scalar
_THRESHOLD: contextvars.ContextVar[int | None] = contextvars.ContextVar("secagg_threshold", default=None)


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


def key_pair() -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]:
    """A fresh SecAgg+ key pair on P-256 (Flower's `generate_key_pairs`, another curve)."""
    private = ec.generate_private_key(CURVE)
    return private, private.public_key()


def private_key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key's private scalar, big-endian, 32 bytes."""
    if key.curve.name != CURVE.name:
        raise ValueError(f"a SecAgg+ key on {key.curve.name}, not {CURVE.name}")
    return key.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")


@functools.lru_cache(maxsize=4)
def private_key_from_bytes(data: bytes) -> ec.EllipticCurvePrivateKey:
    """The P-256 key whose scalar `private_key_bytes` wrote. The mod reads its two keys
    once per neighbour (24 times a round at 50 clients), and each read derives the public
    point again: the last few are kept (the client's state holds their bytes anyway)."""
    if len(data) != SCALAR_BYTES:
        raise ValueError(f"a SecAgg+ private key of {len(data)} bytes, not {SCALAR_BYTES}")
    return ec.derive_private_key(int.from_bytes(data, "big"), CURVE)


class InlineExecutor:
    """`shamir.py`'s ThreadPoolExecutor, minus the threads: `map` runs in the caller."""

    def __init__(self, max_workers: int | None = None):
        del max_workers

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        return map(fn, items)


@contextlib.contextmanager
def threshold_of_the_round(threshold: int) -> Iterator[None]:
    """Within it, `combine_shares` reconstructs each secret from `threshold` shares."""
    token = _THRESHOLD.set(threshold)
    try:
        yield
    finally:
        _THRESHOLD.reset(token)


def combine_threshold_shares(share_list: list[bytes]) -> bytes:
    """Flower's `combine_shares` on the first `threshold` shares (all of them outside
    `threshold_of_the_round`); fewer than the threshold are refused, as they would give a
    wrong secret silently."""
    threshold = _THRESHOLD.get()
    if threshold is None:
        return shamir.combine_shares(share_list)
    if len(share_list) < threshold:
        raise ValueError(f"{len(share_list)} shares, fewer than the threshold {threshold}")
    return shamir.combine_shares(share_list[:threshold])


def install() -> None:
    """Patch Flower's SecAgg+ mod and workflow (idempotent)."""
    secure_masks.install()
    shamir.ThreadPoolExecutor = InlineExecutor
    mod = importlib.import_module(MOD)
    mod.ndarray_to_bytes = packed_bytes
    mod.generate_key_pairs = key_pair
    mod.private_key_to_bytes, mod.bytes_to_private_key = private_key_bytes, private_key_from_bytes
    workflow = importlib.import_module(WORKFLOW)
    workflow.bytes_to_ndarray = widened_array
    workflow.combine_shares = combine_threshold_shares
    workflow.bytes_to_private_key = private_key_from_bytes
