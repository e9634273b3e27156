"""The `fedrec` console script, end to end on the built-in synthetic catalog."""

import json
import subprocess
import sys


def run_fedrec(*args, cwd):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_centralized_writes_summary_with_model_and_baselines(tmp_path):
    done = run_fedrec("centralized", "--epochs", "2", "--quiet", "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run_dir,) = tmp_path.glob("centralized-synthetic-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("model", "popularity", "ease"):
        assert 0.0 <= summary["test"][name]["NDCG@10"] <= summary["test"][name]["HR@10"] <= 1.0
    assert summary["test"]["model"]["NDCG@10"] > summary["test"]["popularity"]["NDCG@10"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "best_adapters.safetensors").stat().st_size > 100_000
    assert "ease" in done.stdout and "NDCG@10" in done.stdout


def test_bad_data_dir_is_a_clear_error(tmp_path):
    done = run_fedrec("centralized", "--dataset", "ml-100k", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert f"{tmp_path}/u.genre: file not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_flag_value_names_the_flag(tmp_path):
    done = run_fedrec("centralized", "--epochs", "0", cwd=tmp_path)
    assert done.returncode == 2 and "--epochs" in done.stderr
