"""benchmarks/gpu_check.py cannot run here (no GPU); its CPU-able parts must: argument
parsing, shape building, the capturable step against the planned step, the timing code."""

from __future__ import annotations

import pytest

from benchmarks import gpu_check


def test_gpu_check_dry_run_runs_on_cpu(tmp_path):
    res = gpu_check.main(["--dry-run", "--reps", "1", "--train-steps", "4", "--out", str(tmp_path)])
    assert res["shapes"] == {"tiny": len(gpu_check.SHAPES["tiny"])}
    assert set(res["parity_dry"]) == {"CAdamW", "CLion", "CSGD", "CAdamW factor_lag=1"}
    assert all(r["pass"] for r in res["parity_dry"].values()), res["parity_dry"]
    assert set(res["isolated"]["tiny"]["median_ms"]) == {
        "adamw_fused",
        "cadamw_eager",
        "cadamw_eager_lag1",
        "cadamw_capturable_eager",
    }
    assert set(res["in_training"]["tiny"]["median_ms"]) == {
        "adamw_fused",
        "cadamw_eager",
        "cadamw_eager_lag1",
    }
    assert (tmp_path / f"gpu_check_cpu_dry_run_{res['date'][:10]}.md").exists()


def test_gpu_check_shapes_are_the_llama_tensor_counts():
    assert len(gpu_check.SHAPES["60m"]) == 75
    assert len(gpu_check.SHAPES["1b"]) == 219
    with pytest.raises(SystemExit, match="unknown shape"):
        gpu_check.main(["--dry-run", "--shapes", "7b"])
