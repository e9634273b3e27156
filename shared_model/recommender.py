"""The recommender: text-based item vectors, an order-aware user tower, dot-product scores.

item vector  = Linear(text vector from the LoRA-adapted encoder) (+ an item-id embedding)
user vector  = a small causal transformer (SASRec-style) over the user's recent items,
               optionally preceded by their free-text profile, read at the last position
score        = <user vector, item vector>

Every parameter is used inside its module's call (no tied tables read as `.weight`), and
every module sees the examples as its leading dimension, so Opacus's per-sample
gradients are complete. Attention is our own (nn.Linear only), which Opacus supports.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared_model.encoder import CatalogCache, TextTower


@dataclass
class RecommenderConfig:
    """The model's knobs (the federated state grows with dim, layers, history and ids)."""

    dim: int = 24  # width of item and user vectors
    layers: int = 2  # transformer blocks in the user tower
    heads: int = 2
    history: int = 50  # W: how many recent items the user tower reads
    dropout: float = 0.2
    lora_layers: int = 1  # adapted encoder layers (0: only the light head trains)
    lora_rank: int = 2
    lora_alpha: float = 4.0
    id_embeddings: bool = True  # a dense item-id table next to the text vectors
    encoder_path: str | None = None  # a local Hugging Face encoder; default all-MiniLM-L6-v2

    @classmethod
    def from_dict(cls, values: dict) -> RecommenderConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=64)
def causal_mask(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


@functools.lru_cache(maxsize=64)
def self_mask(length: int) -> torch.Tensor:
    return torch.eye(length, dtype=torch.bool)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position t reads positions <= t that hold an item."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        q, k, v = (t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        allowed = causal_mask(length) & key_mask[:, None, None, :]  # [B, 1, L, L]
        allowed = allowed | self_mask(length)  # a padded position reads itself
        dropout = self.dropout.p if self.dropout.training else 0.0  # off with its Dropout module
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block with a point-wise feed-forward of the model's width."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), key_mask))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


class Recommender(nn.Module):
    def __init__(self, cache: CatalogCache, n_items: int, config: RecommenderConfig = RecommenderConfig()):
        super().__init__()
        if cache.lora_layers != config.lora_layers:
            raise ValueError(f"the cache was built for lora-layers={cache.lora_layers}, not {config.lora_layers}")
        self.config = config
        self.n_items = n_items
        self.text = TextTower(cache, config.encoder_path, config.lora_rank, config.lora_alpha)
        self.project = nn.Linear(self.text.hidden_size, config.dim)
        self.item_ids = nn.Embedding(n_items, config.dim) if config.id_embeddings else None
        if self.item_ids is not None:
            nn.init.zeros_(self.item_ids.weight)  # untrained (cold) items fall back to their text
        self.position = nn.Embedding(config.history + 1, config.dim)  # +1: the profile slot
        self.blocks = nn.ModuleList(Block(config.dim, config.heads, config.dropout) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, M] (text rows; ids past the id table have no id embedding) -> [B, M, dim]."""
        vectors = self.project(self.text(ids))
        if self.item_ids is None:
            return vectors
        known = ids < self.n_items
        return vectors + self.item_ids(torch.where(known, ids, 0)) * known[..., None]

    def catalog_vectors(self) -> torch.Tensor:
        """[n_items, dim]: every catalog item, computed once and shared by a whole batch."""
        vectors = self.project(self.text.catalog(self.n_items))  # not texts added past the catalog
        return vectors if self.item_ids is None else vectors + self.item_ids(torch.arange(self.n_items))

    def user_states(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """history [B, L, dim] left-padded (mask [B, L] True on items) -> states [B, L, dim].

        The state at position t summarises items up to t; the last one is the user vector.
        """
        batch, length, _ = history.shape
        positions = torch.arange(self.config.history + 1 - length, self.config.history + 1).expand(batch, -1)
        x = self.dropout(history * math.sqrt(self.config.dim) + self.position(positions)) * mask[..., None]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def user_vectors(
        self,
        history_ids: torch.Tensor,
        mask: torch.Tensor,
        catalog: torch.Tensor | None = None,
        profiles: torch.Tensor | None = None,
        has_profile: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """history_ids [B, L] (left-padded) -> user vectors [B, dim].

        With `catalog` given, history vectors are read from it; otherwise each example
        computes its own (needed for per-example gradients). `profiles` [B, dim] (from
        `encode_texts`) are free-text profiles, read as the oldest history item where
        `has_profile` [B] is True.
        """
        safe = torch.where(mask, history_ids, 0)
        history = catalog[safe] if catalog is not None else self.item_vectors(safe)
        if profiles is not None:
            history = torch.cat([profiles[:, None], history], dim=1)
            mask = torch.cat([has_profile[:, None], mask], dim=1)
        return self.user_states(history, mask)[:, -1]

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Vectors [n, dim] of free texts (user profiles), read like item texts."""
        return self.project(self.text.encode(texts))

    def cold_item_vectors(self, cache: CatalogCache) -> torch.Tensor:
        """Vectors [n, dim] of texts from their frozen-prefix rows (`build_cache`), read like
        item texts with no id embedding: items added after training, or profiles."""
        return self.project(self.text.read(cache))

    def add_items(self, texts: list[str]) -> torch.Tensor:
        """Vectors [n, dim] of new items from their text alone (no id embedding: cold items)."""
        return self.item_vectors(self.text.add_texts(texts)[None])[0]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The federated part: every trainable tensor, by name (detached copies)."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise KeyError(f"trainable state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, param in params.items():  # every check before any copy: a bad state changes nothing
            if state[name].shape != param.shape:
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {tuple(param.shape)}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])

    def trainable_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad)


def left_pad(sequences: list, length: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `length` items of each sequence, left-padded: (ids [B, L], mask [B, L])."""
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        tail = list(seq[-length:]) if length else []
        if tail:
            ids[row, length - len(tail) :] = torch.as_tensor(tail, dtype=torch.long)
            mask[row, length - len(tail) :] = True
    return ids, mask


def score_catalog(model: Recommender, histories: list, batch_size: int = 1024,
                  catalog: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of every catalog item for each history: [n, n_items] (eval mode, no grad).
    `catalog`: the model's catalog vectors, when already computed."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        catalog = model.catalog_vectors() if catalog is None else catalog
        out = []
        for start in range(0, len(histories), batch_size):
            ids, mask = left_pad(histories[start : start + batch_size], model.config.history)
            out.append(model.user_vectors(ids, mask, catalog) @ catalog.T)
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.n_items)


def sequence_loss(model: Recommender, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  profiles: torch.Tensor | None = None):
    """Full-catalog softmax at every position of left-padded sequences [B, L] (fast path).

    mask marks the positions with a target; an input below 0 (a START marker) is not an
    item, so its state is exactly that of an empty history. profiles [B]: the text row of
    each sequence's free-text profile in the model's text tower (-1: none), read before
    the items as `user_vectors` reads it."""
    catalog = model.catalog_vectors()
    items = mask & (inputs >= 0)
    history = catalog[torch.where(items, inputs, 0)]
    if profiles is not None:
        given = profiles >= 0
        shown = torch.zeros(len(profiles), 1, history.shape[-1])  # hidden slots are masked out
        shown[given] = model.item_vectors(profiles[given][:, None])  # only the profiles shown
        history = torch.cat([shown, history], dim=1)
        items = torch.cat([given[:, None], items], dim=1)
    states = model.user_states(history, items)[:, -inputs.shape[1]:]
    logits = states[mask] @ catalog.T
    return F.cross_entropy(logits, targets[mask])


def example_loss(
    model: Recommender,
    history: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor | None,
) -> torch.Tensor:
    """Per-example loss: one history window -> one target, mean over the batch.

    negatives [B, N]: a sampled softmax against them (each example computes its own item
    vectors, as Opacus needs); None: a softmax over the whole (public) catalog.
    """
    if negatives is None:
        catalog = model.catalog_vectors()
        users = model.user_vectors(history, mask, catalog)
        return F.cross_entropy(users @ catalog.T, targets)
    candidates = torch.cat([targets[:, None], negatives], dim=1)  # [B, 1 + N]
    width = history.shape[1]
    vectors = model.item_vectors(torch.cat([torch.where(mask, history, 0), candidates], dim=1))
    users = model.user_states(vectors[:, :width], mask)[:, -1]
    logits = torch.einsum("bd,bmd->bm", users, vectors[:, width:])
    collide = torch.cat([torch.zeros_like(targets[:, None], dtype=torch.bool), negatives == targets[:, None]], 1)
    logits = logits.masked_fill(collide, float("-inf"))
    return F.cross_entropy(logits, torch.zeros_like(targets))


def build_recommender(texts: list[str], config: RecommenderConfig, progress: bool = True) -> Recommender:
    """A fresh model over a catalog, with the frozen prefix loaded from (or built into) the cache."""
    from shared_model.encoder import load_or_build_cache

    cache = load_or_build_cache(texts, config.lora_layers, config.encoder_path, progress=progress)
    return Recommender(cache, len(texts), config)


def load_recommender(path, texts: list[str]) -> Recommender:
    """A model over `texts` holding the trainable state saved at `path` (its config is in
    the file's metadata)."""
    from shared_model.state import load_state

    state, meta = load_state(path)
    if "model_config" not in meta:
        raise ValueError(f"{path}: not a fedrec adapters file (no model_config in its metadata)")
    model = build_recommender(texts, RecommenderConfig.from_dict(meta["model_config"]), progress=False)
    try:
        model.load_trainable_state(state)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path} does not fit this catalog of {len(texts)} items: {error}") from None
    return model.eval()


class Ranker:
    """Top-k for one user at a time over precomputed catalog vectors (inference only)."""

    def __init__(self, model: Recommender):
        self.model = model.eval()
        with torch.no_grad():
            self.catalog = model.catalog_vectors()

    @torch.inference_mode()
    def top_k(self, history, k: int = 10, exclude=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(item ids, scores) of the k best items not in `exclude` (default: the history)."""
        recent = torch.as_tensor(np.asarray(history[-self.model.config.history :], dtype=np.int64))
        mask = torch.ones(1, len(recent), dtype=torch.bool)
        if not len(recent):  # no history: one masked slot, the tower's prior
            recent, mask = torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.bool)
        scores = self.model.user_vectors(recent[None], mask, self.catalog)[0] @ self.catalog.T
        seen = np.asarray(history if exclude is None else exclude, dtype=np.int64)
        scores[torch.from_numpy(seen)] = float("-inf")
        best = torch.topk(scores, k)
        return best.indices, best.values
