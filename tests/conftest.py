import itertools
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_model.data import ml100k_dir


def pytest_configure(config):
    """A SIGTERM (a CI timeout, `kill`) interrupts like Ctrl-C, so fixture finalizers still stop
    the SuperLinks, SuperNodes and servers the tests started. On a pytest-xdist worker (README's
    command runs two on two cores) torch, and every process the tests start, use one thread:
    two workers of two threads each slowed CPU-bound tests up to tenfold."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The modules that start real processes or whole federations, longest first (`--durations`,
# 2026-12-01). README's command keeps this order (`--no-loadscope-reorder`): the two workers
# take them first and the short modules fill in behind. xdist's default order (most tests
# first) left the one-test secure deployment module (150 s) to start last.
LONGEST_FIRST = ("test_deployment.py", "test_federation.py", "test_secure_deployment.py", "test_privacy.py",
                 "test_population.py", "test_dp_ftrl.py", "test_frontier.py", "test_cli.py",
                 "test_secure_aggregation.py")


def pytest_collection_modifyitems(items):
    """The modules in LONGEST_FIRST first, in that order; each module's tests keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test session builds its own catalog caches."""
    os.environ["FEDREC_CACHE"] = str(tmp_path_factory.mktemp("fedrec-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def ml100k_path() -> Path:
    path = ml100k_dir()
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {path}: set FEDREC_ML100K to its folder")
    return path


def default_run_config(**overrides) -> dict:
    """The app's run config as pyproject.toml declares it, with overrides (like --run-config)."""
    from simulations.flower_runner import app_run_config

    return app_run_config(**overrides)


def counted_generators() -> Callable[[], np.random.Generator]:
    """A fresh generator per use, each from its own seed 0, 1, 2, ...: a replayable stand-in
    for OS entropy (fresh_numpy_generator), so that tests measuring noise are deterministic.
    Tests only: a run's noise never comes from a seed."""
    seeds = itertools.count()
    return lambda: np.random.default_rng(next(seeds))
