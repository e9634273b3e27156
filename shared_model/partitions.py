"""Which users each client holds: one client per user (devices), or K silos of many users.

Silos are drawn with flwr-datasets partitioners over a table of users: IID, or skewed by
each user's dominant genre (topic) with a Dirichlet distribution.
"""

from __future__ import annotations

import numpy as np

from shared_model.data import Catalog

PARTITIONINGS = ("per-user", "iid", "dirichlet")


def dominant_genre(sequences: list[np.ndarray], catalog: Catalog) -> np.ndarray:
    """Each user's most frequent genre over their items (0 for a user with no items)."""
    out = np.zeros(len(sequences), dtype=np.int64)
    for u, seq in enumerate(sequences):
        if len(seq):
            out[u] = int(catalog.genres[seq].sum(axis=0).argmax())
    return out


def partition_users(
    sequences: list[np.ndarray],
    catalog: Catalog,
    partitioning: str,
    num_partitions: int,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """The user indices of each partition. 'per-user' ignores num_partitions (one per user)."""
    n_users = len(sequences)
    if partitioning == "per-user":
        return [np.array([u]) for u in range(n_users)]
    if partitioning not in PARTITIONINGS:
        raise ValueError(f"partitioning must be one of {PARTITIONINGS}, not {partitioning!r}")
    if not 1 <= num_partitions <= n_users:
        raise ValueError(f"num-partitions must be between 1 and the {n_users} users, not {num_partitions}")
    # imported on use: they take seconds, and a device's ClientApp (a fresh process for each
    # message) reads its own directory and never partitions
    import datasets as hf_datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = hf_datasets.Dataset.from_dict(
        {"user": np.arange(n_users), "genre": dominant_genre(sequences, catalog)}
    )
    if partitioning == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        table = table.shuffle(seed=seed)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="genre",
            alpha=alpha,
            min_partition_size=1,
            self_balancing=True,
            seed=seed,
        )
    partitioner.dataset = table
    return [np.sort(np.array(partitioner.load_partition(i)["user"], dtype=np.int64)) for i in range(num_partitions)]
