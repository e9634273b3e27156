"""Audit of federated runs' privacy ledgers: every epsilon (and per-interaction epsilon)
recomputed by an independent accountant, budgets checked, adaptive clipping's noise split
recomputed, disagreements above a tolerance flagged, and a Markdown report with plots.
Exit codes of `fedrec audit`: 0 clean, 1 a disagreement, 2 unreadable input (the message
names the file and line)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared_model.dp_aggregation import cap_edges  # noqa: E402
from shared_model.ledger import (LedgerEntry, LedgerError, accountant_delta, read_ledger,  # noqa: E402
                                 tree_lengths)
from shared_model.privacy import (TWIN, epsilon, interaction_epsilon, server_epsilon,  # noqa: E402
                                  total_noise_multiplier, tree_epsilon)

TOLERANCE = 0.01


class AuditInputError(ValueError):
    """A run folder or ledger the audit cannot read (exit code 2; names the file and line)."""


@dataclass
class RunAudit:
    folder: Path
    entries: list[LedgerEntry]
    disagreements: list[dict] = field(default_factory=list)
    checked: int = 0
    summary: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name


def read_run_ledger(folder: Path) -> list[LedgerEntry]:
    path = folder / "privacy_ledger.jsonl"
    if not path.is_file():
        raise AuditInputError(f"{path}: no privacy ledger (was the run made with dp or server-dp?)")
    try:
        entries = read_ledger(path)
    except LedgerError as error:
        raise AuditInputError(str(error)) from None
    if not entries:
        raise AuditInputError(f"{path}: the ledger is empty: a private run records every round")
    return entries


def audit_run(folder: Path, tolerance: float = TOLERANCE) -> RunAudit:
    """Replay each client's (and the server's) accountant events in ledger order and recompute every
    epsilon (and per-interaction epsilon) with the twin accountant; check every budget."""
    audit = RunAudit(Path(folder), read_run_ledger(Path(folder)))
    by_client: dict[str, list[tuple[int, LedgerEntry]]] = defaultdict(list)
    for line_no, entry in enumerate(audit.entries, start=1):
        by_client[entry.client].append((line_no, entry))
    for entries in by_client.values():
        events: list = []
        so_far: list[LedgerEntry] = []
        first = entries[0][1]
        for line_no, entry in entries:  # ledger order is the client's own order
            if entry.status != "declined":
                events.append(entry.step())
            so_far.append(entry)
            try:
                trees = tree_lengths(so_far)
            except ValueError as error:  # a tree that skips rounds or mixes noises: its depth cannot be read
                audit.disagreements.append({"line": line_no, "client": entry.client, "round": entry.round,
                                            "field": "tree-round", "claimed": entry.epsilon,
                                            "recomputed": float("nan"), "problem": str(error)})
                continue
            check(audit, line_no, entry, events, accountant_delta(so_far), tolerance, trees)
            changed = [k for k in ("unit", "delta", "accountant", "budget") if getattr(entry, k) != getattr(first, k)]
            if changed:  # one client, one calibration: anything else restarts an account
                audit.disagreements.append({"line": line_no, "client": entry.client, "round": entry.round,
                                            "field": ", ".join(changed), "claimed": entry.epsilon,
                                            "recomputed": float("nan"), "problem": "changed since the client's first entry"})
    summary_path = Path(folder) / "summary.json"
    audit.summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    check_against_the_server(audit, tolerance)
    return audit


def check_against_the_server(audit: RunAudit, tolerance: float) -> None:
    """Secure aggregation: the summary's epsilon against the server (no amplification: a
    Gaussian at rate 1 over the rounds a user takes part in, at most, from the server's
    entries' rounds and rate) recomputed with the twin accountant."""
    claim = audit.summary.get("privacy", {}).get("user", {}).get("against the server")
    server = [(n, e) for n, e in enumerate(audit.entries, start=1) if e.client == "server"]
    if claim is None or not server:
        return
    line_no, last = server[-1]
    twin = TWIN[last.accountant]
    recomputed, rounds = server_epsilon(last.noise_multiplier, last.sample_rate, len(server), last.delta, twin)
    audit.checked += 1
    if rounds != claim["rounds a user takes part in, at most"] or not (
            abs(recomputed - claim["epsilon"]) <= tolerance * max(abs(claim["epsilon"]), 1e-12)):
        audit.disagreements.append({"line": line_no, "client": "server", "round": last.round,
                                    "field": "epsilon against the server", "claimed": claim["epsilon"],
                                    "recomputed": recomputed,
                                    "problem": f"recomputed with {twin} at rate 1 over {rounds} rounds"})


def check(audit: RunAudit, line_no: int, entry: LedgerEntry, events: list, delta: float, tolerance: float,
          trees: list[tuple[int, float, str]]) -> None:
    """One entry's epsilons recomputed by the twin accountant (at `delta`: the entry's, less
    what secure aggregation's cohort caps spent); a DP-FTRL entry's by RDP also from
    dp-accounting's own events for each tree (`trees`: the rounds, noise and kind of each so far)."""
    twin = TWIN[entry.accountant]
    claims = [("epsilon", entry.epsilon, epsilon(events, delta, twin))]
    if entry.tree_round is not None and entry.accountant == "rdp":
        claims.append(("epsilon (tree aggregation or one Gaussian an epoch)", entry.epsilon,
                       tree_epsilon(trees, delta)))
    if entry.unit == "example" and entry.client != "server":  # a missing figure (NaN) never agrees
        claimed = float("nan") if entry.interaction_epsilon is None else entry.interaction_epsilon
        claims.append(("interaction-epsilon", claimed, interaction_epsilon(events, entry.window, entry.delta, twin)))
    for name, claimed, recomputed in claims:
        audit.checked += 1
        if not abs(recomputed - claimed) <= tolerance * max(abs(claimed), 1e-12):
            audit.disagreements.append({"line": line_no, "client": entry.client, "round": entry.round,
                                        "field": name, "claimed": claimed, "recomputed": recomputed,
                                        "problem": f"recomputed with {twin}"})
    if entry.count_noise is not None:
        check_noise_split(audit, line_no, entry, tolerance)
    if entry.cohort_cap is not None:
        edges = cap_edges(entry.population, entry.sample_rate, entry.cohort_cap, entry.min_survivors)
        audit.checked += 1
        if entry.cap_tail < edges * (1 - 1e-9):
            audit.disagreements.append({"line": line_no, "client": entry.client, "round": entry.round,
                                        "field": "cap-tail", "claimed": entry.cap_tail, "recomputed": edges,
                                        "problem": f"below its cap's edges (cohort-cap {entry.cohort_cap}, m "
                                                   f"{entry.min_survivors}, {entry.population} users)"})
    spent = max(entry.epsilon, claims[0][2])  # the budget holds for the claim and for the recomputed value
    if entry.budget is not None and spent > entry.budget * (1 + 1e-9):
        audit.disagreements.append({"line": line_no, "client": entry.client, "round": entry.round, "field": "budget",
                                    "claimed": spent, "recomputed": entry.budget,
                                    "problem": "spent more than its budget"})


def check_noise_split(audit: RunAudit, line_no: int, entry: LedgerEntry, tolerance: float) -> None:
    """Adaptive clipping: the noise on the updates and on the count must give the accounted
    total, z^-2 = z_delta^-2 + (2 sigma_b)^-2 (privacy.total_noise_multiplier)."""
    audit.checked += 1
    total = total_noise_multiplier(entry.update_noise_multiplier, entry.count_noise)
    if not abs(total - entry.noise_multiplier) <= tolerance * entry.noise_multiplier:
        audit.disagreements.append({
            "line": line_no, "client": entry.client, "round": entry.round, "field": "noise-multiplier",
            "claimed": entry.noise_multiplier, "recomputed": total,
            "problem": f"update noise {entry.update_noise_multiplier:.6g} and count noise {entry.count_noise:.6g} give "
                       "this total (adaptive clipping: Andrew et al. 2021, Theorem 1)"})


def final_epsilons(audit: RunAudit, unit: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for entry in audit.entries:
        if entry.unit == unit and entry.client != "server":
            out[entry.client] = max(out.get(entry.client, 0.0), entry.epsilon)
    return out


def plot_audits(audits: list[RunAudit], out: Path) -> list[str]:
    figures = []
    fig, (per_client, spread) = plt.subplots(1, 2, figsize=(11, 4))
    for audit in audits:
        for unit in ("example", "user"):
            clients = defaultdict(list)
            for e in audit.entries:
                if e.unit == unit and e.client != "server":
                    clients[e.client].append((e.round, e.epsilon))
            for i, points in enumerate(list(clients.values())[:50]):
                per_client.plot(*zip(*points), "-", alpha=0.4, label=f"{audit.name} ({unit})" if i == 0 else None)
            finals = list(final_epsilons(audit, unit).values())
            if finals:
                spread.hist(finals, bins=20, alpha=0.6, label=f"{audit.name} ({unit}, {len(finals)} clients)")
    per_client.set_xlabel("round")
    per_client.set_ylabel("epsilon spent")
    per_client.set_title("epsilon per client over rounds (up to 50 clients a run)")
    spread.set_xlabel("final epsilon")
    spread.set_ylabel("clients")
    spread.set_title("distribution across clients")
    for ax in (per_client, spread):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "epsilon_per_client.png", dpi=110)
    plt.close(fig)
    figures.append("epsilon_per_client.png")

    servers = [(a, [e for e in a.entries if e.client == "server"]) for a in audits]
    if any(entries for _, entries in servers):
        fig, ax = plt.subplots(figsize=(6, 4))
        for audit, entries in servers:
            if entries:
                ax.plot([e.round for e in entries], [e.epsilon for e in entries], "-", label=audit.name)
        ax.set_xlabel("round")
        ax.set_ylabel("user-level epsilon (DP-FedAvg)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "user_epsilon.png", dpi=110)
        plt.close(fig)
        figures.append("user_epsilon.png")

    points = [(claimed_epsilon(a), a.summary.get("test", {}).get("NDCG@10"), a.name) for a in audits]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if len(points) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for eps, ndcg, name in points:
            ax.plot(eps, ndcg, "o")
            ax.annotate(name, (eps, ndcg), fontsize=7)
        ax.set_xlabel("largest epsilon claimed")
        ax.set_ylabel("test NDCG@10")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "utility_vs_epsilon.png", dpi=110)
        plt.close(fig)
        figures.append("utility_vs_epsilon.png")
    return figures


def claimed_epsilon(audit: RunAudit) -> float | None:
    values = [e.epsilon for e in audit.entries]
    return max(values) if values else None


def write_report(audits: list[RunAudit], out: Path, tolerance: float = TOLERANCE) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_audits(audits, out)
    lines = ["# Privacy audit", "",
             f"Every epsilon in each ledger was recomputed from the accountant events before it with a second, "
             f"independent accountant (rdp: dp-accounting's RDP; prv: dp-accounting's PLD; pld: Opacus's PRV). "
             f"Tolerance {tolerance:.0%}.", "",
             "| run | entries checked | disagreements | unit | clients | largest epsilon | delta | accountant | "
             "declined | test NDCG@10 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for audit in audits:
        for unit in sorted({e.unit for e in audit.entries}):
            mine = [e for e in audit.entries if e.unit == unit]
            worst = max(mine, key=lambda e: e.epsilon)
            clients = len({e.client for e in mine})
            declined = sum(1 for e in mine if e.status == "declined")
            ndcg = audit.summary.get("test", {}).get("NDCG@10")
            lines.append(f"| {audit.name} | {audit.checked} | {len(audit.disagreements)} | {unit} | {clients} | "
                         f"{worst.epsilon:.4f} | {worst.delta:g} | {worst.accountant} | {declined} | "
                         f"{'' if ndcg is None else f'{ndcg:.4f}'} |")
    examples = [e for a in audits for e in a.entries if e.interaction_epsilon is not None]
    if examples:
        worst = max(examples, key=lambda e: e.interaction_epsilon)
        lines += ["", f"Unit `example`: one interaction is the target of one example and sits in the input window "
                  f"of up to W = {worst.window} later ones, so removing it moves the clipped sum by up to "
                  f"(2W + 1) C; accounted as such (noise multiplier z / {2 * worst.window + 1}, no amplification) "
                  f"it has epsilon {worst.interaction_epsilon:.4g} at delta {worst.delta:g} at the worst client. "
                  f"Example-level DP over overlapping windows protects one interaction weakly: use unit `user`."]
    bad = [d for a in audits for d in a.disagreements]
    lines += ["", "## Disagreements", ""]
    if bad:
        lines += ["| run | ledger line | client | round | field | claimed | recomputed or budget | problem |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {a.name} | {d['line']} | {d['client']} | {d['round']} | {d['field']} | {d['claimed']:.6g} | "
                  f"{d['recomputed']:.6g} | {d['problem']} |" for a in audits for d in a.disagreements]
    else:
        lines.append("None: every claimed epsilon was reproduced.")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    path = out / "privacy_audit.md"
    path.write_text("\n".join(lines) + "\n")
    return path
