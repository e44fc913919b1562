"""C-AdamW's math for the multi-tensor Triton kernel (:mod:`.triton_mt`), its two passes and
the one-pass lagged step.

Arithmetic follows :mod:`.reference` operation by operation in float32; square root and
divisions are correctly rounded (``sqrt_rn`` / ``div_rn``). Operands in table order:

* count: ``(m, g)``. ``m_new = lerp(m, g, 1 - beta1)``; counts ``m_new * g > 0``; writes
  ``m`` unless deferred (``defer_exp_avg=True``: read-only, 8 B per fp32 parameter);
* update: ``(p, g, m, v)``. With a deferred count, ``m`` is brought up to date first with the
  same code (the mask applied is the mask counted); second moment, decoupled (optionally
  cautious) weight decay, the masked step rescaled by ``alpha`` (24 B, 28 B deferred).

* one pass (``factor_lag=1``, :func:`one_pass`): the deferred update with the previous step's
  factors that also counts this step's mask: 28 B per fp32 parameter, AdamW's own traffic.

36 B per fp32 parameter in all, the minimum for an exact two-pass C-AdamW (28 B for
bf16/fp16 parameters with fp32 state); 28 B (22 B) for the one-pass lagged step. Float64
state, non-contiguous tensors and mixed devices are handed to :mod:`.foreach` (same math),
warned once per backend instance.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import foreach as _foreach
from .common import Capabilities, UpdateHyper, cautious_factor
from .triton_mt import INTERPRETED, MultiTensorApply, Variant, config, configure, lerp

__all__ = [
    "INTERPRETED",
    "TritonAdamW",
    "config",
    "configure",
    "count_pass",
    "one_pass",
    "update_pass",
]

NAME = "adamw"
# Deferred exp_avg: the count pass only reads g and m (8 B/param, read-only) and the update
# pass writes m (28 B/param, AdamW's traffic) instead of 12 + 24. Same bytes, better DRAM
# efficiency. Read when a backend is made (TritonAdamW.caps).
DEFER_EXP_AVG = True

# flag bits (constexpr F)
MAXIMIZE, LERP_HI, DECAY, CWD, LERP_M = 1, 2, 4, 8, 16


@triton.jit
def count_pre(x0, x1, x2, x3, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr):
    # x0 = m, x1 = g; s0 = 1 - beta1. Returns m_new (stored right away unless deferred) and
    # g, negated under maximize.
    g = x1
    if F & 1:
        g = -g
    return lerp(x0, g, s0, F & 2), g, x2, x3


@triton.jit
def count_math(x0, x1, x2, x3, alpha, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr, D0, SOFT):
    return x0, x1, x2, x3, x0 * x1 > 0  # m_new * g > 0


@triton.jit
def update_pre(x0, x1, x2, x3, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr):
    # x0..x3 = p, g, m, v. g negated under maximize; m brought up to date when the count pass
    # deferred it (LERP_M), with the count pass's code: stored right away.
    g = x1
    if F & 1:
        g = -g
    m = x2
    if F & 16:
        m = lerp(m, g, s0, F & 2)
    return x0, g, m, x3


@triton.jit
def update_math(x0, x1, x2, x3, alpha, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr, D0, SOFT):
    # x0..x3 = p, g, m, v after update_pre; s1..s6 = beta2, 1 - beta2, 1 - lr * wd, -lr / bc1,
    # sqrt(bc2), eps. Same order as reference.update_pass.
    p = x0
    g = x1
    m = x2
    v_new = x3 * s1 + s2 * g * g
    if F & 4:
        if F & 8:  # cautious weight decay: only where sign(m_new) agrees with p
            p = tl.where(m * p >= 0, p * s3, p)
        else:
            p = p * s3
    denom = tl.div_rn(tl.sqrt_rn(v_new), s5) + s6
    upd = tl.where(m * g > 0, m, 0.0) * alpha
    p = p + s4 * tl.div_rn(upd, denom)
    return p, g, m, v_new, m * g > 0  # the mask (counted by the one-pass launch)


def count_variant(maximize: bool, lerp_hi: bool, write_m: bool) -> Variant:
    flags = MAXIMIZE * bool(maximize) | LERP_HI * bool(lerp_hi)
    stores = 0b01 * bool(write_m)  # operands (m, g)
    return Variant(count_math, flags, 0b11, stores, True, 2, pre=count_pre, early=stores)


def update_variant(maximize: bool, decay: bool, cwd: bool, lerp_m: bool, lerp_hi: bool) -> Variant:
    flags = (
        MAXIMIZE * bool(maximize)
        | DECAY * bool(decay)
        | CWD * bool(decay and cwd)
        | LERP_M * bool(lerp_m)
        | LERP_HI * bool(lerp_m and lerp_hi)
    )
    early = 0b0100 * bool(lerp_m)  # m, when the count pass deferred it
    stores = 0b1001 | early  # p, v
    return Variant(update_math, flags, 0b1111, stores, False, 4, pre=update_pre, early=early)


def one_pass_variant(maximize: bool, decay: bool, cwd: bool, lerp_hi: bool) -> Variant:
    """The lagged step in one launch: the deferred-exp_avg update (m brought up to date
    first, p, m, v written: 28 B per fp32 parameter) that also counts its mask."""
    v = update_variant(maximize, decay, cwd, True, lerp_hi)
    return Variant(v.math, v.flags, v.loads, v.stores, True, 4, v.pre, v.early, lagged=True)


def count_pass(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    beta1: float,
    maximize: bool,
    *,
    defer_exp_avg: bool = False,
    mt: MultiTensorApply | None = None,
) -> Tensor | tuple[Tensor, bool]:
    """``m <- lerp(m, g, 1 - beta1)`` in place; int64 counts of ``m_new * g > 0`` per tensor.

    ``defer_exp_avg=True``: count without writing ``m`` and return ``(counts, deferred)``;
    when ``deferred`` is True the caller must pass ``exp_avg_pending=True`` to the
    :func:`update_pass` that follows, which then updates ``m`` with the same arithmetic.
    ``deferred`` is False when this call fell back to foreach (``m`` already updated).
    ``mt``: the launcher whose table cache to use (a fresh one when None).
    """
    if not exp_avgs:
        counts = _foreach.count_pass(grads, exp_avgs, beta1, maximize)
        return (counts, False) if defer_exp_avg else counts
    mt = mt or MultiTensorApply(NAME)
    hit = mt.prepare("count", [exp_avgs, grads], grads)
    if hit is None:
        counts = _foreach.count_pass(grads, exp_avgs, beta1, maximize)
        return (counts, False) if defer_exp_avg else counts
    w = 1.0 - beta1
    v = count_variant(maximize, lerp_hi=not (w < 0.5), write_m=not defer_exp_avg)
    counts = mt.launch("count", hit, v, (w,), len(exp_avgs))
    return (counts, True) if defer_exp_avg else counts


def update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    alphas: Tensor | None,
    h: UpdateHyper,
    *,
    exp_avg_pending: bool = False,
    factor: tuple[Tensor, Tensor, str, float] | None = None,
    mt: MultiTensorApply | None = None,
) -> None:
    """Second moment, decoupled weight decay and the masked, rescaled step, in place.

    ``exp_avg_pending=True``: ``m`` still holds the previous step's value (a deferred
    :func:`count_pass`); it is updated here first, with ``h.beta1``.
    ``factor=(counts, numels, formula, clamp)`` (``alphas`` then None): each tensor's factor
    is computed inside the kernel from int64 device ``counts`` and ``numels``, bit for bit as
    :func:`~dist_cautious.kernels.common.cautious_factor`.
    """
    if factor is not None:
        if alphas is not None or factor[2] not in ("clamp", "paper"):
            raise ValueError(
                "update_pass: give either alphas or factor=(counts, numels, formula, clamp)"
            )
    if not params:
        return
    mt = mt or MultiTensorApply(NAME)
    hit = mt.prepare("update", [params, grads, exp_avgs, exp_avg_sqs], grads)
    if hit is None:
        if exp_avg_pending:  # bring m up to date first, as the count pass would have
            _foreach.count_pass(grads, exp_avgs, h.beta1, h.maximize)
        if factor is not None:
            alphas = cautious_factor(*factor)
        return _foreach.update_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h)
    w = 1.0 - h.beta1
    v = update_variant(
        h.maximize, h.weight_decay != 0, h.cautious_wd, exp_avg_pending, not (w < 0.5)
    )
    mt.launch("update", hit, v, _scalars(h), len(params), alphas=alphas, factor=factor)


def _scalars(h: UpdateHyper) -> tuple[float, ...]:
    return (
        1.0 - h.beta1,
        h.beta2,
        1.0 - h.beta2,
        1.0 - h.lr * h.weight_decay,
        -h.step_size,
        h.bias_correction2_sqrt,
        h.eps,
    )


def one_pass(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    alphas: Tensor,
    h: UpdateHyper,
    *,
    mt: MultiTensorApply | None = None,
) -> Tensor:
    """A ``factor_lag=1`` step in one launch: ``m <- lerp(m, g, 1 - beta1)``, the second
    moment, weight decay and the masked step scaled by the given per-tensor ``alphas`` (the
    previous step's factors), and the int64 counts of this step's mask ``m_new * g > 0``
    (for the next step's factors), returned. Reads p, g, m, v once and writes p, m, v
    (28 B per fp32 parameter; count pass + update pass: 36). Bitwise :func:`count_pass` +
    :func:`update_pass` with the same ``alphas``. Float64 / non-contiguous tensors: foreach's
    two passes (same results)."""
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    mt = mt or MultiTensorApply(NAME)
    hit = mt.prepare("onepass", [params, grads, exp_avgs, exp_avg_sqs], grads)
    if hit is None:
        return _foreach.one_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h)
    w = 1.0 - h.beta1
    v = one_pass_variant(h.maximize, h.weight_decay != 0, h.cautious_wd, not (w < 0.5))
    return mt.launch("onepass", hit, v, _scalars(h), len(params), alphas=alphas)


class TritonAdamW:
    """The C-AdamW Triton backend: :func:`count_pass` / :func:`update_pass` (and the lagged
    step's :func:`one_pass`) with one :class:`~.triton_mt.MultiTensorApply` (its table cache)
    per instance."""

    def __init__(self) -> None:
        self.mt = MultiTensorApply(NAME)
        self.caps = Capabilities(
            fused_factor=True, deferred_exp_avg=DEFER_EXP_AVG, one_pass_lagged=True
        )

    def count_pass(self, grads, exp_avgs, beta1, maximize, *, defer_exp_avg=False):  # noqa: ANN001, ANN201
        return count_pass(grads, exp_avgs, beta1, maximize, defer_exp_avg=defer_exp_avg, mt=self.mt)

    def update_pass(self, params, grads, exp_avgs, exp_avg_sqs, alphas, h, **kw):  # noqa: ANN001, ANN003, ANN201
        return update_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h, mt=self.mt, **kw)

    def one_pass(self, params, grads, exp_avgs, exp_avg_sqs, alphas, h):  # noqa: ANN001, ANN201
        return one_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h, mt=self.mt)


# --------------------------------------------------------------------------- AOT declaration
# The choice space of the two passes (benchmarks/aot_kernels.py compiles it through
# triton_mt.aot_space): each row goes through the same *_variant functions as a launch.
_FLAG = (False, True)


def _count_aot(row: dict) -> tuple[Variant, int, int]:
    return count_variant(row["maximize"], row["lerp_hi"], not row["defer"]), 0, 1


def _update_aot(row: dict) -> tuple[Variant, int, int]:
    if not row["defer"]:
        row["lerp_hi"] = False  # unused without the deferred lerp
    v = update_variant(
        row["maximize"],
        row["decay"] != "none",
        row["decay"] == "cautious",
        row["defer"],
        row["lerp_hi"],
    )
    return v, ("alphas", "clamp", "paper").index(row["factor"]), 7


def _one_pass_aot(row: dict) -> tuple[Variant, int, int]:
    v = one_pass_variant(
        row["maximize"], row["decay"] != "none", row["decay"] == "cautious", row["lerp_hi"]
    )
    return v, 0, 7


AOT = {
    "count": dict(
        operands=("s", "g"),
        axes=dict(maximize=_FLAG, lerp_hi=_FLAG, defer=(True, False)),
        variant=_count_aot,
    ),
    "update": dict(
        operands=("p", "g", "s", "s"),
        axes=dict(
            maximize=_FLAG,
            decay=("none", "plain", "cautious"),
            defer=_FLAG,
            lerp_hi=_FLAG,
            factor=("alphas", "clamp", "paper"),
        ),
        variant=_update_aot,
    ),
    # the factor_lag=1 step in one launch, given alphas
    "onepass": dict(
        operands=("p", "g", "s", "s"),
        axes=dict(maximize=_FLAG, decay=("none", "plain", "cautious"), lerp_hi=_FLAG),
        variant=_one_pass_aot,
    ),
}
