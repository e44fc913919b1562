"""Cautious Lion (the paper's C-Lion), per tensor and multi-tensor: the math of ``CLion``.

Lion as lion-pytorch and timm define it, with the cautious mask of arXiv 2411.16085. Per
tensor, with ``g`` the gradient (negated under ``maximize``) and ``m`` the state
``exp_avg`` (the name lion-pytorch and timm use, so state dicts move between them):

    c     = lerp(m, g, 1 - beta1)             # = beta1 * m + (1 - beta1) * g
    u     = sign(c)                           # the Lion update direction
    mask  = (u * g > 0)                       # same as c * g > 0, but never underflows
    p    <- p * (1 - lr * wd) - lr * alpha * mask * u
    m    <- lerp(m, g, 1 - beta2)

``alpha`` is the per-tensor factor from the exact counts of ``mask``
(:func:`~dist_cautious.kernels.common.cautious_factor`), computed by the caller between the
two passes.

Cautious weight decay (``h.cautious_wd``, arXiv 2510.12402): the decoupled decay acts only
on coordinates where the update direction agrees in sign with the parameter, the paper's
``I(u * p >= 0)`` (``u = 0`` decays), evaluated on the parameter before the step:

    p    <- p * (1 - lr * wd * 1[u * p >= 0]) - lr * alpha * mask * u

Two passes:

1. ``count_pass`` is read-only: it computes ``c``, ``u`` and returns int64 counts of the mask
   per tensor (8 bytes per fp32 parameter: reads g, m);
2. ``update_pass`` recomputes ``c`` with the same arithmetic (or takes ``u`` and the mask
   from ``scratch``), steps ``p`` and updates ``m`` (reads p, g, m, writes p, m: 20 bytes).

28 bytes per fp32 parameter in all (plain Lion: 20); 20 with bf16/fp16 parameters and fp32
state. Arithmetic is float32 (float64 when the state is float64); ``p`` and ``m`` are written
back in their own dtypes. ``lr * alpha`` is rounded once to the compute dtype; ``u`` is
-1/0/1, so ``lr * alpha * u`` is exact and the step is one rounding.

``dist_cautious.kernels.get_backend(name, "lion")`` returns a backend (``"reference"``,
``"foreach"``, ``"triton"``: :mod:`.triton_lion`), each with
``count_pass(params, grads, states, h, scratch=None) -> int64[n]`` and
``update_pass(params, grads, states, alphas, h, scratch=None)``, ``states = (exp_avgs,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import foreach as _fe
from .common import Capabilities, Functions, LionHyper, compute_dtype, masked_step

STATE_KEYS = ("exp_avg",)

__all__ = ["STATE_KEYS", "LionHyper", "foreach", "reference"]


def _zeros(device: torch.device | None = None) -> Tensor:
    return torch.zeros(0, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------- reference


def _ref_direction(g: Tensor, m: Tensor, h: LionHyper) -> tuple[Tensor, Tensor, Tensor]:
    """(g, m, u) in the compute dtype."""
    dt = compute_dtype(m)
    gc = g.to(dt)
    if h.maximize:
        gc = -gc
    mc = m.to(dt)
    return gc, mc, mc.lerp(gc, 1 - h.beta1).sign()


def reference_count_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    h: LionHyper,
    scratch: dict | None = None,
) -> Tensor:
    """int64 counts of ``sign(lerp(m, g, 1 - beta1)) * g > 0`` per tensor; changes nothing."""
    (exp_avgs,) = states
    counts = []
    for g, m in zip(grads, exp_avgs):
        if m.numel() == 0:
            counts.append(torch.zeros((), dtype=torch.int64, device=m.device))
            continue
        gc, _, u = _ref_direction(g, m, h)
        counts.append((u * gc > 0).sum(dtype=torch.int64))
    return torch.stack(counts) if counts else _zeros()


def reference_update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    alphas: Tensor,
    h: LionHyper,
    scratch: dict | None = None,
) -> None:
    """Decay, the masked rescaled sign step, and ``m <- lerp(m, g, 1 - beta2)``, in place."""
    if scratch is not None:
        scratch.clear()
    (exp_avgs,) = states
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs)):
        if p.numel() == 0:
            continue
        gc, mc, u = _ref_direction(g, m, h)
        dt = gc.dtype
        mask = u * gc > 0
        pc = p.to(dt)
        if h.weight_decay != 0:
            decay = 1 - h.lr * h.weight_decay
            pc = torch.where(u * pc >= 0, pc * decay, pc) if h.cautious_wd else pc * decay
        masked_step(p, pc, mask, u, alphas[i], h.lr)
        m.copy_(mc.lerp(gc, 1 - h.beta2))


# --------------------------------------------------------------------------- foreach
# On CPU the temporaries (u, the mask, fp32 copies of 16-bit tensors, negated gradients)
# live in scratch buffers kept between steps and keyed by the state tensors (see
# foreach.scratch_for: a fresh large CPU allocation costs page faults every step): 8 bytes
# per element of CPU memory, more with 16-bit tensors or maximize. Other devices allocate.
# Slots of foreach.scratch_for used here: 20 gradients, 21 exp_avg, 22 u, 23 mask, 24 p.


_host = _fe.on_host  # the tests switch it off to run the device path on CPU


def _bufs(keys: list[Tensor], dt: torch.dtype, slot: int) -> list[Tensor] | None:
    return _fe.host_bufs(keys, dt, slot, bool(keys) and _host(keys[0]))


def _fe_grads(
    grads: list[Tensor], dt: torch.dtype, maximize: bool, keys: list[Tensor]
) -> list[Tensor]:
    gs, copied = _fe.as_compute(grads, dt, keys, slot=20)
    if maximize:
        gs = _fe.negated(gs, copied, None if copied else _bufs(keys, dt, 20))
    return gs


def _fingerprint(h: LionHyper, grads: list[Tensor], exp_avgs: list[Tensor]) -> tuple:
    return (
        h.beta1,
        h.maximize,
        tuple(map(id, grads)),
        tuple(map(id, exp_avgs)),
        tuple(t._version for t in grads),
        tuple(t._version for t in exp_avgs),
    )


def _fe_direction(gs: list[Tensor], ms: list[Tensor], h: LionHyper, keys: list[Tensor]):
    """(u, 0/1 mask in the compute dtype)."""
    dt = gs[0].dtype
    us, masks = _bufs(keys, dt, 22), _bufs(keys, dt, 23)
    if us is None or masks is None:
        us = torch._foreach_lerp(ms, gs, 1 - h.beta1)
        torch._foreach_sign_(us)
        masks = torch._foreach_mul(us, gs)
    else:
        for m, g, u, x in zip(ms, gs, us, masks):
            torch.lerp(m, g, 1 - h.beta1, out=u)
            torch.sign(u, out=u)
            torch.mul(u, g, out=x)
    for x in masks:
        x.gt_(0)
    return us, masks


def foreach_count_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    h: LionHyper,
    scratch: dict | None = None,
) -> Tensor:
    """As :func:`reference_count_pass`, with ``torch._foreach_*`` ops; hands ``u`` and the
    mask to the update pass through ``scratch`` (checked by identity and version counters)."""
    if scratch is not None:
        scratch.clear()
    (exp_avgs,) = states
    if not exp_avgs:
        return _zeros()
    dt = compute_dtype(exp_avgs[0])
    gs = _fe_grads(grads, dt, h.maximize, exp_avgs)
    ms, _ = _fe.as_compute(exp_avgs, dt, exp_avgs, slot=21)
    us, masks = _fe_direction(gs, ms, h, exp_avgs)
    counts = _fe.mask_counts(masks)
    if scratch is not None:
        scratch.update(key=_fingerprint(h, grads, exp_avgs), us=us, masks=masks)
    return counts


def foreach_update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    alphas: Tensor,
    h: LionHyper,
    scratch: dict | None = None,
) -> None:
    """As :func:`reference_update_pass` (bitwise), with ``torch._foreach_*`` ops."""
    (exp_avgs,) = states
    hit = _fe.take_handoff(scratch, _fingerprint(h, grads, exp_avgs), ("us", "masks"))
    if not params:
        return
    dt = compute_dtype(exp_avgs[0])
    gs = _fe_grads(grads, dt, h.maximize, exp_avgs)
    ms, m_copied = _fe.as_compute(exp_avgs, dt, exp_avgs, slot=21)
    us, masks = hit if hit is not None else _fe_direction(gs, ms, h, exp_avgs)
    ps, p_copied = _fe.as_compute(params, dt, exp_avgs, slot=24)
    if h.weight_decay != 0:
        decay = 1 - h.lr * h.weight_decay
        if h.cautious_wd:
            torch._foreach_mul_(ps, _fe.decay_factors(us, ps, decay))
        else:
            torch._foreach_mul_(ps, decay)
    _fe.masked_step(ps, masks, us, alphas, h.lr, dt, _host(ps[0]))
    if p_copied:
        torch._foreach_copy_(params, ps)
    torch._foreach_lerp_(ms, gs, 1 - h.beta2)
    if m_copied:
        torch._foreach_copy_(exp_avgs, ms)


# --------------------------------------------------------------------------- backends
# Both take the caller's per-bucket ``scratch`` dict (foreach hands the mask from count to
# update through it; reference only clears it). The Triton backend: :mod:`.triton_lion`.
reference = Functions(reference_count_pass, reference_update_pass, Capabilities(takes_scratch=True))
foreach = Functions(foreach_count_pass, foreach_update_pass, Capabilities(takes_scratch=True))
