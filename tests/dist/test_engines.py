"""launch/engines.py: one engine set-up for bench.py and the test workers (gloo, world 2).

One torchrun launch builds the same seeded model under DDP, FSDP2, HSDP (1 x 2 mesh), FSDP1
(original parameters and flat), DeepSpeed ZeRO 0-3 with ``engines.build``, trains two
CAdamW steps (each rank on half the batch) and reads the parameters back with
``engines.full_params``; the worker (tests/dist/workers/engines_worker.py) compares them
with CAdamW in one process on the whole batch and with the float64 oracle
(tests/oracle.py) fed the same gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist.harness import torchrun

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "engines_worker.py"
TORCH_ENGINES = ["ddp", "fsdp2", "hsdp", "fsdp1", "fsdp1-flat"]
DS_ENGINES = ["zero0", "zero1", "zero2", "zero3"]
TOL = 1e-6  # relative, fp32 parameters after 2 steps (measured 4.0e-8 vs CAdamW, 6.2e-8 vs oracle)
TOL_DELTA = 1e-5  # the update p - p0 against the float64 oracle (measured 1.9e-6)
NAMES = ["a.bias", "a.weight", "b.bias", "b.weight", "w"]


@pytest.fixture(scope="module")
def res(tmp_path_factory) -> dict:
    try:
        import deepspeed  # noqa: F401

        names = TORCH_ENGINES + DS_ENGINES
    except ImportError:
        names = TORCH_ENGINES
    out = tmp_path_factory.mktemp("engines") / "out.json"
    torchrun(WORKER, 2, [out, *names], timeout=240, extra_env={"DS_ACCELERATOR": "cpu"})
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", TORCH_ENGINES + DS_ENGINES)
def test_full_params_equal_the_unsharded_run(res: dict, name: str) -> None:
    if name not in res:
        pytest.skip("deepspeed is not installed")
    r = res[name]
    assert r["names"] == NAMES, r  # whole parameters under the unwrapped model's names
    assert r["shapes_equal"], r
    assert r["single_param"] <= TOL, r
    assert r["oracle_param"] <= TOL, r
    assert r["oracle_delta"] <= TOL_DELTA, r


@pytest.mark.parametrize("name", TORCH_ENGINES + DS_ENGINES)
def test_count_sharded_and_state_bytes(res: dict, name: str) -> None:
    if name not in res:
        pytest.skip("deepspeed is not installed")
    r, model = res[name], res["_model"]
    full_state = 2 * 4 * model["numel"]  # exp_avg, exp_avg_sq in fp32 on every element
    sb = r["state_bytes"]
    if name in ("ddp", "zero0"):  # nothing split: every rank holds all the state
        assert r["count_sharded"] == 0 and r["shard_group_size"] == 0
        assert sb == [full_state, full_state]
        return
    assert r["count_sharded"] == model["tensors"] and r["shard_group_size"] == 2
    assert max(sb) < full_state  # each rank holds a part
    if name in ("fsdp2", "hsdp"):  # DTensor local shards: the parts add up exactly
        assert sum(sb) == full_state
    elif name == "fsdp1":  # views of the flat shard; a 1-element piece is not counted
        assert full_state - 2 * 4 * model["tensors"] <= sum(sb) <= full_state
    else:  # flat partitions: padded
        assert sum(sb) >= full_state
    expected = {"fsdp1-flat": "fsdp1", "zero1": "deepspeed-z1", "zero2": "deepspeed-z2"}
    expected["zero3"] = "deepspeed-z3"
    assert r["label"] == expected.get(name, name)
