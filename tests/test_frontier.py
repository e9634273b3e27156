"""The frontier benchmark runs in parts: results merge by variant, population and epsilon."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest

from simulations import bench_frontier
from simulations.bench_frontier import lift_kept


def arguments(tmp_path, *extra: str) -> list[str]:
    return ["--populations", "60", "--rounds", "1", "--cohort", "20", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "figures"), *extra]


def frontier(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "simulations.bench_frontier", *arguments(tmp_path, *extra)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def refusal(tmp_path, *extra: str) -> SimpleNamespace:
    """The benchmark's command line, in this process, for what it refuses before any
    federation (a Python start with torch costs seconds)."""
    err = io.StringIO()
    with mock.patch.object(sys, "argv", ["bench_frontier", *arguments(tmp_path, *extra)]), \
            contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stopped:
        bench_frontier.main()
    return SimpleNamespace(returncode=stopped.value.code, stderr=err.getvalue())


def test_frontier_parts_merge_and_a_variant_keeps_its_overrides(tmp_path):
    first = frontier(tmp_path, "--epsilons", "8", "--jobs", "2")  # the reference and epsilon 8 at once
    assert first.returncode == 0, first.stderr[-2000:]
    second = frontier(tmp_path, "--epsilons", "4")
    assert second.returncode == 0, second.stderr[-2000:]
    results = json.loads((tmp_path / "figures" / "frontier.json").read_text())
    found = results["variants"]["baseline"]["populations"]["60"]
    assert sorted(found["epsilon"]) == ["4", "8"]  # the second part added to the first
    assert found["users"] == 60 and found["sample rate"] == pytest.approx(20 / 60)
    assert len(found["commands"]) == 2 and {"AUC", "coverage@10", "Gini@10"} <= found["no noise"].keys()
    assert found["epsilon"]["4"]["noise multiplier"] > found["epsilon"]["8"]["noise multiplier"]
    for result in found["epsilon"].values():  # whichever of a part's federations finished first
        assert "lift kept" in result and result["lift kept"] == lift_kept(result, found)
    assert (tmp_path / "figures" / "frontier.png").stat().st_size > 0
    reference, = (tmp_path / "runs").glob("*-no-noise")  # no epsilon covers it, none is written
    private = [p for p in (tmp_path / "runs").iterdir() if p != reference]
    assert not (reference / "privacy_ledger.jsonl").exists()
    assert "NOT private" in json.loads((reference / "summary.json").read_text())["path"]
    assert len(private) == 2 and all((p / "privacy_ledger.jsonl").stat().st_size > 0 for p in private)
    clash = refusal(tmp_path, "--epsilons", "8", "--set", "server-dp-clip=2.0")
    assert clash.returncode == 2 and "variant 'baseline' was run with --set {}" in clash.stderr
    assert refusal(tmp_path, "--rounds", "2").returncode == 2  # another protocol: another --out
    refused = refusal(tmp_path, "--variant", "ids", "--set", "id-embeddings=true")  # before any federation
    assert refused.returncode == 2 and "--set: run config 'id-embeddings' must be false" in refused.stderr


def test_lift_kept_is_undefined_without_a_lift():
    population = {"popularity": {"NDCG@10": 0.05}, "no noise": {"NDCG@10": 0.15}}
    assert lift_kept({"NDCG@10": 0.14}, population) == pytest.approx(0.9)
    assert lift_kept({"NDCG@10": 0.1}, {**population, "no noise": {"NDCG@10": 0.04}}) is None
