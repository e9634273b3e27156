"""The signal-to-noise figure that bench_update_norms reports for choosing the clip."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.bench_update_norms import signal_to_noise


def test_agreeing_updates_keep_their_clipped_mean_and_the_noise_follows_the_clip():
    updates = {"a": np.array([[3.0, 0.0], [6.0, 0.0]]), "b": np.array([[[4.0]], [[8.0]]])}  # norms 5 and 10
    row = signal_to_noise(updates, clip=1.0, cohort=10.0, noise=2.0)
    assert row["clipped share"] == 1.0
    assert row["mean update norm"] == pytest.approx(1.0)  # both clipped onto the same unit vector
    assert row["noise norm"] == pytest.approx(2.0 * 1.0 * np.sqrt(3) / 10.0)  # z S sqrt(d) / C, d = 3
    unclipped = signal_to_noise(updates, clip=20.0, cohort=10.0, noise=2.0)
    assert unclipped["clipped share"] == 0.0 and unclipped["mean update norm"] == pytest.approx(7.5)
    assert unclipped["SNR"] < row["SNR"]  # a clip above every norm only adds noise


def test_opposite_updates_carry_no_signal():
    updates = {"a": np.array([[1.0, 2.0], [-1.0, -2.0]])}
    assert signal_to_noise(updates, clip=1.0, cohort=100.0)["mean update norm"] == pytest.approx(0.0)
