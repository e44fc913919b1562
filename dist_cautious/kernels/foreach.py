"""Multi-tensor torch backend (``torch._foreach_*``): the default on CPU, the fallback on GPU.

Same math as :mod:`.reference`, expressed as a few horizontal ops over the whole list
instead of a Python loop of small ops. Lists are grouped by dtype and device by the caller
(:mod:`dist_cautious.kernels`).

Two savings against a literal transcription (each pass over memory counts on CPU):

* the mask ``m * g > 0`` computed by :func:`count_pass` is kept (1 byte per element) and
  reused by :func:`update_pass` when that is called next with the same, unmodified tensors
  (checked by identity and version counters); otherwise it is recomputed;
* on CPU the per-tensor factor is folded into the ``addcdiv`` scalar
  (``p + (-lr/bc1 * alpha) * (m * mask / denom)``, a rounding-level difference from the
  reference order); on other devices ``alpha`` stays a device tensor (no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import UpdateHyper, compute_dtype


def _as_compute(ts: list[Tensor], dt: torch.dtype) -> list[Tensor]:
    return ts if all(t.dtype == dt for t in ts) else [t.to(dt) for t in ts]


def _grads(grads: list[Tensor], dt: torch.dtype, maximize: bool) -> list[Tensor]:
    gs = _as_compute(grads, dt)
    if maximize:
        gs = torch._foreach_neg(gs)
    return gs


# The masks of the last count pass, with what they were computed from (see module doc).
_last: dict[str, object] = {}


def _fingerprint(grads: list[Tensor], exp_avgs: list[Tensor]) -> tuple:
    return (
        tuple(map(id, grads)),
        tuple(map(id, exp_avgs)),
        tuple(t._version for t in grads),
        tuple(t._version for t in exp_avgs),
    )


def count_pass(grads: list[Tensor], exp_avgs: list[Tensor], beta1: float, maximize: bool) -> Tensor:
    _last.clear()
    if not exp_avgs:
        return torch.zeros(0, dtype=torch.int64)
    dt = compute_dtype(exp_avgs[0])
    gs = _grads(grads, dt, maximize)
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    prods = torch._foreach_mul(exp_avgs, gs)
    masks = [torch.gt(x, 0) for x in prods]
    del prods
    counts = torch.stack([mk.sum(dtype=torch.int64) for mk in masks])
    _last.update(key=_fingerprint(grads, exp_avgs), maximize=maximize, masks=masks)
    return counts


def _masks(grads: list[Tensor], exp_avgs: list[Tensor], gs: list[Tensor], maximize: bool):
    masks = _last.get("masks")
    if masks is not None and _last.get("maximize") == maximize:
        if _last.get("key") == _fingerprint(grads, exp_avgs):
            _last.clear()
            return masks
    _last.clear()
    return [torch.gt(x, 0) for x in torch._foreach_mul(exp_avgs, gs)]


def update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    alphas: Tensor,
    h: UpdateHyper,
) -> None:
    if not params:
        return
    dt = compute_dtype(exp_avgs[0])
    gs = _grads(grads, dt, h.maximize)
    torch._foreach_mul_(exp_avg_sqs, h.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, gs, gs, 1 - h.beta2)

    low_precision = any(p.dtype != dt for p in params)
    ps = [p.to(dt) for p in params] if low_precision else params
    if h.weight_decay != 0:
        torch._foreach_mul_(ps, 1 - h.lr * h.weight_decay)

    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, h.bias_correction2_sqrt)
    torch._foreach_add_(denom, h.eps)

    upd = torch._foreach_mul(exp_avgs, _masks(grads, exp_avgs, gs, h.maximize))  # m * mask
    if alphas.device.type == "cpu":
        scal = [-h.step_size * a for a in alphas.tolist()]
        torch._foreach_addcdiv_(ps, upd, denom, scal)
    else:
        torch._foreach_mul_(upd, list(alphas.to(dt).unbind()))
        torch._foreach_addcdiv_(ps, upd, denom, -h.step_size)
    if low_precision:
        torch._foreach_copy_(params, ps)
