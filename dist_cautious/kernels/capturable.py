"""Device-scalar kernels: the capturable (and ``torch.compile``) form of every optimizer's math.

The same algorithms as :mod:`.reference` (C-AdamW), :mod:`.lion` and :mod:`.sgd`, written so
that a step never reads a tensor on the host and never branches on data:

* step counters are device tensors (one 0-d tensor per parameter, as torch's capturable
  AdamW keeps them); bias corrections are computed from them on the device;
* ``lr`` may be a Python float or a 0-d tensor (a scheduler may update it in place between
  steps); it is only ever used as a tensor operand, never read;
* the per-tensor factors stay a device vector, applied as per-tensor 0-d tensors;
* SGD's "first step" (torch's fresh ``momentum_buffer``) is a per-tensor 0/1 weight, not a
  Python ``if``.

Only ``torch`` ops (mostly ``torch._foreach_*``) are used, so dynamo traces them into one
graph and a CUDA graph can capture them. Arithmetic is float32 (float64 for float64 state),
parameters and state are written back in their own dtypes; results agree with the other
backends to float rounding (the bias corrections are float64 device scalars here, Python
floats there).

Each optimizer has ``count(ps, gs, states, steps, group) -> (int64 counts, handoff)`` and
``update(ps, gs, states, steps, alphas, group, handoff)``; all lists are local tensors of one
param group, ``steps`` the list of (already incremented) 0-d step counters, ``alphas`` the
float64 per-tensor factors. Per-tensor scalars are computed on stacked vectors in eager mode
(a few ops) and per 0-d tensor under ``torch.compile`` (:func:`per_tensor`), where the counts
are a list of 0-d tensors too: inductor then computes every scalar inside its fused kernel,
while stacking 0-d tensors makes it pass one view per tensor at every call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from .common import compute_dtype


def _compute(ts: list[Tensor], dt: torch.dtype) -> tuple[list[Tensor], bool]:
    """``ts`` in the compute dtype (copies if any differs) and whether they are copies."""
    if all(t.dtype == dt for t in ts):
        return ts, False
    return [t.to(dt) for t in ts], True


def _grads(gs: list[Tensor], dt: torch.dtype, maximize: bool) -> list[Tensor]:
    gs, copied = _compute(gs, dt)
    if maximize:
        if copied:
            torch._foreach_neg_(gs)
        else:
            gs = torch._foreach_neg(gs)
    return gs


def _masks(us: list[Tensor], gs: list[Tensor]) -> list[Tensor]:
    """``(u * g > 0)`` as 0/1 in the compute dtype (NaN gives 0, as the other backends)."""
    masks = torch._foreach_mul(us, gs)
    for x in masks:
        x.gt_(0)
    return masks


def _counts(masks: list[Tensor]) -> Tensor | list[Tensor]:
    """Exact int64 number of ones per mask. Eager: a vector, from one float64 1-norm over the
    list (exact for 0/1 values); compiled: a list of 0-d per-tensor sums, which inductor fuses
    into its kernel (``_foreach_norm`` with a dtype is not lowered: a fallback op per step)."""
    if torch.compiler.is_compiling():
        return [x.sum(dtype=torch.int64) for x in masks]
    return torch.stack(torch._foreach_norm(masks, 1, dtype=torch.float64)).to(torch.int64)


def per_tensor(fn: Any, *cols: Any) -> list[Tensor]:
    """``fn`` of per-tensor scalars (each column a list of 0-d tensors or a vector), as a
    list of 0-d tensors: one call on stacked vectors in eager mode, one call per tensor under
    ``torch.compile`` (see the module doc)."""
    if torch.compiler.is_compiling():
        return [fn(*xs) for xs in zip(*cols)]
    vecs = [c if isinstance(c, Tensor) else torch.stack(c) for c in cols]
    return list(fn(*vecs).unbind())


def _decay(ps: list[Tensor], dirs: list[Tensor], lr: Any, wd: float, cautious: bool) -> None:
    """Decoupled weight decay ``p *= 1 - lr * wd`` (with ``cautious``: only where
    ``dir * p >= 0``); ``lr`` a float or a 0-d tensor."""
    if wd == 0:
        return
    keep = 1 - lr * wd
    if not cautious:
        torch._foreach_mul_(ps, keep)
        return
    if not isinstance(keep, Tensor):  # a fill, not a host-to-device copy (capturable)
        keep = torch.full((), keep, dtype=ps[0].dtype, device=ps[0].device)
    keep = keep.to(ps[0].dtype)
    factors = [torch.where(x >= 0, keep, 1.0) for x in torch._foreach_mul(dirs, ps)]
    torch._foreach_mul_(ps, factors)


def _write_back(dst: list[Tensor], src: list[Tensor], copied: bool) -> None:
    if copied:
        torch._foreach_copy_(dst, src)


def _masked_step(
    pc: list[Tensor], upd: list[Tensor], dirs: list[Tensor], alphas: Any, lr: Any, dt: torch.dtype
) -> None:
    """``p <- p - (lr * alpha) * mask * dir`` (Lion, SGD), ``lr * alpha`` rounded once to
    ``dt``; ``upd`` holds the 0/1 masks and becomes the step."""
    step = per_tensor(lambda a: a.to(dt) * lr, alphas)
    torch._foreach_mul_(upd, dirs)  # mask * dir
    torch._foreach_mul_(upd, step)
    torch._foreach_sub_(pc, upd)


# --------------------------------------------------------------------------- AdamW


def adamw_count(
    ps: list[Tensor],
    gs: list[Tensor],
    states: tuple[list[Tensor], ...],
    steps: list[Tensor],
    group: dict[str, Any],
) -> tuple[Tensor | list[Tensor], dict]:
    exp_avgs, _ = states
    dt = compute_dtype(exp_avgs[0])
    gc = _grads(gs, dt, bool(group["maximize"]))
    ms, copied = _compute(exp_avgs, dt)
    torch._foreach_lerp_(ms, gc, 1 - group["betas"][0])
    _write_back(exp_avgs, ms, copied)
    masks = _masks(ms, gc)
    if copied:  # 16-bit moments: pass 2 uses the moment as stored, as the reference does
        return _counts(masks), {"gs": gc, "ms": _compute(exp_avgs, dt)[0], "masks": None}
    return _counts(masks), {"gs": gc, "ms": ms, "masks": masks}


def adamw_update(
    ps: list[Tensor],
    gs: list[Tensor],
    states: tuple[list[Tensor], ...],
    steps: list[Tensor],
    alphas: Tensor | list[Tensor],
    group: dict[str, Any],
    kw: dict,
) -> None:
    exp_avgs, exp_avg_sqs = states
    gc, ms, upd = kw["gs"], kw["ms"], kw["masks"]
    dt = ms[0].dtype
    if upd is None:
        upd = _masks(ms, gc)
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    vs, v_copied = _compute(exp_avg_sqs, dt)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gc, gc, 1 - beta2)
    _write_back(exp_avg_sqs, vs, v_copied)
    pc, p_copied = _compute(ps, dt)
    _decay(pc, ms, lr, group["weight_decay"], bool(group["cautious_weight_decay"]))
    # bias corrections in float64, as the host computes them in the planned step: in float32
    # 1 - beta2**t loses ~1e-5 of its value at t = 1 (cancellation)
    bc2_sqrt = per_tensor(
        lambda s: torch.sqrt(1 - torch.pow(beta2, s.to(torch.float64))).to(dt), steps
    )
    coef = per_tensor(  # -lr / bc1 * alpha, per tensor
        lambda s, a: ((-lr * a) / (1 - torch.pow(beta1, s.to(torch.float64)))).to(dt),
        steps,
        alphas,
    )
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(upd, ms)  # m * mask
    torch._foreach_mul_(upd, coef)
    torch._foreach_addcdiv_(pc, upd, denom)
    _write_back(ps, pc, p_copied)


# --------------------------------------------------------------------------- Lion


def lion_count(
    ps: list[Tensor],
    gs: list[Tensor],
    states: tuple[list[Tensor], ...],
    steps: list[Tensor],
    group: dict[str, Any],
) -> tuple[Tensor | list[Tensor], dict]:
    (exp_avgs,) = states
    dt = compute_dtype(exp_avgs[0])
    gc = _grads(gs, dt, bool(group["maximize"]))
    ms, copied = _compute(exp_avgs, dt)
    us = torch._foreach_lerp(ms, gc, 1 - group["betas"][0])
    torch._foreach_sign_(us)
    masks = _masks(us, gc)
    return _counts(masks), {"gs": gc, "ms": ms, "m_copied": copied, "us": us, "masks": masks}


def lion_update(
    ps: list[Tensor],
    gs: list[Tensor],
    states: tuple[list[Tensor], ...],
    steps: list[Tensor],
    alphas: Tensor | list[Tensor],
    group: dict[str, Any],
    kw: dict,
) -> None:
    (exp_avgs,) = states
    gc, ms, us, upd = kw["gs"], kw["ms"], kw["us"], kw["masks"]
    dt = ms[0].dtype
    lr = group["lr"]
    pc, p_copied = _compute(ps, dt)
    _decay(pc, us, lr, group["weight_decay"], bool(group["cautious_weight_decay"]))
    _masked_step(pc, upd, us, alphas, lr, dt)
    _write_back(ps, pc, p_copied)
    torch._foreach_lerp_(ms, gc, 1 - group["betas"][1])
    _write_back(exp_avgs, ms, kw["m_copied"])


# --------------------------------------------------------------------------- SGD


def sgd_count(
    ps: list[Tensor],
    gs: list[Tensor],
    states: tuple[list[Tensor], ...],
    steps: list[Tensor],
    group: dict[str, Any],
) -> tuple[Tensor | list[Tensor], dict]:
    (bufs,) = states
    dt = compute_dtype(bufs[0])
    momentum, dampening = group["momentum"], group["dampening"]
    wd, cwd = group["weight_decay"], bool(group["cautious_weight_decay"])
    ge = _grads(gs, dt, bool(group["maximize"]))
    if wd != 0 and not cwd:  # L2, as torch SGD
        pc, _ = _compute(ps, dt)
        ge = torch._foreach_add(ge, pc, alpha=wd)
    # torch SGD's first step sets the buffer to g_eff: per tensor, first = (step == 1), then
    # buf <- buf * (momentum * (1 - first)) + g_eff * ((1 - dampening) * (1 - first) + first)
    keep = per_tensor(lambda s: momentum * (1 - (s == 1).to(dt)), steps)
    gain = per_tensor(lambda s: (1 - dampening) * (1 - (s == 1).to(dt)) + (s == 1).to(dt), steps)
    bs, copied = _compute(bufs, dt)
    torch._foreach_mul_(bs, keep)
    torch._foreach_add_(bs, torch._foreach_mul(ge, gain))
    _write_back(bufs, bs, copied)
    if copied:  # as stored (a 16-bit state_dtype), so the mask counted is the one applied
        bs, _ = _compute(bufs, dt)
    ds = torch._foreach_add(ge, bs, alpha=momentum) if group["nesterov"] else bs
    masks = _masks(ds, ge)
    return _counts(masks), {"ds": ds, "masks": masks}


def sgd_update(
    ps: list[Tensor],
    gs: list[Tensor],
    states: tuple[list[Tensor], ...],
    steps: list[Tensor],
    alphas: Tensor | list[Tensor],
    group: dict[str, Any],
    kw: dict,
) -> None:
    ds, upd = kw["ds"], kw["masks"]
    dt = upd[0].dtype
    lr = group["lr"]
    pc, p_copied = _compute(ps, dt)
    if group["cautious_weight_decay"]:
        _decay(pc, ds, lr, group["weight_decay"], True)
    _masked_step(pc, upd, ds, alphas, lr, dt)
    _write_back(ps, pc, p_copied)


ADAMW = SimpleNamespace(count=adamw_count, update=adamw_update)
LION = SimpleNamespace(count=lion_count, update=lion_update)
SGD = SimpleNamespace(count=sgd_count, update=sgd_update)
