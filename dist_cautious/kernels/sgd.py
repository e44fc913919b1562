"""Cautious SGD with heavy-ball or Nesterov momentum, per tensor and multi-tensor: ``CSGD``.

``torch.optim.SGD`` semantics (momentum > 0, ``dampening``, ``nesterov``, L2 ``weight_decay``,
``maximize``) with the cautious mask of arXiv 2411.16085. Per tensor, with ``g`` the
gradient (negated under ``maximize``) and ``buf`` the state ``momentum_buffer`` (torch's
name and meaning, so state dicts move between the two):

    g_eff = g + wd * p                        # L2, as torch SGD (not with cautious_wd)
    buf  <- g_eff                             # first step (h.first_step)
          | momentum * buf + (1 - dampening) * g_eff
    d     = g_eff + momentum * buf            # nesterov
          | buf                               # heavy ball
    mask  = (d * g_eff > 0)
    p    <- p - lr * alpha * mask * d

``alpha`` is the per-tensor factor from the exact counts of ``mask``
(:func:`~dist_cautious.kernels.common.cautious_factor`), computed between the two passes.

Cautious weight decay (``h.cautious_wd``, arXiv 2510.12402): the L2 term is **not** added to
the gradient (``g_eff = g``); the decay is decoupled, as in AdamW, and acts only on
coordinates where the update direction ``d`` (before the cautious mask) agrees in sign with
the parameter, the paper's ``I(d * p >= 0)``, evaluated on the parameter before the step:

    p    <- p * (1 - lr * wd * 1[d * p >= 0]) - lr * alpha * mask * d

Two passes:

1. ``count_pass`` updates ``buf`` in place (the algorithm allows it: the next pass only
   needs the new buffer) and returns int64 counts of the mask per tensor. ``d`` and the
   mask are computed from the buffer as stored (rounded to a 16-bit ``state_dtype``), so
   the mask counted is the mask the update pass applies. Reads g, buf (and p with L2
   decay), writes buf: 12 bytes per fp32 parameter (16 with L2 decay);
2. ``update_pass`` recomputes ``g_eff``, ``d`` and the mask from the updated buffer (or
   takes them from ``scratch``) and steps ``p``: reads p, g, buf, writes p: 16 bytes.

28 bytes per fp32 parameter in all, 32 with L2 decay (torch SGD: 20).
Arithmetic is float32 (float64 when the state is float64); ``p`` and ``buf`` are written
back in their own dtypes.

``dist_cautious.kernels.get_backend(name, "sgd")`` returns a backend (``"reference"``,
``"foreach"``, ``"triton"``: :mod:`.triton_sgd`), each with
``count_pass(params, grads, states, h, scratch=None) -> int64[n]`` and
``update_pass(params, grads, states, alphas, h, scratch=None)``,
``states = (momentum_buffers,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import foreach as _fe
from .common import Capabilities, Functions, SGDHyper, compute_dtype, masked_step

STATE_KEYS = ("momentum_buffer",)

__all__ = ["STATE_KEYS", "SGDHyper", "foreach", "reference"]


def _zeros(device: torch.device | None = None) -> Tensor:
    return torch.zeros(0, dtype=torch.int64, device=device)


def _l2(h: SGDHyper) -> bool:
    return h.weight_decay != 0 and not h.cautious_wd


# --------------------------------------------------------------------------- reference


def _ref_grad(p: Tensor, g: Tensor, dt: torch.dtype, h: SGDHyper) -> Tensor:
    gc = g.to(dt)
    if h.maximize:
        gc = -gc
    if _l2(h):
        gc = gc.add(p.to(dt), alpha=h.weight_decay)
    return gc


def _ref_direction(ge: Tensor, buf: Tensor, h: SGDHyper) -> Tensor:
    return ge.add(buf, alpha=h.momentum) if h.nesterov else buf


def reference_count_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    h: SGDHyper,
    scratch: dict | None = None,
) -> Tensor:
    """Momentum buffers updated in place; int64 counts of ``d * g_eff > 0`` per tensor."""
    (bufs,) = states
    counts = []
    for p, g, b in zip(params, grads, bufs):
        if b.numel() == 0:
            counts.append(torch.zeros((), dtype=torch.int64, device=b.device))
            continue
        dt = compute_dtype(b)
        ge = _ref_grad(p, g, dt, h)
        if h.first_step:
            b.copy_(ge)
        else:
            b.copy_(b.to(dt).mul(h.momentum).add_(ge, alpha=1 - h.dampening))
        d = _ref_direction(ge, b.to(dt), h)  # from the buffer as stored
        counts.append((d * ge > 0).sum(dtype=torch.int64))
    return torch.stack(counts) if counts else _zeros()


def reference_update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    alphas: Tensor,
    h: SGDHyper,
    scratch: dict | None = None,
) -> None:
    """The masked, rescaled momentum step (and cautious decay), in place; ``buf`` is read."""
    if scratch is not None:
        scratch.clear()
    (bufs,) = states
    for i, (p, g, b) in enumerate(zip(params, grads, bufs)):
        if p.numel() == 0:
            continue
        dt = compute_dtype(b)
        ge = _ref_grad(p, g, dt, h)
        d = _ref_direction(ge, b.to(dt), h)
        mask = d * ge > 0
        pc = p.to(dt)
        if h.cautious_wd and h.weight_decay != 0:
            pc = torch.where(d * pc >= 0, pc * (1 - h.lr * h.weight_decay), pc)
        masked_step(p, pc, mask, d, alphas[i], h.lr)


# --------------------------------------------------------------------------- foreach
# On CPU the temporaries (g_eff, d for Nesterov, the mask, fp32 copies of 16-bit tensors)
# live in scratch buffers kept between steps and keyed by the momentum buffers (see
# foreach.scratch_for: a fresh large CPU allocation costs page faults every step): 4 bytes
# per element of CPU memory for heavy ball, 8 with Nesterov, more with 16-bit tensors, L2
# decay or maximize. Other devices allocate. Slots of foreach.scratch_for used here:
# 30 g_eff, 31 buf, 32 d, 33 mask, 34 p.


_host = _fe.on_host  # the tests switch it off to run the device path on CPU


def _bufs(keys: list[Tensor], dt: torch.dtype, slot: int) -> list[Tensor] | None:
    return _fe.host_bufs(keys, dt, slot, bool(keys) and _host(keys[0]))


def _fe_grads(
    params: list[Tensor], grads: list[Tensor], dt: torch.dtype, h: SGDHyper, keys: list[Tensor]
) -> list[Tensor]:
    gs, copied = _fe.as_compute(grads, dt, keys, slot=30)
    if h.maximize:
        gs = _fe.negated(gs, copied, None if copied else _bufs(keys, dt, 30))
        copied = True
    if _l2(h):
        ps, _ = _fe.as_compute(params, dt, keys, slot=34)
        out = None if copied else _bufs(keys, dt, 30)
        if copied:
            torch._foreach_add_(gs, ps, alpha=h.weight_decay)
        elif out is not None:
            for g, p, o in zip(gs, ps, out):
                torch.add(g, p, alpha=h.weight_decay, out=o)
            gs = out
        else:
            gs = torch._foreach_add(gs, ps, alpha=h.weight_decay)
    return gs


def _fe_direction(ges: list[Tensor], bs: list[Tensor], h: SGDHyper, keys: list[Tensor]):
    """(d, 0/1 mask in the compute dtype); ``d`` is ``bs`` itself for heavy ball."""
    dt = ges[0].dtype
    if h.nesterov:
        ds = _bufs(keys, dt, 32)
        if ds is None:
            ds = torch._foreach_add(ges, bs, alpha=h.momentum)
        else:
            for g, b, d in zip(ges, bs, ds):
                torch.add(g, b, alpha=h.momentum, out=d)
    else:
        ds = bs
    masks = _bufs(keys, dt, 33)
    if masks is None:
        masks = torch._foreach_mul(ds, ges)
    else:
        for d, g, x in zip(ds, ges, masks):
            torch.mul(d, g, out=x)
    for x in masks:
        x.gt_(0)
    return ds, masks


def _fingerprint(h: SGDHyper, ts: tuple[list[Tensor], ...]) -> tuple:
    return (
        h.momentum,
        h.nesterov,
        h.weight_decay,
        h.maximize,
        h.cautious_wd,
        tuple(tuple(map(id, x)) for x in ts),
        tuple(tuple(t._version for t in x) for x in ts),
    )


def foreach_count_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    h: SGDHyper,
    scratch: dict | None = None,
) -> Tensor:
    """As :func:`reference_count_pass`, with ``torch._foreach_*`` ops; hands ``d`` and the
    mask to the update pass through ``scratch`` (checked by identity and version counters)."""
    if scratch is not None:
        scratch.clear()
    (bufs,) = states
    if not bufs:
        return _zeros()
    dt = compute_dtype(bufs[0])
    ges = _fe_grads(params, grads, dt, h, bufs)
    if h.first_step:
        torch._foreach_copy_(bufs, ges)
    else:
        bs, copied = _fe.as_compute(bufs, dt, bufs, slot=31)
        torch._foreach_mul_(bs, h.momentum)
        torch._foreach_add_(bs, ges, alpha=1 - h.dampening)
        if copied:
            torch._foreach_copy_(bufs, bs)
    bs, _ = _fe.as_compute(bufs, dt, bufs, slot=31)  # as stored
    ds, masks = _fe_direction(ges, bs, h, bufs)
    counts = _fe.mask_counts(masks)
    if scratch is not None:
        scratch.update(key=_fingerprint(h, (params, grads, bufs)), ds=ds, masks=masks)
    return counts


def foreach_update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    alphas: Tensor,
    h: SGDHyper,
    scratch: dict | None = None,
) -> None:
    """As :func:`reference_update_pass` (bitwise), with ``torch._foreach_*`` ops."""
    (bufs,) = states
    hit = _fe.take_handoff(scratch, _fingerprint(h, (params, grads, bufs)), ("ds", "masks"))
    if not params:
        return
    dt = compute_dtype(bufs[0])
    if hit is None:
        ges = _fe_grads(params, grads, dt, h, bufs)
        bs, _ = _fe.as_compute(bufs, dt, bufs, slot=31)
        ds, masks = _fe_direction(ges, bs, h, bufs)
    else:
        ds, masks = hit
    ps, p_copied = _fe.as_compute(params, dt, bufs, slot=34)
    if h.cautious_wd and h.weight_decay != 0:
        torch._foreach_mul_(ps, _fe.decay_factors(ds, ps, 1 - h.lr * h.weight_decay))
    _fe.masked_step(ps, masks, ds, alphas, h.lr, dt, _host(ps[0]))
    if p_copied:
        torch._foreach_copy_(params, ps)


# --------------------------------------------------------------------------- backends
# Both take the caller's per-bucket ``scratch`` dict (foreach hands the mask from count to
# update through it; reference only clears it). The Triton backend: :mod:`.triton_sgd`.
reference = Functions(reference_count_pass, reference_update_pass, Capabilities(takes_scratch=True))
foreach = Functions(foreach_count_pass, foreach_update_pass, Capabilities(takes_scratch=True))
