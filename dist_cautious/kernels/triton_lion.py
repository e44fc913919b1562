"""C-Lion's math for the multi-tensor Triton kernel (:mod:`.triton_mt`), and its two passes.

The algorithm is :mod:`.lion`'s (its module doc). Operands in table order:

* count ``(m, g)``, read-only (8 B per fp32 parameter): ``u = sign(lerp(m, g, 1 - beta1))``,
  counts ``u * g > 0``;
* update ``(p, g, m)`` (20 B): recomputes ``u`` with the same code (the mask applied is the
  mask counted), decays and steps ``p``, writes ``m <- lerp(m, g, 1 - beta2)``;
* one pass (``factor_lag=1``, ``TritonLion.one_pass``): the update with the previous step's
  factors that also counts this step's mask (20 B instead of 28).

Float64 and non-contiguous tensors go to :func:`.lion.foreach_count_pass` /
:func:`.lion.foreach_update_pass` (same math), warned once per backend instance.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import lion as _lion
from .common import Capabilities, LionHyper
from .triton_mt import StatesBackend, Variant, lerp

__all__ = ["TritonLion"]

NAME = "lion"
MAXIMIZE, LERP_HI1, DECAY, CWD, LERP_HI2 = 1, 2, 4, 8, 16  # flag bits (constexpr F)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def count_math(x0, x1, x2, x3, alpha, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr, D0, SOFT):
    # x0 = m, x1 = g; s0 = 1 - beta1
    g = x1
    if F & 1:
        g = -g
    u = _sign(lerp(x0, g, s0, F & 2))
    return x0, x1, x2, x3, u * g > 0


@triton.jit
def update_math(x0, x1, x2, x3, alpha, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr, D0, SOFT):
    # x0..x2 = p, g, m; s0..s3 = 1 - beta1, 1 - beta2, lr, 1 - lr * wd. Same order as
    # lion.reference_update_pass (g negated under maximize, u = sign(c)).
    p = x0
    g = x1
    m = x2
    if F & 1:
        g = -g
    u = _sign(lerp(m, g, s0, F & 2))
    if F & 4:
        if F & 8:
            p = tl.where(u * p >= 0, p * s3, p)
        else:
            p = p * s3
    step = alpha * s2
    p = p - step * tl.where(u * g > 0, u, 0.0)
    m = lerp(m, g, s1, F & 16)
    return p, g, m, x3, u * g > 0  # the mask (counted by the one-pass launch)


def count_variant(maximize: bool, lerp_hi1: bool) -> Variant:
    flags = MAXIMIZE * bool(maximize) | LERP_HI1 * bool(lerp_hi1)
    return Variant(count_math, flags, loads=0b11, stores=0, count=True, nops=2)


def update_variant(
    maximize: bool, decay: bool, cwd: bool, lerp_hi1: bool, lerp_hi2: bool
) -> Variant:
    flags = (
        MAXIMIZE * bool(maximize)
        | DECAY * bool(decay)
        | CWD * bool(decay and cwd)
        | LERP_HI1 * bool(lerp_hi1)
        | LERP_HI2 * bool(lerp_hi2)
    )
    return Variant(update_math, flags, loads=0b111, stores=0b101, count=False, nops=3)


def one_pass_variant(
    maximize: bool, decay: bool, cwd: bool, lerp_hi1: bool, lerp_hi2: bool
) -> Variant:
    """The lagged step in one launch: the update (p, m written: 20 B per fp32 parameter
    instead of 8 + 20) that also counts its mask ``u * g > 0``."""
    v = update_variant(maximize, decay, cwd, lerp_hi1, lerp_hi2)
    return Variant(v.math, v.flags, v.loads, v.stores, True, 3, lagged=True)


class TritonLion(StatesBackend):
    """The C-Lion Triton backend (:mod:`.lion`'s signature); its table cache is its own."""

    NAME = NAME
    caps = Capabilities(takes_scratch=True, fused_factor=True, one_pass_lagged=True)

    def operands(self, pass_, params, grads, states):  # noqa: ANN001, ANN201
        (exp_avgs,) = states
        return [exp_avgs, grads] if pass_ == "count" else [params, grads, exp_avgs]

    def choose(self, pass_: str, h: LionHyper) -> tuple[Variant, tuple[float, ...]]:
        w1, w2 = 1.0 - h.beta1, 1.0 - h.beta2
        if pass_ == "count":
            return count_variant(h.maximize, not (w1 < 0.5)), (w1,)
        make = one_pass_variant if pass_ == "onepass" else update_variant
        v = make(h.maximize, h.weight_decay != 0, h.cautious_wd, not (w1 < 0.5), not (w2 < 0.5))
        return v, (w1, w2, h.lr, 1.0 - h.lr * h.weight_decay)

    def foreach_count(self, params, grads, states, h):  # noqa: ANN001, ANN201
        return _lion.foreach_count_pass(params, grads, states, h)

    def foreach_update(self, params, grads, states, alphas, h):  # noqa: ANN001, ANN201
        return _lion.foreach_update_pass(params, grads, states, alphas, h)


# --------------------------------------------------------------------------- AOT declaration
_FLAG = (False, True)


def _flags(row: dict) -> tuple[bool, ...]:
    """The update's (and the one pass's) variant arguments from an AOT row."""
    decay = row["decay"]
    return row["maximize"], decay != "none", decay == "cautious", row["lerp_hi1"], row["lerp_hi2"]


_UPDATE_AXES = dict(
    maximize=_FLAG, decay=("none", "plain", "cautious"), lerp_hi1=_FLAG, lerp_hi2=_FLAG
)
AOT = {
    "count": dict(
        operands=("s", "g"),
        axes=dict(maximize=_FLAG, lerp_hi1=_FLAG),
        variant=lambda row: (count_variant(row["maximize"], row["lerp_hi1"]), 0, 1),
    ),
    "update": dict(
        operands=("p", "g", "s"),
        axes=dict(_UPDATE_AXES, factor=("alphas", "clamp", "paper")),
        variant=lambda row: (
            update_variant(*_flags(row)),
            ("alphas", "clamp", "paper").index(row["factor"]),
            4,
        ),
    ),
    # the factor_lag=1 step in one launch, given alphas
    "onepass": dict(
        operands=("p", "g", "s"),
        axes=_UPDATE_AXES,
        variant=lambda row: (one_pass_variant(*_flags(row)), 0, 4),
    ),
}
