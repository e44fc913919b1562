"""Pieces: what the optimizer actually steps, whatever the sharding.

The optimizer never reasons about FSDP or ZeRO. For every parameter it asks a
:class:`ParamLayout` for

* ``reserve(param, table)``: the count slots this parameter owns in the step's
  :class:`SlotTable` (one per original tensor that is split across ranks). Called for
  **every** parameter of every group on every rank, in the same order, whether or not the
  parameter has a gradient here: this is what makes every rank build count vectors of
  the same length with the same meaning, so the all-reduce that follows cannot hang or
  mix up tensors. A slot may carry a name (``param_names``, FSDP1 ``_fqns``, DeepSpeed's
  parameter names); named slots are matched across ranks by name, not by position.
* ``pieces(...)``: the local parts (views) of param / grad / each optimizer state tensor
  (AdamW: exp_avg, exp_avg_sq; Lion: exp_avg; SGD: momentum_buffer), each tagged with the
  numel of the *original* tensor and its slot.

Layouts here: plain tensors and DDP (one whole piece, no slot) and DTensors (FSDP2,
HSDP, TP: the local shard, one slot in the group of mesh dims that shard it). The
DeepSpeed adapter adds a layout for ZeRO flat partitions (many pieces per flat tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.5 public path
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor, Shard  # type: ignore[no-redef]
try:  # FSDP2 on top of TP shards the TP-sharded dim again: a "strided" shard
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - older torch
    _StridedShard = Shard  # type: ignore[misc,assignment]


def group_key(group: dist.ProcessGroup) -> object:
    """A key naming a process group the same way on every call (its registered name)."""
    name = getattr(group, "group_name", None)
    return name if name else id(group)


@dataclass(frozen=True, eq=False)
class Reduction:
    """Process groups over which a count is summed (the mesh dims that shard a tensor).

    Several groups mean a tensor sharded over several mesh dims (FSDP + TP): summing over
    each in turn sums over their product (see :mod:`.reduce` for the order). Replicated dims
    (HSDP's replicate dim, DDP) are never listed: their ranks hold copies, and counting them
    would count elements twice. Two reductions are equal when they name the same groups
    (by registered group name), so tensors on equal meshes share one count vector.
    """

    groups: tuple[dist.ProcessGroup, ...]

    def key(self) -> tuple[object, ...]:
        return tuple(group_key(g) for g in self.groups)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reduction) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def describe(self) -> str:
        sizes = [dist.get_world_size(g) for g in self.groups]
        return f"Reduction(group sizes {sizes})"


@dataclass
class SlotTable:
    """Count slots of one step, per reduction, in an order every rank agrees on.

    A slot is reserved (``reserve``) in the order the optimizer walks its parameters; its
    *position* in the count vector (``positions``) is that order, except that **named**
    slots (``param_names`` from ``named_parameters()``, FSDP1's ``_fqns``, the DeepSpeed
    engine's parameter names) come first, sorted by (param group, name). So ranks that list
    the same named tensors in different orders still sum each tensor's count with its own;
    unnamed slots keep the walk's order (the guard can then only compare what each slot
    claims: group, numel, shape, dtype). See :mod:`.reduce` for the guard.
    """

    sizes: dict[Reduction, int] = field(default_factory=dict)
    numels: dict[Reduction, list[int]] = field(default_factory=dict)
    group_index: dict[Reduction, list[int]] = field(default_factory=dict)
    # what each slot claims to be (param group, numel, shape / dtype where known): the
    # ranks' agreement on it is checked inside the count all-reduce (reduce.py)
    tags: dict[Reduction, list[tuple]] = field(default_factory=dict)
    # each slot's name (None: unnamed), in reservation order
    names: dict[Reduction, list[str | None]] = field(default_factory=dict)
    current_group: int = 0
    # the name of the parameter being walked (its group's ``param_names`` entry), for
    # layouts that have no name of their own (DTensors)
    current_name: str | None = None
    # the collective schedule derived from ``sizes`` (reduce.py); reserve() invalidates it
    schedule: list | None = field(default=None, repr=False, compare=False)
    agreed: bool = field(default=False, repr=False, compare=False)
    _positions: dict | None = field(default=None, repr=False, compare=False)

    def reserve(
        self, reduction: Reduction, numel: int, tag: tuple = (), name: str | None = None
    ) -> int:
        """Reserve one slot for an original tensor of ``numel`` elements; return its index
        (in reservation order; :meth:`positions` maps it to its place in the vector).

        ``tag`` describes the tensor further (e.g. shape and dtype), ``name`` names it (a
        name every rank gives the same tensor); both feed the cross-rank consistency check
        and its error message."""
        self.schedule = None
        self.agreed = False
        self._positions = None
        i = self.sizes.get(reduction, 0)
        self.sizes[reduction] = i + 1
        self.numels.setdefault(reduction, []).append(numel)
        self.group_index.setdefault(reduction, []).append(self.current_group)
        self.tags.setdefault(reduction, []).append((self.current_group, int(numel), *tag))
        self.names.setdefault(reduction, []).append(name)
        return i

    def positions(self, reduction: Reduction) -> list[int] | None:
        """Slot index (reservation order) -> position in the count vector, or None where
        the two are the same (no named slot)."""
        if self._positions is None:
            out: dict = {}
            for red, names in self.names.items():
                if all(n is None for n in names):
                    out[red] = None
                    continue
                gis = self.group_index[red]

                def key(i: int, gis: list[int] = gis, names: list = names) -> tuple:
                    n = names[i]
                    return (0, gis[i], n, i) if n is not None else (1, 0, "", i)

                order = sorted(range(len(names)), key=key)
                pos = [0] * len(order)
                for k, i in enumerate(order):
                    pos[i] = k
                out[red] = pos
            self._positions = out
        return self._positions.get(reduction)

    def ordered(self, reduction: Reduction, values: list) -> list:
        """``values`` (one per slot, in reservation order) in count-vector order."""
        pos = self.positions(reduction)
        if pos is None:
            return list(values)
        out = [None] * len(values)
        for i, k in enumerate(pos):
            out[k] = values[i]
        return out

    def signature(self, reduction: Reduction) -> list[tuple]:
        """What each slot claims to be, in count-vector order: (group, numel, shape, dtype
        where known, name or None)."""
        return self.ordered(
            reduction, [(*t, n) for t, n in zip(self.tags[reduction], self.names[reduction])]
        )


@dataclass
class Piece:
    """The local part of one original tensor, as the kernels see it."""

    param: Tensor
    grad: Tensor
    states: tuple[Tensor, ...]  # the optimizer's state tensors, in its ``state_keys`` order
    numel: int  # elements of the original (global) tensor
    reduction: Reduction | None = None  # None: the piece is the whole tensor
    slot: int = -1


class ParamLayout(Protocol):
    def reserve(self, param: Tensor, table: SlotTable) -> object: ...

    def pieces(
        self, param: Tensor, grad: Tensor, states: tuple[Tensor, ...], token: object
    ) -> list[Piece]: ...


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_dims(t: DTensor) -> list[int]:
    """Mesh dims (of size > 1) whose placement splits ``t``; checks every placement.

    ``Shard`` and ``_StridedShard`` split the tensor (``_StridedShard`` is what FSDP2 puts on
    a dim that TP already shards; in torch >= 2.9 it is *not* a ``Shard`` subclass, so it is
    named here explicitly). ``Replicate`` dims hold copies. A mesh dim of size 1 splits
    nothing, so it needs no reduction. Anything else is refused rather than guessed.
    """
    mesh = t.device_mesh
    dims = []
    for i, pl in enumerate(t.placements):
        if isinstance(pl, (Shard, _StridedShard)):
            if mesh.size(i) > 1:
                dims.append(i)
        elif pl.is_replicate():
            continue
        elif pl.is_partial():
            raise ValueError(
                f"DTensor with a Partial placement on mesh dim {i} ({t.placements}); "
                "CAdamW needs parameters and gradients with Shard/Replicate placements "
                "(reduce the gradient first, e.g. with FSDP2 or DDP)"
            )
        else:
            raise ValueError(
                f"unsupported DTensor placement {pl!r} on mesh dim {i} ({t.placements}); "
                "CAdamW knows Shard, _StridedShard and Replicate. Redistribute the parameter "
                "to those placements or keep it in another optimizer."
            )
    return dims


def shard_reduction(t: DTensor) -> Reduction | None:
    """The process groups of the mesh dims that split ``t`` (in mesh-dim order), or None."""
    dims = _shard_dims(t)
    if not dims:
        return None
    mesh = t.device_mesh
    return Reduction(tuple(mesh.get_group(i) for i in dims))


class TensorLayout:
    """Plain tensors (single process, DDP) and DTensors (FSDP2, HSDP, TP)."""

    def reserve(self, param: Tensor, table: SlotTable) -> object:
        if isinstance(param, DTensor):
            red = shard_reduction(param)
            if red is not None:
                tag = (tuple(param.shape), str(param.dtype).replace("torch.", ""))
                return (red, table.reserve(red, param.numel(), tag, table.current_name))
        return None

    def pieces(
        self, param: Tensor, grad: Tensor, states: tuple[Tensor, ...], token: object
    ) -> list[Piece]:
        if isinstance(param, DTensor):
            if not isinstance(grad, DTensor):
                raise TypeError(
                    "parameter is a DTensor but its .grad is a plain tensor; FSDP2/TP should "
                    "produce DTensor gradients (was the gradient replaced by hand?)"
                )
            if grad.placements != param.placements or grad.device_mesh != param.device_mesh:
                raise ValueError(
                    f"gradient placements {grad.placements} differ from the parameter's "
                    f"{param.placements}; redistribute the gradient to the parameter's layout"
                )
            if token is None:  # scale="shard" reserves nothing: still refuse bad placements
                _shard_dims(param)
            red, slot = token if token is not None else (None, -1)  # type: ignore[misc]
            return [
                Piece(
                    _local(param),
                    _local(grad),
                    tuple(map(_local, states)),
                    numel=param.numel(),
                    reduction=red,
                    slot=slot,
                )
            ]
        if isinstance(grad, DTensor):
            raise TypeError("gradient is a DTensor but the parameter is a plain tensor")
        return [Piece(param, grad, states, numel=param.numel())]


DEFAULT_LAYOUT = TensorLayout()


def is_dtensor(t: Tensor) -> bool:
    return isinstance(t, DTensor)


def zeros_state(param: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero moment buffer shaped (and for DTensors, placed) like ``param``."""
    return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
