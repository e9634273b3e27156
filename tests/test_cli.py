"""The commands: `fedrec` (server side), `fedrec-device` (a device), the centralized
experiment, end to end on the built-in synthetic catalog."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_module(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's code


def test_centralized_writes_summary_with_model_and_baselines(tmp_path):
    done = run_module("simulations.centralized", "--epochs", "2", "--quiet", "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run_dir,) = tmp_path.glob("centralized-synthetic-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["test"]) == {"model", "popularity", "ease", "item-knn", "sasrec"}
    for name in summary["test"]:
        assert 0.0 <= summary["test"][name]["NDCG@10"] <= summary["test"][name]["HR@10"] <= 1.0
    assert summary["test"]["model"]["NDCG@10"] > summary["test"]["popularity"]["NDCG@10"]
    model, popular = summary["test"]["model"], summary["test"]["popularity"]
    for metrics in (model, popular):
        assert 0.5 < metrics["AUC"] < 1 and 0 < metrics["coverage@10"] <= 1 and 0 <= metrics["Gini@10"] < 1
        assert 0 <= metrics["long-tail@10"] <= 1 and metrics["popularity@10"] > 0
    assert popular["long-tail@10"] < 0.05 and popular["popularity@10"] > 2  # popularity recommends the head
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "best_adapters.safetensors").stat().st_size > 100_000
    assert summary["baselines"]["sasrec"]["model"]["item_text"] is False
    assert (run_dir / "sasrec" / "best_adapters.safetensors").is_file()
    assert all(name in done.stdout for name in ("ease", "item-knn", "sasrec", "NDCG@10", "long-tail@10"))


def test_bad_data_dir_is_a_clear_error(tmp_path):
    done = run_module("simulations.centralized", "--dataset", "ml-100k", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert f"{tmp_path}/u.genre: file not found" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, flag", [(["--epochs", "0"], "--epochs"), (["--lora-rank", "0"], "--lora-rank"),
                                        (["--dropout", "1.5"], "--dropout"), (["--heads", "5"], "--dim")])
def test_bad_flag_value_names_the_flag(tmp_path, args, flag):
    done = run_module("simulations.centralized", *args, cwd=tmp_path)
    assert done.returncode == 2 and f"argument {flag}: " in done.stderr and "Traceback" not in done.stderr


def test_the_product_commands_are_each_sides_own(tmp_path):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"fedrec": "server.cli:main", "fedrec-device": "client.cli:main"}
    server = run_module("server.cli", "--help", cwd=tmp_path)
    assert server.returncode == 0
    for command in ("serve", "recommend", "audit", "privacy", "deploy"):
        assert command in server.stdout
    assert "centralized" not in server.stdout.split("positional arguments")[1]  # an experiment, not the product
    done = run_module("client.cli", "prepare", "--synthetic-users", "50", "--partition", "3", "--out",
                      str(tmp_path / "device"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 user(s) of synthetic, partition 3 of 50 (per-user)" in done.stdout
    bad = run_module("client.cli", "prepare", "--synthetic-users", "50", "--partition", "50", "--out",
                     str(tmp_path / "d"), cwd=tmp_path)
    assert bad.returncode == 2 and "--partition must be between 0 and 49" in bad.stderr
