"""Cautious SGD-momentum's math for the multi-tensor Triton kernel (:mod:`.triton_mt`), and its
two passes.

The algorithm is :mod:`.sgd`'s (its module doc). Operands in table order:

* count ``(buf, g, p)``: updates the momentum buffer (reads ``p`` only with L2 decay, ``buf``
  only after the first step) and counts ``d * g_eff > 0`` from the buffer *as stored*
  (rounded to its dtype), so the mask counted is the mask applied (12 B per fp32 parameter,
  16 with L2);
* update ``(p, g, buf)``: recomputes ``g_eff`` and ``d`` from the stored buffer and steps
  ``p`` (16 B).

Float64 and non-contiguous tensors go to :func:`.sgd.foreach_count_pass` /
:func:`.sgd.foreach_update_pass` (same math), warned once per backend instance.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import sgd as _sgd
from .common import SGDHyper
from .triton_mt import StatesBackend, Variant, cast_out

__all__ = ["TritonSGD"]

NAME = "sgd"
MAXIMIZE, L2, NESTEROV, FIRST, CWD = 1, 2, 4, 8, 16  # flag bits (constexpr F)


@triton.jit
def _grad(g, p, wd, MAXIMIZE: tl.constexpr, L2: tl.constexpr):
    if MAXIMIZE:
        g = -g
    if L2:
        g = g + wd * p
    return g


@triton.jit
def _direction(ge, b, momentum, NESTEROV: tl.constexpr):
    if NESTEROV:
        return ge + momentum * b
    else:
        return b


@triton.jit
def count_pre(x0, x1, x2, x3, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr):
    # x0..x2 = buf, g, p; s0..s2 = wd, momentum, 1 - dampening. Returns the new buffer
    # (stored right away) and g_eff.
    ge = _grad(x1, x2, s0, F & 1, F & 2)
    if F & 8:
        b = ge
    else:
        b = x0 * s1 + s2 * ge
    return b, ge, x2, x3


@triton.jit
def count_math(x0, x1, x2, x3, alpha, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr, D0, SOFT):
    # x0 = the new buffer, x1 = g_eff: d from the buffer as stored (rounded to its dtype)
    d = _direction(x1, cast_out(x0, D0, SOFT).to(tl.float32), s1, F & 4)
    return x0, x1, x2, x3, d * x1 > 0


@triton.jit
def update_math(x0, x1, x2, x3, alpha, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr, D0, SOFT):
    # x0..x2 = p, g, buf; s0..s3 = wd, momentum, lr, 1 - lr * wd
    ge = _grad(x1, x0, s0, F & 1, F & 2)
    d = _direction(ge, x2, s1, F & 4)
    p = x0
    if F & 16:
        p = tl.where(d * p >= 0, p * s3, p)
    step = alpha * s2
    p = p - step * tl.where(d * ge > 0, d, 0.0)
    return p, x1, x2, x3, d > 0


def count_variant(maximize: bool, l2: bool, first: bool, nesterov: bool) -> Variant:
    flags = (
        MAXIMIZE * bool(maximize) | L2 * bool(l2) | FIRST * bool(first) | NESTEROV * bool(nesterov)
    )
    loads = 0b010 | 0b100 * bool(l2) | 0b001 * (not first)  # operands (buf, g, p)
    return Variant(count_math, flags, loads, 0b001, True, 3, pre=count_pre, early=0b001)


def update_variant(maximize: bool, l2: bool, cwd: bool, nesterov: bool) -> Variant:
    flags = MAXIMIZE * bool(maximize) | L2 * bool(l2) | CWD * bool(cwd) | NESTEROV * bool(nesterov)
    return Variant(update_math, flags, loads=0b111, stores=0b001, count=False, nops=3)


class TritonSGD(StatesBackend):
    """The cautious SGD Triton backend (:mod:`.sgd`'s signature); its table cache is its own."""

    NAME = NAME

    def operands(self, pass_, params, grads, states):  # noqa: ANN001, ANN201
        (bufs,) = states
        return [bufs, grads, params] if pass_ == "count" else [params, grads, bufs]

    def choose(self, pass_: str, h: SGDHyper) -> tuple[Variant, tuple[float, ...]]:
        l2 = h.weight_decay != 0 and not h.cautious_wd
        if pass_ == "count":
            v = count_variant(h.maximize, l2, h.first_step, h.nesterov)
            return v, (h.weight_decay, h.momentum, 1.0 - h.dampening)
        cwd = bool(h.cautious_wd) and h.weight_decay != 0
        v = update_variant(h.maximize, l2, cwd, h.nesterov)
        return v, (h.weight_decay, h.momentum, h.lr, 1.0 - h.lr * h.weight_decay)

    def foreach_count(self, params, grads, states, h):  # noqa: ANN001, ANN201
        return _sgd.foreach_count_pass(params, grads, states, h)

    def foreach_update(self, params, grads, states, alphas, h):  # noqa: ANN001, ANN201
        return _sgd.foreach_update_pass(params, grads, states, alphas, h)


# --------------------------------------------------------------------------- AOT declaration
_FLAG = (False, True)
_FACTOR = ("alphas", "clamp", "paper")
AOT = {
    "count": dict(
        operands=("s", "g", "p"),
        axes=dict(maximize=_FLAG, l2=_FLAG, first=_FLAG, nesterov=_FLAG),
        variant=lambda row: (
            count_variant(row["maximize"], row["l2"], row["first"], row["nesterov"]),
            0,
            3,
        ),
    ),
    "update": dict(
        operands=("p", "g", "s"),
        axes=dict(maximize=_FLAG, decay=("none", "l2", "cautious"), nesterov=_FLAG, factor=_FACTOR),
        variant=lambda row: (
            update_variant(
                row["maximize"], row["decay"] == "l2", row["decay"] == "cautious", row["nesterov"]
            ),
            _FACTOR.index(row["factor"]),
            4,
        ),
    ),
}
