"""Multi-tensor torch backend (``torch._foreach_*``): the default on CPU, the fallback on GPU.

Same math and the same operation order as :mod:`.reference`, expressed as a few
horizontal ops over the whole list instead of a Python loop of small ops. Lists are
grouped by dtype and device by the caller (:mod:`dist_cautious.kernels`).
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


def count_pass(grads: list[Tensor], exp_avgs: list[Tensor], beta1: float, maximize: bool) -> Tensor:
    if not exp_avgs:
        return torch.zeros(0, dtype=torch.int64)
    dt = compute_dtype(exp_avgs[0])
    gs = _grads(grads, dt, maximize)
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    prods = torch._foreach_mul(exp_avgs, gs)
    return torch.stack([(x > 0).sum(dtype=torch.int64) for x in prods])


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

    # mask = (m * g > 0) as 0/1 in the compute dtype: sign(m*g) clamped at 0.
    upd = torch._foreach_mul(exp_avgs, gs)
    torch._foreach_sign_(upd)
    torch._foreach_clamp_min_(upd, 0)
    torch._foreach_mul_(upd, exp_avgs)
    torch._foreach_mul_(upd, list(alphas.to(dt).unbind()))
    torch._foreach_addcdiv_(ps, upd, denom, -h.step_size)
    if low_precision:
        torch._foreach_copy_(params, ps)
