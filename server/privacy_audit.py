"""Audit of federated runs' privacy ledgers: every epsilon recomputed by an independent
accountant, disagreements above a tolerance flagged, and a Markdown report with plots."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared_model.privacy import TWIN, epsilon  # noqa: E402

TOLERANCE = 0.01


@dataclass
class RunAudit:
    folder: Path
    entries: list[dict]
    disagreements: list[dict] = field(default_factory=list)
    checked: int = 0
    summary: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name


def read_ledger(folder: Path) -> list[dict]:
    path = folder / "privacy_ledger.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no privacy ledger (was the run made with dp or server-dp?)")
    entries = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_no}: not JSON: {error}") from None
        missing = {"round", "client", "unit", "noise-multiplier", "sample-rate", "steps", "delta", "accountant",
                   "epsilon", "status"} - entry.keys()
        if missing:
            raise ValueError(f"{path}:{line_no}: entry lacks {sorted(missing)}")
        entry["line"] = line_no
        entries.append(entry)
    return entries


def audit_run(folder: Path, tolerance: float = TOLERANCE) -> RunAudit:
    """Replay each client's (and the server's) history in ledger order and recompute every
    epsilon with the twin accountant."""
    audit = RunAudit(Path(folder), read_ledger(Path(folder)))
    by_client: dict[tuple, list[dict]] = defaultdict(list)
    for entry in audit.entries:
        by_client[(str(entry["client"]), entry["unit"])].append(entry)
    for (client, unit), entries in by_client.items():
        if client == "server":  # user-level DP-FedAvg: one Poisson-sampled Gaussian per round
            history = []
            for entry in sorted(entries, key=lambda e: e["round"]):
                history = [(entry["noise-multiplier"], entry["sample-rate"], entry["round"])]
                check(audit, entry, history, tolerance)
            continue
        history = []
        for entry in entries:  # ledger order is the client's own order
            if entry["status"] == "trained":
                history.append((entry["noise-multiplier"], entry["sample-rate"], entry["steps"]))
            check(audit, entry, history, tolerance)
    summary_path = Path(folder) / "summary.json"
    audit.summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return audit


def check(audit: RunAudit, entry: dict, history: list, tolerance: float) -> None:
    recomputed = epsilon(history, entry["delta"], TWIN[entry["accountant"]])
    claimed = float(entry["epsilon"])
    audit.checked += 1
    if abs(recomputed - claimed) > tolerance * max(abs(claimed), 1e-12):
        audit.disagreements.append({**entry, "recomputed": recomputed, "accountant twin": TWIN[entry["accountant"]]})


def final_epsilons(audit: RunAudit, unit: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for entry in audit.entries:
        if entry["unit"] == unit and str(entry["client"]) != "server":
            out[str(entry["client"])] = max(out.get(str(entry["client"]), 0.0), float(entry["epsilon"]))
    return out


def plot_audits(audits: list[RunAudit], out: Path) -> list[str]:
    figures = []
    fig, (per_client, spread) = plt.subplots(1, 2, figsize=(11, 4))
    for audit in audits:
        for unit in ("example", "user"):
            clients = defaultdict(list)
            for e in audit.entries:
                if e["unit"] == unit and str(e["client"]) != "server":
                    clients[str(e["client"])].append((e["round"], e["epsilon"]))
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

    servers = [(a, [e for e in a.entries if str(e["client"]) == "server"]) for a in audits]
    if any(entries for _, entries in servers):
        fig, ax = plt.subplots(figsize=(6, 4))
        for audit, entries in servers:
            if entries:
                ax.plot([e["round"] for e in entries], [e["epsilon"] for e in entries], "-", label=audit.name)
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
    values = [float(e["epsilon"]) for e in audit.entries]
    return max(values) if values else None


def write_report(audits: list[RunAudit], out: Path, tolerance: float = TOLERANCE) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_audits(audits, out)
    lines = ["# Privacy audit", "",
             f"Every epsilon in each ledger was recomputed from the history before it with a second, "
             f"independent accountant (rdp: dp-accounting's RDP; prv: dp-accounting's PLD; pld: Opacus's PRV). "
             f"Tolerance {tolerance:.0%}.", "",
             "| run | entries checked | disagreements | unit | clients | largest epsilon | delta | accountant | "
             "declined | test NDCG@10 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for audit in audits:
        for unit in sorted({e["unit"] for e in audit.entries}):
            mine = [e for e in audit.entries if e["unit"] == unit]
            worst = max(mine, key=lambda e: e["epsilon"])
            clients = len({str(e["client"]) for e in mine})
            declined = sum(1 for e in mine if e["status"] == "declined")
            ndcg = audit.summary.get("test", {}).get("NDCG@10")
            lines.append(f"| {audit.name} | {audit.checked} | {len(audit.disagreements)} | {unit} | {clients} | "
                         f"{worst['epsilon']:.4f} | {worst['delta']:g} | {worst['accountant']} | {declined} | "
                         f"{'' if ndcg is None else f'{ndcg:.4f}'} |")
    groups = [e for a in audits for e in a.entries if "group-epsilon" in e]
    if groups:
        worst = max(groups, key=lambda e: e["epsilon"])
        lines += ["", f"Unit `example`: one interaction is the target of one example and sits in the input window "
                  f"of up to {worst['group-size'] - 1} later ones, so it is protected only through group privacy "
                  f"over {worst['group-size']} examples: epsilon {worst['group-epsilon']:.1f}, delta "
                  f"{worst['group-delta']:.3g} at the worst client. User-level protection comes from the "
                  f"server's DP-FedAvg (unit `user`)."]
    bad = [d for a in audits for d in a.disagreements]
    lines += ["", "## Disagreements", ""]
    if bad:
        lines += ["| run | ledger line | client | round | claimed | recomputed |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {d['run'] if 'run' in d else ''} | {d['line']} | {d['client']} | {d['round']} | "
                  f"{d['epsilon']:.6g} | {d['recomputed']:.6g} |" for d in bad]
    else:
        lines.append("None: every claimed epsilon was reproduced.")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    path = out / "privacy_audit.md"
    path.write_text("\n".join(lines) + "\n")
    return path
