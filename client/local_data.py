"""What one client holds: the public catalog and its own users' interactions, split by time.

On a device they come from its own data directory (node config `data-dir`). In simulation
a client's users are a partition of the whole dataset (one user per client, or a silo of
many); the partition is computed identically in every process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from client.device_store import device_identity, device_split
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


@lru_cache(maxsize=4)
def device_client_data(folder: str) -> ClientData:
    catalog, split = device_split(Path(folder))
    return ClientData(catalog.texts, split)


def client_data(settings: RunSettings, node_config: dict) -> ClientData:
    """The device's own directory if the node names one, else its simulated partition."""
    if node_config.get("data-dir"):
        return device_client_data(str(node_config["data-dir"]))
    return simulated_client_data(settings, int(node_config["partition-id"]), int(node_config["num-partitions"]))


def sampling_key(node_config: dict) -> int:
    """A stable key the server orders clients by, so that seeded sampling is reproducible
    across restarts (node ids are not): a device's own random identity, or in simulation
    the partition index."""
    if node_config.get("data-dir"):
        return device_identity(Path(str(node_config["data-dir"])))
    return int(node_config["partition-id"])
