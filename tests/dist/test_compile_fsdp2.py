"""The device-scalar step under FSDP2-layout DTensor shards (world 2, gloo): the eager
capturable step and ``torch.compile(opt.step)`` equal the planned step, one process on whole
tensors and the float64 oracle; dynamo makes one graph without a break (the count
all-reduce is a functional collective). Worker: tests/dist/workers/compile_worker.py."""

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
