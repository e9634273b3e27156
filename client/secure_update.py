"""A client's part of DP-FedAvg under secure aggregation (`secure-aggregation = true`).

Flower's `secaggplus_mod` runs the SecAgg+ protocol around the ClientApp: it calls the
ClientApp once, in the protocol's third stage, with the round's instructions in the legacy
FitIns shape, quantises and masks what the ClientApp returns in the FitRes shape, and sends
only the masked vector. What the ClientApp returns is already private on its own: the
update (trained minus global model) clipped to L2 norm S and its share of DP-FedAvg's
noise, N(0, (z S)^2 / m) per coordinate from fresh OS entropy (z, S and m from the run
config, not from the server's message: a server cannot ask for less noise). The sum of
m or more such vectors carries the accounted noise; the server learns only that sum.

`secure_aggregation_guard` is the ClientApp's training mod: with secure aggregation on, a
training message that does not come through the protocol is refused (an honest client
never sends a plain update), and otherwise it hands over to `secaggplus_mod`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from shared_model import secagg_patches
from shared_model.dp_aggregation import (MODULUS, NAMES_KEY, clipped_sum, clipping_range, flat_vector,
                                         noise_share_std, reconstruction_threshold, unflattened)
from shared_model.fresh_randomness import fresh_numpy_generator
from shared_model.settings import RunSettings


def secure_aggregation_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
                             ) -> Message:
    """Training goes through SecAgg+ when the run config asks for it, and never around it."""
    settings = RunSettings.from_run_config(context.run_config)
    if not settings.secure_aggregation:
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        raise RuntimeError("secure-aggregation = true: this client sends its update only through SecAgg+, and this "
                           "training message did not come through the protocol")
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) == Stage.SETUP:
        check_setup(configs, settings)
    secagg_patches.install()  # masks from the whole key, masked vectors as uint32: as the server
    answer = secaggplus_mod(msg, context, call_next)
    if configs.get(Key.STAGE) == Stage.UNMASK:  # the round's keys are done with: none stays cached past it
        secagg_patches.private_key_from_bytes.cache_clear()
    return answer


def check_setup(configs: ConfigRecord, settings: RunSettings) -> None:
    """Refuse a round whose protocol settings would weaken what this client sends: a weight
    or range that rescales or clips its noise share away, a threshold below the one for the
    neighbourhood the server announces, a sample smaller than m."""
    problems = [f"{key} {configs[key]!r}, expected {wanted!r}" for key, wanted in
                ((Key.MAX_WEIGHT, 1.0), (Key.MOD_RANGE, MODULUS), (Key.CLIPPING_RANGE, clipping_range(settings)))
                if not math.isclose(float(configs[key]), float(wanted), rel_tol=1e-9)]
    least = reconstruction_threshold(int(configs[Key.SHARE_NUMBER]))
    if int(configs[Key.THRESHOLD]) < least:
        problems.append(f"threshold {configs[Key.THRESHOLD]} below {least} for {configs[Key.SHARE_NUMBER]} shares")
    if int(configs[Key.SAMPLE_NUMBER]) < settings.secagg_min_clients:
        problems.append(f"{configs[Key.SAMPLE_NUMBER]} clients sampled, fewer than secagg-min-clients")
    if problems:
        raise RuntimeError("secure aggregation refused: " + "; ".join(problems))


def instructions(msg: Message, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], dict]:
    """(the global arrays by name, the FitIns config) of a SecAgg+ training message, whose
    parameters are one flat vector (dp_aggregation.flat_vector) of the arrays the config
    names, in that order; shapes: this client's model's, by name (the same names or none)."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    names = str(fitins.config[NAMES_KEY]).split(",")
    if sorted(names) != sorted(shapes):
        raise ValueError(f"the server's arrays {sorted(names)} are not this model's {sorted(shapes)}")
    vectors = parameters_to_ndarrays(fitins.parameters)
    if len(vectors) != 1:
        raise ValueError(f"a SecAgg+ training message with {len(vectors)} arrays, expected one flat vector")
    if not np.issubdtype(vectors[0].dtype, np.floating) or not np.isfinite(vectors[0]).all():
        raise ValueError("a SecAgg+ training message whose model is not finite floating point: refused (a NaN in "
                         "the model would make the update's norm NaN, and NaN passes the clip)")
    return unflattened(vectors[0], {name: shapes[name] for name in names}), dict(fitins.config)


def private_vector(update: dict[str, np.ndarray], settings: RunSettings,
                   rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """The update clipped to server-dp-clip plus this client's share of the noise (rng:
    fresh OS entropy; a test may pass a seeded one)."""
    if not all(np.isfinite(v).all() for v in update.values()):
        raise ValueError("a non-finite update: refused (its norm is NaN or infinite, so clipping cannot bound it)")
    rng = rng or fresh_numpy_generator()
    clipped, _ = clipped_sum({k: np.asarray(v, dtype=np.float64)[None] for k, v in update.items()},
                             settings.server_dp_clip)
    std = noise_share_std(settings.server_dp_noise, settings.server_dp_clip, settings.secagg_min_clients)
    return {k: v + rng.normal(0.0, std, size=v.shape) for k, v in clipped.items()}


def reply(msg: Message, vector: dict[str, np.ndarray], names: list[str]) -> Message:
    """The FitRes-shaped reply `secaggplus_mod` masks: the vector, flat in the order of
    `names`, weight 1, no metrics."""
    parameters = ndarrays_to_parameters([flat_vector({k: vector[k] for k in names})])
    return Message(fitres_to_recorddict(FitRes(Status(Code.OK, ""), parameters, 1, {}), keep_input=False),
                   reply_to=msg)
