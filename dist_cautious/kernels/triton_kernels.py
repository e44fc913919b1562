"""Fused multi-tensor Triton kernels for the two passes of a C-AdamW step.

One launch per pass covers every tensor of the call, whatever their number and sizes:

* The host cuts each tensor into *chunks* of ``CHUNK = BLOCK * TILES`` elements and
  writes a small int64 table: per chunk its tensor and chunk index and whether it is
  *full* (``CHUNK`` elements from a 16-byte aligned start), per tensor its element
  offset from a base pointer (one base per operand: params, grads, exp_avg,
  exp_avg_sq) and its numel. Program ``i`` of the grid steps chunk ``i``.
* Full chunks take an unmasked path whose addresses the compiler can prove 16-byte
  aligned (the offset is rebuilt as ``(off // VEC) * VEC``), so every load and store is
  a 128-bit vector access. The last, partial chunk of a tensor and tensors that are not
  16-byte aligned (odd slices of a ZeRO flat partition) take a masked scalar path.
* The count pass accumulates ``m_new * g > 0`` per chunk in int32 registers and adds
  the chunk's total into an int64 ``counts[tensor]`` with one atomic: exact integers,
  independent of scheduling order.

Bytes per fp32 parameter: pass 1 reads g, m and writes m (12 B); pass 2 reads p, g, m, v
and writes p, v (24 B); 36 B in all, the minimum for an exact two-pass C-AdamW.
bf16/fp16 parameters with fp32 state: 10 + 18 = 28 B.

Tables depend only on the tensors' addresses, sizes and dtypes. They are cached on the
device per (sizes, dtypes); when only the addresses change (fresh gradient tensors every
step in a training loop) just the small offsets part is refreshed in place. Uploads come
from pinned memory with ``non_blocking=True``, so a step does no blocking host-to-device
copy and no host synchronisation: counts and factors stay on the device.

Cautious weight decay (``UpdateHyper.cautious_wd``) is a constexpr of the update kernel
(decay where ``m_new * p >= 0``); without it the kernel is the one it was. The C-Lion and
cautious SGD kernels, built on this module's tables, are in :mod:`.triton_lion_sgd`.

Arithmetic follows :mod:`.reference` operation by operation in float32 (bf16/fp16 are
converted to float32 inside the kernels: the Triton interpreter computes natively in
bf16 wrongly); square root and divisions are correctly rounded (``sqrt_rn``/``div_rn``).
Float64 state, non-contiguous tensors and mixed devices are handed to the
:mod:`.foreach` backend (same math); the first such call warns.

On CPU tensors the kernels only run under the Triton interpreter (``TRITON_INTERPRET=1``
set before Triton is imported), which the test suite uses.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from operator import attrgetter

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import foreach as _foreach
from .common import UpdateHyper, cautious_factor

__all__ = ["count_pass", "update_pass", "configure", "config", "INTERPRETED"]


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old Triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return isinstance(_count_kernel, InterpretedFunction)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _cast_out(x, DT: tl.constexpr, SOFT_BF16: tl.constexpr):
    # fp32 -> storage dtype, round to nearest even. The interpreter truncates in its bf16
    # conversion, so under it (SOFT_BF16) bf16 rounding is done on the bits.
    if SOFT_BF16 and DT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _lerp(m, g, w, LERP_HI: tl.constexpr):
    # torch.lerp(m, g, w): the formula switches at w = 0.5 (same rounding as torch).
    if LERP_HI:
        return g - (g - m) * (1.0 - w)
    else:
        return m + w * (g - m)


@triton.jit(do_not_specialize=["nc", "n"])
def _count_kernel(
    G,
    M,
    tab,
    counts,
    nc,
    n,
    w,
    MAXIMIZE: tl.constexpr,
    LERP_HI: tl.constexpr,
    WRITE_M: tl.constexpr,
    VG: tl.constexpr,
    VM: tl.constexpr,
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
    og = tl.load(tab + 3 * nc + t) + c * CHUNK
    om = tl.load(tab + 3 * nc + n + t) + c * CHUNK
    rem = tl.load(tab + 3 * nc + 2 * n + t) - c * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    idx0 = tl.arange(0, BLOCK)
    if full != 0:
        # 16-byte aligned and CHUNK elements long: unmasked 128-bit accesses.
        gp = G + (og // VG) * VG
        mp = M + (om // VM) * VM
        for i in range(TILES):
            idx = i * BLOCK + idx0
            g = tl.load(gp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            m = tl.load(mp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            if MAXIMIZE:
                g = -g
            m_new = _lerp(m, g, w, LERP_HI)
            if WRITE_M:
                tl.store(
                    mp + idx,
                    _cast_out(m_new, M.dtype.element_ty, SOFT_BF16),
                    cache_modifier=STORE_CM,
                )
            acc += (m_new * g > 0).to(tl.int32)
    else:
        for i in range(TILES):
            idx = i * BLOCK + idx0
            live = idx < rem
            g = tl.load(G + og + idx, mask=live, other=0.0).to(tl.float32)
            m = tl.load(M + om + idx, mask=live, other=0.0).to(tl.float32)
            if MAXIMIZE:
                g = -g
            m_new = _lerp(m, g, w, LERP_HI)
            if WRITE_M:
                tl.store(M + om + idx, _cast_out(m_new, M.dtype.element_ty, SOFT_BF16), mask=live)
            acc += ((m_new * g > 0) & live).to(tl.int32)
    total = tl.sum(acc, axis=0).to(tl.int64)
    tl.atomic_add(counts + t, total, sem="relaxed")


@triton.jit
def _adam_math(p, g, m, v, alpha, beta2, omb2, decay, neg_step, bc2, eps, DECAY, CWD):
    # Same order as reference.update_pass (g already negated under maximize).
    v_new = v * beta2 + omb2 * g * g
    if DECAY:
        if CWD:  # cautious weight decay: only where sign(m_new) agrees with p
            p = tl.where(m * p >= 0, p * decay, p)
        else:
            p = p * decay
    denom = tl.div_rn(tl.sqrt_rn(v_new), bc2) + eps
    upd = tl.where(m * g > 0, m, 0.0) * alpha
    p = p + neg_step * tl.div_rn(upd, denom)
    return p, v_new


@triton.jit(do_not_specialize=["nc", "n"])
def _update_kernel(
    P,
    G,
    M,
    V,
    tab,
    alphas,
    counts,
    numels,
    fparams,
    nc,
    n,
    w,
    beta2,
    omb2,
    decay,
    neg_step,
    bc2,
    eps,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
    CWD: tl.constexpr,
    LERP_M: tl.constexpr,
    LERP_HI: tl.constexpr,
    VP: tl.constexpr,
    VG: tl.constexpr,
    VM: tl.constexpr,
    VV: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    LOAD_EV: tl.constexpr,
    STORE_CM: tl.constexpr,
    FACTOR: tl.constexpr,
):
    # FACTOR: 0 = read alphas[t]; 1 = "clamp", 2 = "paper": alpha from the int64 counts and
    # numels, in float64 exactly as common.cautious_factor (fparams[0] = clamp, float64).
    # LERP_M: the count pass left exp_avg as it was (deferred): update it here, with the
    # same helper, so the mask applied is the mask counted.
    CHUNK: tl.constexpr = BLOCK * TILES
    pid = tl.program_id(0)
    t = tl.load(tab + pid)
    c = tl.load(tab + nc + pid)
    full = tl.load(tab + 2 * nc + pid)
    base = tab + 3 * nc
    op = tl.load(base + t) + c * CHUNK
    og = tl.load(base + n + t) + c * CHUNK
    om = tl.load(base + 2 * n + t) + c * CHUNK
    ov = tl.load(base + 3 * n + t) + c * CHUNK
    rem = tl.load(base + 4 * n + t) - c * CHUNK
    if FACTOR == 0:
        alpha = tl.load(alphas + t).to(tl.float32)
    else:
        cnt = tl.load(counts + t).to(tl.float64)
        num = tl.load(numels + t).to(tl.float64)
        if FACTOR == 1:
            a64 = num / tl.maximum(cnt, tl.load(fparams) * num)
        else:
            a64 = num / (cnt + 1.0)
        alpha = a64.to(tl.float32)  # num > 0: tensors without elements have no program
    idx0 = tl.arange(0, BLOCK)
    if full != 0:
        pp = P + (op // VP) * VP
        gp = G + (og // VG) * VG
        mp = M + (om // VM) * VM
        vp = V + (ov // VV) * VV
        for i in range(TILES):
            idx = i * BLOCK + idx0
            g = tl.load(gp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            m = tl.load(mp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            v = tl.load(vp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            p = tl.load(pp + idx, eviction_policy=LOAD_EV).to(tl.float32)
            if MAXIMIZE:
                g = -g
            if LERP_M:
                m = _lerp(m, g, w, LERP_HI)
                tl.store(
                    mp + idx, _cast_out(m, M.dtype.element_ty, SOFT_BF16), cache_modifier=STORE_CM
                )
            p, v = _adam_math(p, g, m, v, alpha, beta2, omb2, decay, neg_step, bc2, eps, DECAY, CWD)
            tl.store(vp + idx, _cast_out(v, V.dtype.element_ty, SOFT_BF16), cache_modifier=STORE_CM)
            tl.store(pp + idx, _cast_out(p, P.dtype.element_ty, SOFT_BF16), cache_modifier=STORE_CM)
    else:
        for i in range(TILES):
            idx = i * BLOCK + idx0
            live = idx < rem
            g = tl.load(G + og + idx, mask=live, other=0.0).to(tl.float32)
            m = tl.load(M + om + idx, mask=live, other=0.0).to(tl.float32)
            v = tl.load(V + ov + idx, mask=live, other=0.0).to(tl.float32)
            p = tl.load(P + op + idx, mask=live, other=0.0).to(tl.float32)
            if MAXIMIZE:
                g = -g
            if LERP_M:
                m = _lerp(m, g, w, LERP_HI)
                tl.store(M + om + idx, _cast_out(m, M.dtype.element_ty, SOFT_BF16), mask=live)
            p, v = _adam_math(p, g, m, v, alpha, beta2, omb2, decay, neg_step, bc2, eps, DECAY, CWD)
            tl.store(V + ov + idx, _cast_out(v, V.dtype.element_ty, SOFT_BF16), mask=live)
            tl.store(P + op + idx, _cast_out(p, P.dtype.element_ty, SOFT_BF16), mask=live)


# --------------------------------------------------------------------------- configuration

_PASSES = ("count", "update")
# Chosen on an H100 (benchmarks/kernel.py --sweep, see docs/kernels.md).
_DEFAULT = {
    "count": {"block": 4096, "tiles": 1, "num_warps": 8, "load_ev": "evict_first", "store_cm": ""},
    "update": {
        "block": 2048,
        "tiles": 4,
        "num_warps": 8,
        "load_ev": "evict_first",
        "store_cm": ".cs",
    },
}
_CONFIG = {k: dict(v) for k, v in _DEFAULT.items()}
# Deferred exp_avg: the count pass only reads g and m (8 B/param, read-only) and the update
# pass writes m (28 B/param, AdamW's traffic) instead of 12 + 24. Same bytes, better DRAM
# efficiency; see count_pass(defer_exp_avg=...).
DEFER_EXP_AVG = True
SUPPORTS_DEFERRED_EXP_AVG = True
SUPPORTS_FUSED_FACTOR = True  # update_pass(..., factor=(counts, numels, formula, clamp))
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_CACHE_SIZE = 32
_tables: OrderedDict[tuple, _TableEntry] = OrderedDict()  # noqa: F821 (defined below)
_chunk_maps: OrderedDict[tuple, tuple] = OrderedDict()
_warned: set[str] = set()


def config() -> dict[str, dict]:
    """The current launch configuration per pass (``count``, ``update``)."""
    return {k: dict(v) for k, v in _CONFIG.items()}


def configure(
    block: int | None = None,
    tiles: int | None = None,
    num_warps: int | None = None,
    *,
    which: str | None = None,
    load_ev: str | None = None,
    store_cm: str | None = None,
    reset: bool = False,
) -> None:
    """Change the launch configuration of one pass (``which="count"|"update"``) or both.

    ``block`` (power of two, >= 16): elements per tile; ``tiles``: tiles per program
    (a chunk is ``block * tiles`` elements); ``num_warps``: warps per program;
    ``load_ev``: eviction policy of the full-chunk loads (``""``, ``"evict_first"``,
    ``"evict_last"``); ``store_cm``: cache modifier of their stores (``""``, ``".cs"``,
    ``".cg"``, ``".wb"``). ``reset=True`` restores the defaults first. Clears the table cache.
    Tests use small blocks; ``benchmarks/kernel.py --sweep`` times alternatives.
    """
    if which is not None and which not in _PASSES:
        raise ValueError(f"which={which!r}: use 'count', 'update' or None (both)")
    for w in (which,) if which else _PASSES:
        new = dict(_DEFAULT[w]) if reset else dict(_CONFIG[w])
        for k, val in (("block", block), ("tiles", tiles), ("num_warps", num_warps)):
            if val is not None:
                new[k] = int(val)
        if load_ev is not None:
            new["load_ev"] = load_ev
        if store_cm is not None:
            new["store_cm"] = store_cm
        b = new["block"]
        if b < 16 or b & (b - 1):
            raise ValueError(f"block={b!r} must be a power of two >= 16")
        if new["tiles"] < 1:
            raise ValueError(f"tiles={new['tiles']!r} must be >= 1")
        if new["num_warps"] not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps={new['num_warps']!r} must be a power of two <= 32")
        if new["load_ev"] not in ("", "evict_first", "evict_last"):
            raise ValueError(f"load_ev={new['load_ev']!r}: use '', 'evict_first' or 'evict_last'")
        if new["store_cm"] not in ("", ".cs", ".cg", ".wb"):
            raise ValueError(f"store_cm={new['store_cm']!r}: use '', '.cs', '.cg' or '.wb'")
        _CONFIG[w] = new
    _tables.clear()
    _chunk_maps.clear()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


# --------------------------------------------------------------------------- tables


def _check_device(device: torch.device) -> None:
    interp = INTERPRETED
    if device.type == "cpu" and not interp:
        raise RuntimeError(
            "backend='triton' got CPU tensors, but Triton kernels run on CPU only under the "
            "Triton interpreter: set TRITON_INTERPRET=1 before Triton is first imported (slow; "
            "meant for tests), or use backend='foreach' (the default on CPU)"
        )
    if device.type != "cpu" and interp:
        raise RuntimeError(
            f"backend='triton' got {device.type} tensors while TRITON_INTERPRET=1 is set; the "
            "interpreter only handles CPU tensors here. Unset TRITON_INTERPRET for GPU runs."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"backend='triton' supports CUDA tensors (got {device.type}); use backend='foreach'"
        )


_IS_SPARSE = attrgetter("is_sparse")
_DATA_PTR = Tensor.data_ptr
_IS_CONTIGUOUS = Tensor.is_contiguous
_NUMEL = Tensor.numel
_VEC = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}  # elements per 16 bytes


def _offsets(lists: list[list[Tensor]], numels: tuple[int, ...], ptrs: tuple[tuple[int, ...], ...]):
    """Per operand: a base tensor, each tensor's element offset from it, 16-byte alignment."""
    n = len(numels)
    bases: list[Tensor] = []
    offs: list[int] = []
    aligned = [True] * n
    cand = [i for i in range(n) if numels[i] > 0]
    for lst, pt in zip(lists, ptrs):
        esize = lst[0].element_size()
        vec = 16 // esize
        # Base: an aligned, non-empty tensor of the list when there is one.
        al = [i for i in cand if pt[i] % 16 == 0]
        bi = al[0] if al else (cand[0] if cand else 0)
        bases.append(lst[bi])
        b = pt[bi]
        for i, q in enumerate(pt):
            if numels[i] == 0:
                offs.append(0)
                continue
            d = q - b
            if d % esize:
                raise RuntimeError(
                    f"tensor {i} of a triton call is not aligned to its element size "
                    f"({esize} bytes); use backend='foreach' for such tensors"
                )
            e = d // esize
            offs.append(e)
            if e % vec:
                aligned[i] = False
    return bases, offs, tuple(aligned)


def _chunks(numels: tuple[int, ...], chunk: int):
    """Chunk map of a list of sizes (cached: it depends on the sizes only)."""
    key = (numels, chunk)
    hit = _chunk_maps.get(key)
    if hit is None:
        n = len(numels)
        nt = torch.tensor(numels, dtype=torch.int64)
        nch = (nt + chunk - 1) // chunk
        nc = int(nch.sum())
        tid = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), nch)
        first = torch.cumsum(nch, 0) - nch
        cid = torch.arange(nc, dtype=torch.int64) - torch.repeat_interleave(first, nch)
        inrange = (cid + 1) * chunk <= nt[tid]
        hit = (tid, cid, inrange, nt, nc)
        _chunk_maps[key] = hit
        if len(_chunk_maps) > _CACHE_SIZE:
            _chunk_maps.popitem(last=False)
    return hit


def _upload(host: Tensor, out: Tensor | None, device: torch.device) -> Tensor:
    """Copy ``host`` into ``out`` (or a new device tensor) without a blocking copy.

    The copy is queued on the current stream, after the kernels that read the old contents,
    and comes from pinned memory that the caching host allocator keeps alive until it ran."""
    if device.type != "cuda":
        if out is None:
            return host.clone()
        out.copy_(host)
        return out
    if out is None:
        out = torch.empty(host.shape, dtype=torch.int64, device=device)
    out.copy_(host.pin_memory(), non_blocking=True)
    return out


class _TableEntry:
    __slots__ = ("table", "nc", "bases", "ptrs", "aligned", "n_ops")

    def __init__(self, table, nc, bases, ptrs, aligned, n_ops) -> None:  # noqa: ANN001
        self.table, self.nc, self.bases = table, nc, bases
        self.ptrs, self.aligned, self.n_ops = ptrs, aligned, n_ops


def _table(kind: str, lists: list[list[Tensor]], device: torch.device):
    """(table, nc, bases) for ``lists``, or None when the fused path cannot take them.

    Table layout (int64): ``[tid | cid | full | offsets (operand-major) | numels]`` with one
    entry per chunk in the first three parts. Entries are cached per (kind, sizes, dtypes);
    when only addresses changed (new gradient tensors every step, the usual case in a
    training loop) just the small offsets part is re-uploaded, in place.
    """
    first = lists[0]
    dtypes = tuple(lst[0].dtype for lst in lists)
    ptrs = tuple(tuple(map(_DATA_PTR, lst)) for lst in lists)
    numels = tuple(map(_NUMEL, first))
    cfg = _CONFIG[kind]
    chunk = cfg["block"] * cfg["tiles"]
    key = (kind, device, dtypes, numels, chunk)
    ent = _tables.get(key)
    if ent is not None:
        _tables.move_to_end(key)
        if ent.ptrs == ptrs:
            return ent.table, ent.nc, ent.bases
        # Same sizes and dtypes as a checked call (the caller buckets by device and dtype):
        # only contiguity can differ.
        if not all(all(map(_IS_CONTIGUOUS, lst)) for lst in lists):
            return None
    for j, lst in enumerate(lists if ent is None else ()):
        for i, t in enumerate(lst):
            if t.dtype != dtypes[j] or t.device != device or t.numel() != numels[i]:
                raise ValueError(
                    f"triton backend: tensor {i} of operand {j} has dtype {t.dtype}, device "
                    f"{t.device} and {t.numel()} elements; expected {dtypes[j]}, {device} and "
                    f"{numels[i]} (all lists of one call share device and dtypes)"
                )
            if not t.is_contiguous():
                return None
    bases, offs, aligned = _offsets(lists, numels, ptrs)
    tid, cid, inrange, nt, nc = _chunks(numels, chunk)
    offs_t = torch.tensor(offs, dtype=torch.int64)
    if ent is not None and ent.aligned == aligned:
        # Same sizes and alignment: only the offsets moved.
        start = 3 * nc
        _upload(offs_t, ent.table[start : start + offs_t.numel()], device)
        ent.ptrs, ent.bases = ptrs, bases
        return ent.table, ent.nc, ent.bases
    full = inrange if all(aligned) else (torch.tensor(aligned, dtype=torch.bool)[tid] & inrange)
    host = torch.cat([tid, cid, full.to(torch.int64), offs_t, nt])
    table = _upload(host, None, device)
    _tables[key] = _TableEntry(table, nc, bases, ptrs, aligned, len(lists))
    if len(_tables) > _CACHE_SIZE:
        _tables.popitem(last=False)
    return table, nc, bases


def _usable(state_dtype: torch.dtype, other: tuple[torch.dtype, ...]) -> str | None:
    if state_dtype == torch.float64 or any(d == torch.float64 for d in other):
        return "float64 tensors"
    if state_dtype not in _SUPPORTED or any(d not in _SUPPORTED for d in other):
        return f"dtypes {(state_dtype, *other)}"
    return None


# --------------------------------------------------------------------------- passes


def _fused_ok(grads: list[Tensor]) -> bool:
    """Per-call check of the gradients (the table cache covers the other operands)."""
    if any(map(_IS_SPARSE, grads)):
        raise RuntimeError(
            "triton backend: sparse gradients are not supported (CAdamW raises before this)"
        )
    if all(map(Tensor.is_contiguous, grads)):
        return True
    _warn_once("contig", "triton backend: non-contiguous tensors are stepped by foreach")
    return False


def count_pass(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    beta1: float,
    maximize: bool,
    *,
    defer_exp_avg: bool = False,
) -> Tensor | tuple[Tensor, bool]:
    """``m <- lerp(m, g, 1 - beta1)`` in place; int64 counts of ``m_new * g > 0`` per tensor.

    ``defer_exp_avg=True`` (used by :class:`~dist_cautious.CAdamW`): count without writing
    ``m`` and return ``(counts, deferred)``; when ``deferred`` is True the caller must pass
    ``exp_avg_pending=True`` to the :func:`update_pass` that follows, which then updates
    ``m`` with the same arithmetic (so the mask applied is the mask counted). ``deferred``
    is False when this call fell back to the foreach backend (``m`` already updated).
    """
    if not exp_avgs:
        counts = torch.zeros(0, dtype=torch.int64)
        return (counts, False) if defer_exp_avg else counts
    device = exp_avgs[0].device
    _check_device(device)
    why = _usable(exp_avgs[0].dtype, (grads[0].dtype,))
    hit = None
    if why is not None:
        _warn_once(why, f"triton backend: {why} are stepped by the foreach backend (same math)")
    elif _fused_ok(grads):
        hit = _table("count", [grads, exp_avgs], device)
    if hit is None:
        counts = _foreach.count_pass(grads, exp_avgs, beta1, maximize)
        return (counts, False) if defer_exp_avg else counts
    table, nc, (gb, mb) = hit
    n = len(exp_avgs)
    counts = torch.zeros(n, dtype=torch.int64, device=device)
    if nc > 0:
        cfg = _CONFIG["count"]
        w = 1.0 - beta1
        _count_kernel[(nc,)](
            gb,
            mb,
            table,
            counts,
            nc,
            n,
            w,
            MAXIMIZE=bool(maximize),
            LERP_HI=not (w < 0.5),
            WRITE_M=not defer_exp_avg,
            VG=_VEC[gb.dtype],
            VM=_VEC[mb.dtype],
            BLOCK=cfg["block"],
            TILES=cfg["tiles"],
            SOFT_BF16=INTERPRETED,
            LOAD_EV=cfg["load_ev"],
            STORE_CM=cfg["store_cm"],
            num_warps=cfg["num_warps"],
        )
    return (counts, True) if defer_exp_avg else counts


def update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    alphas: Tensor,
    h: UpdateHyper,
    *,
    exp_avg_pending: bool = False,
    factor: tuple[Tensor, Tensor, str, float] | None = None,
) -> None:
    """Second moment, decoupled weight decay and the masked, rescaled step, in place.

    ``exp_avg_pending=True``: ``m`` still holds the previous step's value (a deferred
    :func:`count_pass`); it is updated here first, with ``h.beta1``.
    ``factor=(counts, numels, formula, clamp)`` (``alphas`` then None): compute each
    tensor's factor inside the kernel from int64 ``counts`` and ``numels`` (device tensors),
    bit for bit as :func:`~dist_cautious.kernels.common.cautious_factor` does, which saves
    the small launches of a separate factor computation.
    """
    if factor is not None:
        counts, numels, formula, clamp = factor
        if alphas is not None or formula not in ("clamp", "paper"):
            raise ValueError(
                "update_pass: give either alphas or factor=(counts, numels, formula, clamp)"
            )
    if not params:
        return
    device = params[0].device
    _check_device(device)
    why = _usable(exp_avgs[0].dtype, (params[0].dtype, grads[0].dtype, exp_avg_sqs[0].dtype))
    hit = None
    if why is not None:
        _warn_once(why, f"triton backend: {why} are stepped by the foreach backend (same math)")
    elif _fused_ok(grads):
        hit = _table("update", [params, grads, exp_avgs, exp_avg_sqs], device)
    if hit is None:
        if exp_avg_pending:  # bring m up to date first, as the count pass would have
            _foreach.count_pass(grads, exp_avgs, h.beta1, h.maximize)
        if factor is not None:
            alphas = cautious_factor(counts, numels, formula, clamp)
        return _foreach.update_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h)
    table, nc, (pb, gb, mb, vb) = hit
    if nc == 0:
        return
    n = len(params)
    if factor is None:
        if alphas.dtype != torch.float32 or alphas.device != device or not alphas.is_contiguous():
            alphas = alphas.to(device=device, dtype=torch.float32).contiguous()
        if alphas.numel() != n:
            raise ValueError(f"update_pass: {alphas.numel()} alphas for {n} tensors")
        counts = numels = fparams = alphas  # unused pointers
        fmode = 0
    else:
        for name, x in (("counts", counts), ("numels", numels)):
            if x.dtype != torch.int64 or x.device != device or x.numel() != n:
                raise ValueError(
                    f"update_pass: {name} must be int64[{n}] on {device}, got "
                    f"{x.dtype}[{x.numel()}] on {x.device}"
                )
        counts, numels = counts.contiguous(), numels.contiguous()
        fparams = _clamp_tensor(float(clamp), device)
        alphas = counts  # unused pointer
        fmode = 1 if formula == "clamp" else 2
    cfg = _CONFIG["update"]
    w = 1.0 - h.beta1
    _update_kernel[(nc,)](
        pb,
        gb,
        mb,
        vb,
        table,
        alphas,
        counts,
        numels,
        fparams,
        nc,
        n,
        w,
        h.beta2,
        1.0 - h.beta2,
        1.0 - h.lr * h.weight_decay,
        -h.step_size,
        h.bias_correction2_sqrt,
        h.eps,
        MAXIMIZE=bool(h.maximize),
        DECAY=h.weight_decay != 0,
        CWD=bool(h.cautious_wd),
        LERP_M=bool(exp_avg_pending),
        LERP_HI=not (w < 0.5),
        VP=_VEC[pb.dtype],
        VG=_VEC[gb.dtype],
        VM=_VEC[mb.dtype],
        VV=_VEC[vb.dtype],
        BLOCK=cfg["block"],
        TILES=cfg["tiles"],
        SOFT_BF16=INTERPRETED,
        LOAD_EV=cfg["load_ev"],
        STORE_CM=cfg["store_cm"],
        FACTOR=fmode,
        num_warps=cfg["num_warps"],
    )


_clamps: dict[tuple[float, torch.device], Tensor] = {}


def _clamp_tensor(clamp: float, device: torch.device) -> Tensor:
    """``clamp`` as a float64 device scalar (Triton passes Python floats as float32), made
    once per value and device."""
    key = (clamp, device)
    t = _clamps.get(key)
    if t is None:
        t = _clamps[key] = torch.full((1,), clamp, dtype=torch.float64, device=device)
    return t


INTERPRETED = _interpreted()
