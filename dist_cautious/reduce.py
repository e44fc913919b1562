"""Summing mask counts over shards: one batched all-reduce per reduction group per step.

Every rank builds, for each :class:`~dist_cautious.layout.Reduction` in the step's
:class:`~dist_cautious.layout.SlotTable`, one int64 vector ``[counts | elements]`` of
``2 * slots`` entries: ``counts[s]`` is the number of kept elements of original tensor
``s`` in this rank's pieces, ``elements[s]`` the number of its elements this rank stepped
(used only for the kept-fraction statistic). Pieces add into their slot; slots this rank
has no piece for stay 0.

Why this cannot hang: the table is built by walking *every* parameter of every group in
order on every rank (:meth:`CAdamW._plan`), independent of which gradients exist or
how large the local shards are, so all ranks issue the same all-reduces, on the same
groups, in the same order, with vectors of the same length. Nothing here depends on
data, and nothing is skipped when a rank has nothing to add.

Counts are exact integers, so the sum does not depend on the reduction order and the
factor computed from it is bitwise identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import Piece, Reduction, SlotTable

_INDEX_CACHE: dict[tuple, Tensor] = {}


def device_index(values: tuple[int, ...], device: torch.device) -> Tensor:
    """A cached int64 tensor of ``values`` on ``device``: avoids a blocking host-to-device copy
    every step (the same plan repeats step after step)."""
    key = (values, device)
    t = _INDEX_CACHE.get(key)
    if t is None:
        if len(_INDEX_CACHE) > 4096:
            _INDEX_CACHE.clear()
        t = torch.tensor(values, dtype=torch.int64, device=device)
        _INDEX_CACHE[key] = t
    return t


def _all_reduce(vec: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, object]:
    """Start a SUM all-reduce of ``vec`` on ``group``, on a device that group's backend takes."""
    backend = str(dist.get_backend(group))
    on_cuda = vec.device.type == "cuda"
    if on_cuda and "nccl" not in backend and "gloo" in backend:
        buf = vec.cpu()  # gloo runs on host memory
    elif not on_cuda and "gloo" not in backend and torch.cuda.is_available():
        buf = vec.cuda()  # NCCL-only group
    else:
        buf = vec
    work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return buf, work


@dataclass
class ReducedCounts:
    counts: Tensor  # int64 per piece: counts over the whole original tensor (or local)
    numels: Tensor  # int64 per piece: elements the factor divides (global or local)
    kept_per_group: Tensor  # int64 per param group: kept elements (for statistics)
    elements_per_group: Tensor  # int64 per param group: stepped elements


def reduce_counts(
    pieces: list[Piece],
    piece_group: list[int],
    local_counts: Tensor,
    table: SlotTable,
    n_groups: int,
    scale: str,
) -> ReducedCounts:
    """Turn local per-piece counts into the counts each piece's factor is computed from.

    ``scale="global"``: sum over the ranks that hold pieces of the same original tensor
    (one all-reduce per reduction group). ``scale="shard"``: no communication, local
    counts over local numels.
    """
    device = local_counts.device
    local_numels = device_index(tuple(p.param.numel() for p in pieces), device)
    groups_t = device_index(tuple(piece_group), device)
    kept = torch.zeros(n_groups, dtype=torch.int64, device=device)
    elems = torch.zeros(n_groups, dtype=torch.int64, device=device)

    if scale == "shard" or not table.sizes:
        kept.index_add_(0, groups_t, local_counts)
        elems.index_add_(0, groups_t, local_numels)
        return ReducedCounts(local_counts, local_numels, kept, elems)

    counts = local_counts.clone()
    numels = device_index(tuple(p.numel for p in pieces), device)

    # Pieces of whole tensors (no reduction) count directly.
    whole = tuple(i for i, p in enumerate(pieces) if p.reduction is None)
    if whole:
        w = device_index(whole, device)
        kept.index_add_(0, groups_t[w], local_counts[w])
        elems.index_add_(0, groups_t[w], local_numels[w])

    # One vector per reduction, all collectives started before any is waited on.
    pending = []
    for red, size in table.sizes.items():
        idx = tuple(i for i, p in enumerate(pieces) if p.reduction == red)
        vec = torch.zeros(2 * size, dtype=torch.int64, device=device)
        if idx:
            ii = device_index(idx, device)
            slots = device_index(tuple(pieces[i].slot for i in idx), device)
            vec.index_add_(0, slots, local_counts[ii])
            vec.index_add_(0, slots + size, local_numels[ii])
        else:
            ii = slots = None
        bufs = []
        for g in red.groups:  # several groups: sum over each in turn (FSDP + TP)
            buf, work = _all_reduce(vec, g)
            work.wait()  # type: ignore[attr-defined]
            vec = buf.to(device) if buf.device != device else buf
            bufs.append(buf)
        pending.append((red, size, vec, ii, slots))

    for red, size, vec, ii, slots in pending:
        if ii is not None:
            counts[ii] = vec[slots]
        gi = device_index(tuple(table.group_index[red]), device)
        kept.index_add_(0, gi, vec[:size])
        elems.index_add_(0, gi, vec[size:])
    return ReducedCounts(counts, numels, kept, elems)
