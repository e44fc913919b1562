"""The Triton backend on CPU, under the Triton interpreter, against independent references.

Triton decides at import whether its kernels are interpreted (``TRITON_INTERPRET=1``), so
the kernels run in one subprocess (tests/unit/triton_cases.py) that prints the numbers;
this file asserts on them. References: the per-tensor ``reference`` backend (counts must
be equal, not close) and, for CAdamW end to end, the float64 oracle (tests/oracle.py).
Cases: odd, empty and block/chunk-boundary sizes in one call, bf16/fp16 parameters with
fp32 state, bf16 state, maximize, both lerp formulas, no weight decay, slices of a flat
buffer at aligned and unaligned offsets (ZeRO pieces), the deferred-exp_avg mode, the
table cache, the foreach fallbacks (float64, non-contiguous) and the default launch config.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.interpreter import run_cases  # noqa: E402

CASES = Path(__file__).with_name("triton_cases.py")

FP32_TOL = 1e-6  # relative, one fp32 step of p/m/v against the reference order
DELTA_TOL = 1e-5  # relative error of the fp32 update p_new - p_old itself
LOW_TOL = 4e-3  # bf16/fp16 parameters: at most one rounding step apart


@pytest.fixture(scope="module")
def r() -> dict:
    return run_cases(CASES, timeout=240)


def _ok(c: dict, p_tol: float = FP32_TOL) -> None:
    assert c["counts_equal"], c
    assert c["p"] <= p_tol and c["m"] <= FP32_TOL and c["v"] <= FP32_TOL, c
    if p_tol == FP32_TOL:  # fp32 parameters: the update itself, not only p, must agree
        assert c["dp"] <= DELTA_TOL, c


@pytest.mark.parametrize(
    "case",
    ["fp32_edges", "views_aligned", "views_unaligned", "lerp_high_weight", "no_weight_decay"],
)
def test_fp32_matches_reference(r, case):
    _ok(r[case])


def test_edges_cover_empty_and_boundaries(r):
    c = r["fp32_edges"]
    assert c["counts"][1] == 0  # the empty tensor
    assert len(c["counts"]) == 13  # all tensors in one call


@pytest.mark.parametrize(
    "case", ["bf16_params_fp32_state_maximize", "fp16_params_fp32_state", "views_bf16"]
)
def test_low_precision_params_match_reference(r, case):
    _ok(r[case], p_tol=LOW_TOL)


def test_bf16_state(r):
    c = r["bf16_state"]
    assert c["counts_equal"] and max(c["p"], c["m"], c["v"]) <= LOW_TOL, c


@pytest.mark.parametrize("case", ["deferred_fp32", "deferred_bf16_maximize", "default_config"])
def test_deferred_exp_avg(r, case):
    c = r[case]
    assert c["deferred"] and c["m_untouched_by_deferred_count"], c
    _ok(c, p_tol=LOW_TOL if "bf16" in case else FP32_TOL)


@pytest.mark.parametrize("case", ["clamp_0.001", "clamp_0.25", "paper_0.001"])
def test_factor_inside_update_kernel_is_bitwise_cautious_factor(r, case):
    assert r[f"fused_factor_{case}"] is True


def test_table_cache(r):
    assert r["cache"] == {
        "hit_adds_nothing": True,
        "same_sizes_reuse_entry": True,
        "new_sizes_add_one": True,
        "counts_right": True,
    }


def test_fallbacks_match_and_warn(r):
    for case in ("fp64_fallback", "noncontig_fallback", "noncontig_deferred_fallback"):
        _ok(r[case])
    assert not r["noncontig_deferred_fallback"]["deferred"]
    assert any("float64" in w for w in r["fallback_warnings"])
    assert any("non-contiguous" in w for w in r["fallback_warnings"])


def test_optimizer_fp32_against_oracle(r):
    c = r["optimizer_fp32"]
    assert c["p"] <= FP32_TOL and c["delta"] <= 5e-5 and c["p_vs_reference"] <= FP32_TOL, c
    assert all(a == b for a, b in c["kept"]), c
    assert c["steps"] == [float(t) for t in c["oracle_steps"]], c


def test_optimizer_bf16_against_reference_backend(r):
    c = r["optimizer_bf16"]
    assert c["p_vs_reference"] <= LOW_TOL and c["p"] <= 1e-2, c
    assert all(a == b for a, b in c["kept"]), c


def test_cpu_without_interpreter_raises_clearly():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the interpreter")
    import torch

    from dist_cautious import CAdamW
    from dist_cautious.kernels import resolve

    assert resolve("auto", torch.device("cpu")) == "foreach"
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        CAdamW([p], backend="triton").step()
