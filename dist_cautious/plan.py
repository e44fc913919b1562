"""The step plan: what a step does to which pieces, built, reused and executed here.

A step of :class:`~dist_cautious.base.CautiousOptimizer` is gather -> plan -> execute:

* :func:`build` walks every parameter of every group (layouts, count slots, state, pieces,
  buckets). Planning is Python work per parameter; at LLaMA-60M shapes it would cost more
  than the kernels. So a plan whose parameters all use the default layout (plain tensors,
  DDP, DTensors) or FSDP1's flat layouts is cached (``Plan.cached``) and
* :func:`reuse` takes it again while nothing it depends on changed (O(1) work per
  parameter: read ``.grad`` and compare identities);
* :func:`agree`: the ranks' one-time check that they count the same tensors;
* :func:`execute`: count pass, reduce (:mod:`.reduce`, which also decides whether the update
  kernels compute the factor themselves), factors, update pass; a ``factor_lag=1`` step
  whose factors are all the previous step's is one pass on backends that can
  (``Capabilities.one_pass_lagged``): factors, then update and count in one go, reduce.

The optimizer is reached only through :class:`Stepper`, its public surface. This module
knows nothing about any particular optimizer's math: states are tuples in the optimizer's
``state_keys`` order, and the passes are the optimizer's ``count`` / ``update`` (and
``one_pass``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from itertools import accumulate, repeat
from operator import attrgetter, is_
from typing import Any, Protocol

import torch
from torch import Tensor

from .kernels import cautious_factor
from .lag import LagState, Pending
from .layout import DEFAULT_LAYOUT, ParamLayout, Piece, SlotTable, is_dtensor
from .reduce import ReducedCounts, start_reduce


class Stepper(Protocol):
    """What a plan needs from its optimizer: the public surface of
    :class:`~dist_cautious.base.CautiousOptimizer` (its subclasses give ``count`` and
    ``update`` their math through the ``_count`` / ``_update`` hooks)."""

    param_groups: list[dict[str, Any]]
    state: Any  # torch's mapping parameter -> state dict
    state_keys: tuple[str, ...]

    def check_group(self, group: dict[str, Any], gi: int) -> None: ...

    def layout_for(self, p: Tensor) -> ParamLayout: ...

    def layout_registered(self, p: Tensor) -> bool: ...

    def state_for(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]: ...

    def backend_for(self, group: dict[str, Any], device: torch.device) -> Any: ...

    def check_agreement(self, table: SlotTable) -> None: ...

    def count(
        self, b: Bucket, grads: list[Tensor], group: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]: ...

    def update(
        self,
        b: Bucket,
        grads: list[Tensor],
        group: dict[str, Any],
        alphas: Tensor | None,
        kw: dict[str, Any],
    ) -> None: ...

    def one_pass(
        self, b: Bucket, grads: list[Tensor], group: dict[str, Any], alphas: Tensor
    ) -> Tensor: ...


def backend_name(group: dict[str, Any]) -> str:
    """The backend a group asks for: ``backend``, unless it is ``"auto"`` and torch's
    ``fused`` / ``foreach`` choose (``fused=True``: ``"triton"``; ``foreach=True``:
    ``"foreach"``; ``foreach=False``: ``"reference"``, torch's single-tensor loop;
    ``fused=False``: ``"foreach"``). ``"auto"`` is resolved per device by the optimizer."""
    backend = group["backend"]
    if backend != "auto":
        return backend
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        return "triton"
    if foreach:
        return "foreach"
    if foreach is False:
        return "reference"
    if fused is False:
        return "foreach"
    return "auto"


def settings(groups: list[dict[str, Any]]) -> tuple:
    """What a cached plan depends on besides parameters, gradients and state objects
    (formula, clamp and the other scalars are read at every step)."""
    return tuple((g["scale"], backend_name(g), g["state_dtype"], g["factor_lag"]) for g in groups)


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
    """Everything a step needs except the gradients (see :func:`build`)."""

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
        self.lag: LagState | None = None  # factor_lag=1 in some group (lag.py)
        self.cached = False  # frozen for reuse (see build)
        self.flat: list[tuple[Tensor, ParamLayout]] = []  # FSDP1 parameters and their layouts
        self.entry_layouts: list[ParamLayout] | None = None  # per entry, once cached

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
        self.step_version = buf._version  # torch's in-place version counter (no public API)

    def advance(self, by: int) -> None:
        """Move every step counter of a cached plan by ``by`` (one op)."""
        assert self.step_buf is not None
        self.step_buf.add_(by)
        self.step_version = self.step_buf._version  # torch's, as in freeze
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


# ---------------------------------------------------------------------- build
#
# A plan whose parameters all use the default layout (plain tensors, DDP, DTensors) is
# cached and reused while nothing it depends on changed: the same param_groups (same dicts,
# same parameters in the same order), the same gradient presence pattern, the same state
# mapping with the same dict per parameter and the same tensors in it (``del opt.state[p]``,
# ``opt.state[p] = {}``, ``opt.state.clear()`` and a new ``opt.state`` all re-plan, with
# fresh state for the affected parameters), unchanged step counters (checked through their
# version counter) and the same :func:`settings`. FSDP1 flat layouts are cached too (each
# reuse checks that ``layout_for`` still returns the plan's layout and cuts fresh views of
# the flat tensors, as DTensor buckets take fresh local shards); layouts registered by
# adapters (DeepSpeed ZeRO: ``register_layout``) are planned every step.

_GRAD = attrgetter("grad")
_IS_SPARSE = attrgetter("is_sparse")


def build(opt: Stepper) -> tuple[Plan | None, list[list[Tensor]] | None]:
    """Walk every parameter: the step's plan (``plan.cached``: frozen for :func:`reuse`)
    and its per-bucket gradients; ``(None, None)`` when there is nothing to step."""
    table = SlotTable()
    buckets: dict[tuple, Bucket] = {}
    bucket_grads: dict[tuple, list[Tensor]] = defaultdict(list)
    home: torch.device | None = None
    params: list[Tensor] = []
    none_pattern: list[bool] = []
    entries: list[Entry] = []
    entry_layouts: list[ParamLayout] = []
    created: list[bool] = []
    cacheable = True
    flat: list[tuple[Tensor, ParamLayout]] = []  # FSDP1 parameters and their layouts
    n_states = len(opt.state_keys)
    for gi, group in enumerate(opt.param_groups):
        opt.check_group(group, gi)
        table.current_group = gi
        shard = group["scale"] == "shard"
        names = group.get("param_names")  # torch >= 2.6: from named_parameters()
        for j, p in enumerate(group["params"]):
            table.current_name = names[j] if names is not None else None
            layout = opt.layout_for(p)
            if layout is not DEFAULT_LAYOUT:
                if opt.layout_registered(p):  # an adapter's (ZeRO): planned every step
                    cacheable = False
                else:  # FSDP1's: cached, the layout checked every step (reuse)
                    flat.append((p, layout))
            # Reserve slots for every parameter, gradient or not (see reduce.py).
            token = None if shard else layout.reserve(p, table)
            if home is None:
                home = (p.to_local() if is_dtensor(p) else p).device
            g = p.grad
            params.append(p)
            none_pattern.append(g is None)
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"sparse gradient for a parameter of shape {tuple(p.shape)}: "
                    f"{type(opt).__name__} does not support sparse gradients"
                )
            created.append(not opt.state.get(p))
            state = opt.state_for(p, group)
            state["step"] += 1
            step = int(state["step"].item())  # a CPU tensor: no device sync
            states = tuple(state[k] for k in opt.state_keys)
            ei = len(entries)
            entries.append(Entry(p, state, states, token, gi, step))
            entry_layouts.append(layout)
            for pc in pieces_of(layout, p, g, states, token, shard):
                key = (gi, step, pc.param.device, pc.param.dtype, pc.grad.dtype, pc.states[0].dtype)
                b = buckets.get(key)
                if b is None:
                    be = opt.backend_for(group, pc.param.device)
                    b = buckets[key] = Bucket(gi, step, be, shard, n_states)
                b.add(pc, ei)
                bucket_grads[key].append(pc.grad)

    if home is None or (not buckets and not table.sizes):
        return None, None
    order = list(buckets)
    plan = Plan(
        groups=list(opt.param_groups),
        param_ids=[tuple(map(id, g["params"])) for g in opt.param_groups],
        params=params,
        none_pattern=none_pattern,
        entries=entries,
        created=created,
        table=table,
        home=home,
        buckets=[buckets[k] for k in order],
        state_obj=opt.state,
        settings=settings(opt.param_groups),
        state_keys=opt.state_keys,
    )
    grads = [bucket_grads[k] for k in order]
    lag_groups = {gi for gi, g in enumerate(opt.param_groups) if g["factor_lag"] == 1}
    if lag_groups:
        piece_entry = [i for b in plan.buckets for i in b.src]
        plan.lag = LagState(entries, entry_layouts, plan.pieces, piece_entry, lag_groups, home)
        # the all-reduce may be left in flight only when every slot is lagged
        plan.lag.deferrable = all(
            opt.param_groups[gi]["factor_lag"] == 1
            for gis in table.group_index.values()
            for gi in gis
        )
    if cacheable:
        plan.freeze()
        plan.cached = True
        plan.flat = flat
        plan.entry_layouts = entry_layouts
        for b in plan.buckets:  # FSDP1: fresh views of the flat tensors every step
            flat_bucket = any(entry_layouts[i] is not DEFAULT_LAYOUT for i in b.src)
            if b.dynamic is None and flat_bucket:
                b.dynamic = list(b.pieces)
    return plan, grads


def agree(plan: Plan, opt: Stepper) -> None:
    """The ranks' one-time check that they count the same tensors (see reduce.py), before
    anything is stepped; on failure the planned step is undone (no state is left)."""
    if not plan.table.sizes or plan.table.agreed:
        return
    try:
        opt.check_agreement(plan.table)
    except RuntimeError:
        for e, created in zip(plan.entries, plan.created):
            if created:
                opt.state.pop(e.param, None)
            else:
                e.state["step"] = e.state["step"].clone() - 1
        raise


# ---------------------------------------------------------------------- reuse


def reuse(plan: Plan, opt: Stepper) -> list[list[Tensor]] | None:
    """The per-bucket gradients if the cached ``plan`` still describes this step (then its
    step counters are advanced by one), else None."""
    if plan.state_obj is not opt.state or plan.settings != settings(opt.param_groups):
        return None
    if not all(map(is_, map(opt.state.get, plan.eparams), plan.states)):
        return None  # a parameter's state was deleted, replaced or cleared
    for group, g0, ids in zip(opt.param_groups, plan.groups, plan.param_ids):
        if group is not g0 or tuple(map(id, group["params"])) != ids:
            return None
    for p, layout in plan.flat:
        if opt.layout_for(p) is not layout:
            return None  # FSDP1 re-computed its shard metadata (re-wrapped, resharded)
    buf = plan.step_buf
    if buf is None or buf._version != plan.step_version:  # torch's version counter
        return None  # a step counter was changed in place
    # C-level loops (map/operator): this runs for every parameter on every step.
    pgrads = list(map(_GRAD, plan.params))
    if list(map(is_, pgrads, repeat(None))) != plan.none_pattern:
        return None
    states = plan.states
    if not all(map(is_, map(dict.get, states, repeat("step")), plan.steps)):
        return None
    for key, objs in zip(plan.state_keys, plan.tensors):
        if not all(map(is_, map(dict.get, states, repeat(key)), objs)):
            return None  # a state tensor was replaced
    lag = plan.lag
    if lag is not None and not lag.intact():
        return None  # a cautious_count was replaced
    egrads = list(map(pgrads.__getitem__, plan.grad_index))
    if any(map(_IS_SPARSE, egrads)):
        return None  # the full path raises the error
    for gi, group in enumerate(opt.param_groups):
        opt.check_group(group, gi)
    # Valid: this step is the cached one with every counter one further.
    plan.advance(1)
    out = []
    for b in plan.buckets:
        if b.dynamic is None:
            out.append(egrads if b.all_entries else list(map(egrads.__getitem__, b.src)))
            continue
        # DTensors and FSDP1 flat tensors: fresh local views (and the layout's checks)
        # every step; an entry's pieces are consecutive in its bucket
        layouts = plan.entry_layouts
        j, n = 0, len(b.dynamic)
        for i in dict.fromkeys(b.src):
            e = plan.entries[i]
            layout = DEFAULT_LAYOUT if layouts is None else layouts[i]
            pcs = pieces_of(layout, e.param, egrads[i], e.states, e.token, b.shard)
            for pc in pcs:
                if j >= n or b.src[j] != i or pc.grad.dtype != b.grad_dtype:
                    plan.advance(-1)  # undo; the full path re-plans this step
                    return None
                b.dynamic[j] = pc
                j += 1
        if j != n:
            plan.advance(-1)
            return None
        out.append([pc.grad for pc in b.dynamic])
        b.refresh(b.dynamic)
        for pc in b.dynamic:
            pc.grad = None  # type: ignore[assignment]
    return out


# ---------------------------------------------------------------------- execute


def execute(
    plan: Plan, grads: list[list[Tensor]], opt: Stepper
) -> tuple[ReducedCounts | None, Pending | None]:
    """Count pass, reduce, factors, update pass. Returns this step's statistics, or (with
    ``factor_lag=1``, the all-reduce left in flight) the :class:`~.lag.Pending` reduction
    that will give them."""
    home = plan.home
    groups = opt.param_groups
    lag = plan.lag
    if (
        lag is not None
        and lag.all_lagged
        and not lag.fresh
        and all(b.backend.caps.one_pass_lagged for b in plan.buckets)
    ):
        return _execute_one_pass(plan, grads, opt, lag)
    # Pass 1: local counts (and whatever state the optimizer updates there), one backend
    # call per bucket; each call may hand keyword arguments to its pass 2.
    counts_parts = []
    handoff = []
    for b, gs in zip(plan.buckets, grads):
        c, kw = opt.count(b, gs, groups[b.gi])
        counts_parts.append(c if c.device == home else c.to(home))
        handoff.append(kw)
    if len(counts_parts) == 1:
        local_counts = counts_parts[0]
    elif counts_parts:
        local_counts = torch.cat(counts_parts)
    else:
        local_counts = torch.zeros(0, dtype=torch.int64, device=home)

    # The step's one count reduction (no-op for whole tensors and scale="shard" groups);
    # reduce.py decides whether the update kernels compute the factor (``red.fused``).
    in_kernel = lag is None and all(
        b.backend.caps.fused_factor and b.device == home for b in plan.buckets
    )
    red = start_reduce(
        plan.pieces, plan.piece_group, local_counts, plan.table, len(groups), in_kernel=in_kernel
    )  # (the table's agreement was checked when the plan was built: see agree)
    pending = None
    slices = plan.slices
    if lag is not None:  # factor_lag=1 in some group (lag.py)
        alphas, pending = _lagged_factors(plan, lag, local_counts, red, groups)
    elif red.fused:
        alphas = {}
    else:
        alphas = factors(red.wait(), groups, plan.buckets, slices)

    # Pass 2: the masked, rescaled step.
    single = len(plan.buckets) == 1
    for b, gs, kw, sl in zip(plan.buckets, grads, handoff, slices):
        group = groups[b.gi]
        if red.fused:
            numels = red.local_numels[sl]
            kw["factor"] = (local_counts[sl], numels, group["formula"], group["clamp"])
            a = None
        else:
            a = alphas[b.factor_dtype]
            a = a if single else a[sl]
            a = a if a.device == b.device else a.to(b.device)
        opt.update(b, gs, group, a, kw)
    if pending is not None:
        return None, pending
    return red.wait(), None  # fused: the statistics, reduced after the update


def _lagged_factors(
    plan: Plan, lag: LagState, local_counts: Tensor, red: Any, groups: list[dict[str, Any]]
) -> tuple[dict[torch.dtype, Tensor], Pending | None]:
    """The factors of a step with ``factor_lag=1`` groups: the previous step's counts for
    lagged pieces, this step's for the others. The all-reduce ``red`` of this step's counts
    is left in flight (returned as pending, waited for at the next step) when no factor of
    this step needs it."""
    if lag.deferrable and not lag.fresh and plan.table.sizes:
        # every sharded tensor's factor lags: this step needs no reduced count
        numels = lag.numels
        used = ReducedCounts(lag.counts(local_counts), numels, numels[:0], numels[:0])
        r = None
    else:
        r = red.wait()
        used = ReducedCounts(lag.counts(r.counts), r.numels, r.numels, r.numels)
    alphas = factors(used, groups, plan.buckets, plan.slices)
    return alphas, _keep_counts(lag, local_counts, red, r)


def _keep_counts(lag: LagState, local_counts: Tensor, red: Any, r: Any) -> Pending | None:
    """This step's counts become the lagged pieces' previous counts: local ones at once;
    reduced ones at once when the reduction was waited for (``r``), else when the returned
    :class:`~.lag.Pending` is (at the next step)."""
    lag.store_local(local_counts)
    if r is not None:
        lag.store_reduced(r)
    lag.stepped()
    return None if r is not None else Pending(red, lag)


def _execute_one_pass(
    plan: Plan, grads: list[list[Tensor]], opt: Stepper, lag: LagState
) -> tuple[ReducedCounts | None, Pending | None]:
    """A ``factor_lag=1`` step whose factors are all known before it (every piece lags and
    has previous counts) on backends that declare ``one_pass_lagged``: one pass per bucket
    applies the update with the previous counts' factors and counts this step's mask. The
    counts then go to the same reduction as in :func:`execute` (left in flight when a
    tensor is sharded). Same numbers as count pass + update pass (tests/unit/test_one_pass.py)."""
    home, groups = plan.home, opt.param_groups
    numels = lag.numels
    used = ReducedCounts(lag.previous(), numels, numels[:0], numels[:0])
    alphas = factors(used, groups, plan.buckets, plan.slices)
    single = len(plan.buckets) == 1
    parts = []
    for b, gs, sl in zip(plan.buckets, grads, plan.slices):
        a = alphas[b.factor_dtype]
        a = a if single else a[sl]
        c = opt.one_pass(b, gs, groups[b.gi], a if a.device == b.device else a.to(b.device))
        parts.append(c if c.device == home else c.to(home))
    if len(parts) == 1:
        local_counts = parts[0]
    else:
        local_counts = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=home)
    red = start_reduce(plan.pieces, plan.piece_group, local_counts, plan.table, len(groups))
    r = None if lag.deferrable and plan.table.sizes else red.wait()
    pending = _keep_counts(lag, local_counts, red, r)
    return (None, pending) if pending is not None else (r, None)
