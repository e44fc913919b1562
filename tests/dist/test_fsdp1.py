"""The cautious optimizers under FSDP1 (FullyShardedDataParallel), gloo on CPU, against
independent references.

Two torchrun launches (tests/dist/workers/fsdp1_worker.py): world 2 (FULL_SHARD,
SHARD_GRAD_OP, NO_SHARD, bf16 mixed precision, scale="shard", unreadable metadata, FSDP1's
full optimizer state dict, host cost) and world 4
(FULL_SHARD with uneven and empty shards, HYBRID_SHARD and _HYBRID_SHARD_ZERO2 2x2), each
strategy with use_orig_params False and True and two param groups that differ in weight
decay. The workers train 10 steps with a real backward, feed FSDP1's own gradients to
single-process CAdamW on whole tensors and to the float64 oracle (tests/oracle.py), and
compare FSDP1's FULL_STATE_DICT after training; this file asserts on those numbers.

CLion and CSGD (tests/optimizers.py rows) run a subset of the cases in the same two
launches (``subset:NAME`` scenarios; a launch costs more than the cases): FULL_SHARD on 2
ranks and HYBRID_SHARD 2x2 on 4, both use_orig_params, scale "global" and "shard", 6 steps,
with the same assertions as CAdamW's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_cautious.flat import Fragment, window_fragments
from dist_cautious.fsdp1 import layout_for
from tests.dist.harness import torchrun

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "fsdp1_worker.py"
TOL = 1e-6  # relative, fp32 params after 10 steps
# relative error of the total update p - p0 against the float64 oracle: the fp32 rounding of
# p (~|p| 2^-24 per step) relative to the update. Lion steps lr=1e-3 per element and SGD
# lr |grad|, smaller than AdamW's ~lr=1e-2, so their floor sqrt(steps) 2^-24 |p| / |p - p0|
# is higher (measured worst tensor: 3.6e-5 Lion, 1.0e-4 SGD; errors 6.1e-5 and 5.0e-5, while
# the parameters themselves match to 3e-7 and single-process fp32 exactly)
TOL_DELTA = {"cadamw": 5e-5, "clion": 2e-4, "csgd": 2e-4}
OTHER_ROWS = ["clion", "csgd"]  # tests/optimizers.py rows run on a subset of the cases
CLASS = {"cadamw": "CAdamW", "clion": "CLion", "csgd": "CSGD"}
SHARDED = ["FULL_SHARD", "SHARD_GRAD_OP"]
HYBRID = ["HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"]


def _launch(nproc: int, out: Path, scenarios: list[str]) -> dict:
    torchrun(WORKER, nproc, [out, *scenarios], timeout=240)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def w2(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp1_w2") / "out.json"
    subset = [f"subset:{n}" for n in OTHER_ROWS]
    scenarios = ["strategies", "shard", "errors", "ckpt", "cost", "lag", "lag_ckpt", *subset]
    return _launch(2, out, scenarios)


@pytest.fixture(scope="module")
def w4(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp1_w4") / "out.json"
    return _launch(4, out, ["strategies", *[f"subset:{n}" for n in OTHER_ROWS]])


def _assert_exact(r: dict, row: str = "cadamw") -> None:
    assert r["optimizer"] == CLASS[row], r["optimizer"]
    # the same optimizer in one process on whole tensors, and the float64 oracle
    assert r["single_param"] <= TOL and r["single_delta"] <= TOL, r
    assert r["oracle_param"] <= TOL and r["oracle_delta"] <= TOL_DELTA[row], r


def _assert_counts(r: dict, per_step: int, sizes: list[int]) -> None:
    assert r["all_reduce_per_step"] == per_step, r
    assert r["all_reduce_group_sizes"] == sizes, r
    assert r["other_collectives"] == {}, r  # nothing but the count all-reduce in step()
    assert r["same_sequence_per_group"], r


CASES = [(2, s, u) for s in [*SHARDED, "NO_SHARD"] for u in (False, True)]
CASES += [(4, s, u) for s in ["FULL_SHARD", *HYBRID] for u in (False, True)]


@pytest.mark.parametrize("world,strategy,uop", CASES)
def test_global_matches_single_process(world, strategy, uop, w2, w4):
    r = (w2 if world == 2 else w4)["strategies"][f"{strategy}.uop={uop}"]
    _assert_exact(r)
    if strategy == "NO_SHARD":  # whole tensors on every rank: no collective
        _assert_counts(r, 0, [])
        assert r["layouts"] == (["NoneType"] if uop else ["FlatLayout"]), r
        return
    # one count all-reduce per step, on the shard group only (HSDP: size 2, not 4)
    _assert_counts(r, 1, [2 if strategy in HYBRID else world])
    assert r["layouts"] == ["FlatLayout"], r
    if strategy in HYBRID:
        assert r["handle_group"] == r["shard_group"] != r["replicate_group"], r
        assert r["all_reduce_groups"] == [r["shard_group"]], r


@pytest.mark.parametrize("uop", [False, True])
def test_factor_lag_matches_single_process(uop, w2):
    """factor_lag=1, FULL_SHARD: the single-process factor_lag=1 optimizer and the lagged
    float64 oracle (factor_lag=0 lands 0.1 away: a lag using this step's factor fails);
    one all-reduce per step, the last one left in flight."""
    r = w2["lag"][f"uop={uop}"]
    _assert_exact(r)
    _assert_counts(r, 1, [2])
    assert r["in_flight"], r
    assert w2["lag"]["exact_vs_lag_delta"] > 1e-2, w2["lag"]


@pytest.mark.parametrize("uop", [False, True])
def test_factor_lag_full_optim_state_dict_resume(uop, w2):
    """factor_lag=1 through FSDP1's full optimizer state dict: the counts travel (a tuple per
    FlatParameter, a 0-d tensor per use_orig_params view) and the resumed run is bitwise the
    uninterrupted one (a lost count would make the first resumed step exact: not bitwise)."""
    r = w2["lag_ckpt"][f"uop={uop}"]
    assert r["resume_vs_straight"] == 0.0, r
    assert r["saved_steps"] == [5.0], r


@pytest.mark.parametrize("uop", [False, True])
def test_bf16_mixed_precision(uop, w2):
    """MixedPrecision(param_dtype=bf16, reduce_dtype=bf16): the optimizer steps fp32 shards
    with fp32 gradients; single-process fp32 CAdamW fed the same gradients is matched."""
    r = w2["strategies"][f"FULL_SHARD.bf16.uop={uop}"]
    assert r["single_param"] <= TOL and r["single_delta"] <= TOL, r
    _assert_counts(r, 1, [2])


@pytest.mark.parametrize("uop", [False, True])
def test_full_optim_state_dict_resume(uop, w2):
    """FSDP.optim_state_dict after 5 steps, optim_state_dict_to_load into a fresh model and
    CAdamW, 5 more steps: equal to 10 uninterrupted steps."""
    r = w2["ckpt"][f"uop={uop}"]
    assert r["resume_vs_straight"] <= 1e-7, r
    assert r["saved_steps"] == [5.0], r
    assert r["saved_tensors"] == sorted(
        ["w35", "w17", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    )


def test_uneven_and_empty_shards_really_happen(w2, w4):
    # use_orig_params=True, 4 ranks, groups [w35, fc1.weight, fc2.bias | w17, fc1.bias,
    # fc2.weight]: w35 empty on rank 3, w17 on ranks 0-1, fc1.bias / fc2.bias on 0-2
    r = w4["strategies"]["FULL_SHARD.uop=True"]
    assert r["local_numels"] == [
        [6, 60, 0, 0, 0, 73],
        [6, 60, 0, 0, 0, 73],
        [3, 60, 0, 2, 0, 73],
        [0, 20, 6, 5, 40, 63],
    ]
    # use_orig_params=False: three FlatParameters per rank, windows of 22 / 240 / 288
    assert w4["strategies"]["FULL_SHARD.uop=False"]["local_numels"] == [[6, 60, 72]] * 4
    assert w2["strategies"]["FULL_SHARD.uop=False"]["local_numels"] == [[11, 120, 144]] * 2
    assert w2["strategies"]["NO_SHARD.uop=False"]["local_numels"] == [[22, 240, 288]] * 2


@pytest.mark.parametrize("uop", [False, True])
def test_scale_shard_is_per_piece(uop, w2):
    r = w2["shard"][f"uop={uop}"]
    _assert_per_piece(r)


def _assert_per_piece(r: dict) -> None:
    assert r["piece_oracle_param"] <= TOL, r  # float64 oracle on each local fragment
    assert r["piece_oracle_state"] <= TOL, r  # and its state (every state key of the row)
    _assert_counts(r, 0, [])
    assert r["shard_vs_global_delta_rel"] > 0.01, r  # a different algorithm, not rounding


# ------------------------------------------- the other optimizers (tests/optimizers.py rows)

ROW_CASES = [(2, "FULL_SHARD"), (4, "HYBRID_SHARD")]


@pytest.mark.parametrize("world,strategy", ROW_CASES)
@pytest.mark.parametrize("uop", [False, True])
@pytest.mark.parametrize("row", OTHER_ROWS)
def test_other_optimizers_global_match_single_process(row, uop, world, strategy, w2, w4):
    r = (w2 if world == 2 else w4)[f"subset:{row}"][f"{strategy}.global.uop={uop}"]
    assert r["steps"] == 6, r
    _assert_exact(r, row)
    # one count all-reduce per step, on the shard group only (HSDP: size 2, not 4)
    _assert_counts(r, 1, [2])
    assert r["layouts"] == ["FlatLayout"], r
    if strategy in HYBRID:
        assert r["handle_group"] == r["shard_group"] != r["replicate_group"], r
        assert r["all_reduce_groups"] == [r["shard_group"]], r


@pytest.mark.parametrize("world,strategy", ROW_CASES)
@pytest.mark.parametrize("uop", [False, True])
@pytest.mark.parametrize("row", OTHER_ROWS)
def test_other_optimizers_scale_shard_is_per_piece(row, uop, world, strategy, w2, w4):
    r = (w2 if world == 2 else w4)[f"subset:{row}"][f"{strategy}.shard.uop={uop}"]
    assert r["optimizer"] == CLASS[row], r["optimizer"]
    _assert_per_piece(r)


def test_unreadable_metadata_raises_instead_of_stepping(w2):
    r = w2["errors"]
    for uop in (False, True):
        missing, corrupt = r[f"missing.uop={uop}"], r[f"corrupt.uop={uop}"]
        assert missing.startswith("RuntimeError") and "'_shard_numel_padded'" in missing, missing
        assert corrupt.startswith("RuntimeError") and "_shard_param_infos[0]" in corrupt, corrupt
        assert "torch 2.13" in missing and "FSDP2" in missing, missing
        assert r[f"unchanged.uop={uop}"], r  # nothing was stepped
        assert r[f"restored.uop={uop}"] == "no error", r
    assert "not in its sharded state" in r["unsharded_view"], r["unsharded_view"]
    assert "no live FSDP1 FlatParamHandle owns it" in r["orphan"], r["orphan"]
    assert r["plain_is_none"]


def test_host_cost_of_layout_lookup(w2):
    """300 tiny tensors, FULL_SHARD: the per-step FSDP1 lookup stays a small part of the
    step (it would not if the handle search ran every step). Numbers go to the report."""
    for uop in (False, True):
        r = w2["cost"][f"uop={uop}"]
        print(f"use_orig_params={uop}:", json.dumps(r))
        assert r["tensors"] == 300 and r["optimizer_params"] == (300 if uop else 15), r
        assert r["plan_cached"], r  # FSDP1 steps reuse the cached plan (base.py _reuse)
        assert r["ms"]["layout_for"] < 0.5 * r["ms"]["fsdp1_step"], r


# ------------------------------------------------------------------ no launch


def test_layout_for_ignores_unflattened_tensors():
    assert layout_for(torch.nn.Parameter(torch.randn(3, 4))) is None
    assert layout_for(torch.randn(5)) is None


def test_window_fragments():
    # tensors of 15 and 7 at offsets 0 and 16 (one element of alignment padding), window 6
    got = window_fragments([15, 7], [0, 16], 12, 6)
    assert got == [Fragment(0, 15, 12, 0, 3), Fragment(1, 7, 0, 4, 2)]
    assert window_fragments([15, 7], [0, 16], 0, 6)[1] == Fragment(1, 7, 0, 0, 0)
