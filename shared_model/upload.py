"""What a client uploads: its trained adapters in fp32, or its update in fp16.

At "fp16" a client sends the update (trained minus the round's global adapters), not the
adapters: an update is small, so fp16's 11 bits of mantissa keep it to about 3 significant
digits, where the adapters' own rounding would swamp it. Each value is rounded up or down
at random, in proportion to its distance from the two neighbouring fp16 values, so the
rounding is unbiased: the server's mean of many clients' updates converges to the fp32
mean. The server adds each update back to the round's global adapters in fp32. Rounding
is post-processing of what the client would have sent (under DP, of a noised release), so
it changes no privacy guarantee; its randomness need not be secret.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("fp32", "fp16")


def stochastic_fp16(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """values rounded to one of their two neighbouring fp16 values, up with probability
    (value - low) / (high - low): unbiased (values beyond fp16's range are clipped to it)."""
    limit = float(np.finfo(np.float16).max)
    values = np.clip(np.asarray(values, dtype=np.float32), -limit, limit)
    nearest = values.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # at the range's ends, where nearest is exact
        other = np.nextafter(nearest, np.where(nearest < values, np.float16(np.inf), np.float16(-np.inf)))
        low, high = np.minimum(nearest, other), np.maximum(nearest, other)
        gap = high.astype(np.float32) - low.astype(np.float32)
        up = (values - low.astype(np.float32)) / np.where(gap > 0, gap, 1.0)
    rounded = np.where(rng.random(values.shape) < up, high, low)
    return np.where(nearest == values, nearest, rounded)


def encode_upload(trained: dict[str, np.ndarray], start: dict[str, np.ndarray], precision: str,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What the client sends: the trained adapters (fp32), or its update in fp16."""
    if precision == "fp32":
        return trained
    return {name: stochastic_fp16(trained[name] - start[name], rng) for name in trained}


def decode_upload(received: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapters a client trained, from its fp16 update and the round's global adapters.
    Raises ValueError when the upload is not an fp16 update of the model's shape."""
    if set(received) != set(start):
        raise ValueError(f"its arrays are not the model's (unexpected {sorted(set(received) - set(start))[:3]}, "
                         f"missing {sorted(set(start) - set(received))[:3]})")
    for name, array in received.items():
        if array.dtype != np.float16 or array.shape != start[name].shape:
            raise ValueError(f"'{name}' is {array.dtype} {array.shape}, not float16 {start[name].shape} "
                             "(upload-precision = 'fp16')")
    return {name: (start[name] + received[name].astype(np.float32)).astype(start[name].dtype) for name in received}
