"""The device-scalar step under FSDP2-layout DTensor shards (world 2, gloo): the eager
capturable step and ``torch.compile(opt.step)`` equal the planned step, one process on whole
tensors and the float64 oracle; dynamo makes one graph without a break (the count
all-reduce is a functional collective); the same with ``factor_lag=1``. Worker:
tests/dist/workers/compile_worker.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist.harness import torchrun

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "compile_worker.py"


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "out.json"
    torchrun(WORKER, 2, [out], timeout=400)
    return json.loads(out.read_text())


def test_fsdp2_compiled_step_is_one_graph_without_breaks(result):
    assert result["graph_breaks"] == 0, result["break_reasons"]
    assert result["graphs"] == 1


def test_fsdp2_capturable_and_compiled_steps_equal_eager_and_the_oracle(result):
    assert result["planned_vs_whole"] <= 1e-6
    assert result["capturable_vs_whole"] <= 1e-6
    assert result["compiled_vs_whole"] <= 1e-6
    assert result["compiled_vs_planned"] <= 1e-6
    assert result["capturable_vs_planned"] <= 1e-6
    assert result["compiled_vs_oracle"] <= 1e-6
    assert result["steps"] == [8.0] * 4
    assert result["is_dtensor_state"]
    # counts summed over both shards: the kept fraction of whole tensors
    kept, whole = result["kept_fraction"]
    assert kept == pytest.approx(whole) and 0.2 < kept < 0.99


def test_fsdp2_factor_lag_compiled_and_capturable_equal_the_planned_step(result):
    """``factor_lag=1`` on the shards: the compiled step (2 graphs: the first step's exact
    factors, then the lagged one; no break) and the capturable step equal the planned
    ``factor_lag=1`` step and the lagged oracle; the counts kept as state are summed over
    both shards (the oracle's whole-tensor counts)."""
    assert result["lag_graph_breaks"] == 0
    assert result["lag_graphs"] == 2
    assert result["lag_compiled_vs_planned"] <= 1e-6
    assert result["lag_capturable_vs_planned"] <= 1e-6
    assert result["lag_compiled_vs_oracle"] <= 1e-6
    assert result["lag_counts_match_oracle"]
    # the functional graphs: both count and all-reduce; the first step's update depends on
    # this step's (reduced) counts, the lagged one's on none of them: the collective is off
    # the update's path
    assert result["dep_graphs"] == 2
    assert all(n > 0 for n in result["dep_sums"]) and all(result["dep_all_reduces"])
    first, lagged = result["dep_float_tensors_from_counts"]
    assert first > 0 and lagged == 0, result["dep_float_tensors_from_counts"]
