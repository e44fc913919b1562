"""Readable per-tensor C-AdamW: the specification every faster backend must match.

Each function works on lists of *local* tensors (whole tensors, DTensor shards or
slices of a ZeRO flat partition: the kernels never know which). A step is two passes:

1. :func:`count_pass` updates the first moment in place and counts, per tensor, the
   elements whose updated momentum agrees in sign with the gradient,
   ``nnz = sum(exp_avg * grad > 0)``. Counts are exact int64.
2. The caller turns counts into one factor ``alpha`` per tensor (summing counts over
   shards first when needed, see :mod:`dist_cautious.reduce`), then :func:`update_pass`
   updates the second moment and the parameter:

   ``p <- p * (1 - lr * wd) - lr / bc1 * alpha * mask * m / (sqrt(v) / sqrt(bc2) + eps)``

   With ``cautious_wd`` (cautious weight decay, arXiv 2510.12402) the decoupled decay acts
   only on coordinates where the Adam direction agrees in sign with the parameter (the
   direction's sign is ``sign(m)``, the denominator being positive), the paper's
   ``I(u * p >= 0)``, evaluated on the parameter before the step:

   ``p <- p * (1 - lr * wd * 1[m * p >= 0]) - lr / bc1 * alpha * mask * m / (...)``

The split between passes follows the bytes: pass 1 reads g and m and writes m; pass 2
reads p, g, m, v and writes p and v (36 bytes per fp32 parameter in all).

Arithmetic is done in float32 (or the state dtype when wider); the parameter is
written back in its own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import UpdateHyper, compute_dtype


def count_pass(grads: list[Tensor], exp_avgs: list[Tensor], beta1: float, maximize: bool) -> Tensor:
    """``m <- beta1 * m + (1 - beta1) * g`` in place; return int64 counts of ``m * g > 0``."""
    counts = []
    for g, m in zip(grads, exp_avgs):
        if m.numel() == 0:
            counts.append(torch.zeros((), dtype=torch.int64, device=m.device))
            continue
        gc = g.to(compute_dtype(m))
        if maximize:
            gc = -gc
        m_new = m.to(gc.dtype).lerp(gc, 1 - beta1)
        m.copy_(m_new)
        counts.append((m_new * gc > 0).sum(dtype=torch.int64))
    if not counts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack(counts)


def update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    alphas: Tensor,
    h: UpdateHyper,
) -> None:
    """Second moment, decoupled weight decay, and the masked, rescaled Adam step, in place."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if p.numel() == 0:
            continue
        dt = compute_dtype(m)
        gc = g.to(dt)
        if h.maximize:
            gc = -gc
        mc = m.to(dt)
        v_new = v.to(dt).mul(h.beta2).addcmul(gc, gc, value=1 - h.beta2)
        v.copy_(v_new)
        pc = p.to(dt)
        if h.weight_decay != 0:
            if h.cautious_wd:  # decay only where the Adam direction (sign m) agrees with p
                pc = torch.where(mc * pc >= 0, pc.mul(1 - h.lr * h.weight_decay), pc)
            else:
                pc = pc.mul(1 - h.lr * h.weight_decay)
        denom = (v_new.sqrt() / h.bias_correction2_sqrt).add_(h.eps)
        mask = (mc * gc > 0).to(dt)
        update = mc * mask * alphas[i].to(dt)
        pc = pc.addcdiv(update, denom, value=-h.step_size)
        p.copy_(pc)
