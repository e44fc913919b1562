"""The multi-tensor machinery of every Triton kernel: one kernel, a math function per optimizer.

Modelled on PyTorch's ``MultiTensorApply.cuh`` with ``fused_adam_utils.cuh``: this module owns
the chunking, the loads and stores and the counts; an optimizer only writes its arithmetic as
a ``@triton.jit`` *math function* (:mod:`.triton_adamw`, :mod:`.triton_lion`,
:mod:`.triton_sgd`), which :func:`mt_kernel` calls per tile. One launch per pass covers every
tensor of the call, whatever their number and sizes:

* The host cuts each tensor into *chunks* of ``CHUNK = BLOCK * TILES`` elements and writes a
  small int64 table ``[tid | cid | full | offsets (operand-major) | numels]``: per chunk its
  tensor and chunk index and whether it is *full* (``CHUNK`` elements, every operand 16-byte
  aligned), per tensor and operand its element offset from that operand's base pointer, and
  its numel. Program ``i`` steps chunk ``i``.
* Full chunks take an unmasked path whose addresses the compiler can prove 16-byte aligned
  (the offset is rebuilt as ``(off // VEC) * VEC``): 128-bit loads and stores. Partial chunks
  and unaligned tensors (odd slices of a ZeRO flat partition) take a masked path.
* A *count* launch accumulates the math's mask per chunk in int32 registers and adds the
  chunk's total into an int64 ``counts[tensor]`` with one atomic: exact, order-independent.
* An *update* launch can compute the cautious factor itself (``FACTOR`` 1 = "clamp",
  2 = "paper") from the int64 counts and numels, in float64 exactly as
  :func:`~dist_cautious.kernels.common.cautious_factor`; ``FACTOR`` 0 reads ``alphas[t]``;
  a count launch has ``FACTOR`` -1 (no factor).
* A *one-pass* launch (``Variant.lagged``, for ``factor_lag=1``) is both: it runs the
  update math with given factors ``alphas[t]`` (the previous step's) and counts the mask the
  math returns into ``counts[t]`` for the next step: p, g and the states are read once
  (C-AdamW fp32: 28 B per parameter instead of the two passes' 36).

Up to four operands (``X0..X3``, in table order), seven float scalars (``s0..s6``, the math's
hyperparameters: plain kernel arguments, so that a device-tensor form for ``capturable``
replaces them by one pointer and a load in :func:`mt_kernel` without touching the math) and a
constexpr bit set ``F`` of the math's flags. ``LOADS`` / ``STORES`` say which operands are
read and written (bit ``k``: operand ``k``): what is not read is never loaded, so the bytes
per parameter are the math's own. The math is two-stage: ``PRE`` (identity by default)
returns the operands that are final early, which are stored at once (``EARLY``: e.g. AdamW's
``m``, SGD's buffer), then ``MATH`` returns the rest and the count mask (stored after it,
``LATE``); storing early keeps the register counts of hand-written kernels (see
benchmarks/aot_kernels.py). Loads go operand 1, 2, 3, then 0, stores likewise; each pass
orders its operands for that. Arithmetic is float32 (16-bit operands are converted inside;
the Triton interpreter computes natively in bf16 wrongly) and is rounded back with
:func:`cast_out`.

State: the chunk tables and the warn-once set belong to a :class:`MultiTensorApply` (one per
backend instance; an optimizer keeps one backend per backend name and device), not to this
module. The launch configuration (:func:`configure`) is a process-wide setting, per optimizer
and pass.

On CPU tensors the kernels only run under the Triton interpreter (``TRITON_INTERPRET=1`` set
before Triton is imported), which the test suite uses.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import Capabilities, cautious_factor

__all__ = [
    "INTERPRETED",
    "MultiTensorApply",
    "StatesBackend",
    "Variant",
    "aot_space",
    "cast_out",
    "config",
    "configure",
    "lerp",
    "mt_kernel",
]


# --------------------------------------------------------------------------- device helpers


@triton.jit
def cast_out(x, DT: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 -> storage dtype, round to nearest even. The interpreter truncates in its bf16
    conversion, so under it (``SOFT_BF16``) bf16 rounding is done on the bits."""
    if SOFT_BF16 and DT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def lerp(m, g, w, LERP_HI: tl.constexpr):
    """``torch.lerp(m, g, w)``: the formula switches at ``w = 0.5`` (torch's rounding)."""
    if LERP_HI:
        return g - (g - m) * (1.0 - w)
    else:
        return m + w * (g - m)


@triton.jit
def _load_full(ptr, ON: tl.constexpr, LOAD_EV: tl.constexpr, BLOCK: tl.constexpr):
    if ON:
        return tl.load(ptr, eviction_policy=LOAD_EV).to(tl.float32)
    else:
        return tl.zeros([BLOCK], dtype=tl.float32)


@triton.jit
def _load_masked(ptr, live, ON: tl.constexpr, BLOCK: tl.constexpr):
    if ON:
        return tl.load(ptr, mask=live, other=0.0).to(tl.float32)
    else:
        return tl.zeros([BLOCK], dtype=tl.float32)


@triton.jit
def _store_full(
    ptr, x, ON: tl.constexpr, DT: tl.constexpr, SOFT_BF16: tl.constexpr, CM: tl.constexpr
):
    if ON:
        tl.store(ptr, cast_out(x, DT, SOFT_BF16), cache_modifier=CM)


@triton.jit
def _store_masked(ptr, x, live, ON: tl.constexpr, DT: tl.constexpr, SOFT_BF16: tl.constexpr):
    if ON:
        tl.store(ptr, cast_out(x, DT, SOFT_BF16), mask=live)


@triton.jit
def no_pre(x0, x1, x2, x3, s0, s1, s2, s3, s4, s5, s6, F: tl.constexpr):
    """The identity first stage (a math function that needs no early store)."""
    return x0, x1, x2, x3


@triton.jit
def _factor(alphas, counts, numels, fparams, t, FACTOR: tl.constexpr):
    # 0: alphas[t]; 1 "clamp", 2 "paper": from int64 counts and numels in float64, exactly as
    # common.cautious_factor (fparams[0] = clamp, float64).
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


@triton.jit(do_not_specialize=["nc", "n"])
def mt_kernel(
    X0,
    X1,
    X2,
    X3,
    tab,
    counts,
    alphas,
    numels,
    fparams,
    nc,
    n,
    s0,
    s1,
    s2,
    s3,
    s4,
    s5,
    s6,
    PRE: tl.constexpr,
    MATH: tl.constexpr,
    F: tl.constexpr,
    NOPS: tl.constexpr,
    LOADS: tl.constexpr,
    STORES: tl.constexpr,
    EARLY: tl.constexpr,
    COUNT: tl.constexpr,
    FACTOR: tl.constexpr,
    V0: tl.constexpr,
    V1: tl.constexpr,
    V2: tl.constexpr,
    V3: tl.constexpr,
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
    o0 = tl.load(base + t) + c * CHUNK
    o1 = tl.load(base + n + t) + c * CHUNK
    o2 = o1
    o3 = o1
    if NOPS > 2:
        o2 = tl.load(base + 2 * n + t) + c * CHUNK
    if NOPS > 3:
        o3 = tl.load(base + 3 * n + t) + c * CHUNK
    rem = tl.load(base + NOPS * n + t) - c * CHUNK
    if FACTOR < 0:  # a count pass: the math takes no factor
        alpha = 1.0
    else:
        alpha = _factor(alphas, counts, numels, fparams, t, FACTOR)
    D0: tl.constexpr = X0.dtype.element_ty
    D1: tl.constexpr = X1.dtype.element_ty
    D2: tl.constexpr = X2.dtype.element_ty
    D3: tl.constexpr = X3.dtype.element_ty
    LATE: tl.constexpr = STORES - (STORES & EARLY)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    idx0 = tl.arange(0, BLOCK)
    if full != 0:
        # CHUNK elements, every operand 16-byte aligned: unmasked 128-bit accesses.
        q0 = X0 + (o0 // V0) * V0
        q1 = X1 + (o1 // V1) * V1
        q2 = X2 + (o2 // V2) * V2
        q3 = X3 + (o3 // V3) * V3
        for i in range(TILES):
            idx = i * BLOCK + idx0
            x1 = _load_full(q1 + idx, LOADS & 2, LOAD_EV, BLOCK)
            x2 = _load_full(q2 + idx, LOADS & 4, LOAD_EV, BLOCK)
            x3 = _load_full(q3 + idx, LOADS & 8, LOAD_EV, BLOCK)
            x0 = _load_full(q0 + idx, LOADS & 1, LOAD_EV, BLOCK)
            x0, x1, x2, x3 = PRE(x0, x1, x2, x3, s0, s1, s2, s3, s4, s5, s6, F)
            # EARLY operands are final after PRE: stored before MATH (fewer live registers)
            _store_full(q1 + idx, x1, EARLY & 2, D1, SOFT_BF16, STORE_CM)
            _store_full(q2 + idx, x2, EARLY & 4, D2, SOFT_BF16, STORE_CM)
            _store_full(q0 + idx, x0, EARLY & 1, D0, SOFT_BF16, STORE_CM)
            y0, y1, y2, y3, hit = MATH(
                x0, x1, x2, x3, alpha, s0, s1, s2, s3, s4, s5, s6, F, D0, SOFT_BF16
            )
            _store_full(q1 + idx, y1, LATE & 2, D1, SOFT_BF16, STORE_CM)
            _store_full(q2 + idx, y2, LATE & 4, D2, SOFT_BF16, STORE_CM)
            _store_full(q3 + idx, y3, LATE & 8, D3, SOFT_BF16, STORE_CM)
            _store_full(q0 + idx, y0, LATE & 1, D0, SOFT_BF16, STORE_CM)
            if COUNT:
                acc += hit.to(tl.int32)
    else:
        for i in range(TILES):
            idx = i * BLOCK + idx0
            live = idx < rem
            x1 = _load_masked(X1 + o1 + idx, live, LOADS & 2, BLOCK)
            x2 = _load_masked(X2 + o2 + idx, live, LOADS & 4, BLOCK)
            x3 = _load_masked(X3 + o3 + idx, live, LOADS & 8, BLOCK)
            x0 = _load_masked(X0 + o0 + idx, live, LOADS & 1, BLOCK)
            x0, x1, x2, x3 = PRE(x0, x1, x2, x3, s0, s1, s2, s3, s4, s5, s6, F)
            _store_masked(X1 + o1 + idx, x1, live, EARLY & 2, D1, SOFT_BF16)
            _store_masked(X2 + o2 + idx, x2, live, EARLY & 4, D2, SOFT_BF16)
            _store_masked(X0 + o0 + idx, x0, live, EARLY & 1, D0, SOFT_BF16)
            y0, y1, y2, y3, hit = MATH(
                x0, x1, x2, x3, alpha, s0, s1, s2, s3, s4, s5, s6, F, D0, SOFT_BF16
            )
            _store_masked(X1 + o1 + idx, y1, live, LATE & 2, D1, SOFT_BF16)
            _store_masked(X2 + o2 + idx, y2, live, LATE & 4, D2, SOFT_BF16)
            _store_masked(X3 + o3 + idx, y3, live, LATE & 8, D3, SOFT_BF16)
            _store_masked(X0 + o0 + idx, y0, live, LATE & 1, D0, SOFT_BF16)
            if COUNT:
                acc += (hit & live).to(tl.int32)
    if COUNT:
        total = tl.sum(acc, axis=0).to(tl.int64)
        tl.atomic_add(counts + t, total, sem="relaxed")


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old Triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return isinstance(mt_kernel, InterpretedFunction)


INTERPRETED = _interpreted()

# --------------------------------------------------------------------------- launch choices


@dataclass(frozen=True)
class Variant:
    """What a dispatcher chose for one launch: the math function, its flag bits, which table
    operands are read (``loads``) and written (``stores``), and whether it counts. The launch
    and the ahead-of-time compile (benchmarks/aot_kernels.py) both turn it into constexprs
    with :func:`constexprs`."""

    math: Any
    flags: int
    loads: int
    stores: int
    count: bool
    nops: int
    pre: Any = None  # first stage; None: no_pre
    early: int = 0  # operands final after ``pre``: stored before ``math`` runs
    lagged: bool = False  # with ``count``: an update math applying given ``alphas`` (one pass)


_VEC = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}  # elements per 16 bytes
_SUPPORTED = tuple(_VEC)


def constexprs(
    v: Variant, dtypes: tuple[torch.dtype, ...], factor: int, cfg: dict, soft_bf16: bool
) -> dict[str, Any]:
    """The constexpr arguments of :func:`mt_kernel` for ``v`` on operands of ``dtypes`` (the
    table's; a missing fourth operand aliases the first)."""
    vec = [_VEC[d] for d in dtypes] + [_VEC[dtypes[0]]] * (4 - len(dtypes))
    return dict(
        PRE=v.pre or no_pre,
        MATH=v.math,
        F=v.flags,
        NOPS=v.nops,
        LOADS=v.loads,
        STORES=v.stores,
        EARLY=v.early,
        COUNT=v.count,
        FACTOR=(0 if v.lagged else -1) if v.count else factor,
        V0=vec[0],
        V1=vec[1],
        V2=vec[2],
        V3=vec[3],
        BLOCK=cfg["block"],
        TILES=cfg["tiles"],
        SOFT_BF16=soft_bf16,
        LOAD_EV=cfg["load_ev"],
        STORE_CM=cfg["store_cm"],
    )


# --------------------------------------------------------------------------- configuration

OPTIMIZERS = ("adamw", "lion", "sgd")
PASSES = ("count", "update", "onepass")
# Chosen for AdamW on an H100 (benchmarks/kernel.py --sweep, see docs/kernels.md). Lion and
# SGD start from the same values (untuned: no GPU has been lent since they were written).
# The one-pass launch (factor_lag=1) keeps the update's chunk (8192 elements) in tiles half
# as wide: with the update's 2048-element tiles ptxas capped C-AdamW's one pass at 128
# registers and 2 of its 18 CI variants spilled on sm_90 (4 and 12 B); with 1024 it needs
# 64-80 and none spills (benchmarks/results/aot_kernels_2026-12-03_onepass.md). Untimed.
_DEFAULT = {
    "count": {"block": 4096, "tiles": 1, "num_warps": 8, "load_ev": "evict_first", "store_cm": ""},
    "update": {
        "block": 2048,
        "tiles": 4,
        "num_warps": 8,
        "load_ev": "evict_first",
        "store_cm": ".cs",
    },
    "onepass": {
        "block": 1024,
        "tiles": 8,
        "num_warps": 8,
        "load_ev": "evict_first",
        "store_cm": ".cs",
    },
}
_CONFIG = {(o, p): dict(_DEFAULT[p]) for o in OPTIMIZERS for p in PASSES}


def config(optimizer: str = "adamw") -> dict[str, dict]:
    """The current launch configuration of ``optimizer``'s passes (``count``, ``update``,
    ``onepass``)."""
    return {p: dict(_CONFIG[(optimizer, p)]) for p in PASSES}


def configure(
    block: int | None = None,
    tiles: int | None = None,
    num_warps: int | None = None,
    *,
    which: str | None = None,
    optimizer: str | None = None,
    load_ev: str | None = None,
    store_cm: str | None = None,
    reset: bool = False,
) -> None:
    """Change the launch configuration of one pass (``which="count"|"update"|"onepass"``) or
    all, of one optimizer (``"adamw"``, ``"lion"``, ``"sgd"``) or all.

    ``block`` (power of two, >= 16): elements per tile; ``tiles``: tiles per program (a chunk
    is ``block * tiles`` elements); ``num_warps``: warps per program; ``load_ev``: eviction
    policy of the full-chunk loads (``""``, ``"evict_first"``, ``"evict_last"``);
    ``store_cm``: cache modifier of their stores (``""``, ``".cs"``, ``".cg"``, ``".wb"``).
    ``reset=True`` restores the defaults first. Tests use small blocks;
    ``benchmarks/kernel.py --sweep`` times alternatives.
    """
    if which is not None and which not in PASSES:
        raise ValueError(f"which={which!r}: use one of {PASSES} or None (all)")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: use one of {OPTIMIZERS} or None (all)")
    for o in (optimizer,) if optimizer else OPTIMIZERS:
        for w in (which,) if which else PASSES:
            new = dict(_DEFAULT[w]) if reset else dict(_CONFIG[(o, w)])
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
                raise ValueError(
                    f"load_ev={new['load_ev']!r}: use '', 'evict_first' or 'evict_last'"
                )
            if new["store_cm"] not in ("", ".cs", ".cg", ".wb"):
                raise ValueError(f"store_cm={new['store_cm']!r}: use '', '.cs', '.cg' or '.wb'")
            _CONFIG[(o, w)] = new


# --------------------------------------------------------------------------- tables


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "backend='triton' got CPU tensors, but Triton kernels run on CPU only under the "
            "Triton interpreter: set TRITON_INTERPRET=1 before Triton is first imported (slow; "
            "meant for tests), or use backend='foreach' (the default on CPU)"
        )
    if device.type != "cpu" and INTERPRETED:
        raise RuntimeError(
            f"backend='triton' got {device.type} tensors while TRITON_INTERPRET=1 is set; the "
            "interpreter only handles CPU tensors here. Unset TRITON_INTERPRET for GPU runs."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"backend='triton' supports CUDA tensors (got {device.type}); use backend='foreach'"
        )


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
    """(tid, cid, in-range, numels, number of chunks) of a list of sizes."""
    n = len(numels)
    nt = torch.tensor(numels, dtype=torch.int64)
    nch = (nt + chunk - 1) // chunk
    nc = int(nch.sum())
    tid = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), nch)
    first = torch.cumsum(nch, 0) - nch
    cid = torch.arange(nc, dtype=torch.int64) - torch.repeat_interleave(first, nch)
    inrange = (cid + 1) * chunk <= nt[tid]
    return tid, cid, inrange, nt, nc


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
    __slots__ = ("table", "nc", "bases", "ptrs", "aligned")

    def __init__(self, table, nc, bases, ptrs, aligned) -> None:  # noqa: ANN001
        self.table, self.nc, self.bases, self.ptrs, self.aligned = table, nc, bases, ptrs, aligned


_DATA_PTR = Tensor.data_ptr
_NUMEL = Tensor.numel
_IS_CONTIGUOUS = Tensor.is_contiguous


class MultiTensorApply:
    """The launcher of one backend instance (an optimizer keeps one per name and device).

    Holds what a launch can reuse from the previous step: chunk tables per (pass, device,
    dtypes, sizes, chunk), kept on the device. When only the addresses changed (fresh
    gradient tensors every step) just the small offsets part is refreshed in place; uploads
    are non-blocking, so a step does no blocking host-to-device copy and no host
    synchronisation. Also the set of fallback warnings already given."""

    CACHE_SIZE = 32

    def __init__(self, optimizer: str) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r}: use one of {OPTIMIZERS}")
        self.optimizer = optimizer
        self.tables: OrderedDict[tuple, _TableEntry] = OrderedDict()
        self.warned: set[str] = set()
        self._clamps: dict[tuple[float, torch.device], Tensor] = {}

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(msg, stacklevel=4)

    def prepare(self, pass_: str, lists: list[list[Tensor]], grads: list[Tensor]):
        """``(table, nc, bases)`` for a fused launch over ``lists`` (``lists[k]``: operand
        ``k``, its tensors in one order), or None when the call must go to foreach (float64
        or unsupported dtypes, non-contiguous tensors; warned once per reason)."""
        device = lists[0][0].device
        _check_device(device)
        dtypes = tuple(lst[0].dtype for lst in lists)
        if any(d not in _SUPPORTED for d in dtypes):
            why = (
                "float64 tensors"
                if torch.float64 in dtypes
                else f"dtypes {tuple(sorted(set(dtypes), key=str))}"
            )
            self.warn_once(
                why, f"triton backend: {why} are stepped by the foreach backend (same math)"
            )
            return None
        if any(g.is_sparse for g in grads):
            raise RuntimeError(
                "triton backend: sparse gradients are not supported (the optimizer raises first)"
            )
        if not all(map(_IS_CONTIGUOUS, grads)):
            self.warn_once(
                "contig", "triton backend: non-contiguous tensors are stepped by foreach"
            )
            return None
        return self._table(pass_, lists, dtypes, device)

    def _table(self, pass_, lists, dtypes, device):  # noqa: ANN001, ANN202
        ptrs = tuple(tuple(map(_DATA_PTR, lst)) for lst in lists)
        numels = tuple(map(_NUMEL, lists[0]))
        cfg = _CONFIG[(self.optimizer, pass_)]
        chunk = cfg["block"] * cfg["tiles"]
        key = (pass_, device, dtypes, numels, chunk)
        ent = self.tables.get(key)
        if ent is not None:
            self.tables.move_to_end(key)
            if ent.ptrs == ptrs:
                return ent.table, ent.nc, ent.bases
            # Same sizes and dtypes as a checked call: only contiguity can differ.
            if not all(all(map(_IS_CONTIGUOUS, lst)) for lst in lists):
                return None
        for j, lst in enumerate(lists if ent is None else ()):
            for i, t in enumerate(lst):
                if t.dtype != dtypes[j] or t.device != device or t.numel() != numels[i]:
                    raise ValueError(
                        f"triton backend: tensor {i} of operand {j} has dtype {t.dtype}, device "
                        f"{t.device} and {t.numel()} elements; expected {dtypes[j]}, {device} "
                        f"and {numels[i]} (all lists of one call share device and dtypes)"
                    )
                if not t.is_contiguous():
                    return None
        bases, offs, aligned = _offsets(lists, numels, ptrs)
        offs_t = torch.tensor(offs, dtype=torch.int64)
        if ent is not None and ent.aligned == aligned:
            # Same sizes and alignment: only the offsets moved.
            start = 3 * ent.nc
            _upload(offs_t, ent.table[start : start + offs_t.numel()], device)
            ent.ptrs, ent.bases = ptrs, bases
            return ent.table, ent.nc, ent.bases
        tid, cid, inrange, nt, nc = _chunks(numels, chunk)
        full = inrange if all(aligned) else (torch.tensor(aligned, dtype=torch.bool)[tid] & inrange)
        host = torch.cat([tid, cid, full.to(torch.int64), offs_t, nt])
        table = _upload(host, None, device)
        self.tables[key] = _TableEntry(table, nc, bases, ptrs, aligned)
        if len(self.tables) > self.CACHE_SIZE:
            self.tables.popitem(last=False)
        return table, nc, bases

    def _clamp(self, clamp: float, device: torch.device) -> Tensor:
        """``clamp`` as a float64 device scalar (Triton passes Python floats as float32)."""
        key = (clamp, device)
        t = self._clamps.get(key)
        if t is None:
            t = self._clamps[key] = torch.full((1,), clamp, dtype=torch.float64, device=device)
        return t

    def launch(
        self,
        pass_: str,
        prepared: tuple,
        v: Variant,
        scalars: tuple[float, ...],
        n: int,
        *,
        alphas: Tensor | None = None,
        factor: tuple | None = None,
    ) -> Tensor | None:
        """One launch of :func:`mt_kernel` over a :meth:`prepare`\\ d table: returns the int64
        counts for a count variant (a one-pass ``lagged`` one too: it takes ``alphas``), None
        for an update (``alphas`` or ``factor``)."""
        table, nc, bases = prepared
        device = bases[0].device
        counts = torch.zeros(n, dtype=torch.int64, device=device) if v.count else None
        if nc == 0:
            return counts
        fmode = 0
        if v.count and not v.lagged:
            aux = (counts, counts, counts, counts)
        elif factor is None:
            if (
                alphas.dtype != torch.float32
                or alphas.device != device
                or not alphas.is_contiguous()
            ):
                alphas = alphas.to(device=device, dtype=torch.float32).contiguous()
            if alphas.numel() != n:
                raise ValueError(f"{pass_} pass: {alphas.numel()} alphas for {n} tensors")
            aux = (counts if v.count else alphas, alphas, alphas, alphas)
        elif v.count:
            raise ValueError("one_pass: give alphas (the lagged factors), not factor=")
        else:
            cts, numels, formula, clamp = factor
            for name, x in (("counts", cts), ("numels", numels)):
                if x.dtype != torch.int64 or x.device != device or x.numel() != n:
                    raise ValueError(
                        f"update_pass: {name} must be int64[{n}] on {device}, got "
                        f"{x.dtype}[{x.numel()}] on {x.device}"
                    )
            cts, numels = cts.contiguous(), numels.contiguous()
            aux = (cts, cts, numels, self._clamp(float(clamp), device))
            fmode = 1 if formula == "clamp" else 2
        cfg = _CONFIG[(self.optimizer, pass_)]
        ops = list(bases) + [bases[0]] * (4 - len(bases))
        s = tuple(scalars) + (0.0,) * (7 - len(scalars))
        const = constexprs(v, tuple(b.dtype for b in bases), fmode, cfg, INTERPRETED)
        mt_kernel[(nc,)](*ops, table, *aux, nc, n, *s, **const, num_warps=cfg["num_warps"])
        return counts


def check_factor(alphas: Tensor | None, factor: tuple | None) -> None:
    """``update_pass`` takes either ``alphas`` or ``factor=(counts, numels, formula, clamp)``."""
    if factor is None:
        if alphas is None:
            raise ValueError("update_pass: give alphas or factor=(counts, numels, formula, clamp)")
        return
    formula = factor[2]
    if alphas is not None or formula not in ("clamp", "paper"):
        raise ValueError(
            "update_pass: give either alphas or factor=(counts, numels, formula, clamp) with "
            f"formula 'clamp' or 'paper' (got alphas={alphas is not None}, formula={formula!r})"
        )


class StatesBackend:
    """A Triton backend with the Lion / SGD signature (:mod:`.lion`, :mod:`.sgd`):
    ``count_pass(params, grads, states, h, scratch=None)`` and
    ``update_pass(params, grads, states, alphas, h, scratch=None, *, factor=None)``.

    A subclass names its optimizer (``NAME``), its foreach fallbacks, the table operands of
    each pass (``operands(pass_, params, grads, states)``) and its launch choices
    (``choose(pass_, h) -> (Variant, scalars)``; ``pass_="onepass"`` too where its ``caps``
    declare ``one_pass_lagged``: :meth:`one_pass`)."""

    NAME = ""
    caps = Capabilities(takes_scratch=True, fused_factor=True)

    def __init__(self) -> None:
        self.mt = MultiTensorApply(self.NAME)

    def operands(self, pass_: str, params, grads, states) -> list[list[Tensor]]:  # noqa: ANN001
        raise NotImplementedError

    def choose(self, pass_: str, h: Any) -> tuple[Variant, tuple[float, ...]]:
        raise NotImplementedError

    def foreach_count(self, params, grads, states, h) -> Tensor:  # noqa: ANN001
        raise NotImplementedError

    def foreach_update(self, params, grads, states, alphas, h) -> None:  # noqa: ANN001
        raise NotImplementedError

    def count_pass(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: tuple[list[Tensor], ...],
        h: Any,
        scratch: dict | None = None,
    ) -> Tensor:
        """int64 counts of the optimizer's mask per tensor (and its pass-1 state writes)."""
        if scratch is not None:
            scratch.clear()
        if not states[0]:
            return torch.zeros(0, dtype=torch.int64)
        hit = self.mt.prepare("count", self.operands("count", params, grads, states), grads)
        if hit is None:
            return self.foreach_count(params, grads, states, h)
        v, scalars = self.choose("count", h)
        return self.mt.launch("count", hit, v, scalars, len(states[0]))

    def update_pass(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: tuple[list[Tensor], ...],
        alphas: Tensor | None,
        h: Any,
        scratch: dict | None = None,
        *,
        factor: tuple[Tensor, Tensor, str, float] | None = None,
    ) -> None:
        """The optimizer's update, in place. ``factor=(counts, numels, formula, clamp)``
        (``alphas`` then None): each tensor's factor is computed inside the kernel from int64
        device counts and numels, bit for bit as
        :func:`~dist_cautious.kernels.common.cautious_factor`."""
        if scratch is not None:
            scratch.clear()
        check_factor(alphas, factor)
        if not params:
            return
        hit = self.mt.prepare("update", self.operands("update", params, grads, states), grads)
        if hit is None:
            if factor is not None:
                alphas = cautious_factor(*factor)
            return self.foreach_update(params, grads, states, alphas, h)
        v, scalars = self.choose("update", h)
        self.mt.launch("update", hit, v, scalars, len(params), alphas=alphas, factor=factor)

    def one_pass(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: tuple[list[Tensor], ...],
        alphas: Tensor,
        h: Any,
        scratch: dict | None = None,
    ) -> Tensor:
        """A ``factor_lag=1`` step in one launch, where the subclass declares
        ``caps.one_pass_lagged`` (its ``choose("onepass", h)``): the update with the given
        per-tensor ``alphas`` (the previous step's factors) and the int64 counts of this step's
        mask, returned; equal to :meth:`count_pass` then :meth:`update_pass` with ``alphas``.
        Where the kernel does not apply (float64, non-contiguous), foreach's two passes."""
        if scratch is not None:
            scratch.clear()
        if not params:
            return torch.zeros(0, dtype=torch.int64)
        hit = self.mt.prepare("onepass", self.operands("update", params, grads, states), grads)
        if hit is None:
            counts = self.foreach_count(params, grads, states, h)
            self.foreach_update(params, grads, states, alphas, h)
            return counts
        v, scalars = self.choose("onepass", h)
        return self.mt.launch("onepass", hit, v, scalars, len(params), alphas=alphas)


# --------------------------------------------------------------------------- AOT space


def aot_space() -> list[dict]:
    """Every launch the dispatchers can make, for benchmarks/aot_kernels.py: per optimizer and
    pass (``count``, ``update``; ``onepass`` where the optimizer has a one-pass lagged step),
    the axes of its choices (flags and operand
    dtypes) and a function from one choice to the exact kernel signature and constexprs the
    launch would use (through the optimizer's own ``variant`` function and
    :func:`constexprs`)."""
    from . import triton_adamw, triton_lion, triton_sgd

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    tname = {v: k for k, v in dt.items()}
    esize = {"fp32": 4, "bf16": 2, "fp16": 2}
    cfgs = {
        "default": {p: dict(_DEFAULT[p]) for p in PASSES},
        "tests": {p: dict(_DEFAULT[p], block=64, tiles=2, num_warps=4) for p in PASSES},
    }
    out = []
    for mod in (triton_adamw, triton_lion, triton_sgd):
        for pass_, decl in mod.AOT.items():

            def spec(row: dict, cfg_name: str, mod=mod, pass_=pass_, decl=decl) -> dict:
                v, fmode, nscal = decl["variant"](row)
                roles = decl["operands"]  # table order, e.g. ("p", "g", "s", "s")
                for k, r in enumerate(roles):  # an operand neither read nor written
                    if not (v.loads | v.stores) >> k & 1:
                        row[r] = "fp32"
                dts = tuple(dt[row[r]] for r in roles)
                cfg = cfgs[cfg_name][pass_]
                const = constexprs(v, dts, fmode, cfg, False)
                for k in ("PRE", "MATH"):  # by name: the compile runs in another process
                    f = getattr(const[k], "fn", const[k])  # the Python function of the jit
                    const[k] = f"jit:{f.__module__}.{f.__name__}"
                ptr = [tname[d] for d in dts] + [tname[dts[0]]] * (4 - len(dts))
                if v.lagged:  # counts out, alphas in
                    aux = ["i64", "fp32", "fp32", "fp32"]
                elif v.count:
                    aux = ["i64"] * 4
                elif fmode == 0:
                    aux = ["fp32"] * 4
                else:
                    aux = ["i64", "i64", "i64", "fp64"]
                sig = {f"X{k}": "*" + ptr[k] for k in range(4)}
                sig["tab"] = "*i64"
                sig.update(zip(("counts", "alphas", "numels", "fparams"), ("*" + a for a in aux)))
                sig.update(nc="i32", n="i32", **{f"s{k}": "fp32" for k in range(7)})
                sig.update({k: "constexpr" for k in const})
                nbytes = sum(
                    esize[row[r]] * ((v.loads >> k & 1) + (v.stores >> k & 1))
                    for k, r in enumerate(roles)
                )
                flags = {k: x for k, x in row.items() if k not in ("p", "g", "s")}
                dstr = "/".join(f"{k}:{row[k]}" for k in ("p", "g", "s") if k in row)
                fstr = ",".join(f"{k}={x}" for k, x in flags.items())
                return {
                    "key": f"{mod.NAME}.{pass_}[{fstr};{dstr};{cfg_name}]",
                    "kernel": f"{__name__}.mt_kernel",
                    "signature": sig,
                    "constexprs": const,
                    "num_warps": cfg["num_warps"],
                    "bytes": nbytes,
                    "update": not v.count or v.lagged,  # writes p: no spill allowed
                }

            roles = decl["operands"]
            dtypes = {r: ("fp32", "bf16", "fp16") for r in ("p", "g", "s") if r in roles}
            out.append(dict(axes={**decl["axes"], **dtypes}, configs=tuple(cfgs), spec=spec))
    return out
