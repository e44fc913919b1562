"""Fused multi-tensor Triton kernels for cautious Lion and cautious SGD-momentum.

The math is :mod:`.lion` and :mod:`.sgd` (their module docs); the machinery is
:mod:`.triton_kernels`' (chunk tables, launch configuration, 128-bit full-chunk path,
masked tails, soft bf16 rounding under the interpreter, int64 atomic counts, fallbacks).
One launch per pass for every tensor of the call:

* Lion: the count kernel is read-only (reads g, m: 8 B per fp32 parameter); the update
  kernel recomputes ``c = lerp(m, g, 1 - beta1)`` with the same code, so the mask applied
  is the mask counted, steps p and writes ``m <- lerp(m, g, 1 - beta2)`` (20 B).
* SGD: the count kernel writes the momentum buffer (reads p only with L2 decay) and counts
  from the buffer as stored; the update kernel recomputes ``g_eff`` and ``d`` from it and
  writes p (16 B).

Float64 tensors, non-contiguous tensors and unsupported dtypes go to the foreach
implementations (same math), with one warning per reason, as for C-AdamW. On CPU tensors
the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import lion as _lion
from . import sgd as _sgd
from .common import LionHyper, SGDHyper, cautious_factor
from .triton_kernels import (
    _CONFIG,
    _VEC,
    INTERPRETED,
    _cast_out,
    _check_device,
    _clamp_tensor,
    _fused_ok,
    _lerp,
    _table,
    _usable,
    _warn_once,
)

__all__ = ["lion", "sgd"]


# --------------------------------------------------------------------------- Lion kernels


@triton.jit
def _alpha(alphas, counts, numels, fparams, t, FACTOR: tl.constexpr):
    # FACTOR: 0 = read alphas[t]; 1 = "clamp", 2 = "paper": from the int64 counts and numels,
    # in float64 exactly as common.cautious_factor (fparams[0] = clamp), as the AdamW kernel.
    if FACTOR == 0:
        return tl.load(alphas + t).to(tl.float32)
    else:
        cnt = tl.load(counts + t).to(tl.float64)
        num = tl.load(numels + t).to(tl.float64)
        if FACTOR == 1:
            a64 = num / tl.maximum(cnt, tl.load(fparams) * num)
        else:
            a64 = num / (cnt + 1.0)
        return a64.to(tl.float32)  # num > 0: tensors without elements have no program


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit(do_not_specialize=["nc", "n"])
def _lion_count_kernel(
    G,
    M,
    tab,
    counts,
    nc,
    n,
    w1,
    MAXIMIZE: tl.constexpr,
    LERP_HI: tl.constexpr,
    VG: tl.constexpr,
    VM: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    LOAD_EV: tl.constexpr,
):
    CHUNK: tl.constexpr = BLOCK * TILES
    pid = tl.program_id(0)
    t = tl.load(tab + pid)
    c = tl.load(tab + nc + pid)
    full = tl.load(tab + 2 * nc + pid)
    og = tl.load(tab + 3 * nc + t) + c * CHUNK
    om = tl.load(tab + 3 * nc + n + t) + c * CHUNK
    rem = tl.load(tab + 3 * nc + 2 * n + t) - c * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    idx0 = tl.arange(0, BLOCK)
    if full != 0:
        gp = G + (og // VG) * VG
        mp = M + (om // VM) * VM
        for i in range(TILES):
            idx = i * BLOCK + idx0
            g = tl.load(gp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            m = tl.load(mp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            if MAXIMIZE:
                g = -g
            u = _sign(_lerp(m, g, w1, LERP_HI))
            acc += (u * g > 0).to(tl.int32)
    else:
        for i in range(TILES):
            idx = i * BLOCK + idx0
            live = idx < rem
            g = tl.load(G + og + idx, mask=live, other=0.0).to(tl.float32)
            m = tl.load(M + om + idx, mask=live, other=0.0).to(tl.float32)
            if MAXIMIZE:
                g = -g
            u = _sign(_lerp(m, g, w1, LERP_HI))
            acc += ((u * g > 0) & live).to(tl.int32)
    total = tl.sum(acc, axis=0).to(tl.int64)
    tl.atomic_add(counts + t, total, sem="relaxed")


@triton.jit
def _lion_math(p, g, m, alpha, lr, w2, decay, DECAY, CWD, LERP_HI2, u):
    # Same order as lion.reference_update_pass (g negated under maximize, u = sign(c)).
    if DECAY:
        if CWD:
            p = tl.where(u * p >= 0, p * decay, p)
        else:
            p = p * decay
    step = alpha * lr
    p = p - step * tl.where(u * g > 0, u, 0.0)
    m = _lerp(m, g, w2, LERP_HI2)
    return p, m


@triton.jit(do_not_specialize=["nc", "n"])
def _lion_update_kernel(
    P,
    G,
    M,
    tab,
    alphas,
    counts,
    numels,
    fparams,
    nc,
    n,
    w1,
    w2,
    lr,
    decay,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
    CWD: tl.constexpr,
    LERP_HI1: tl.constexpr,
    LERP_HI2: tl.constexpr,
    VP: tl.constexpr,
    VG: tl.constexpr,
    VM: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    LOAD_EV: tl.constexpr,
    STORE_CM: tl.constexpr,
    FACTOR: tl.constexpr,
):
    CHUNK: tl.constexpr = BLOCK * TILES
    pid = tl.program_id(0)
    t = tl.load(tab + pid)
    c = tl.load(tab + nc + pid)
    full = tl.load(tab + 2 * nc + pid)
    base = tab + 3 * nc
    op = tl.load(base + t) + c * CHUNK
    og = tl.load(base + n + t) + c * CHUNK
    om = tl.load(base + 2 * n + t) + c * CHUNK
    rem = tl.load(base + 3 * n + t) - c * CHUNK
    alpha = _alpha(alphas, counts, numels, fparams, t, FACTOR)
    idx0 = tl.arange(0, BLOCK)
    if full != 0:
        pp = P + (op // VP) * VP
        gp = G + (og // VG) * VG
        mp = M + (om // VM) * VM
        for i in range(TILES):
            idx = i * BLOCK + idx0
            g = tl.load(gp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            m = tl.load(mp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            p = tl.load(pp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            if MAXIMIZE:
                g = -g
            u = _sign(_lerp(m, g, w1, LERP_HI1))
            p, m = _lion_math(p, g, m, alpha, lr, w2, decay, DECAY, CWD, LERP_HI2, u)
            tl.store(mp + idx, _cast_out(m, M.dtype.element_ty, SOFT_BF16), cache_modifier=STORE_CM)
            tl.store(pp + idx, _cast_out(p, P.dtype.element_ty, SOFT_BF16), cache_modifier=STORE_CM)
    else:
        for i in range(TILES):
            idx = i * BLOCK + idx0
            live = idx < rem
            g = tl.load(G + og + idx, mask=live, other=0.0).to(tl.float32)
            m = tl.load(M + om + idx, mask=live, other=0.0).to(tl.float32)
            p = tl.load(P + op + idx, mask=live, other=0.0).to(tl.float32)
            if MAXIMIZE:
                g = -g
            u = _sign(_lerp(m, g, w1, LERP_HI1))
            p, m = _lion_math(p, g, m, alpha, lr, w2, decay, DECAY, CWD, LERP_HI2, u)
            tl.store(M + om + idx, _cast_out(m, M.dtype.element_ty, SOFT_BF16), mask=live)
            tl.store(P + op + idx, _cast_out(p, P.dtype.element_ty, SOFT_BF16), mask=live)


# --------------------------------------------------------------------------- SGD kernels


@triton.jit
def _sgd_grad(g, p, wd, MAXIMIZE, L2):
    if MAXIMIZE:
        g = -g
    if L2:
        g = g + wd * p
    return g


@triton.jit
def _sgd_dir(ge, b, momentum, NESTEROV):
    if NESTEROV:
        return ge + momentum * b
    else:
        return b


@triton.jit(do_not_specialize=["nc", "n"])
def _sgd_count_kernel(
    P,
    G,
    B,
    tab,
    counts,
    nc,
    n,
    wd,
    momentum,
    omd,
    MAXIMIZE: tl.constexpr,
    L2: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    VP: tl.constexpr,
    VG: tl.constexpr,
    VB: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    LOAD_EV: tl.constexpr,
    STORE_CM: tl.constexpr,
):
    CHUNK: tl.constexpr = BLOCK * TILES
    pid = tl.program_id(0)
    t = tl.load(tab + pid)
    c = tl.load(tab + nc + pid)
    full = tl.load(tab + 2 * nc + pid)
    base = tab + 3 * nc
    op = tl.load(base + t) + c * CHUNK
    og = tl.load(base + n + t) + c * CHUNK
    ob = tl.load(base + 2 * n + t) + c * CHUNK
    rem = tl.load(base + 3 * n + t) - c * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    idx0 = tl.arange(0, BLOCK)
    if full != 0:
        pp = P + (op // VP) * VP
        gp = G + (og // VG) * VG
        bp = B + (ob // VB) * VB
        for i in range(TILES):
            idx = i * BLOCK + idx0
            g = tl.load(gp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            if L2:
                p = tl.load(pp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            else:
                p = g
            ge = _sgd_grad(g, p, wd, MAXIMIZE, L2)
            if FIRST:
                b = ge
            else:
                b = tl.load(bp + idx, eviction_policy=LOAD_EV).to(tl.float32)
                b = b * momentum + omd * ge
            bs = _cast_out(b, B.dtype.element_ty, SOFT_BF16)
            tl.store(bp + idx, bs, cache_modifier=STORE_CM)
            d = _sgd_dir(ge, bs.to(tl.float32), momentum, NESTEROV)
            acc += (d * ge > 0).to(tl.int32)
    else:
        for i in range(TILES):
            idx = i * BLOCK + idx0
            live = idx < rem
            g = tl.load(G + og + idx, mask=live, other=0.0).to(tl.float32)
            if L2:
                p = tl.load(P + op + idx, mask=live, other=0.0).to(tl.float32)
            else:
                p = g
            ge = _sgd_grad(g, p, wd, MAXIMIZE, L2)
            if FIRST:
                b = ge
            else:
                b = tl.load(B + ob + idx, mask=live, other=0.0).to(tl.float32)
                b = b * momentum + omd * ge
            bs = _cast_out(b, B.dtype.element_ty, SOFT_BF16)
            tl.store(B + ob + idx, bs, mask=live)
            d = _sgd_dir(ge, bs.to(tl.float32), momentum, NESTEROV)
            acc += ((d * ge > 0) & live).to(tl.int32)
    total = tl.sum(acc, axis=0).to(tl.int64)
    tl.atomic_add(counts + t, total, sem="relaxed")


@triton.jit
def _sgd_step(p, ge, d, alpha, lr, decay, CWD):
    if CWD:
        p = tl.where(d * p >= 0, p * decay, p)
    step = alpha * lr
    return p - step * tl.where(d * ge > 0, d, 0.0)


@triton.jit(do_not_specialize=["nc", "n"])
def _sgd_update_kernel(
    P,
    G,
    B,
    tab,
    alphas,
    counts,
    numels,
    fparams,
    nc,
    n,
    wd,
    momentum,
    lr,
    decay,
    MAXIMIZE: tl.constexpr,
    L2: tl.constexpr,
    CWD: tl.constexpr,
    NESTEROV: tl.constexpr,
    VP: tl.constexpr,
    VG: tl.constexpr,
    VB: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    LOAD_EV: tl.constexpr,
    STORE_CM: tl.constexpr,
    FACTOR: tl.constexpr,
):
    CHUNK: tl.constexpr = BLOCK * TILES
    pid = tl.program_id(0)
    t = tl.load(tab + pid)
    c = tl.load(tab + nc + pid)
    full = tl.load(tab + 2 * nc + pid)
    base = tab + 3 * nc
    op = tl.load(base + t) + c * CHUNK
    og = tl.load(base + n + t) + c * CHUNK
    ob = tl.load(base + 2 * n + t) + c * CHUNK
    rem = tl.load(base + 3 * n + t) - c * CHUNK
    alpha = _alpha(alphas, counts, numels, fparams, t, FACTOR)
    idx0 = tl.arange(0, BLOCK)
    if full != 0:
        pp = P + (op // VP) * VP
        gp = G + (og // VG) * VG
        bp = B + (ob // VB) * VB
        for i in range(TILES):
            idx = i * BLOCK + idx0
            g = tl.load(gp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            b = tl.load(bp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            p = tl.load(pp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            ge = _sgd_grad(g, p, wd, MAXIMIZE, L2)
            d = _sgd_dir(ge, b, momentum, NESTEROV)
            p = _sgd_step(p, ge, d, alpha, lr, decay, CWD)
            tl.store(pp + idx, _cast_out(p, P.dtype.element_ty, SOFT_BF16), cache_modifier=STORE_CM)
    else:
        for i in range(TILES):
            idx = i * BLOCK + idx0
            live = idx < rem
            g = tl.load(G + og + idx, mask=live, other=0.0).to(tl.float32)
            b = tl.load(B + ob + idx, mask=live, other=0.0).to(tl.float32)
            p = tl.load(P + op + idx, mask=live, other=0.0).to(tl.float32)
            ge = _sgd_grad(g, p, wd, MAXIMIZE, L2)
            d = _sgd_dir(ge, b, momentum, NESTEROV)
            p = _sgd_step(p, ge, d, alpha, lr, decay, CWD)
            tl.store(P + op + idx, _cast_out(p, P.dtype.element_ty, SOFT_BF16), mask=live)


# --------------------------------------------------------------------------- passes


def _fused(
    kind: str,
    lists: list[list[Tensor]],
    grads: list[Tensor],
    state: Tensor,
    others: tuple[torch.dtype, ...],
) -> tuple | None:
    """The chunk table of ``lists`` (``kind``: ``"count"`` or ``"update"``, whose launch
    configuration it follows), or None when the call goes to foreach (warned once)."""
    device = state.device
    _check_device(device)
    why = _usable(state.dtype, others)
    if why is not None:
        _warn_once(why, f"triton backend: {why} are stepped by the foreach backend (same math)")
        return None
    if not _fused_ok(grads):
        return None
    return _table(kind, lists, device)


def _factor_args(
    alphas: Tensor | None, factor: tuple | None, n: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(alphas, counts, numels, fparams, FACTOR) kernel arguments; unused pointers alias."""
    if factor is None:
        if alphas.dtype != torch.float32 or alphas.device != device or not alphas.is_contiguous():
            alphas = alphas.to(device=device, dtype=torch.float32).contiguous()
        if alphas.numel() != n:
            raise ValueError(f"update_pass: {alphas.numel()} alphas for {n} tensors")
        return alphas, alphas, alphas, alphas, 0
    counts, numels, formula, clamp = factor
    for name, x in (("counts", counts), ("numels", numels)):
        if x.dtype != torch.int64 or x.device != device or x.numel() != n:
            raise ValueError(
                f"update_pass: {name} must be int64[{n}] on {device}, got "
                f"{x.dtype}[{x.numel()}] on {x.device}"
            )
    counts, numels = counts.contiguous(), numels.contiguous()
    fparams = _clamp_tensor(float(clamp), device)
    return counts, counts, numels, fparams, 1 if formula == "clamp" else 2


def _check_factor(alphas: Tensor | None, factor: tuple | None) -> Tensor | None:
    """Validate ``alphas`` / ``factor``; the alphas a foreach fallback would use."""
    if factor is None:
        if alphas is None:
            raise ValueError("update_pass: give alphas or factor=(counts, numels, formula, clamp)")
        return alphas
    counts, numels, formula, clamp = factor
    if alphas is not None or formula not in ("clamp", "paper"):
        raise ValueError(
            "update_pass: give either alphas or factor=(counts, numels, formula, clamp) with "
            f"formula 'clamp' or 'paper' (got alphas={alphas is not None}, formula={formula!r})"
        )
    return None


def lion_count_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    h: LionHyper,
    scratch: dict | None = None,
) -> Tensor:
    """int64 counts of ``sign(lerp(m, g, 1 - beta1)) * g > 0`` per tensor; read-only."""
    if scratch is not None:
        scratch.clear()
    (exp_avgs,) = states
    if not exp_avgs:
        return torch.zeros(0, dtype=torch.int64)
    hit = _fused("count", [grads, exp_avgs], grads, exp_avgs[0], (grads[0].dtype,))
    if hit is None:
        return _lion.foreach_count_pass(params, grads, states, h)
    table, nc, (gb, mb) = hit
    n = len(exp_avgs)
    counts = torch.zeros(n, dtype=torch.int64, device=exp_avgs[0].device)
    if nc > 0:
        cfg = _CONFIG["count"]
        w1 = 1.0 - h.beta1
        _lion_count_kernel[(nc,)](
            gb,
            mb,
            table,
            counts,
            nc,
            n,
            w1,
            MAXIMIZE=bool(h.maximize),
            LERP_HI=not (w1 < 0.5),
            VG=_VEC[gb.dtype],
            VM=_VEC[mb.dtype],
            BLOCK=cfg["block"],
            TILES=cfg["tiles"],
            LOAD_EV=cfg["load_ev"],
            num_warps=cfg["num_warps"],
        )
    return counts


def lion_update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    alphas: Tensor | None,
    h: LionHyper,
    scratch: dict | None = None,
    *,
    factor: tuple[Tensor, Tensor, str, float] | None = None,
) -> None:
    """Decay, the masked rescaled sign step and ``m <- lerp(m, g, 1 - beta2)``, in place.

    ``factor=(counts, numels, formula, clamp)`` (``alphas`` then None): each tensor's factor
    is computed inside the kernel from int64 device ``counts`` and ``numels``, bit for bit
    as :func:`~dist_cautious.kernels.common.cautious_factor` (as the AdamW update kernel)."""
    if scratch is not None:
        scratch.clear()
    _check_factor(alphas, factor)
    (exp_avgs,) = states
    if not params:
        return
    hit = _fused(
        "update",
        [params, grads, exp_avgs],
        grads,
        exp_avgs[0],
        (params[0].dtype, grads[0].dtype),
    )
    if hit is None:
        if factor is not None:
            alphas = cautious_factor(*factor)
        return _lion.foreach_update_pass(params, grads, states, alphas, h)
    table, nc, (pb, gb, mb) = hit
    if nc == 0:
        return
    n = len(params)
    alphas, counts, numels, fparams, fmode = _factor_args(alphas, factor, n, pb.device)
    cfg = _CONFIG["update"]
    w1, w2 = 1.0 - h.beta1, 1.0 - h.beta2
    _lion_update_kernel[(nc,)](
        pb,
        gb,
        mb,
        table,
        alphas,
        counts,
        numels,
        fparams,
        nc,
        n,
        w1,
        w2,
        h.lr,
        1.0 - h.lr * h.weight_decay,
        MAXIMIZE=bool(h.maximize),
        DECAY=h.weight_decay != 0,
        CWD=bool(h.cautious_wd),
        LERP_HI1=not (w1 < 0.5),
        LERP_HI2=not (w2 < 0.5),
        VP=_VEC[pb.dtype],
        VG=_VEC[gb.dtype],
        VM=_VEC[mb.dtype],
        BLOCK=cfg["block"],
        TILES=cfg["tiles"],
        SOFT_BF16=INTERPRETED,
        LOAD_EV=cfg["load_ev"],
        STORE_CM=cfg["store_cm"],
        FACTOR=fmode,
        num_warps=cfg["num_warps"],
    )


def sgd_count_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    h: SGDHyper,
    scratch: dict | None = None,
) -> Tensor:
    """Momentum buffers updated in place; int64 counts of ``d * g_eff > 0`` per tensor."""
    if scratch is not None:
        scratch.clear()
    (bufs,) = states
    if not bufs:
        return torch.zeros(0, dtype=torch.int64)
    hit = _fused("count", [params, grads, bufs], grads, bufs[0], (params[0].dtype, grads[0].dtype))
    if hit is None:
        return _sgd.foreach_count_pass(params, grads, states, h)
    table, nc, (pb, gb, bb) = hit
    n = len(bufs)
    counts = torch.zeros(n, dtype=torch.int64, device=bufs[0].device)
    if nc > 0:
        cfg = _CONFIG["count"]
        _sgd_count_kernel[(nc,)](
            pb,
            gb,
            bb,
            table,
            counts,
            nc,
            n,
            h.weight_decay,
            h.momentum,
            1.0 - h.dampening,
            MAXIMIZE=bool(h.maximize),
            L2=h.weight_decay != 0 and not h.cautious_wd,
            FIRST=bool(h.first_step),
            NESTEROV=bool(h.nesterov),
            VP=_VEC[pb.dtype],
            VG=_VEC[gb.dtype],
            VB=_VEC[bb.dtype],
            BLOCK=cfg["block"],
            TILES=cfg["tiles"],
            SOFT_BF16=INTERPRETED,
            LOAD_EV=cfg["load_ev"],
            STORE_CM=cfg["store_cm"],
            num_warps=cfg["num_warps"],
        )
    return counts


def sgd_update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    states: tuple[list[Tensor], ...],
    alphas: Tensor | None,
    h: SGDHyper,
    scratch: dict | None = None,
    *,
    factor: tuple[Tensor, Tensor, str, float] | None = None,
) -> None:
    """The masked, rescaled momentum step (and cautious decay), in place; ``factor`` as in
    :func:`lion_update_pass`."""
    if scratch is not None:
        scratch.clear()
    _check_factor(alphas, factor)
    (bufs,) = states
    if not params:
        return
    hit = _fused("update", [params, grads, bufs], grads, bufs[0], (params[0].dtype, grads[0].dtype))
    if hit is None:
        if factor is not None:
            alphas = cautious_factor(*factor)
        return _sgd.foreach_update_pass(params, grads, states, alphas, h)
    table, nc, (pb, gb, bb) = hit
    if nc == 0:
        return
    n = len(params)
    alphas, counts, numels, fparams, fmode = _factor_args(alphas, factor, n, pb.device)
    cfg = _CONFIG["update"]
    _sgd_update_kernel[(nc,)](
        pb,
        gb,
        bb,
        table,
        alphas,
        counts,
        numels,
        fparams,
        nc,
        n,
        h.weight_decay,
        h.momentum,
        h.lr,
        1.0 - h.lr * h.weight_decay,
        MAXIMIZE=bool(h.maximize),
        L2=h.weight_decay != 0 and not h.cautious_wd,
        CWD=bool(h.cautious_wd) and h.weight_decay != 0,
        NESTEROV=bool(h.nesterov),
        VP=_VEC[pb.dtype],
        VG=_VEC[gb.dtype],
        VB=_VEC[bb.dtype],
        BLOCK=cfg["block"],
        TILES=cfg["tiles"],
        SOFT_BF16=INTERPRETED,
        LOAD_EV=cfg["load_ev"],
        STORE_CM=cfg["store_cm"],
        FACTOR=fmode,
        num_warps=cfg["num_warps"],
    )


# SUPPORTS_FUSED_FACTOR: update_pass(..., alphas=None, factor=(counts, numels, formula, clamp))
# computes the factor in the kernel (no separate launches), as triton_kernels.update_pass.
lion = SimpleNamespace(
    count_pass=lion_count_pass,
    update_pass=lion_update_pass,
    SUPPORTS_FUSED_FACTOR=True,
    TAKES_SCRATCH=True,
)
sgd = SimpleNamespace(
    count_pass=sgd_count_pass,
    update_pass=sgd_update_pass,
    SUPPORTS_FUSED_FACTOR=True,
    TAKES_SCRATCH=True,
)
