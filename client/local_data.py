"""What one client holds: the public catalog and its own users' interactions, split by time.

In simulation a client's users come from a partition of the whole dataset (one user per
client, or a silo of many); the partition is computed identically in every process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from shared_model.data import Dataset
from shared_model.partitions import partition_users
from shared_model.settings import RunSettings, SettingsError
from shared_model.splits import LeaveOneOut, split_sequences, user_sequences


@dataclass(frozen=True)
class ClientData:
    texts: list[str]  # the public catalog
    split: LeaveOneOut  # this client's users only

    @property
    def n_users(self) -> int:
        return self.split.n_users


@lru_cache(maxsize=2)
def _world(settings: RunSettings) -> tuple[Dataset, list[np.ndarray]]:
    data = settings.load_dataset()
    return data, user_sequences(data)


@lru_cache(maxsize=4)
def _partitions(settings: RunSettings, count: int) -> list[np.ndarray]:
    data, sequences = _world(settings)
    return partition_users(sequences, data.catalog, settings.partitioning, count, alpha=settings.dirichlet_alpha,
                           seed=settings.seed)


def simulated_client_data(settings: RunSettings, partition_id: int, num_partitions: int) -> ClientData:
    """Partition `partition_id` of `num_partitions` (the simulation's SuperNodes)."""
    data, sequences = _world(settings)
    if settings.partitioning == "per-user" and num_partitions != data.n_users:
        raise SettingsError(
            f"partitioning 'per-user' needs one SuperNode per user: {settings.dataset} has {data.n_users} users "
            f"but the federation has {num_partitions}; run with "
            f"--federation-config 'num-supernodes={data.n_users}'"
        )
    users = _partitions(settings, num_partitions)[partition_id]
    return ClientData(data.catalog.texts, split_sequences([sequences[u] for u in users], data.n_items))
