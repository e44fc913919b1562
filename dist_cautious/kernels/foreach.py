"""Multi-tensor torch backend (``torch._foreach_*``): the default on CPU, the fallback on GPU.

Same math as :mod:`.reference`, expressed as a few horizontal ops over the whole list
instead of a Python loop of small ops. Lists are grouped by dtype and device by the caller
(:mod:`dist_cautious.kernels`).

Savings against a literal transcription (each pass over memory counts on CPU):

* the mask ``m * g > 0`` computed by :func:`count_pass` (0/1 in the compute dtype, in the
  buffer of the product) is handed to :func:`update_pass` through the caller's
  ``scratch`` dict (the optimizer keeps one per bucket of its step plan, so buckets of
  several param groups do not evict each other) and reused when the tensors are the same
  and unmodified (checked by identity and version counters); otherwise it is recomputed.
  With 16-bit moments (``state_dtype``) it is always recomputed from the stored moment, as
  the reference does;
* on CPU that mask and the denominator (and, for bf16/fp16 parameters, their float32
  copies and the gradients') live in scratch buffers kept between steps (8 bytes per
  element of CPU memory, 16 with 16-bit parameters; AdamW allocates as much afresh every
  step): a fresh large CPU allocation costs page faults on every step, several times the
  op itself;
* on CPU the per-tensor factor is folded into the ``addcdiv`` scalar
  (``p + (-lr/bc1 * alpha) * (m * mask / denom)``, equal up to rounding to the reference
  order, and bitwise AdamW's update where nothing is masked and alpha is 1); on other
  devices ``alpha`` stays a device tensor (no host sync).

Cautious weight decay (``h.cautious_wd``) multiplies by :func:`decay_factors` (``1 - lr * wd``
where ``m * p >= 0``, else 1) instead of the scalar: bitwise the reference's decay.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .common import UpdateHyper, compute_dtype


def as_compute(
    ts: list[Tensor], dt: torch.dtype, keys: list[Tensor], slot: int
) -> tuple[list[Tensor], bool]:
    """``ts`` in the compute dtype, and whether that is a copy. On CPU the copies go to
    scratch buffers (keyed by the stable tensors ``keys``, see ``_scratch``)."""
    if all(t.dtype == dt for t in ts):
        return ts, False
    if ts[0].device.type == "cpu":
        out = [scratch_for(k, dt, slot) for k in keys]
        torch._foreach_copy_(out, ts)
        return out, True
    return [t.to(dt) for t in ts], True


def _grads(
    grads: list[Tensor], dt: torch.dtype, maximize: bool, keys: list[Tensor]
) -> list[Tensor]:
    gs, copied = as_compute(grads, dt, keys, slot=2)
    if maximize:
        if copied:
            torch._foreach_neg_(gs)
        else:
            gs = torch._foreach_neg(gs)
    return gs


def _fingerprint(grads: list[Tensor], exp_avgs: list[Tensor]) -> tuple:
    return (
        tuple(map(id, grads)),
        tuple(map(id, exp_avgs)),
        tuple(t._version for t in grads),
        tuple(t._version for t in exp_avgs),
    )


def decay_factors(dirs: list[Tensor], ps: list[Tensor], decay: float) -> list[Tensor]:
    """Cautious weight decay: per element ``decay`` where ``dir * p >= 0``, else 1, in the
    dtype of ``ps`` (the value ``p * decay`` takes in the reference: bitwise the same)."""
    if not ps:
        return []
    hi = torch.tensor(decay, dtype=ps[0].dtype, device=ps[0].device)
    one = torch.ones((), dtype=ps[0].dtype, device=ps[0].device)
    return [torch.where(x >= 0, hi, one) for x in torch._foreach_mul(dirs, ps)]


def count_ones(mask: Tensor) -> Tensor:
    """Exact number of ones in a 0/1 float tensor: a float32 sum is exact while every partial
    sum stays below 2**24; larger tensors are summed in float64."""
    if mask.numel() < (1 << 24) and mask.dtype == torch.float32:
        return mask.sum()
    return mask.sum(dtype=torch.float64)


# CPU: one scratch buffer per exp_avg, kept between steps (freshly allocated large CPU
# buffers cost page faults on every step, several times the op itself). Keyed by id, checked
# by a weak reference, dropped when the exp_avg dies.
_scratch: dict[tuple[int, int], tuple[weakref.ref, Tensor]] = {}


def scratch_for(m: Tensor, dt: torch.dtype, slot: int = 0) -> Tensor:
    key = (id(m), slot)
    hit = _scratch.get(key)
    if hit is not None and hit[0]() is m and hit[1].shape == m.shape and hit[1].dtype == dt:
        return hit[1]
    buf = torch.empty(m.shape, dtype=dt)
    _scratch[key] = (weakref.ref(m, lambda _, k=key: _scratch.pop(k, None)), buf)
    return buf


def on_host(t: Tensor) -> bool:
    """CPU tensors take the host path (scratch buffers, host scalars)."""
    return t.device.type == "cpu"


def host_bufs(keys: list[Tensor], dt: torch.dtype, slot: int, host: bool) -> list[Tensor] | None:
    """Scratch buffers of ``keys`` for ``slot`` on the host path, else None (allocate)."""
    if not keys or not host:
        return None
    return [scratch_for(k, dt, slot) for k in keys]


def negated(gs: list[Tensor], copied: bool, out: list[Tensor] | None) -> list[Tensor]:
    """``-gs``: in place when ``gs`` is already a copy, into ``out`` when given (host scratch),
    else freshly allocated."""
    if copied:
        torch._foreach_neg_(gs)
        return gs
    if out is not None:
        for g, o in zip(gs, out):
            torch.neg(g, out=o)
        return out
    return torch._foreach_neg(gs)


def mask_counts(masks: list[Tensor]) -> Tensor:
    """int64 number of ones per 0/1 mask (exact: see :func:`count_ones`)."""
    return torch.stack([count_ones(x).to(torch.float64) for x in masks]).to(torch.int64)


def take_handoff(scratch: dict | None, key: tuple, names: tuple[str, ...]) -> tuple | None:
    """The tensors ``names`` the count pass left in ``scratch`` under ``key`` (None when the
    key differs); ``scratch`` is cleared: nothing is kept alive past the update."""
    hit = None
    if scratch and scratch.get("key") == key:
        hit = tuple(scratch[n] for n in names)
    if scratch is not None:
        scratch.clear()
    return hit


def masked_step(
    ps: list[Tensor],
    masks: list[Tensor],
    dirs: list[Tensor],
    alphas: Tensor,
    lr: float,
    dt: torch.dtype,
    host: bool,
) -> None:
    """``p <- p - (lr * alpha) * mask * dir`` per tensor, ``lr * alpha`` rounded to ``dt`` as
    the reference rounds it. Host: one ``addcmul`` with host scalars (same roundings); else
    the step stays on the device (no host sync) and the mask's buffer becomes the step."""
    steps = alphas.to(device=ps[0].device, dtype=dt) * lr
    if host:
        torch._foreach_addcmul_(ps, masks, dirs, [-s for s in steps.tolist()])
    else:
        upd = masks  # mask * dir * (lr * alpha): exact for Lion's -1/0/1 direction
        torch._foreach_mul_(upd, dirs)
        torch._foreach_mul_(upd, list(steps.unbind()))
        torch._foreach_sub_(ps, upd)


def _mask_products(
    exp_avgs: list[Tensor], gs: list[Tensor], dt: torch.dtype, keys: list[Tensor]
) -> list[Tensor]:
    """``(m * g > 0)`` as 0/1 in the compute dtype (CPU: in the scratch buffers of ``keys``)."""
    if exp_avgs[0].device.type == "cpu":
        masks = [scratch_for(k, dt) for k in keys]
        for m, g, x in zip(exp_avgs, gs, masks):
            torch.mul(m, g, out=x)
    else:
        masks = torch._foreach_mul(exp_avgs, gs)
    for x in masks:
        x.gt_(0)
    return masks


def count_pass(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    beta1: float,
    maximize: bool,
    scratch: dict | None = None,
) -> Tensor:
    if scratch is not None:
        scratch.clear()
    if not exp_avgs:
        return torch.zeros(0, dtype=torch.int64)
    dt = compute_dtype(exp_avgs[0])
    gs = _grads(grads, dt, maximize, exp_avgs)
    ms, copied = as_compute(exp_avgs, dt, exp_avgs, slot=4)  # 16-bit moments: fp32 copies
    torch._foreach_lerp_(ms, gs, 1 - beta1)
    masks = _mask_products(ms, gs, dt, keys=exp_avgs)
    if copied:
        torch._foreach_copy_(exp_avgs, ms)
    sums = [count_ones(x) for x in masks]
    if masks[0].device.type == "cpu":  # exact integer-valued floats; .item() is free here
        counts = torch.tensor([int(x.item()) for x in sums], dtype=torch.int64)
    else:
        counts = torch.stack([x.to(torch.float64) for x in sums]).to(torch.int64)
    if scratch is not None and not copied:
        scratch.update(key=_fingerprint(grads, exp_avgs), maximize=maximize, masks=masks)
    return counts


def _masks(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    ms: list[Tensor],
    gs: list[Tensor],
    maximize: bool,
    scratch: dict | None,
) -> list[Tensor]:
    if scratch:
        masks = scratch.get("masks")
        hit = scratch.get("maximize") == maximize and scratch.get("key") == _fingerprint(
            grads, exp_avgs
        )
        scratch.clear()  # hand-off only: no mask is kept alive past the update
        if hit:
            return masks  # type: ignore[return-value]
    return _mask_products(ms, gs, compute_dtype(ms[0]), keys=exp_avgs)


def update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    alphas: Tensor,
    h: UpdateHyper,
    scratch: dict | None = None,
) -> None:
    if not params:
        if scratch is not None:
            scratch.clear()
        return
    dt = compute_dtype(exp_avgs[0])
    gs = _grads(grads, dt, h.maximize, exp_avgs)
    # 16-bit moments (state_dtype): computed in float32 copies, stored rounded; the
    # denominator uses the unrounded second moment, as the reference does.
    ms, _ = as_compute(exp_avgs, dt, exp_avgs, slot=4)
    vs, v_copied = as_compute(exp_avg_sqs, dt, exp_avg_sqs, slot=5)
    torch._foreach_mul_(vs, h.beta2)
    torch._foreach_addcmul_(vs, gs, gs, 1 - h.beta2)
    if v_copied:
        torch._foreach_copy_(exp_avg_sqs, vs)

    ps, low_precision = as_compute(params, dt, exp_avg_sqs, slot=3)
    if h.weight_decay != 0:
        if h.cautious_wd:  # decay where sign(m) agrees with p (m * p >= 0), as the reference
            torch._foreach_mul_(ps, decay_factors(ms, ps, 1 - h.lr * h.weight_decay))
        else:
            torch._foreach_mul_(ps, 1 - h.lr * h.weight_decay)

    upd = _masks(grads, exp_avgs, ms, gs, h.maximize, scratch)
    torch._foreach_mul_(upd, ms)  # m * mask, in the mask buffer
    if vs[0].device.type == "cpu":
        # No fresh allocation (see _scratch). With alpha = 1 this is bitwise AdamW's
        # foreach update (same denominator, same addcdiv).
        denom = [scratch_for(v, dt, slot=1) for v in exp_avg_sqs]
        for v, d in zip(vs, denom):
            torch.sqrt(v, out=d)
        torch._foreach_div_(denom, h.bias_correction2_sqrt)
        torch._foreach_add_(denom, h.eps)
        scal = [-h.step_size * a for a in alphas.tolist()]
        torch._foreach_addcdiv_(ps, upd, denom, scal)
    else:  # as the reference orders it; alpha stays on the device (no host sync)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, h.bias_correction2_sqrt)
        torch._foreach_add_(denom, h.eps)
        torch._foreach_mul_(upd, list(alphas.to(dt).unbind()))
        torch._foreach_addcdiv_(ps, upd, denom, -h.step_size)
    if low_precision:
        torch._foreach_copy_(params, ps)


def one_pass(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    alphas: Tensor,
    h: UpdateHyper,
    scratch: dict | None = None,
) -> Tensor:
    """A ``factor_lag=1`` step (the factors ``alphas`` are the previous step's, known before
    it): :func:`count_pass` and :func:`update_pass` back to back in one call, the mask of the
    first handed to the second; returns this step's int64 counts (for the next step's
    factors). Bitwise the two calls with the same ``alphas``. Torch ops cannot fuse the
    sweeps; the C kernel (``cpu_fused.one_pass``) and Triton do it in one."""
    hand = {} if scratch is None else scratch
    counts = count_pass(grads, exp_avgs, h.beta1, h.maximize, scratch=hand)
    update_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h, scratch=hand)
    return counts
