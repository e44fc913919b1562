"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``): exact per-tensor factors on
its flattened parameters, with no extra call for the user.

FSDP1 flattens the original parameters of every wrapped module back to back into one
``FlatParameter`` (with alignment padding between them when ``use_orig_params=True``), pads
it to a multiple of the shard group size, and keeps on rank ``r`` of the shard group the
window ``[r * P, (r + 1) * P)`` of it (``P`` = ``flat_param._sharded_size``). The optimizer
then sees

* ``use_orig_params=False``: the ``FlatParameter`` itself, a 1-D window mixing slices of
  several original tensors;
* ``use_orig_params=True``: every original parameter as a 1-D view of *its* part of that
  window (empty where the rank holds none of it), marked ``_fsdp_flattened``.

A local cautious factor on either would be per-window. :func:`layout_for` (the ``fsdp1``
resolver of the optimizer's layout chain, :mod:`dist_cautious.resolve`, asked for every
parameter, so nothing is needed from the user)
finds the ``FlatParamHandle`` that owns the tensor, reads FSDP1's own shard metadata
(``_shard_param_infos``, ``_numels``, ``_numels_with_padding``, ``_is_padding_mask``,
``_sharded_size``, ``_shard_numel_padded``) and returns a :class:`~dist_cautious.flat.FlatLayout`
(the mechanism ZeRO's flat partitions use) with one fragment and one count slot per
original tensor, reduced over the handle's process group: the shard group, which for
``HYBRID_SHARD`` / ``_HYBRID_SHARD_ZERO2`` is the intra-node group (replicas are never
counted twice). ``NO_SHARD`` holds whole tensors: no collective.

Before a layout is used it is checked against an independent recomputation: the fragments
that the window ``[r * P, (r + 1) * P)`` of the back-to-back flattening gives (the same
:func:`~dist_cautious.flat.window_fragments` ZeRO uses) must equal FSDP1's
``_shard_param_infos``, and real elements + alignment padding + end padding must add up to
``P``. Missing or inconsistent metadata (another torch version, a corrupted handle), FSDP1
with tensor parallelism, or a flattened tensor whose owner cannot be found raise an error
that names the attribute; a flattened parameter is never stepped with a local factor.

Written against torch 2.13's ``torch/distributed/fsdp/_flat_param.py``.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from torch import Tensor

from .flat import FlatLayout, Fragment, packed_offsets, window_fragments
from .layout import ParamLayout, Reduction, is_dtensor
from .resolve import FSDP1, register_resolver

try:
    from torch.distributed.fsdp._flat_param import (
        FlatParameter,
        FlatParamHandle,
        HandleShardingStrategy,
    )
except ImportError:  # pragma: no cover - a torch without FSDP1
    FlatParameter = FlatParamHandle = HandleShardingStrategy = None  # type: ignore[assignment,misc]

__all__ = ["layout_for"]

_SOURCE = "FSDP1"
_STALE = (
    "FSDP1 is not in its sharded state (optimizer.step() inside summon_full_params(), or "
    "between forward and backward?), or the module was re-wrapped; call optimizer.step() "
    "after backward, outside FSDP context managers"
)
_REPORT = (
    "dist_cautious.fsdp1 reads FSDP1's FlatParameter metadata as written in torch 2.13; "
    "this torch version or configuration is not understood, and stepping the tensor with a "
    "local factor would be silently wrong. Please report it with your torch version, or "
    "use FSDP2 (torch.distributed.fsdp.fully_shard)."
)
_META = (
    "_num_params",
    "_numels",
    "_numels_with_padding",
    "_is_padding_mask",
    "_shapes",
    "_fqns",
    "_shard_param_infos",
    "_sharded_size",
    "_shard_numel_padded",
)


class _Owner:
    """Where a flattened tensor lives: its handle and its index in ``flat_param._params``
    (None: the tensor is the ``FlatParameter`` itself); the layout once built."""

    __slots__ = ("tensor", "handle", "index", "key", "layout")

    def __init__(self, tensor: Tensor, handle: Any, index: int | None) -> None:
        k = id(tensor)

        def forget(_: weakref.ref, k: int = k) -> None:
            if _OWNERS.get(k) is self:
                del _OWNERS[k]

        self.tensor = weakref.ref(tensor, forget)
        self.handle = weakref.ref(handle)
        self.index = index
        self.key: tuple | None = None
        self.layout: ParamLayout | None = None


# id(tensor) -> _Owner (a plain dict: this lookup runs for every flattened parameter on
# every step; the weak reference to the tensor guards against a reused id)
_OWNERS: dict[int, _Owner] = {}


def _index_handles() -> None:
    """Find every live ``FlatParamHandle`` (FSDP1 keeps no global registry, and neither the
    ``FlatParameter`` nor the original parameters point back to their handle) and index
    its flat parameter and original parameters. Runs only when a flattened tensor is not
    indexed yet (once after wrapping, typically)."""
    if FlatParamHandle is None:  # pragma: no cover
        return
    # type(o), not isinstance: some module objects warn when their __class__ is read
    handles = [o for o in gc.get_objects() if issubclass(type(o), FlatParamHandle)]
    for h in handles:
        fp = getattr(h, "flat_param", None)
        if fp is None:
            continue
        _claim(fp, h, None)
        for k, q in enumerate(getattr(fp, "_params", None) or ()):
            _claim(q, h, k)


def _claim(t: Tensor, handle: Any, index: int | None) -> None:
    old = _OWNERS.get(id(t))
    if old is not None and old.tensor() is t and old.handle() is handle and old.index == index:
        return
    _OWNERS[id(t)] = _Owner(t, handle, index)


def _lookup(p: Tensor) -> _Owner | None:
    o = _OWNERS.get(id(p))
    if o is None or o.tensor() is not p or o.handle() is None or not _owns(o, p):
        return None
    return o


def _owner(p: Tensor) -> _Owner:
    o = _lookup(p)
    if o is None:
        _index_handles()
        o = _lookup(p)
    if o is None:
        raise RuntimeError(
            f"a tensor of shape {tuple(p.shape)} and dtype {p.dtype} is marked as flattened by "
            "FSDP1 (_fsdp_flattened) but no live FSDP1 FlatParamHandle owns it, so which "
            "elements of which original tensors it holds is unknown; CAdamW refuses to step "
            "it with a per-shard factor. Build the optimizer on the parameters of the "
            "FullyShardedDataParallel model as it is now (model.parameters() after wrapping), "
            "and do not copy FSDP1 parameters into other tensors that keep the mark."
        )
    return o


def _owns(o: _Owner, p: Tensor) -> bool:
    h = o.handle()
    fp = getattr(h, "flat_param", None)
    if fp is None:
        return False
    if o.index is None:
        return fp is p
    params = getattr(fp, "_params", None)
    return params is not None and o.index < len(params) and params[o.index] is p


def _meta_key(h: Any) -> tuple:
    """What a cached layout depends on: FSDP1 sets a new ``_shard_param_infos`` tuple
    whenever it (re-)computes the shard metadata; the strategy and process group are fixed
    at wrapping. The objects themselves are kept (compared by identity first, then by
    value), so a freed and reused ``id`` cannot validate a stale layout. The rest of the
    metadata is checked when the layout is built."""
    return (
        getattr(h.flat_param, "_shard_param_infos", None),
        getattr(h, "process_group", None),
        getattr(h, "_sharding_strategy", None),
        getattr(h, "_handle_index", None),
    )


def _names(h: Any) -> list[str]:
    """Names of the handle's original tensors, the same on every rank: FSDP1's ``_fqns``
    (relative to the wrapped module, so two wrapped layers both have ``lin.weight``) with
    the handle's index in the root's module-order list of handles (``_handle_index``, set
    when the root initialises, before the first forward). They identify the count slots
    across ranks (:mod:`.reduce`), whether or not the optimizer was given names."""
    fqns = [str(n) for n in h.flat_param._fqns]
    k = getattr(h, "_handle_index", None)
    return fqns if k is None else [f"{n} (FSDP1 unit {k})" for n in fqns]


def _where(h: Any, index: int | None) -> str:
    fqns = list(getattr(h.flat_param, "_fqns", ()) or ())
    if index is not None and index < len(fqns):
        return f"FSDP1 parameter {fqns[index]!r} (use_orig_params=True)"
    names = ", ".join(fqns[:4]) + (", ..." if len(fqns) > 4 else "")
    return f"FSDP1 FlatParameter [{names}]"


def _fail(where: str, what: str) -> RuntimeError:
    return RuntimeError(f"{where}: {what}. " + _REPORT)


def _read(h: Any, where: str) -> tuple[list[Fragment], Reduction | None, int, bool]:
    """FSDP1's fragments of this rank's window, checked against an independent recomputation.

    Returns (fragments, reduction, window size P, sharded)."""
    fp = h.flat_param
    for name in _META:
        if not hasattr(fp, name):
            raise _fail(where, f"the FlatParameter has no attribute {name!r}")
    for name in ("_sharding_strategy", "process_group", "rank", "world_size"):
        if not hasattr(h, name):
            raise _fail(where, f"the FlatParamHandle has no attribute {name!r}")
    if any(e is not None for e in getattr(fp, "_param_extensions", ()) or ()):
        raise NotImplementedError(
            f"{where}: FSDP1 with tensor parallelism (DTensor parameters flattened through "
            "an FSDP extension) is not supported by dist_cautious: the flat parameter holds "
            "local TP shards whose whole tensors span another process group. Use FSDP2 "
            "(fully_shard) with TP, which dist_cautious supports exactly."
        )
    strategy = h._sharding_strategy
    hs = HandleShardingStrategy
    if strategy in (hs.FULL_SHARD, hs.SHARD_GRAD_OP, hs.HYBRID_SHARD, hs._HYBRID_SHARD_ZERO2):
        sharded = True
    elif strategy == hs.NO_SHARD:
        sharded = False
    else:
        raise _fail(where, f"unknown sharding strategy {strategy!r}")

    n_params = int(fp._num_params)
    numels = [int(n) for n in fp._numels]
    nwp = [int(n) for n in fp._numels_with_padding]
    pad_mask = list(fp._is_padding_mask)
    infos = tuple(fp._shard_param_infos)
    shapes = list(fp._shapes)
    n_fqns = len(fp._fqns)
    if not (len(numels) == len(infos) == len(shapes) == n_fqns == n_params) or len(pad_mask) != len(
        nwp
    ):
        raise _fail(
            where,
            f"inconsistent metadata lengths (_num_params={n_params}, _numels={len(numels)}, "
            f"_shard_param_infos={len(infos)}, _shapes={len(shapes)}, _fqns={n_fqns}, "
            f"_numels_with_padding={len(nwp)}, _is_padding_mask={len(pad_mask)})",
        )
    real = [i for i, pad in enumerate(pad_mask) if not pad]
    if [nwp[i] for i in real] != numels:
        raise _fail(where, "_numels disagrees with the non-padding _numels_with_padding")
    for k, (n, s) in enumerate(zip(numels, shapes)):
        sn = 1
        for d in s:
            sn *= int(d)
        if sn != n:
            raise _fail(where, f"_shapes[{k}]={tuple(s)} has {sn} elements but _numels says {n}")
    size = 1
    for d in fp._sharded_size:
        size *= int(d)
    world, rank = int(h.world_size), int(h.rank)
    start = rank * size if sharded else 0

    # FSDP1's own view of this rank's window
    got = []
    for k, (n, info) in enumerate(zip(numels, infos)):
        try:
            if info.in_shard:
                got.append(
                    Fragment(
                        k, n, int(info.intra_param_start_idx), int(info.offset_in_shard),
                        int(info.numel_in_shard),
                    )
                )  # fmt: skip
            else:
                got.append(Fragment(k, n, 0, 0, 0))
        except (AttributeError, TypeError) as e:
            raise _fail(where, f"_shard_param_infos[{k}]={info!r} is not understood ({e})") from e
    # ... and the same window recomputed from the back-to-back flattening
    offsets = packed_offsets(nwp)
    expect = window_fragments(numels, [offsets[i] for i in real], start, size)
    if got != expect:
        bad = next(k for k, (a, b) in enumerate(zip(got, expect)) if a != b)
        raise _fail(
            where,
            f"_shard_param_infos[{bad}] gives {got[bad]} but the flattening "
            f"(_numels_with_padding, rank {rank} of {world}, window {size}) gives {expect[bad]}",
        )
    # real elements + alignment padding in the window + end padding == the window
    total = sum(nwp)
    covered = max(0, min(size, total - start))
    padded = int(fp._shard_numel_padded)
    real_in = sum(f.length for f in got)
    if covered + padded != size or real_in > covered:
        raise _fail(
            where,
            f"the window of {size} elements holds {real_in} parameter elements of "
            f"{covered} flattened ones plus _shard_numel_padded={padded}; they do not add up",
        )
    red = None
    if sharded and world > 1:
        red = Reduction((h.process_group,))
    return got, red, size, sharded


def _build(o: _Owner, p: Tensor) -> ParamLayout | None:
    h = o.handle()
    where = _where(h, o.index)
    frags, red, size, sharded = _read(h, where)
    msgs = dict(source=_SOURCE, stale_hint=_STALE)
    names = _names(h)
    if o.index is None:  # the FlatParameter: one fragment per original tensor
        return FlatLayout(frags, red, size, where, names=names, **msgs)
    f = frags[o.index]
    if not sharded:  # NO_SHARD: the original parameter, whole, in its own shape
        shape = tuple(h.flat_param._shapes[o.index])
        if tuple(p.shape) != shape:
            raise RuntimeError(
                f"{where}: the NO_SHARD parameter has shape {tuple(p.shape)}, not its original "
                f"{shape}; {_STALE}"
            )
        return None
    # use_orig_params=True: the tensor is this rank's fragment of one original tensor
    one = Fragment(f.index, f.numel, f.lp_start, 0, f.length)
    return FlatLayout([one], red, f.length, where, names=[names[o.index]], **msgs)


def layout_for(p: Tensor) -> ParamLayout | None:
    """The layout of an FSDP1-flattened tensor, or None for anything else.

    ``None`` for tensors FSDP1 did not flatten (plain tensors, DDP, FSDP2 / TP DTensors) and
    for ``NO_SHARD`` ``use_orig_params=True`` parameters (whole tensors in their own shape);
    a :class:`~dist_cautious.flat.FlatLayout` for a ``FlatParameter`` (one fragment per
    original tensor) and for a ``use_orig_params=True`` sharded view (one fragment). Raises
    when the tensor is flattened but FSDP1's metadata cannot be read exactly.
    """
    if not getattr(p, "_fsdp_flattened", False) and not (
        FlatParameter is not None and isinstance(p, FlatParameter)
    ):
        return None
    if is_dtensor(p):
        return None  # a DTensor describes its own layout (FSDP2 / TP)
    if FlatParamHandle is None:  # pragma: no cover
        raise RuntimeError(
            "a tensor is marked as flattened by FSDP1 but torch.distributed.fsdp._flat_param "
            "cannot be imported. " + _REPORT
        )
    o = _owner(p)
    key = _meta_key(o.handle())
    if o.key != key:
        o.layout, o.key = None, None
        o.layout = _build(o, p)
        o.key = key
    return o.layout


def _resolve(p: Tensor, opt: Any) -> ParamLayout | None:
    return layout_for(p)


# replaces resolve.py's lazy shim (which imported this module) in the chain, in its place
register_resolver(FSDP1, _resolve)
