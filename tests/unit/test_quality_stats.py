"""The issue-20 study's statistics (benchmarks/quality/study_analyze.py): the t-based 95%
interval, the in-schedule crossing step and the own-schedule interpolation, against values
worked out independently (published t quantiles, hand arithmetic)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "quality"))

from study_analyze import (  # noqa: E402
    ci,
    schedule_steps_to_reach,
    shard_per_kind,
    steps_to_reach,
    t975,
)


def test_t_interval():
    # Student's t 0.975 quantiles (standard tables): df 2 4.3027, df 4 2.7764, df 30 2.0423
    assert t975(2) == pytest.approx(4.3027, abs=6e-4)
    assert t975(4) == pytest.approx(2.7764, abs=6e-4)
    assert t975(30) == pytest.approx(2.0423, abs=6e-4)
    # x = 1..5: mean 3, sd sqrt(2.5), half-width 2.7764 * sqrt(2.5 / 5) = 1.96324
    c = ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert c["mean"] == 3.0 and c["sd"] == pytest.approx(math.sqrt(2.5))
    assert (c["lo"], c["hi"]) == pytest.approx((3 - 1.96324, 3 + 1.96324), abs=5e-4)
    assert "lo" not in ci([1.0])  # one value: no interval
    with pytest.raises(ValueError, match="df"):
        t975(0)


def test_sample_efficiency_interpolation():
    # in-schedule: loss 2.0 at step 100, 1.0 at step 200 -> 1.25 is crossed at step 175
    assert steps_to_reach([0, 100, 200], [3.0, 2.0, 1.0], 1.25) == pytest.approx(175.0)
    assert steps_to_reach([0, 100], [3.0, 2.0], 1.0) is None
    # own schedules: final 1.5 at T=500, 1.4 at T=1500; 1.45 is halfway in log T
    got = schedule_steps_to_reach({500: 1.5, 1500: 1.4}, 1.45)
    assert got == pytest.approx(math.sqrt(500 * 1500))
    assert schedule_steps_to_reach({500: 1.5, 1500: 1.4}, 1.39) is None  # beyond the longest
    assert schedule_steps_to_reach({500: 1.5, 1500: 1.4}, 1.6) == 500.0  # a bound


def test_shard_per_kind_accounting(tmp_path):
    # one step, 2 ranks, one embedding tensor cut in two pieces of 4 elements:
    # rank 0 keeps 3, rank 1 keeps 1. Shard factors 4/3 and 4/1; the whole tensor's 8/4 = 2;
    # shares 3/4 and 1/4. Rank 1 of a second (attn) tensor keeps nothing: its shard factor
    # is clamped to 1/1e-3 but weighs nothing (no kept element gets it).
    import numpy as np

    (tmp_path / "runs").mkdir()
    counts = np.array([[[[3, 4], [2, 2]], [[1, 4], [0, 2]]]], dtype=np.int32)  # (1, 2, 2, 2)
    np.savez(
        tmp_path / "runs" / "r.counts.npz",
        counts=counts,
        kinds=np.array(["embed", "attn"]),
        names=np.array(["embed.weight", "layers.0.attn.q_proj.weight"]),
        shard=np.array([True, True]),
    )
    got = shard_per_kind(tmp_path, "r")
    e0, e1 = got["embed"]
    assert (e0["kept"], e0["share"], e0["factor_shard"], e0["factor_global"]) == pytest.approx(
        (0.75, 0.75, 4 / 3, 2.0)
    )
    assert (e1["kept"], e1["share"], e1["factor_shard"], e1["factor_global"]) == pytest.approx(
        (0.25, 0.25, 4.0, 2.0)
    )
    a0, a1 = got["attn"]
    assert (a0["factor_shard"], a0["factor_global"]) == pytest.approx((1.0, 2.0))  # 2/2, 4/2
    assert (a1["kept"], a1["share"], a1["factor_shard"]) == (0.0, 0.0, 0.0)
    assert set(got) == {"embed", "attn"}
    assert shard_per_kind(tmp_path, "missing") is None
