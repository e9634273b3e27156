"""bench_federated compare: several quality runs' curves in one JSON and one figure."""

import json

import pytest

from simulations.bench_federated import compare


def quality_run(tmp_path, name: str, tests: list[float]) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"upload-precision": name}))
    lines = [{"round": 0, "valid NDCG@10": 0.0, "test NDCG@10": 0.0}]
    lines += [{"round": 10 * (i + 1), "valid NDCG@10": t, "test NDCG@10": t, "seconds": 6.0} for i, t in enumerate(tests)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = tmp_path / f"{name}.json"
    result.write_text(json.dumps({"centralized test NDCG@10": 0.12, "final test NDCG@10": tests[-1],
                                  "run folder": str(folder)}))
    return str(result)


def test_compare_keeps_each_runs_config_and_curve_and_draws_them(tmp_path):
    rows = [f"fp16={quality_run(tmp_path, 'fp16', [0.05, 0.09])}", f"fp32={quality_run(tmp_path, 'fp32', [0.04])}"]
    result = compare(rows, tmp_path / "recipes")
    assert list(result) == ["fp16", "fp32"]
    assert result["fp16"]["run config"] == {"upload-precision": "fp16"}
    assert [m["test NDCG@10"] for m in result["fp16"]["by round"]] == [0.0, 0.05, 0.09]
    assert result["fp32"]["final test NDCG@10"] == 0.04
    assert (tmp_path / "recipes.png").stat().st_size > 0


@pytest.mark.parametrize("row", ["no-equals-sign", "missing=/no/such/bench_quality.json"])
def test_compare_names_the_row_it_cannot_read(tmp_path, row):
    with pytest.raises(SystemExit, match=row.partition("=")[0]):
        compare([row], tmp_path / "recipes")
