"""The global model behind the scoring service: load, rank, score, add items, hot-reload.

No gRPC here: ids in and out are the dataset's own item ids, and a bad input raises
`InvalidInput` naming the field, which the service turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared_model.data import Catalog
from shared_model.recommender import Recommender, load_recommender
from shared_model.state import load_state

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_PROFILE_CHARS = 2_000
MAX_CANDIDATES = 100_000
MAX_NEW_ITEMS = 10_000
MAX_TEXT_CHARS = 2_000
EXPLAIN = 3  # history items named per recommendation
MAX_REMEMBERED_PROFILES = 10_000


class InvalidInput(ValueError):
    """A request field is wrong; the message names it."""


@dataclass(frozen=True)
class UserInput:
    history: list[int]  # dataset item ids, oldest first
    profile: str = ""


@dataclass(frozen=True)
class Recommendation:
    item_id: int
    score: float
    text: str
    because: list[int]


@dataclass(frozen=True)
class Query:
    history: list[int]  # catalog indices
    blocked: list[int]
    profile: str
    k: int


class ScoringModel:
    """One Recommender plus its catalog vectors; a lock makes reloads atomic for requests."""

    def __init__(self, checkpoint: Path, catalog: Catalog):
        self.checkpoint = Path(checkpoint)
        self.model: Recommender = load_recommender(self.checkpoint, catalog.texts)
        self.texts = list(catalog.texts)
        self._set_ids(np.asarray(catalog.raw_ids, dtype=np.int64))
        self.lock = threading.RLock()
        self.profiles: dict[str, torch.Tensor] = {}  # profile text -> vector, for this model version
        self._apply(self.model.trainable_state())
        self.loaded_mtime = self.checkpoint.stat().st_mtime

    # -- loading ---------------------------------------------------------------------
    def _apply(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_trainable_state(state)
        self.model.eval()
        with torch.inference_mode():
            catalog = self.model.catalog_vectors()
            if len(self.texts) > self.model.n_items:  # items added since the start
                added = torch.arange(self.model.n_items, len(self.texts))[None]
                catalog = torch.cat([catalog, self.model.item_vectors(added)[0]])
        digest = hashlib.sha1(b"".join(t.numpy().tobytes() for _, t in sorted(state.items()))).hexdigest()[:12]
        with self.lock:
            self.catalog = catalog
            self.version = digest
            self.profiles.clear()

    def reload_if_newer(self) -> bool:
        """Load the checkpoint again if it was rewritten; a bad file leaves the old model serving."""
        try:
            mtime = self.checkpoint.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime == self.loaded_mtime:
            return False
        state, _ = load_state(self.checkpoint)  # raises on a half-written or foreign file
        with self.lock:
            self._apply(state)
            self.loaded_mtime = mtime
        return True

    # -- inputs ------------------------------------------------------------------------
    def _set_ids(self, raw_ids: np.ndarray) -> None:
        """raw id of each catalog index, and a sorted view to look ids up in bulk."""
        self.ids = raw_ids
        self._order = np.argsort(raw_ids, kind="stable")
        self._sorted = raw_ids[self._order]

    def item_indices(self, ids, field: str) -> list[int]:
        """Catalog indices of dataset item ids; the first unknown one is named."""
        raw = np.asarray(ids, dtype=np.int64)
        if not len(raw):
            return []
        position = np.minimum(np.searchsorted(self._sorted, raw), len(self._sorted) - 1)
        known = self._sorted[position] == raw
        if not known.all():
            first = int(np.flatnonzero(~known)[0])
            raise InvalidInput(f"{field}[{first}]: unknown item id {raw[first]}")
        return self._order[position].tolist()

    def check_user(self, user: UserInput, field: str = "user") -> list[int]:
        if not user.history and not user.profile.strip():
            raise InvalidInput(f"{field}: give a history or a profile (both are empty)")
        if len(user.history) > MAX_HISTORY:
            raise InvalidInput(f"{field}.history: {len(user.history)} items, at most {MAX_HISTORY}")
        if len(user.profile) > MAX_PROFILE_CHARS:
            raise InvalidInput(f"{field}.profile: {len(user.profile)} characters, at most {MAX_PROFILE_CHARS}")
        return self.item_indices(user.history, f"{field}.history")

    def _profile_vectors(self, profiles: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors of the users' profiles (encoded like item texts, remembered), and where given."""
        new = sorted({p for p in profiles if p and p not in self.profiles})
        if new:
            if len(self.profiles) + len(new) > MAX_REMEMBERED_PROFILES:
                self.profiles.clear()
            self.profiles.update(zip(new, self.model.encode_texts(new)))
        zero = torch.zeros(self.model.config.dim)
        vectors = torch.stack([self.profiles[p] if p else zero for p in profiles])
        return vectors, torch.tensor([bool(p) for p in profiles])

    # -- queries -----------------------------------------------------------------------
    def _user_vectors(self, histories: list[list[int]], profiles: list[str],
                      padded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        ids, mask = padded or self.model.windows(histories)
        if not any(profiles):
            return self.model.user_vectors(ids, mask, self.catalog)
        return self.model.user_vectors(ids, mask, self.catalog, *self._profile_vectors(profiles))

    def prepare(self, user: UserInput, k: int, exclude: list[int]) -> "Query":
        """Check one Recommend request; what `recommend` then needs, in catalog indices."""
        if not 1 <= k <= min(MAX_K, len(self.texts)):
            raise InvalidInput(f"k: {k} is out of range 1..{min(MAX_K, len(self.texts))}")
        if len(exclude) > MAX_CANDIDATES:
            raise InvalidInput(f"exclude: {len(exclude)} items, at most {MAX_CANDIDATES}")
        history = self.check_user(user)
        return Query(history, history + self.item_indices(exclude, "exclude"), user.profile, k)

    def recommend(self, queries: list["Query"]) -> list[list[Recommendation]]:
        """Top-k for a batch of prepared queries, never an item of a user's history or
        exclude; each item with the history items whose vectors point most its way."""
        histories = [q.history for q in queries]
        with self.lock, torch.inference_mode():
            padded = self.model.windows(histories)
            scores = self._user_vectors(histories, [q.profile for q in queries], padded) @ self.catalog.T
            rows = np.repeat(np.arange(len(queries)), [len(q.blocked) for q in queries])
            if len(rows):
                scores[torch.from_numpy(rows), torch.tensor(np.concatenate([q.blocked for q in queries]))] = -np.inf
            best = torch.topk(scores, max(q.k for q in queries), dim=1)
            because = self._because(best.indices, padded)
            indices = best.indices.tolist()
            values = best.values.tolist()
            raw = self.ids[best.indices.numpy()].tolist()
        return [[Recommendation(raw[r][j], values[r][j], self.texts[indices[r][j]], because[r][j])
                 for j in range(query.k) if math.isfinite(values[r][j])] for r, query in enumerate(queries)]

    def _because(self, items: torch.Tensor, padded: tuple[torch.Tensor, torch.Tensor]) -> list[list[list[int]]]:
        """For each user and recommended item, the raw ids of up to EXPLAIN history items
        with the largest dot product with the item (a short "because you liked")."""
        ids, mask = padded
        if not mask.any():
            return [[[] for _ in range(items.shape[1])] for _ in range(len(ids))]
        affinity = self.catalog[items] @ self.catalog[ids].transpose(1, 2)  # [B, k, L]
        affinity = affinity.masked_fill(~mask[:, None, :], -np.inf)
        top = affinity.topk(min(EXPLAIN, ids.shape[1]), dim=2)
        raw = self.ids[ids.gather(1, top.indices.flatten(1)).view(top.indices.shape).numpy()].tolist()
        finite = torch.isfinite(top.values).tolist()
        return [[[x for x, ok in zip(raw_j, ok_j) if ok] for raw_j, ok_j in zip(raw_b, ok_b)]
                for raw_b, ok_b in zip(raw, finite)]

    def score(self, user: UserInput, item_ids: list[int]) -> list[float]:
        with self.lock, torch.inference_mode():
            if not item_ids:
                raise InvalidInput("item_ids: empty")
            if len(item_ids) > MAX_CANDIDATES:
                raise InvalidInput(f"item_ids: {len(item_ids)} items, at most {MAX_CANDIDATES}")
            history = self.check_user(user)
            candidates = torch.tensor(self.item_indices(item_ids, "item_ids"))
            user_vector = self._user_vectors([history], [user.profile])[0]
            return (self.catalog[candidates] @ user_vector).tolist()

    def add_items(self, items: list[tuple[int, str]]) -> int:
        """New items from their text alone; they rank at once. Returns the catalog size."""
        if not items:
            raise InvalidInput("items: empty")
        if len(items) > MAX_NEW_ITEMS:
            raise InvalidInput(f"items: {len(items)} items, at most {MAX_NEW_ITEMS}")
        seen: set[int] = set()
        known = set(self.ids.tolist())
        for position, (raw, text) in enumerate(items):
            if raw in known or raw in seen:
                raise InvalidInput(f"items[{position}].item_id: {raw} is already in the catalog")
            if not text.strip() or len(text) > MAX_TEXT_CHARS:
                raise InvalidInput(f"items[{position}].text: must be 1..{MAX_TEXT_CHARS} characters")
            seen.add(raw)
        with self.lock, torch.inference_mode():
            vectors = self.model.add_items([t for _, t in items])
            self._set_ids(np.concatenate([self.ids, np.array([raw for raw, _ in items], dtype=np.int64)]))
            self.texts += [text for _, text in items]
            self.catalog = torch.cat([self.catalog, vectors])
            return len(self.texts)
