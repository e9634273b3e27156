"""Train / validation / test splits, following the evaluation protocol of DESIGN.md.

Per user, interactions are ordered by time with ties broken by a seeded permutation of the
file's rows (breaking ties by item id would bias the test set toward rare movies). The
last item is the test target, the one before it the validation target, the rest train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared_model.data import Dataset

STAGES = ("valid", "test")


@dataclass(frozen=True)
class EvalCases:
    """Ranking cases: for each, a history (model input), a target and the items to exclude."""

    users: np.ndarray  # [n] int64
    histories: list[np.ndarray]
    targets: np.ndarray  # [n] int64
    exclude: list[np.ndarray]
    profiles: list[str] | None = None

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class LeaveOneOut:
    """Leave-one-out by time: train sequences, one validation and one test item per user."""

    train: list[np.ndarray]  # per user, items in time order
    valid: np.ndarray  # [n_users] item, or -1 for users with fewer than 3 interactions
    test: np.ndarray  # [n_users]
    n_items: int
    profiles: list[str] | None = field(default=None, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.train)

    def cases(self, stage: str, users: np.ndarray | None = None) -> EvalCases:
        """Validation cases read train; test cases read train plus the validation item."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        targets_all = self.valid if stage == "valid" else self.test
        chosen = np.arange(self.n_users) if users is None else np.asarray(users)
        chosen = chosen[targets_all[chosen] >= 0]
        histories = [self.prefix(u, stage) for u in chosen]
        profiles = [self.profiles[u] for u in chosen] if self.profiles else None
        return EvalCases(chosen, histories, targets_all[chosen], histories, profiles)

    def prefix(self, user: int, stage: str) -> np.ndarray:
        """The items of `user` before `stage`'s target: what the model may read then."""
        if stage == "test" and self.valid[user] >= 0:
            return np.append(self.train[user], self.valid[user])
        return self.train[user]


def protocol_order(dataset: Dataset, seeded_ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Row order by user, then time, ties broken by a permutation seeded with 0 (or, with
    seeded_ties=False, by row order: for data already written in protocol order); and
    where each user's rows start in it."""
    ties = np.random.default_rng(0).permutation(len(dataset.users)) if seeded_ties else np.arange(len(dataset.users))
    order = np.lexsort((ties, dataset.timestamps, dataset.users))
    return order, np.searchsorted(dataset.users[order], np.arange(dataset.n_users + 1))


def user_sequences(dataset: Dataset, seeded_ties: bool = True) -> list[np.ndarray]:
    """Each user's items in protocol order."""
    order, bounds = protocol_order(dataset, seeded_ties)
    items = dataset.items[order]
    return [items[bounds[u] : bounds[u + 1]] for u in range(dataset.n_users)]


def split_sequences(sequences: list[np.ndarray], n_items: int, profiles: list[str] | None = None) -> LeaveOneOut:
    """Last item = test, second last = validation, rest = train (short users: all train)."""
    train, valid, test = [], np.full(len(sequences), -1), np.full(len(sequences), -1)
    for u, seq in enumerate(sequences):
        if len(seq) >= 3:
            train.append(seq[:-2])
            valid[u], test[u] = seq[-2], seq[-1]
        else:
            train.append(seq)
    return LeaveOneOut(train, valid, test, n_items, profiles)


def leave_one_out(dataset: Dataset) -> LeaveOneOut:
    return split_sequences(user_sequences(dataset), dataset.n_items, dataset.profiles)


@dataclass(frozen=True)
class ColdItemSplit:
    """A seeded fraction of items removed from all training data, and cases that target them."""

    warm: LeaveOneOut  # the split of the interactions with warm items only
    cold_items: np.ndarray
    cases: EvalCases  # per user with a cold item: its warm history -> its last cold item


def cold_item_split(dataset: Dataset, fraction: float = 0.1, seed: int = 0) -> ColdItemSplit:
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(dataset.n_items, size=max(1, round(fraction * dataset.n_items)), replace=False))
    is_cold = np.zeros(dataset.n_items, dtype=bool)
    is_cold[cold] = True
    sequences = user_sequences(dataset)
    warm = split_sequences([s[~is_cold[s]] for s in sequences], dataset.n_items, dataset.profiles)
    users, histories, targets = [], [], []
    for u, seq in enumerate(sequences):
        cold_positions = np.flatnonzero(is_cold[seq])
        if len(cold_positions) and (~is_cold[seq]).any():
            users.append(u)
            histories.append(seq[~is_cold[seq]])
            targets.append(seq[cold_positions[-1]])
    cases = EvalCases(np.array(users, dtype=np.int64), histories, np.array(targets, dtype=np.int64), histories)
    return ColdItemSplit(warm, cold, cases)


@dataclass(frozen=True)
class ColdUserSplit:
    """A seeded fraction of users held out of training; at test they show their first h items."""

    warm: LeaveOneOut  # cold users have empty train sequences and no targets here
    cold_users: np.ndarray
    sequences: list[np.ndarray]  # full sequences of the cold users
    profiles: list[str] | None

    def cases(self, known: int) -> EvalCases:
        """Each cold user with `known` items seen (0-3): predict the next one."""
        keep = [i for i, s in enumerate(self.sequences) if len(s) > known]
        histories = [self.sequences[i][:known] for i in keep]
        targets = np.array([self.sequences[i][known] for i in keep], dtype=np.int64)
        profiles = [self.profiles[i] for i in keep] if self.profiles else None
        return EvalCases(self.cold_users[keep], histories, targets, histories, profiles)


def cold_user_split(dataset: Dataset, fraction: float = 0.1, seed: int = 0) -> ColdUserSplit:
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(dataset.n_users, size=max(1, round(fraction * dataset.n_users)), replace=False))
    sequences = user_sequences(dataset)
    is_cold = np.zeros(dataset.n_users, dtype=bool)
    is_cold[cold] = True
    warm = split_sequences(
        [np.empty(0, dtype=np.int64) if is_cold[u] else s for u, s in enumerate(sequences)],
        dataset.n_items,
        dataset.profiles,
    )
    profiles = [dataset.profiles[u] for u in cold] if dataset.profiles else None
    return ColdUserSplit(warm, cold, [sequences[u] for u in cold], profiles)
