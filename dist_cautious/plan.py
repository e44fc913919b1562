"""The step plan: what a step does to which pieces, cached while nothing it depends on changes.

:class:`~dist_cautious.base.CautiousOptimizer` plans a step by walking every parameter of
every group (layouts, count slots, state, pieces, buckets) and then executes it (count
pass, reduce, factor, update pass). Planning is Python work per parameter; at LLaMA-60M
shapes it would cost more than the kernels. So a plan whose parameters all use the default
layout (plain tensors, DDP, DTensors) or FSDP1's flat layouts is cached and reused while
nothing it depends on changed (see ``CautiousOptimizer._reuse``). This module holds the plan's data structures;
it knows nothing about any particular optimizer's math: states are tuples in the
optimizer's ``state_keys`` order.
"""

from __future__ import annotations

import dataclasses
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor

from .kernels import cautious_factor
from .layout import ParamLayout, Piece, SlotTable, is_dtensor
from .reduce import ReducedCounts


def pieces_of(
    layout: ParamLayout,
    p: Tensor,
    g: Tensor,
    states: tuple[Tensor, ...],
    token: object,
    shard: bool,
) -> list[Piece]:
    """The non-empty pieces of ``p`` (an empty piece's slot, if any, stays reserved and
    contributes 0). Under ``scale="shard"`` every piece is a tensor of its own: local ``N``,
    no slot, no reduction (the factor of a piece depends only on the piece)."""
    out = []
    for pc in layout.pieces(p, g, states, token):
        if pc.param.numel() == 0:
            continue
        if shard:
            pc.numel, pc.reduction, pc.slot = pc.param.numel(), None, -1
        out.append(pc)
    return out


class Entry:
    """A parameter with a gradient in a step plan."""

    __slots__ = ("param", "state", "states", "token", "gi", "step")

    def __init__(
        self,
        param: Tensor,
        state: dict[str, Any],
        states: tuple[Tensor, ...],
        token: object,
        gi: int,
        step: int,
    ) -> None:
        self.param, self.state, self.states, self.token, self.gi = param, state, states, token, gi
        self.step: Any = step  # the int step while planning; the counter view once frozen


class Bucket:
    """Pieces stepped by one backend call: one param group, step value, device and dtypes."""

    def __init__(self, gi: int, step: int, backend: Any, shard: bool, n_states: int) -> None:
        self.gi, self.step, self.backend, self.shard = gi, step, backend, shard
        # the backend's hand-off between its two passes (e.g. the mask), per bucket
        self.scratch_kw = {"scratch": {}} if backend.caps.takes_scratch else {}
        self.pieces: list[Piece] = []
        self.params: list[Tensor] = []
        self.states: tuple[list[Tensor], ...] = tuple([] for _ in range(n_states))
        self.src: list[int] = []  # entry index of each piece
        self.dynamic: list[Piece] | None = None  # DTensor buckets: pieces refreshed per step
        self.device: torch.device | None = None
        self.grad_dtype: torch.dtype | None = None
        self.factor_dtype = torch.float32
        self.all_entries = False  # src == every entry, in order: the gradient list as is

    def add(self, pc: Piece, entry: int) -> None:
        self.pieces.append(pc)
        self.params.append(pc.param)
        for lst, t in zip(self.states, pc.states):
            lst.append(t)
        self.src.append(entry)
        self.device = pc.param.device
        self.grad_dtype = pc.grad.dtype
        # float64 state (float64 parameters) gets the float64 factor, the others its
        # float32 rounding (as the Triton kernels compute it)
        self.factor_dtype = torch.float64 if pc.states[0].dtype == torch.float64 else torch.float32

    def refresh(self, pieces: list[Piece]) -> None:
        """Take this step's local views (DTensor buckets of a cached plan)."""
        self.params = [pc.param for pc in pieces]
        self.states = tuple(list(ts) for ts in zip(*(pc.states for pc in pieces)))


class Plan:
    """Everything a step needs except the gradients (see ``CautiousOptimizer.step``)."""

    def __init__(self, **kw: Any) -> None:
        self.groups: list[dict[str, Any]] = kw["groups"]
        self.param_ids: list[tuple[int, ...]] = kw["param_ids"]
        self.params: list[Tensor] = kw["params"]
        self.none_pattern: list[bool] = kw["none_pattern"]
        self.entries: list[Entry] = kw["entries"]
        self.created: list[bool] = kw["created"]  # per entry: its state was created here
        self.table: SlotTable = kw["table"]
        self.home: torch.device = kw["home"]
        self.buckets: list[Bucket] = kw["buckets"]
        self.state_obj: Any = kw["state_obj"]
        self.settings: tuple = kw["settings"]
        self.state_keys: tuple[str, ...] = kw["state_keys"]
        self.pieces = [pc for b in self.buckets for pc in b.pieces]
        self.piece_group = [b.gi for b in self.buckets for _ in b.pieces]
        starts = list(accumulate((len(b.pieces) for b in self.buckets), initial=0))
        self.slices = [slice(a, z) for a, z in zip(starts, starts[1:])]
        self.grad_index = [i for i, none in enumerate(self.none_pattern) if not none]
        self.states = [e.state for e in self.entries]
        self.eparams = [e.param for e in self.entries]
        # per state key, the state tensor of every entry (identity-checked on reuse)
        self.tensors = [[e.states[k] for e in self.entries] for k in range(len(self.state_keys))]
        self.steps: list[Tensor] = []
        n = len(self.entries)
        for b in self.buckets:
            b.all_entries = b.src == list(range(n))
        self.step_buf: Tensor | None = None
        self.step_version = -1
        self.local_numels: dict[torch.device, Tensor] = {}  # per-piece numels on the device

    def freeze(self) -> None:
        """Make the plan reusable: drop gradient references, share the step counters.

        Step counters of a cached plan are 0-d views of one float32 buffer
        (``state["step"]`` keeps its meaning and its value), incremented by one op."""
        for b in self.buckets:
            b.pieces = [dataclasses.replace(pc, grad=None) for pc in b.pieces]
            if any(is_dtensor(self.entries[i].param) for i in b.src):
                b.dynamic = list(b.pieces)
        self.pieces = [pc for b in self.buckets for pc in b.pieces]
        buf = torch.tensor([float(e.step) for e in self.entries], dtype=torch.float32)
        for j, e in enumerate(self.entries):
            view = buf[j]
            e.state["step"] = view
            e.step = view
        self.steps = [e.step for e in self.entries]
        self.step_buf = buf
        self.step_version = buf._version

    def advance(self, by: int) -> None:
        """Move every step counter of a cached plan by ``by`` (one op)."""
        assert self.step_buf is not None
        self.step_buf.add_(by)
        self.step_version = self.step_buf._version
        for b in self.buckets:
            b.step += by


def factors(
    red: ReducedCounts,
    groups: list[dict[str, Any]],
    buckets: list[Bucket],
    slices: list[slice],
) -> dict[torch.dtype, Tensor]:
    """Per-piece factors from the reduced counts, with each bucket's group's formula and
    clamp, in float64 and (where a bucket needs it) rounded to float32."""
    opts = {(groups[b.gi]["formula"], float(groups[b.gi]["clamp"])) for b in buckets}
    if len(opts) <= 1:
        f, c = opts.pop() if opts else ("clamp", 1e-3)
        a64 = cautious_factor(red.counts, red.numels, f, c, dtype=torch.float64)
    else:  # groups with their own formula or clamp
        parts = []
        for b, sl in zip(buckets, slices):
            g = groups[b.gi]
            parts.append(
                cautious_factor(
                    red.counts[sl],
                    red.numels[sl],
                    g["formula"],
                    float(g["clamp"]),
                    dtype=torch.float64,
                )  # fmt: skip
            )
        a64 = torch.cat(parts)
    out = {torch.float64: a64}
    if any(b.factor_dtype == torch.float32 for b in buckets):
        out[torch.float32] = a64.to(torch.float32)
    return out
