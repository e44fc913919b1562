"""Flat layouts: 1-D buffers that hold slices of many original tensors.

DeepSpeed ZeRO (:mod:`.deepspeed`) and FSDP1 (:mod:`.fsdp1`) both flatten original tensors
back to back into one 1-D buffer (with padding here and there) and give every rank a
contiguous window of it. Whatever the framework, the optimizer sees that window as one
tensor, and a per-tensor cautious factor computed on it would be per-window. One mechanism
serves every such layout: the adapter reads the framework's metadata into
:class:`Fragment` s (which elements of which original tensor lie where in the window), and
:class:`FlatLayout` reserves one count slot per original tensor and cuts the window into
per-tensor :class:`~.layout.Piece` s. :func:`window_fragments` computes the fragments of a
window from the flattened numels and offsets (ZeRO 1/2, BF16, and FSDP1's self-check).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch.distributed as dist
from torch import Tensor

from .layout import Piece, Reduction, SlotTable

__all__ = [
    "FlatLayout",
    "Fragment",
    "group_reduction",
    "packed_offsets",
    "window_fragments",
    "window_spans",
]


@dataclass(frozen=True)
class Fragment:
    """The part of one original tensor that lies in this rank's flat partition.

    ``index`` is the tensor's position in the framework's list for that flat buffer,
    ``numel`` its element count, ``lp_start`` where the fragment starts inside the flattened
    original tensor, ``hp_start`` where it starts inside the flat partition the optimizer
    steps, ``length`` how many elements it has (0: the tensor has nothing on this rank, but
    it still owns a slot).
    """

    index: int
    numel: int
    lp_start: int
    hp_start: int
    length: int


class FlatLayout:
    """A flat partition as a list of per-tensor :class:`Fragment` s.

    ``reserve`` takes one slot per original tensor of the flat buffer, on every rank (so the
    count vectors of all ranks have the same length and meaning, and the all-reduce cannot
    mix tensors up); ``pieces`` returns the fragments present on this rank as views of the
    flat param / grad / optimizer states. Padding belongs to no fragment and is never
    stepped. ``reduction`` is ``None`` when no fragment's tensor is split across ranks (the
    partition group has one rank, or nothing is sharded).

    ``source`` names the framework whose metadata the fragments come from, and
    ``stale_hint`` says what to do when the tensor no longer has the partition's size; both
    only shape error messages.

    ``names`` (one per fragment) name the original tensors the same way on every rank (FSDP1's
    ``_fqns``, the DeepSpeed engine's parameter names); the slots are then matched across
    ranks by name (:class:`~.layout.SlotTable`). Without them a layout of one fragment takes
    the name the optimizer was given for the tensor (``param_names``), if any.
    """

    def __init__(
        self,
        fragments: Sequence[Fragment],
        reduction: Reduction | None,
        partition_numel: int,
        where: str,
        params: Sequence[Tensor] = (),
        *,
        source: str = "the framework",
        stale_hint: str = "the flat parameter was re-partitioned after its layout was read",
        names: Sequence[str] | None = None,
    ) -> None:
        self.fragments = tuple(fragments)
        self.names = tuple(names) if names is not None else None
        if self.names is not None and len(self.names) != len(self.fragments):
            raise ValueError(
                f"{where}: {len(self.names)} names for {len(self.fragments)} fragments"
            )
        self.reduction = reduction
        self.partition_numel = int(partition_numel)
        self.where = where
        self.params = tuple(params)  # the original (model) tensors, for checks
        self.source = source
        self.stale_hint = stale_hint
        end = 0
        for f in sorted(self.fragments, key=lambda f: f.hp_start):
            if f.length == 0:
                continue
            if f.hp_start < end or f.hp_start + f.length > self.partition_numel:
                raise RuntimeError(
                    f"{where}: {source}'s partition metadata gives overlapping or out-of-range "
                    f"fragments ({f}); this {source} version's layout is not understood by "
                    f"dist_cautious. Please report it with your {source} version."
                )
            if f.lp_start < 0 or f.lp_start + f.length > f.numel:
                raise RuntimeError(f"{where}: fragment {f} lies outside its tensor")
            end = f.hp_start + f.length

    def __repr__(self) -> str:
        red = "local" if self.reduction is None else self.reduction.describe()
        return (
            f"FlatLayout({self.where}, {len(self.fragments)} tensors, "
            f"{self.partition_numel} elements, {red})"
        )

    def _check(self, t: Tensor, what: str) -> None:
        if t.dim() != 1 or t.numel() != self.partition_numel:
            raise RuntimeError(
                f"{self.where}: the {what} has shape {tuple(t.shape)} but the registered flat "
                f"partition has {self.partition_numel} elements; {self.stale_hint}"
            )

    def reserve(self, param: Tensor, table: SlotTable) -> object:
        self._check(param, "flat parameter")
        if self.reduction is None:
            return None
        names = self.names
        if names is None:
            names = (table.current_name,) if len(self.fragments) == 1 else (None,) * len(self.fragments)  # fmt: skip
        return tuple(
            table.reserve(self.reduction, f.numel, (), name)
            for f, name in zip(self.fragments, names)
        )

    def pieces(
        self, param: Tensor, grad: Tensor, states: tuple[Tensor, ...], token: object
    ) -> list[Piece]:
        self._check(param, "flat parameter")
        self._check(grad, "gradient")
        out = []
        for k, f in enumerate(self.fragments):
            if f.length == 0:
                continue
            s, n = f.hp_start, f.length
            out.append(
                Piece(
                    param.narrow(0, s, n),
                    grad.narrow(0, s, n),
                    tuple(t.narrow(0, s, n) for t in states),
                    numel=f.numel,
                    reduction=self.reduction,
                    slot=token[k] if token is not None else -1,  # type: ignore[index]
                )
            )
        return out


def group_reduction(group: Any) -> Reduction | None:
    """The reduction over ``group`` (None: the default group), or None for one rank."""
    if group is None:
        group = dist.group.WORLD
    return Reduction((group,)) if dist.get_world_size(group) > 1 else None


def packed_offsets(numels: Sequence[int]) -> list[int]:
    """Start of each tensor in a flat buffer that packs them back to back, no padding."""
    return [0, *accumulate(numels)][:-1]


def window_spans(
    numels: Sequence[int], offsets: Sequence[int], start: int, size: int
) -> list[tuple[int, int, int]]:
    """(lp_start, hp_start, length) of tensors at ``offsets`` in a flat buffer, inside the
    window ``[start, start + size)`` of that buffer."""
    out = []
    for n, off in zip(numels, offsets):
        lo, hi = max(off, start), min(off + n, start + size)
        if hi > lo:
            out.append((lo - off, lo - start, hi - lo))
        else:
            out.append((0, 0, 0))
    return out


def window_fragments(
    numels: Sequence[int], offsets: Sequence[int], start: int, size: int
) -> list[Fragment]:
    """The :class:`Fragment` of each tensor (``index`` = its position in ``numels``) in the
    window ``[start, start + size)`` of a flat buffer holding the tensors at ``offsets``."""
    return [
        Fragment(k, int(n), lp, hp, ln)
        for k, (n, (lp, hp, ln)) in enumerate(
            zip(numels, window_spans(numels, offsets, start, size))
        )
    ]
