"""The global model behind the scoring service: load, rank, score, add items, hot-reload.

No gRPC here: ids in and out are the dataset's own item ids, and a bad input raises
`InvalidInput` naming the field, which the service turns into INVALID_ARGUMENT.

Requests read an immutable `Served` snapshot (model, catalog vectors, ids, texts) and take
no lock: AddItems and reloads do their slow work (the encoder, a new model) outside any
lock, then swap in a new snapshot under the writers' lock, so a request never waits for
them and never sees half of a change.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from shared_model.data import Catalog
from shared_model.encoder import MAX_TOKENS, CatalogCache, build_cache, load_encoder, load_or_build_cache
from shared_model.recommender import Recommender, load_adapters_into, read_adapters

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_PROFILE_CHARS = 2_000  # a cheap bound before the profile is tokenised
MAX_CANDIDATES = 100_000
MAX_NEW_ITEMS = 10_000  # per AddItems call
MAX_TEXT_CHARS = 1_000  # per new item; only its first MAX_TOKENS tokens are read
# Over the server's life: each added item keeps its encoder rows (about 220 KB at 48
# tokens) so that a reload can re-read it, so growth is capped: 20,000 items ~ 4.4 GB.
MAX_ADDED_ITEMS = 20_000
ENCODE_BATCH = 32  # texts per encoder pass of AddItems: bounds its working memory
EXPLAIN = 3  # history items named per recommendation
MAX_REMEMBERED_PROFILES = 10_000
UTF8_BYTES = 4  # the most bytes one character takes on the wire


class InvalidInput(ValueError):
    """A request field is wrong; the message names it."""


class CatalogFull(RuntimeError):
    """AddItems would take the catalog past MAX_ADDED_ITEMS added items."""


def max_request_bytes() -> int:
    """The largest request the limits above allow (AddItems at its limits, every character
    4 UTF-8 bytes, each item's framing), with room for field tags: the receive cap."""
    add_items = MAX_NEW_ITEMS * (UTF8_BYTES * MAX_TEXT_CHARS + 32)
    score = MAX_CANDIDATES * 11 + MAX_HISTORY * 11 + UTF8_BYTES * MAX_PROFILE_CHARS
    recommend = (MAX_CANDIDATES + MAX_HISTORY) * 11 + UTF8_BYTES * MAX_PROFILE_CHARS
    return max(add_items, score, recommend) + 64 * 1024


@dataclass(frozen=True)
class UserInput:
    history: list[int]  # dataset item ids, oldest first
    profile: str = ""


class Ranked(NamedTuple):
    """One user's top-k, best first, as columns (a batch builds 64 of these per pass: one
    object per item cost a fifth of its time): raw item ids, scores, texts, and for each
    item the history items that explain it."""

    item_ids: list[int]
    scores: list[float]
    texts: list[str]
    because: list[list[int]]


@dataclass(frozen=True)
class Query:
    history: list[int]  # catalog indices
    blocked: list[int]
    profile: str
    k: int


@dataclass(frozen=True)
class Served:
    """What one request reads: never changed after it is made (a change makes a new one)."""

    model: Recommender
    version: str
    catalog: torch.Tensor  # [n, dim] item vectors, base catalog then added items
    ids: np.ndarray  # [n] raw id of each catalog index
    texts: list[str]
    index: dict[int, int] = field(init=False)  # raw id -> catalog index
    profiles: dict[str, torch.Tensor] = field(default_factory=dict)  # profile -> vector, this model

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", dict(zip(self.ids.tolist(), range(len(self.ids)))))

    def item_indices(self, ids, field: str) -> list[int]:
        """Catalog indices of dataset item ids; the first unknown one is named. (A dict: a
        request's 50 ids cost a microsecond, a sixth of numpy's searchsorted.)"""
        index = self.index
        try:
            return [index[i] for i in ids]
        except KeyError:
            first = next(p for p, i in enumerate(ids) if i not in index)
            raise InvalidInput(f"{field}[{first}]: unknown item id {ids[first]}") from None


@dataclass(frozen=True)
class Added:
    catalog_size: int
    truncated: int  # texts longer than MAX_TOKENS tokens, read up to there


def state_version(model: Recommender) -> str:
    """A digest of the weights as served (fp32 after loading, whatever the file's dtype)."""
    state = model.trainable_state()
    return hashlib.sha1(b"".join(t.numpy().tobytes() for _, t in sorted(state.items()))).hexdigest()[:12]


def file_signature(path: Path) -> tuple[int, int, int]:
    """What changes when a file is rewritten or replaced (raises FileNotFoundError)."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class ScoringModel:
    """The served snapshot, and the writers (AddItems, reload) that replace it."""

    def __init__(self, checkpoint: Path, catalog: Catalog, max_added: int = MAX_ADDED_ITEMS):
        self.checkpoint = Path(checkpoint)
        self.base_texts = list(catalog.texts)
        self.base_ids = np.asarray(catalog.raw_ids, dtype=np.int64)
        self.max_added = max_added
        self.lock = threading.Lock()  # writers only: requests read `self.served`
        self.pending: set[int] = set()  # ids of AddItems calls still encoding
        self.added: list[CatalogCache] = []  # frozen-prefix rows of added items, one chunk per batch
        self.added_count = 0
        self.loaded = file_signature(self.checkpoint)
        state, self.config = read_adapters(self.checkpoint)
        self.cache = load_or_build_cache(self.base_texts, self.config.lora_layers, self.config.encoder_path,
                                         progress=False)
        self.encoder = load_encoder(self.config.encoder_path)
        # A tokenizer of our own that counts every token (the encoder's own cuts at MAX_TOKENS).
        self.counter = Tokenizer.from_str(self.encoder[0].backend_tokenizer.to_str())
        self.counter.no_truncation()
        self.counter.no_padding()
        model = self._model(state)
        self.served = Served(model, state_version(model), self._vectors(model, self.added),
                             self.base_ids, self.base_texts)
        self._profile_vectors(self.served, ["warm-up"])  # the encoder's first call is slow

    # -- loading ---------------------------------------------------------------------
    def _model(self, state: dict[str, torch.Tensor]) -> Recommender:
        """A model holding `state` over the shared frozen catalog rows; nothing served changes."""
        model = Recommender(self.cache, len(self.base_texts), self.config)
        load_adapters_into(model, state, self.checkpoint)
        model.text.save_memory()  # fp16 token rows, shared by every model: serving never trains
        return model.eval()

    @staticmethod
    def _vectors(model: Recommender, chunks: list[CatalogCache]) -> torch.Tensor:
        """[n, dim]: the base catalog, then the added items, chunk by chunk (bounded memory)."""
        with torch.inference_mode():
            return torch.cat([model.catalog_vectors()] + [model.cold_item_vectors(c) for c in chunks])

    def reload_if_newer(self) -> bool:
        """Load the checkpoint again if it was rewritten, building the new model aside and
        swapping it in whole. A bad file raises once (it is not retried until it changes)
        and leaves the old model serving untouched; a deleted one raises FileNotFoundError."""
        signature = file_signature(self.checkpoint)
        if signature == self.loaded:
            return False
        self.loaded = signature
        state, config = read_adapters(self.checkpoint)
        if config != self.config:
            raise ValueError(f"{self.checkpoint}: its model_config differs from the served one "
                             f"({config.to_dict()} != {self.config.to_dict()}); restart the server to change it")
        model = self._model(state)
        version = state_version(model)
        with self.lock:
            chunks = list(self.added)
        catalog = self._vectors(model, chunks)
        with self.lock:  # items added meanwhile: read under the new model too
            with torch.inference_mode():
                extra = [model.cold_item_vectors(c) for c in self.added[len(chunks):]]
            self.served = Served(model, version, torch.cat([catalog, *extra]),
                                 self.served.ids, self.served.texts)
        return True

    # -- inputs ------------------------------------------------------------------------
    def check_user(self, served: Served, user: UserInput, field: str = "user") -> list[int]:
        if not user.history and not user.profile.strip():
            raise InvalidInput(f"{field}: give a history or a profile (both are empty)")
        if len(user.history) > MAX_HISTORY:
            raise InvalidInput(f"{field}.history: {len(user.history)} items, at most {MAX_HISTORY}")
        if len(user.profile) > MAX_PROFILE_CHARS:
            raise InvalidInput(f"{field}.profile: {len(user.profile)} characters, at most {MAX_PROFILE_CHARS}")
        if user.profile and user.profile not in served.profiles:  # a remembered one was checked
            tokens = len(self.counter.encode(user.profile).ids)
            if tokens > MAX_TOKENS:
                raise InvalidInput(f"{field}.profile: {tokens} tokens, at most {MAX_TOKENS} (the encoder reads "
                                   f"no more; shorten it)")
        return served.item_indices(user.history, f"{field}.history")

    def _profile_vectors(self, served: Served, profiles: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors of the users' profiles (encoded like item texts, remembered), and where given."""
        # A local view: another thread may clear the shared memo while this one reads it.
        known = {p: v for p in {p for p in profiles if p} if (v := served.profiles.get(p)) is not None}
        new = sorted({p for p in profiles if p} - known.keys())
        if new:
            with torch.inference_mode():
                vectors = served.model.cold_item_vectors(build_cache(new, self.config.lora_layers,
                                                                     encoder=self.encoder))
            known.update(zip(new, vectors))
            if len(served.profiles) + len(new) > MAX_REMEMBERED_PROFILES:
                served.profiles.clear()
            served.profiles.update(zip(new, vectors))
        zero = torch.zeros(self.config.dim)
        vectors = torch.stack([known[p] if p else zero for p in profiles])
        return vectors, torch.tensor([bool(p) for p in profiles])

    # -- queries -----------------------------------------------------------------------
    def _user_vectors(self, served: Served, padded: tuple[torch.Tensor, torch.Tensor],
                      profiles: list[str]) -> torch.Tensor:
        ids, mask = padded
        if not any(profiles):
            return served.model.user_vectors(ids, mask, served.catalog)
        return served.model.user_vectors(ids, mask, served.catalog, *self._profile_vectors(served, profiles))

    def prepare(self, user: UserInput, k: int, exclude: list[int]) -> Query:
        """Check one Recommend request; what `recommend` then needs, in catalog indices
        (they stay valid: the catalog only grows)."""
        served = self.served
        if not 1 <= k <= min(MAX_K, len(served.texts)):
            raise InvalidInput(f"k: {k} is out of range 1..{min(MAX_K, len(served.texts))}")
        if len(exclude) > MAX_CANDIDATES:
            raise InvalidInput(f"exclude: {len(exclude)} items, at most {MAX_CANDIDATES}")
        history = self.check_user(served, user)
        return Query(history, history + served.item_indices(exclude, "exclude"), user.profile, k)

    def recommend(self, queries: list[Query]) -> tuple[list[Ranked], str]:
        """Top-k for a batch of prepared queries, never an item of a user's history or
        exclude; each item with the history items whose vectors point most its way. Also
        the version of the model that answered."""
        served = self.served
        with torch.inference_mode():
            padded = served.model.windows([q.history for q in queries])
            scores = self._user_vectors(served, padded, [q.profile for q in queries]) @ served.catalog.T
            scores.masked_fill_(scores.isnan(), -np.inf)  # an invalid score ranks last (topk puts NaN first)
            rows = np.repeat(np.arange(len(queries)), [len(q.blocked) for q in queries])
            if len(rows):
                scores[torch.from_numpy(rows), torch.tensor(np.concatenate([q.blocked for q in queries]))] = -np.inf
            best = torch.topk(scores, max(q.k for q in queries), dim=1)
            because = self._because(served, best.indices, padded)
            finite = torch.isfinite(best.values)
            clean = finite.all(dim=1).tolist()
            finite = finite.tolist() if not all(clean) else None
            indices = best.indices.tolist()
            values = best.values.tolist()
            raw = served.ids[best.indices.numpy()].tolist()
        texts = served.texts
        ranked = []
        for r, query in enumerate(queries):
            # Blocked and invalid items (-inf) rank only when fewer than k are left, and
            # +inf ones first: none is ever recommended.
            keep = range(query.k) if clean[r] else [j for j in range(query.k) if finite[r][j]]
            ranked.append(Ranked([raw[r][j] for j in keep], [values[r][j] for j in keep],
                                 [texts[indices[r][j]] for j in keep], [because[r][j] for j in keep]))
        return ranked, served.version

    @staticmethod
    def _because(served: Served, items: torch.Tensor,
                 padded: tuple[torch.Tensor, torch.Tensor]) -> list[list[list[int]]]:
        """For each user and recommended item, the raw ids of up to EXPLAIN history items
        with the largest dot product with the item (a short "because you liked")."""
        ids, mask = padded
        if not mask.any():
            return [[[] for _ in range(items.shape[1])] for _ in range(len(ids))]
        affinity = served.catalog[items] @ served.catalog[ids].transpose(1, 2)  # [B, k, L]
        affinity = affinity.masked_fill(~mask[:, None, :], -np.inf)
        top = affinity.topk(min(EXPLAIN, ids.shape[1]), dim=2)
        raw = served.ids[ids.gather(1, top.indices.flatten(1)).view(top.indices.shape).numpy()].tolist()
        finite = torch.isfinite(top.values)
        if finite.all():  # every history of EXPLAIN items or more
            return raw
        finite = finite.tolist()
        return [[[x for x, ok in zip(raw_j, ok_j) if ok] for raw_j, ok_j in zip(raw_b, ok_b)]
                for raw_b, ok_b in zip(raw, finite)]

    def score(self, user: UserInput, item_ids: list[int]) -> tuple[list[float], str]:
        """Scores of the given items for one user, and the version of the model that answered."""
        served = self.served
        if not item_ids:
            raise InvalidInput("item_ids: empty")
        if len(item_ids) > MAX_CANDIDATES:
            raise InvalidInput(f"item_ids: {len(item_ids)} items, at most {MAX_CANDIDATES}")
        history = self.check_user(served, user)
        candidates = torch.tensor(served.item_indices(item_ids, "item_ids"))
        with torch.inference_mode():
            user_vector = self._user_vectors(served, served.model.windows([history]), [user.profile])[0]
            return (served.catalog[candidates] @ user_vector).tolist(), served.version

    # -- new items ---------------------------------------------------------------------
    def add_items(self, items: list[tuple[int | None, str]]) -> Added:
        """New items from their text alone; they rank at once. The encoder runs outside
        the lock, ENCODE_BATCH texts at a time; the ids are reserved first, so of two
        concurrent calls with one id exactly one succeeds."""
        if not items:
            raise InvalidInput("items: empty")
        if len(items) > MAX_NEW_ITEMS:
            raise InvalidInput(f"items: {len(items)} items, at most {MAX_NEW_ITEMS}")
        seen: set[int] = set()
        for position, (raw, text) in enumerate(items):
            if raw is None:
                raise InvalidInput(f"items[{position}].item_id: missing")
            if raw in seen:
                raise InvalidInput(f"items[{position}].item_id: {raw} appears twice in this request")
            if not text.strip() or len(text) > MAX_TEXT_CHARS:
                raise InvalidInput(f"items[{position}].text: must be 1..{MAX_TEXT_CHARS} characters")
            seen.add(raw)
        ids = [raw for raw, _ in items]
        texts = [text for _, text in items]
        with self.lock:
            served = self.served
            for position, raw in enumerate(ids):
                if raw in self.pending:
                    raise InvalidInput(f"items[{position}].item_id: {raw} is being added by another request")
            known = np.isin(np.asarray(ids, dtype=np.int64), served.ids)
            if known.any():
                position = int(np.flatnonzero(known)[0])
                raise InvalidInput(f"items[{position}].item_id: {ids[position]} is already in the catalog")
            if self.added_count + len(self.pending) + len(ids) > self.max_added:
                raise CatalogFull(f"items: {len(ids)} more would pass the cap of {self.max_added} items added "
                                  f"to this server ({self.added_count} added, {len(self.pending)} being "
                                  f"added); restart it with a catalog that includes them")
            self.pending.update(ids)
        try:
            truncated, chunks, vectors = 0, [], []
            with torch.inference_mode():
                for start in range(0, len(texts), ENCODE_BATCH):
                    batch = texts[start:start + ENCODE_BATCH]
                    truncated += sum(len(e.ids) > MAX_TOKENS for e in self.counter.encode_batch(batch))
                    chunks.append(build_cache(batch, self.config.lora_layers, encoder=self.encoder))
                    vectors.append(served.model.cold_item_vectors(chunks[-1]))
            with self.lock:
                current = self.served
                if current.model is not served.model:  # reloaded meanwhile: read under the new model
                    with torch.inference_mode():
                        vectors = [current.model.cold_item_vectors(c) for c in chunks]
                self.added += chunks
                self.added_count += len(ids)
                self.served = replace(current, catalog=torch.cat([current.catalog, *vectors]),
                                      ids=np.concatenate([current.ids, np.asarray(ids, dtype=np.int64)]),
                                      texts=current.texts + texts)
                return Added(len(self.served.texts), truncated)
        finally:
            with self.lock:
                self.pending.difference_update(ids)
