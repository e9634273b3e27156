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
import itertools
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared_model.encoder import CatalogCache, TextTower


class ConfigError(ValueError):
    """A model knob out of its bounds; `name` is the field, so each front end (run config,
    command line) can name the key or flag the user typed."""

    def __init__(self, name: str, message: str, value: object):
        super().__init__(f"{name} {message}, not {value!r}")
        self.name, self.message, self.value = name, message, value


@dataclass(frozen=True)
class Bounds:
    """The range a numeric knob may take (open ends exclude the limit itself)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def knob(default, help: str, bounds: Bounds | None = None):
    """A model field with the help text and bounds that every front end shows and checks."""
    return field(default=default, metadata={"help": help, "bounds": bounds})


@dataclass(frozen=True)
class RecommenderConfig:
    """The model's knobs, the one schema of them: the run config (shared_model.settings) and
    the command-line options (shared_model.cli_options) derive their keys, help and checks
    from these fields. The federated state grows with dim, layers, history and ids."""

    dim: int = knob(24, "width of item and user vectors (a multiple of heads)", Bounds(1))
    layers: int = knob(2, "transformer blocks in the user tower", Bounds(1))
    heads: int = knob(2, "attention heads per block (must divide dim)", Bounds(1))
    ffn: int = knob(1, "each block's feed-forward width, in multiples of dim", Bounds(1))
    history: int = knob(50, "W, the history window: how many recent items the user tower reads", Bounds(1))
    dropout: float = knob(0.2, "dropout probability in the user tower", Bounds(0, 1, high_open=True))
    lora_layers: int = knob(1, "top encoder layers with LoRA adapters (0: only the light head trains)",
                            Bounds(0, 6))
    lora_rank: int = knob(2, "rank of each LoRA adapter", Bounds(1))
    lora_alpha: float = knob(4.0, "LoRA scale numerator (adapter scale = alpha / rank)", Bounds(0, low_open=True))
    id_embeddings: bool = knob(True, "a dense item-id table next to the text vectors (warm items; its update "
                               "reveals a user's items unless DP-noised)")
    id_rank: int = knob(0, "rank of the item-id table: n_items x rank rows times a rank x dim map, so the id "
                        "table's upload grows with rank, not dim (0: a full n_items x dim table)", Bounds(0))
    hide_seen: bool = knob(False, "the training softmax leaves out the items a user already had before each "
                           "position, as the evaluation does: the model spends nothing on pushing them down")
    item_text: bool = knob(True, "item vectors from their text (the LoRA-adapted encoder); false: from the id "
                           "table alone, a SASRec-style model with no item cold start and no text profiles")
    encoder_path: str = knob("", "a local Hugging Face encoder folder ('' = the packaged all-MiniLM-L6-v2)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Each field within its bounds, and dim divisible by heads; ConfigError names the field."""
        for f in fields(self):
            value, bounds = getattr(self, f.name), f.metadata["bounds"]
            if bounds is not None and value not in bounds:
                raise ConfigError(f.name, f"must be {bounds}", value)
        if self.dim % self.heads:
            raise ConfigError("dim", f"must be divisible by heads ({self.heads})", self.dim)
        if self.id_rank >= self.dim:
            raise ConfigError("id_rank", f"must be below dim ({self.dim}; 0 for a full table)", self.id_rank)
        if not (self.item_text or self.id_embeddings):
            raise ConfigError("item_text", "may be false only with id-embeddings (items need a vector)", self.item_text)

    @classmethod
    def from_dict(cls, values: dict) -> RecommenderConfig:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in names}
        if values.get("encoder_path") is None:  # files written before "" meant the packaged encoder
            values.pop("encoder_path", None)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def rows_of(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table [N, D] rows at ids [...] -> [..., D]. Gathered with index_select, whose
    gradient (index_add, one index after another) is the same on every run; indexing
    (`table[ids]`) sums the gradients of repeated ids in parallel on CPU, in an order that
    changes with thread timing, and non-private runs would not be bit-reproducible."""
    return table.index_select(0, ids.reshape(-1)).reshape(*ids.shape, table.shape[-1])


@functools.lru_cache(maxsize=64)
def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


@functools.lru_cache(maxsize=64)
def self_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.eye(length, dtype=torch.bool, device=device)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position t reads positions <= t that hold an item."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        q, k, v = (t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        allowed = causal_mask(length, x.device) & key_mask[:, None, None, :]  # [B, 1, L, L]
        allowed = allowed | self_mask(length, x.device)  # a padded position reads itself
        dropout = self.dropout.p if self.dropout.training else 0.0  # off with its Dropout module
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))

    def last(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """The output at the last position only, [B, dim]: it reads every item (and itself)."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        q = q[:, -1:].view(batch, 1, self.heads, dim // self.heads).transpose(1, 2)  # [B, heads, 1, dim/heads]
        k, v = (t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2) for t in (k, v))
        allowed = key_mask.clone()
        allowed[:, -1] = True
        dropout = self.dropout.p if self.dropout.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :], dropout_p=dropout)
        return self.out(y.reshape(batch, dim))


class Block(nn.Module):
    """Pre-norm transformer block with a point-wise feed-forward `ffn` times the model's width."""

    def __init__(self, dim: int, heads: int, dropout: float, ffn: int = 1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, ffn * dim), nn.GELU(), nn.Linear(ffn * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), key_mask))
        return x + self.dropout(self.feed_forward(self.norm2(x)))

    def last(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """`forward(x, key_mask)[:, -1]`, computing the last position only."""
        last = x[:, -1] + self.dropout(self.attention.last(self.norm1(x), key_mask))
        return last + self.dropout(self.feed_forward(self.norm2(last)))


class Recommender(nn.Module):
    def __init__(self, cache: CatalogCache | None, n_items: int, config: RecommenderConfig = RecommenderConfig()):
        """cache: the catalog's frozen encoder prefix (`build_recommender`); None without item text."""
        super().__init__()
        self.config = config
        self.n_items = n_items
        self.text: TextTower | None = None
        if config.item_text:
            if cache is None or cache.lora_layers != config.lora_layers:
                raise ValueError(f"the cache was built for lora-layers={getattr(cache, 'lora_layers', None)}, "
                                 f"not {config.lora_layers}")
            self.text = TextTower(cache, config.encoder_path, config.lora_rank, config.lora_alpha)
            self.project = nn.Linear(self.text.hidden_size, config.dim)
        self.item_ids = nn.Embedding(n_items, config.id_rank or config.dim) if config.id_embeddings else None
        low_rank = config.id_embeddings and config.id_rank
        self.id_map = nn.Linear(config.id_rank, config.dim, bias=False) if low_rank else None
        if self.item_ids is not None and self.text is not None:
            nn.init.zeros_(self.item_ids.weight)  # untrained (cold) items fall back to their text
        elif self.item_ids is not None:
            nn.init.normal_(self.item_ids.weight, std=self.item_ids.embedding_dim ** -0.5)  # ids alone: distinct
        self.position = nn.Embedding(config.history + 1, config.dim)  # +1: the profile slot
        self.blocks = nn.ModuleList(Block(config.dim, config.heads, config.dropout, config.ffn)
                                    for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def window(self) -> int:
        """W: how many of a user's most recent items the user tower reads."""
        return self.config.history

    def windows(self, histories: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The user tower's input for whole histories: each one's last W items, left-padded
        (ids [B, W], mask [B, W]); callers pass full histories and never trim them."""
        return left_pad(histories, self.window)

    def text_tower(self) -> TextTower:
        """The text tower, or an error naming the knob for a model without one."""
        if self.text is None:
            raise ValueError("this model reads no item text (item-text = false): it has no text tower for new "
                             "items or free-text profiles")
        return self.text

    def id_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> their id embeddings [..., dim] (through the rank's map when low-rank)."""
        vectors = self.item_ids(ids)
        return vectors if self.id_map is None else self.id_map(vectors)

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, M] (text rows; ids past the id table have no id embedding) -> [B, M, dim]."""
        if self.text is None:
            return self.id_vectors(ids)
        vectors = self.project(self.text(ids))
        if self.item_ids is None:
            return vectors
        known = ids < self.n_items
        return vectors + self.id_vectors(torch.where(known, ids, 0)) * known[..., None]

    def catalog_vectors(self) -> torch.Tensor:
        """[n_items, dim]: every catalog item, computed once and shared by a whole batch."""
        ids = torch.arange(self.n_items, device=self.item_ids.weight.device) if self.item_ids is not None else None
        if self.text is None:
            return self.id_vectors(ids)
        vectors = self.project(self.text.catalog(self.n_items))  # not texts added past the catalog
        if self.item_ids is None:
            return vectors
        return vectors + self.id_vectors(ids)

    def user_states(self, history_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """history_vectors [B, L, dim] left-padded (mask [B, L] True on items) -> states [B, L, dim].

        The state at position t summarises items up to t; the last one is the user vector.
        """
        x = self._embed(history_vectors, mask)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def last_state(self, history_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`user_states(...)[:, -1]` [B, dim], with the top block run at the last position
        only: nothing reads its other positions (half of a serving batch's time)."""
        x = self._embed(history_vectors, mask)
        *lower, top = self.blocks
        for block in lower:
            x = block(x, mask)
        return self.norm(top.last(x, mask))

    def _embed(self, history_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = history_vectors.shape
        positions = torch.arange(self.window + 1 - length, self.window + 1, device=mask.device).expand(batch, -1)
        return self.dropout(history_vectors * math.sqrt(self.config.dim) + self.position(positions)) * mask[..., None]

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
        vectors = rows_of(catalog, safe) if catalog is not None else self.item_vectors(safe)
        if profiles is not None:
            vectors = torch.cat([profiles[:, None], vectors], dim=1)
            mask = torch.cat([has_profile[:, None], mask], dim=1)
        return self.last_state(vectors, mask)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Vectors [n, dim] of free texts (user profiles), read like item texts."""
        return self.project(self.text_tower().encode(texts))

    def cold_item_vectors(self, cache: CatalogCache) -> torch.Tensor:
        """Vectors [n, dim] of texts from their frozen-prefix rows (`build_cache`), read like
        item texts with no id embedding: items added after training, or profiles."""
        return self.project(self.text_tower().read(cache))

    def add_items(self, texts: list[str]) -> torch.Tensor:
        """Vectors [n, dim] of new items from their text alone (no id embedding: cold items)."""
        return self.item_vectors(self.text_tower().add_texts(texts)[None])[0]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that train and are federated (adapters, user tower, projection),
        by name; the frozen encoder is not among them."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The federated part: every trainable tensor, by name (detached copies)."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
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
        return sum(p.numel() * p.element_size() for p in self.trainable_parameters().values())


def left_pad(sequences: list, length: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `length` items of each sequence, left-padded: (ids [B, L], mask [B, L]).
    A few numpy calls for the whole batch (two tensors a row cost 2 ms of a 64-query
    serving batch)."""
    counts = np.fromiter((min(len(seq), length) for seq in sequences), np.int64, len(sequences))
    mask = np.arange(length)[None, :] >= (length - counts)[:, None]  # [B, L]: each row's tail
    ids = np.full(mask.shape, pad, dtype=np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(seq[len(seq) - c:] for seq, c in zip(sequences, counts)),
                            np.int64, int(counts.sum()))  # row-major: each row's tail, in order
    return torch.from_numpy(ids), torch.from_numpy(mask)


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
            ids, mask = (t.to(catalog.device) for t in model.windows(histories[start : start + batch_size]))
            out.append(model.user_vectors(ids, mask, catalog) @ catalog.T)
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.n_items)


def sequence_states(model: Recommender, catalog: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor,
                    profiles: torch.Tensor | None = None) -> torch.Tensor:
    """User states [B, L, dim] at every position of left-padded sequences [B, L] (mask marks
    the positions with a target), reading item vectors from `catalog` [n_items, dim]. An
    input below 0 (a START marker) is not an item, so its state is exactly that of an empty
    history. profiles [B]: the text row of each sequence's free-text profile in the model's
    text tower (-1: none), read before the items as `user_vectors` reads it."""
    items = mask & (inputs >= 0)
    vectors = rows_of(catalog, torch.where(items, inputs, 0))
    if profiles is not None:
        given = profiles >= 0
        shown = torch.zeros(len(profiles), 1, vectors.shape[-1])  # hidden slots are masked out
        shown[given] = model.item_vectors(profiles[given][:, None])  # only the profiles shown
        vectors = torch.cat([shown, vectors], dim=1)
        items = torch.cat([given[:, None], items], dim=1)
    return model.user_states(vectors, items)[:, -inputs.shape[1]:]


def hide_items(logits: torch.Tensor, ids: torch.Tensor, present: torch.Tensor, targets: torch.Tensor
               ) -> torch.Tensor:
    """logits [..., n_items] with the items ids [..., K] (where `present`) at -inf, never a
    row's target [...]. No shape depends on the data (torch.func.vmap batches it)."""
    counts = torch.zeros_like(logits).scatter_add(-1, ids.clamp(min=0), present.to(logits.dtype))
    hidden = (counts > 0).scatter(-1, targets.clamp(min=0)[..., None], False)
    return logits.masked_fill(hidden, float("-inf"))


def earlier_items(inputs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For `hide_items`: the items input at or before each position of `inputs` [..., L]
    (mask: real positions; an input below 0 is no item), as ids and `present` [..., L, L]."""
    length = inputs.shape[-1]
    present = (mask & (inputs >= 0))[..., None, :] & causal_mask(length, inputs.device)
    return inputs[..., None, :].expand(*inputs.shape, length), present


def seen_candidates(inputs: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """[B, L, C]: True where candidate c of candidates [B, C] is among the items input at or
    before each position of `inputs` [B, L] (mask: real items)."""
    return (((inputs[..., None] == candidates[:, None, :]) & mask[..., None]).cumsum(1) > 0)


def sequence_loss(model: Recommender, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  profiles: torch.Tensor | None = None):
    """Full-catalog softmax at every position of left-padded sequences [B, L] with a target
    (mask), averaged over those positions (fast path; see `sequence_states`)."""
    catalog = model.catalog_vectors()
    logits = sequence_states(model, catalog, inputs, mask, profiles)[mask] @ catalog.T
    if model.config.hide_seen:  # the evaluation ranks none of a user's earlier items
        ids, present = earlier_items(inputs, mask)
        logits = hide_items(logits, ids[mask], present[mask], targets[mask])
    return F.cross_entropy(logits, targets[mask])


def masked_sequence_loss(model: Recommender, inputs: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """`sequence_loss` (no profiles) as a masked mean over all B x L positions, 0 with no
    target: no shape depends on the data, so torch.func.vmap batches it over users whose
    batches are padded to one shape."""
    catalog = model.catalog_vectors()
    logits = sequence_states(model, catalog, inputs, mask) @ catalog.T  # [B, L, n_items]
    if model.config.hide_seen:
        logits = hide_items(logits, *earlier_items(inputs, mask), targets)
    losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
    weights = mask.flatten().to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def example_loss(
    model: Recommender,
    history_ids: torch.Tensor,
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
        logits = model.user_vectors(history_ids, mask, catalog) @ catalog.T
        if model.config.hide_seen:
            logits = hide_items(logits, history_ids, mask, targets)
        return F.cross_entropy(logits, targets)
    candidates = torch.cat([targets[:, None], negatives], dim=1)  # [B, 1 + N]
    width = history_ids.shape[1]
    vectors = model.item_vectors(torch.cat([torch.where(mask, history_ids, 0), candidates], dim=1))
    users = model.user_states(vectors[:, :width], mask)[:, -1]
    logits = torch.einsum("bd,bmd->bm", users, vectors[:, width:])
    collide = negatives == targets[:, None]
    if model.config.hide_seen:
        collide = collide | seen_candidates(history_ids, mask, negatives)[:, -1]
    collide = torch.cat([torch.zeros_like(targets[:, None], dtype=torch.bool), collide], 1)
    logits = logits.masked_fill(collide, float("-inf"))
    return F.cross_entropy(logits, torch.zeros_like(targets))


def build_recommender(texts: list[str], config: RecommenderConfig, progress: bool = True) -> Recommender:
    """A fresh model over a catalog, with the frozen prefix loaded from (or built into) the cache."""
    from shared_model.encoder import load_or_build_cache

    if not config.item_text:
        return Recommender(None, len(texts), config)
    cache = load_or_build_cache(texts, config.lora_layers, config.encoder_path, progress=progress)
    return Recommender(cache, len(texts), config)


def read_adapters(path) -> tuple[dict[str, torch.Tensor], RecommenderConfig]:
    """(trainable state, model config) of an adapters file written by a run (its config is
    in the file's metadata)."""
    from shared_model.state import load_state

    state, meta = load_state(path)
    if "model_config" not in meta:
        raise ValueError(f"{path}: not a fedrec adapters file (no model_config in its metadata)")
    return state, RecommenderConfig.from_dict(meta["model_config"])


def load_adapters_into(model: Recommender, state: dict[str, torch.Tensor], path) -> None:
    """`model.load_trainable_state`, with an error that names the file it came from."""
    try:
        model.load_trainable_state(state)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path} does not fit this catalog of {model.n_items} items: {error}") from None


def load_recommender(path, texts: list[str]) -> Recommender:
    """A model over `texts` holding the trainable state saved at `path`."""
    state, config = read_adapters(path)
    model = build_recommender(texts, config, progress=False)
    load_adapters_into(model, state, path)
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
        recent = torch.as_tensor(np.asarray(history[-self.model.window :], dtype=np.int64))
        mask = torch.ones(1, len(recent), dtype=torch.bool)
        if not len(recent):  # no history: one masked slot, the tower's prior
            recent, mask = torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.bool)
        scores = self.model.user_vectors(recent[None], mask, self.catalog)[0] @ self.catalog.T
        seen = np.asarray(history if exclude is None else exclude, dtype=np.int64)
        scores[torch.from_numpy(seen)] = float("-inf")
        best = torch.topk(scores, k)
        return best.indices, best.values
