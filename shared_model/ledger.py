"""The privacy ledger: one typed entry per spend (or decline), append-only, on the client,
the server and in the audit alike.

An entry holds the whole of one mechanism's use, so its epsilon can be recomputed from
the entries before it: the Gaussian's noise multiplier, the Poisson rate and steps, the
unit protected, delta, accountant and neighbouring relation. A line that cannot be read
fails closed, naming the file and line: a torn or forged ledger is never a fresh budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from shared_model.files import JsonLinesError, append_lines, read_jsonl
from shared_model.privacy import ACCOUNTANTS, RELATION, Events, tree_steps
from shared_model.square_root_noise import square_root_weight

UNITS = ("example", "user")
STATUSES = ("trained", "declined", "aggregated")


class LedgerError(ValueError):
    """A ledger line that is not a valid entry (the message names the file and line)."""


@dataclass(frozen=True)
class LedgerEntry:
    client: str  # the device's sampling key, or "server" for DP-FedAvg
    round: int
    status: str  # "trained" (a client spent), "declined" (it did not), "aggregated" (the server's DP-FedAvg)
    unit: str  # what one add/remove step protects: one "example" or one "user" (all their data)
    noise_multiplier: float
    sample_rate: float
    steps: int  # steps this entry spent (0 when declined)
    delta: float
    accountant: str
    epsilon: float  # everything this client (or the server) has spent up to and including this entry
    budget: float | None = None  # the client's whole budget (None: the server has none)
    relation: str = RELATION
    window: int | None = None  # unit "example": the history window W an interaction spans
    interaction_epsilon: float | None = None  # unit "example": per interaction, same delta
    run: str = ""
    clip: float | None = None  # the server's DP-FedAvg: the round's clip S
    # adaptive clipping: the noise multiplier on the updates and the count's noise std; with them
    # noise_multiplier is the total z (privacy.total_noise_multiplier), which the audit recomputes
    update_noise_multiplier: float | None = None
    count_noise: float | None = None
    # secure aggregation: the server saw only sums of at least this many clients' noised updates
    # (against it, no amplification by sampling: privacy.server_epsilon, from the entries' rounds)
    min_survivors: int | None = None
    # secure aggregation: the round's cohort cap n_max and beta, the chance that the others' sample
    # alone reached it, which the guarantee's delta pays for (dp_aggregation.cohort_cap); epsilon is
    # computed at `accountant_delta`: delta minus every beta up to and including this round
    cohort_cap: int | None = None
    cap_tail: float | None = None
    # DP-FTRL: the round's place in its tree (1 starts a tree, or an epoch of the square-root noise);
    # steps is what it adds to the tree's depth (privacy.tree_steps), at rate 1: no amplification
    tree_round: int | None = None
    # DP-FTRL with dp-ftrl-noise "square-root" (absent: the tree): one step whose noise multiplier
    # is z / f_{t-1}, t the tree-round (square_root_noise.square_root_weight: f_{t-1}^2)
    ftrl_noise: str | None = None
    # secure aggregation and DP-FTRL: the population N the run sampled from (public, as DP-FedAvg's
    # normaliser q N makes it); DP-FTRL: its clients a round C (a tree has at most N // C rounds)
    population: int | None = None
    cohort: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.status not in STATUSES:
            problems.append(f"status {self.status!r} is not one of {STATUSES}")
        if self.unit not in UNITS:
            problems.append(f"unit {self.unit!r} is not one of {UNITS}")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant {self.accountant!r} is not one of {ACCOUNTANTS}")
        if self.relation != RELATION:
            problems.append(f"relation {self.relation!r}: every epsilon here is for {RELATION!r}")
        for name in ("noise_multiplier", "sample_rate", "delta", "epsilon", "budget", "interaction_epsilon", "clip",
                     "update_noise_multiplier", "count_noise", "cap_tail"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                problems.append(f"{name.replace('_', '-')} {value!r} is not a finite number >= 0")
        if not self.noise_multiplier > 0:
            problems.append("noise-multiplier must be positive")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample-rate {self.sample_rate} is not in (0, 1]")
        if not 0 < self.delta < 1:
            problems.append(f"delta {self.delta} is not in (0, 1)")
        if self.ftrl_noise not in (None, "square-root") or (self.ftrl_noise and self.tree_round is None):
            problems.append(f"ftrl-noise {self.ftrl_noise!r} (DP-FTRL's \"square-root\", with its tree-round; absent: "
                            "the tree)")
        if self.tree_round is not None:
            if self.population is None or self.cohort is None or not 1 <= self.cohort <= self.population:
                problems.append("a DP-FTRL entry needs its population and cohort (1 <= cohort <= population)")
            elif self.tree_round > self.population // self.cohort:
                problems.append(f"tree-round {self.tree_round} beyond population // cohort = "
                                f"{self.population // self.cohort} (each client at most once a tree)")
            steps = 1 if self.ftrl_noise == "square-root" else tree_steps(max(self.tree_round, 1))
            if self.tree_round < 1 or self.client != "server" or self.sample_rate != 1.0 or self.steps != steps:
                problems.append(f"tree-round {self.tree_round} (DP-FTRL: the server's, from 1, at rate 1, "
                                f"with the steps it adds to the tree's depth, or 1 with the square-root noise), "
                                f"not steps {self.steps} at rate {self.sample_rate}")
        elif (self.status == "declined") != (self.steps == 0) or self.steps < 0:
            problems.append(f"steps {self.steps} with status {self.status!r} (a decline spends none, a spend some)")
        if (self.client == "server") != (self.status == "aggregated"):
            problems.append(f"status {self.status!r} for client {self.client!r} (only the server aggregates)")
        if (self.update_noise_multiplier is None) != (self.count_noise is None):
            problems.append("update-noise-multiplier and count-noise come together (adaptive clipping)")
        if self.min_survivors is not None and (self.client != "server" or self.min_survivors < 2):
            problems.append(f"min-survivors {self.min_survivors} (secure aggregation: the server's, at least 2)")
        if (self.cohort_cap is None) != (self.min_survivors is None) or (self.cap_tail is None) != (
                self.min_survivors is None):
            problems.append("cohort-cap and cap-tail come with min-survivors (secure aggregation)")
        elif self.cohort_cap is not None and self.population is None:
            problems.append("a secure aggregation entry needs its population (its cap's edges are recomputed from it)")
        elif self.cohort_cap is not None and (self.cohort_cap < self.min_survivors or not self.cap_tail < self.delta):
            problems.append(f"cohort-cap {self.cohort_cap} below min-survivors, or cap-tail {self.cap_tail} not below "
                            f"delta {self.delta}")
        if self.client != "server" and self.budget is None:
            problems.append("a client's entry needs its budget")
        if self.unit == "example" and self.client != "server" and (self.window is None or self.window < 1):
            problems.append("an example-level entry needs its window W")
        if problems:
            raise ValueError("; ".join(problems))

    def step(self) -> tuple[float, float, int]:
        """(noise multiplier, rate, steps) of the accountant's event: with the square-root noise
        the round's Gaussian has sensitivity f_{t-1} (of the epoch's first client), so z / f_{t-1}."""
        if self.ftrl_noise == "square-root":
            return self.noise_multiplier / math.sqrt(square_root_weight(self.tree_round)), 1.0, 1
        return self.noise_multiplier, self.sample_rate, self.steps

    def to_json(self) -> dict:
        return {f.name.replace("_", "-"): v for f, v in zip(fields(self), asdict(self).values()) if v is not None}

    @classmethod
    def from_json(cls, value: object, where: str) -> LedgerEntry:
        if not isinstance(value, dict):
            raise LedgerError(f"{where}: expected a JSON object, found {type(value).__name__}")
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise LedgerError(f"{where}: unknown field(s) {unknown}")
        kinds = {"str": str, "int": int, "float": float}
        values = {}
        for key, f in known.items():
            if key not in value:
                if f.default is not MISSING:
                    continue
                raise LedgerError(f"{where}: missing field '{key}'")
            raw, kind = value[key], f.type.split(" | ")[0]
            if kind == "float" and isinstance(raw, int) and not isinstance(raw, bool):
                raw = float(raw)
            if kind == "str" and key == "client" and isinstance(raw, int) and not isinstance(raw, bool):
                raw = str(raw)
            if not (type(raw) is kinds[kind] or (raw is None and "None" in f.type)):
                raise LedgerError(f"{where}: field '{key}' should be {kind}, found {raw!r}")
            values[f.name] = raw
        try:
            return cls(**values)
        except ValueError as error:
            raise LedgerError(f"{where}: {error}") from None


def read_ledger(path: Path) -> list[LedgerEntry]:
    """Every entry of a ledger file, in order (an absent file is an empty ledger). A torn
    line fails closed, even the last: an entry half written may be a spend."""
    try:
        lines = read_jsonl(path)
    except JsonLinesError as error:
        raise LedgerError(str(error)) from None
    return [LedgerEntry.from_json(line.value, line.where) for line in lines]


def append_entries(path: Path, entries: list[LedgerEntry]) -> None:
    """Append and fsync (the file and, for a new file, its folder) before anything is sent."""
    append_lines(path, [json.dumps(e.to_json()) for e in entries])


def accountant_delta(entries: list[LedgerEntry]) -> float:
    """The delta the accountant gets after these entries (one client's, in order): the
    last entry's delta minus what secure aggregation's cohort caps spent (their tails)."""
    left = entries[-1].delta - sum(e.cap_tail or 0.0 for e in entries)
    if not left > 0:
        raise ValueError(f"the cohort caps' tails spent all of delta {entries[-1].delta}")
    return left


def tree_lengths(entries: list[LedgerEntry]) -> list[tuple[int, float, str]]:
    """DP-FTRL: (rounds, noise multiplier, "tree" or "square-root") of each tree so far (a
    tree-round of 1 starts a tree; its noise is the least of its entries'; one kind, one
    population and cohort a tree, and with the square-root noise one noise multiplier: where
    it varied, a later round's user could be worse off than the first round's, whom the
    entries account)."""
    trees: list[tuple[int, float, str]] = []
    shape: tuple[int | None, int | None] = (None, None)
    for e in entries:
        if e.tree_round is None:
            continue
        kind = e.ftrl_noise or "tree"
        if e.tree_round == 1:
            trees.append((0, e.noise_multiplier, kind))
        if not trees or e.tree_round != trees[-1][0] + 1:
            raise ValueError(f"round {e.round}: tree-round {e.tree_round} does not follow "
                             f"{trees[-1][0] if trees else 'nothing'}")
        if kind != trees[-1][2]:
            raise ValueError(f"round {e.round}: {kind} noise within a tree of {trees[-1][2]} noise")
        if kind == "square-root" and e.noise_multiplier != trees[-1][1]:
            raise ValueError(f"round {e.round}: noise multiplier {e.noise_multiplier} within an epoch of square-root "
                             f"noise at {trees[-1][1]}")
        if e.tree_round > 1 and (e.population, e.cohort) != shape:
            raise ValueError(f"round {e.round}: population {e.population} and cohort {e.cohort} within a tree of "
                             f"{shape[0]} and {shape[1]}")
        shape = (e.population, e.cohort)
        trees[-1] = (e.tree_round, min(trees[-1][1], e.noise_multiplier), kind)
    return trees


def events_of(entries: list[LedgerEntry]) -> Events:
    """The accountant events of the entries that spent (trained or aggregated)."""
    return [e.step() for e in entries if e.status != "declined"]
