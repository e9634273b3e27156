"""The tree aggregation mechanism's noise (DP-FTRL: Kairouz, McMahan, Song, Thakkar,
Thakurta and Xu 2021, "Practical and private (deep) learning without sampling or
shuffling"), for the prefix sums of one tree of rounds.

Every node of a binary tree over rounds 1, 2, ... holds the sum of the updates of its
dyadic interval of rounds plus its own N(0, std^2) noise, drawn once. The prefix sum of
rounds 1..t is read from the nodes of t's binary decomposition (popcount(t) of them), so
its noise has variance popcount(t) std^2 (not t std^2, as independent noise each round
would give), and one client's update, in one round of the tree, is in one node per level:
ceil(log2(T + 1)) nodes of a tree of T rounds. Releasing the round's part of the prefix
sum, x_t + noise(1..t) - noise(1..t-1), is post-processing of the prefix sums.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np


def depth(rounds: int) -> int:
    """Levels of a tree of `rounds` leaves that one leaf is in: ceil(log2(rounds + 1))."""
    return int(rounds).bit_length()


def intervals(t: int) -> list[tuple[int, int]]:
    """The tree's nodes, (level, index), whose dyadic intervals make up rounds 1..t: node
    (l, i) sums rounds i 2^l + 1 .. (i + 1) 2^l."""
    nodes, start = [], 0
    for level in reversed(range(t.bit_length())):
        if t >> level & 1:
            nodes.append((level, start >> level))
            start += 1 << level
    return nodes


class TreeNoise:
    """The node noises of one tree, each drawn once, when first needed, from `randomness`
    (a fresh generator per draw: OS entropy in a run)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], std: float,
                 randomness: Callable[[], np.random.Generator]):
        self.shapes, self.std, self.randomness = dict(shapes), std, randomness
        self.nodes: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def node(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        if key not in self.nodes:
            rng = self.randomness()
            self.nodes[key] = {k: rng.normal(0.0, self.std, size=shape) for k, shape in self.shapes.items()}
        return self.nodes[key]

    def prefix(self, t: int) -> dict[str, np.ndarray]:
        """The noise on the prefix sum of rounds 1..t (zero for t = 0)."""
        total = {k: np.zeros(shape) for k, shape in self.shapes.items()}
        for key in intervals(t):
            for k, value in self.node(key).items():
                total[k] += value
        return total

    def round_noise(self, t: int) -> dict[str, np.ndarray]:
        """The noise on round t's release: noise(1..t) - noise(1..t-1)."""
        now, before = self.prefix(t), self.prefix(t - 1)
        return {k: now[k] - before[k] for k in now}
