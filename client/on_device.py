"""On-device scoring: a device ranks the public catalog for its own user from its local
history and the global adapters. The history is read here and sent nowhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared_model.recommender import Ranker, load_recommender


class OnDeviceRanker:
    def __init__(self, adapters: Path, catalog_texts: list[str]):
        self.texts = catalog_texts
        self.ranker = Ranker(load_recommender(adapters, catalog_texts))

    def top_k(self, history: np.ndarray, k: int = 10) -> list[tuple[int, float, str]]:
        """(catalog index, score, text) of the k best items the user has not seen."""
        ids, scores = self.ranker.top_k(np.asarray(history, dtype=np.int64), k)
        return [(int(i), float(s), self.texts[int(i)]) for i, s in zip(ids, scores) if torch.isfinite(s)]
