"""Which layout a parameter is stepped with: one chain of resolvers, asked in order.

A resolver is ``fn(param, optimizer) -> ParamLayout | None``; the first one that answers
(not ``None``) gives the layout (:meth:`CautiousOptimizer.layout_for`). The chain:

1. ``registered``: layouts registered on this optimizer with ``register_layout`` (DeepSpeed
   ZeRO's flat partitions: :func:`dist_cautious.deepspeed.attach` reads them from the
   engine, which only it knows, and registers them per optimizer);
2. ``fsdp1``: FSDP1 ``FlatParameter`` s and ``use_orig_params=True`` views
   (:func:`dist_cautious.fsdp1.layout_for`, found from the tensor alone);
3. ``dtensor``: a DTensor (FSDP2, HSDP, TP) describes its own layout (mesh, placements,
   global shape): :data:`~.layout.DEFAULT_LAYOUT`, also for one swapped into ``param_groups``
   after construction (HF Accelerate's FSDP2 path);
4. ``given``: a plain tensor the optimizer was given (plain, DDP): the default layout.

A tensor none of them answers for is refused by ``layout_for`` with an error that names
the fix. An adapter adds its resolver with :func:`register_resolver` (by default just
before ``given``, the fallback).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .layout import DEFAULT_LAYOUT, ParamLayout, is_dtensor

Resolver = Callable[[Tensor, Any], "ParamLayout | None"]

REGISTERED, FSDP1, DTENSOR, GIVEN = "registered", "fsdp1", "dtensor", "given"

# FSDP1's FlatParameter class lives here (while it is not imported, no tensor is one)
_FLAT_PARAM_MODULE = "torch.distributed.fsdp._flat_param"


def _registered(p: Tensor, opt: Any) -> ParamLayout | None:
    return opt.registered_layout(p)


def _fsdp1_shim(p: Tensor, opt: Any) -> ParamLayout | None:
    # A lazy shim, not only a registration in fsdp1.py: a user of FSDP1 never imports
    # dist_cautious.fsdp1 (so its registration would never run), and a plain run need not
    # import it. The check below is fsdp1.layout_for's own first test, without importing
    # FSDP1: it answers for every tensor of a run without FSDP1. The first flattened tensor
    # imports fsdp1.py, which then registers its own resolver in this one's place.
    mod = sys.modules.get(_FLAT_PARAM_MODULE)
    if not getattr(p, "_fsdp_flattened", False) and (
        mod is None or not isinstance(p, mod.FlatParameter)
    ):
        return None
    from .fsdp1 import layout_for

    return layout_for(p)


def _dtensor(p: Tensor, opt: Any) -> ParamLayout | None:
    return DEFAULT_LAYOUT if is_dtensor(p) else None


def _given(p: Tensor, opt: Any) -> ParamLayout | None:
    return DEFAULT_LAYOUT if opt.was_given(p) else None


_CHAIN: list[tuple[str, Resolver]] = [
    (REGISTERED, _registered),
    (FSDP1, _fsdp1_shim),
    (DTENSOR, _dtensor),
    (GIVEN, _given),
]


def resolvers() -> tuple[tuple[str, Resolver], ...]:
    """The chain, in the order it is asked: ``((name, resolver), ...)``."""
    return tuple(_CHAIN)


def resolver(name: str) -> Resolver:
    """The resolver registered as ``name``."""
    for n, fn in _CHAIN:
        if n == name:
            return fn
    raise KeyError(f"no layout resolver named {name!r}; registered: {[n for n, _ in _CHAIN]}")


def register_resolver(name: str, fn: Resolver, before: str = GIVEN) -> None:
    """Add resolver ``fn`` as ``name``, asked just before ``before`` (default: before the
    plain-tensor fallback). A resolver already registered as ``name`` is replaced in place
    (its position kept)."""
    for i, (n, _) in enumerate(_CHAIN):
        if n == name:
            _CHAIN[i] = (name, fn)
            return
    names = [n for n, _ in _CHAIN]
    if before not in names:
        raise ValueError(
            f"register_resolver({name!r}, before={before!r}): no resolver named {before!r}; "
            f"registered: {names}"
        )
    _CHAIN.insert(names.index(before), (name, fn))


def remove_resolver(name: str) -> None:
    """Remove the resolver ``name`` (one an adapter added; the built-in ones stay)."""
    if name in (REGISTERED, FSDP1, DTENSOR, GIVEN):
        raise ValueError(f"remove_resolver({name!r}): the built-in resolvers cannot be removed")
    _CHAIN[:] = [(n, fn) for n, fn in _CHAIN if n != name]


def resolve(p: Tensor, opt: Any) -> tuple[str, ParamLayout] | None:
    """``(name of the resolver that answered, layout)`` for ``p`` under ``opt``, or None."""
    for name, fn in _CHAIN:
        layout = fn(p, opt)
        if layout is not None:
            return name, layout
    return None
