"""The device-scalar step: what ``capturable=True`` and ``torch.compile(opt.step)`` run.

The planned step (:mod:`.base`, :mod:`.plan`) is fast in eager mode because it caches a plan
and reads small things on the host (Python step counts, CPU factors folded into scalars,
the per-step cross-rank fingerprint on gloo). None of that can be traced by dynamo or
captured in a CUDA graph. This module computes the same algorithm with everything that
changes from step to step kept in tensors:

1. gather (:func:`gather`, called by ``CautiousOptimizer._init_group``: torch's name, which
   dynamo runs eagerly, as for torch's optimizers, and guards on what it saw; plain
   Python): per param group the parameters with a
   gradient, their gradients, state tensors and step counters (moved to the parameter's
   device, as torch's capturable AdamW keeps them), and per parameter the constants the
   step needs: the factor's ``N`` and the names of the process groups its count is summed
   over. The cross-rank agreement check (:func:`.reduce.check_agreement`) runs there, once
   per layout, before anything is stepped: outside a captured or compiled steady state;
2. count pass (:mod:`.kernels.capturable`, per param group): exact int64 counts, a device
   vector;
3. reduce: per process group, one functional all-reduce
   (``torch.distributed._functional_collectives.all_reduce``, traceable by dynamo) of the
   counts of every piece whose tensor that group shards (all param groups together), in
   the first-appearance order every rank computes alike; factors on the device. The
   per-step ``[h, h*h]`` fingerprint check of the planned step is **not** done here: it
   is a host read, and the one-time check in (1) covers the layout;
4. update pass (:mod:`.kernels.capturable`), step counters incremented on the device;
   :func:`step` returns the kept / stepped elements per group, which the optimizer writes
   into its statistics buffers.

``factor_lag=1`` (:mod:`.lag`): a parameter's update uses the factor of its previous step's
counts, ``state[p]["cautious_count"]`` (0-d int64 on the parameter's local device, summed
over every shard; the gather copies out a view of the planned step's buffer or a loaded
count on another device, as it does step counters, so state dicts interchange with the
planned step both ways). This step's counts (for a sharded tensor: summed by the same
functional all-reduce as ``factor_lag=0``) are written into it after the update pass. Whether
a parameter has previous counts is decided from the state's keys in the eagerly run gather
(as torch decides on lazy state creation there), never from data: one with counts is
"lagged", one without (fresh state, ``del opt.state[p]``, loaded without counts) is "fresh"
and takes its exact factor, its counts becoming a new state entry. Consequences:

* under ``torch.compile`` the first lagged step and the later ones are different graphs:
  storing the first counts changes the state's keys, which dynamo guards on, so the second
  call retraces once (2 graphs in all; a deleted state or a load without counts retraces
  again);
* under CUDA-graph capture run warm-up steps before capturing (as for torch's optimizers):
  a step captured while a parameter is fresh replays its exact factor forever and its new
  state entry would live in the graph's memory pool;
* where every parameter of a param group is lagged, its factors come from the previous
  counts only: the update pass does not depend on this step's counts (inductor may count
  inside the update loop), nor on their all-reduce, which can overlap the update pass. No
  handle is kept across steps: the all-reduce is waited for within the step (eagerly at the
  store after the update pass; compiled where inductor schedules its wait), unlike the
  planned step, which leaves it in flight until the next step. Pending all-reduces of
  earlier planned steps are waited for in the gather.

Supported layouts: plain tensors, DDP, DTensors (FSDP2, HSDP, TP). Adapter layouts (FSDP1
flat parameters, DeepSpeed ZeRO partitions) raise: use the planned step there
(``capturable=False``, no ``torch.compile`` of the optimizer step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .kernels import capturable as cap
from .kernels import cautious_factor
from .lag import COUNT_KEY
from .layout import DEFAULT_LAYOUT, SlotTable, group_key, is_dtensor, shard_reduction
from .reduce import device_index


def wanted(opt: Any) -> bool:
    """Take this path: under ``torch.compile`` (dynamo also sets every group's
    ``capturable`` to True), or when any param group asks for ``capturable=True``."""
    if torch.compiler.is_compiling():
        return True
    return any(g.get("capturable", False) for g in opt.param_groups)


def _math(opt: Any) -> Any:
    from .optim import CSGD, CAdamW, CLion

    for cls, math in ((CAdamW, cap.ADAMW), (CLion, cap.LION), (CSGD, cap.SGD)):
        if isinstance(opt, cls):
            return math
    raise NotImplementedError(
        f"{type(opt).__name__} has no capturable step; set capturable=False and do not "
        "torch.compile its step"
    )


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


# a parameter's factor (info's third field): this step's counts (factor_lag=0); the
# previous step's counts (factor_lag=1, ``cautious_count`` in its state); this step's counts,
# kept for the next step (factor_lag=1, no counts yet: fresh state, reset, loaded without)
NO_LAG, LAGGED, FRESH = 0, 1, 2


def _previous(state: dict[str, Any], device: torch.device) -> tuple[Tensor | None, bool]:
    """``state``'s previous counts as a 0-d int64 tensor of its own on ``device`` (the eager
    planned step keeps views of its plan's buffer, a loaded state may hold them on the host
    or as a 1-element tensor), or None where there are none (the key is removed if its value
    is not one count); and whether the stored tensor was replaced."""
    c = state.get(COUNT_KEY)
    if c is None:
        return None, False
    if not torch.is_tensor(c) or c.numel() != 1:  # as the planned step: not one count
        del state[COUNT_KEY]
        return None, False
    if c._base is None and c.device == device and c.dtype == torch.int64 and c.dim() == 0:
        return c, False
    c = state[COUNT_KEY] = c.detach().reshape(()).to(device, torch.int64, copy=True)
    return c, True


def gather(
    opt: Any,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    states: list[Tensor],
    prevs: list[Tensor],
) -> tuple[tuple, SlotTable, bool]:
    """Fill the lists for ``group`` (``states`` key-major: every parameter's first state
    tensor, then every second one; ``prevs``: the previous counts of the ``factor_lag=1``
    parameters that have them, see :func:`_previous`). Returns per parameter ``(N, process
    group names, lag kind)``, the slot table the optimizer checks the ranks' agreement on,
    and whether a step counter or a count was taken out of the cached plan's shared buffer
    (the plan is then stale)."""
    gi = next(i for i, g in enumerate(opt.param_groups) if g is group)
    opt.check_group(group, gi)
    lag = group.get("factor_lag", 0) == 1
    shard = group["scale"] == "shard"
    table = SlotTable()
    table.current_group = gi
    info = []
    per_key: list[list[Tensor]] = [[] for _ in opt.state_keys]
    moved = False
    pnames = group.get("param_names")  # named_parameters(): the guard's identity
    for j, p in enumerate(group["params"]):
        if opt.layout_for(p) is not DEFAULT_LAYOUT:  # (raises for tensors never given)
            raise NotImplementedError(
                f"param group {gi}: a parameter of shape {tuple(p.shape)} has an adapter "
                "layout (FSDP1 flat parameter or DeepSpeed ZeRO partition), which the "
                "capturable / torch.compile step does not handle; use capturable=False and "
                "the eager step for FSDP1 and ZeRO"
            )
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError(
                f"sparse gradient for a parameter of shape {tuple(p.shape)}: "
                f"{type(opt).__name__} does not support sparse gradients"
            )
        red = None if shard or not is_dtensor(p) else shard_reduction(p)
        if red is not None:
            tag = (tuple(p.shape), str(p.dtype).replace("torch.", ""))
            # counts are summed in walk order here (not sorted by name as in the planned
            # step), so a name carries its position: another order on another rank raises
            name = None if pnames is None else f"{pnames[j]} (position {j})"
            table.reserve(red, p.numel(), tag, name)
            names = tuple(str(group_key(pg)) for pg in red.groups)
            for pg in red.groups:
                if not getattr(pg, "group_name", None):
                    raise RuntimeError("a process group without a registered name")
        else:
            names = ()
        local = _local(p)
        state = opt.state_for(p, group)
        t = state["step"]
        if t._base is not None or t.device != local.device:  # (torch's view attribute)
            # a view of the planned step's shared counter buffer, or on another device
            state["step"] = t.detach().to(local.device, copy=True)
            moved = True
        kind = NO_LAG
        if lag:
            prev, copied = _previous(state, local.device)
            moved = moved or copied
            kind = FRESH if prev is None else LAGGED
            if prev is not None:
                prevs.append(prev)
        params.append(p)
        grads.append(g)
        steps.append(state["step"])
        for lst, key in zip(per_key, opt.state_keys):
            lst.append(state[key])
        info.append((int(p.numel()) if red is not None else int(local.numel()), names, kind))
    for lst in per_key:
        states.extend(lst)
    return tuple(info), table, moved


def _index(values: list[int], device: torch.device) -> Tensor:
    # eager: cached device tensors (no host-to-device copy per step, capturable); traced: a
    # constant of the graph
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.int64, device=device)
    return device_index(tuple(values), device)


def step(opt: Any) -> tuple[Tensor, Tensor] | None:
    """One step of ``opt`` on the device-scalar path (see the module doc): the kept and the
    stepped elements per param group, or None when no parameter has a gradient."""
    math = _math(opt)
    n_keys = len(opt.state_keys)
    work = []
    for group in opt.param_groups:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        steps: list[Tensor] = []
        states: list[Tensor] = []
        prevs: list[Tensor] = []
        # torch's name, see (1)
        info = opt._init_group(group, params, grads, steps, states, prevs)
        work.append((group, params, grads, steps, states, prevs, info))

    # pass 1, per param group
    counts_parts = []
    passes = []
    device = None
    for group, params, grads, steps, states, _prevs, _info in work:
        if not params:
            passes.append(None)
            continue
        n = len(params)
        ps = [_local(p) for p in params]
        gs = [_local(g) for g in grads]
        sts = tuple([_local(t) for t in states[k * n : (k + 1) * n]] for k in range(n_keys))
        torch._foreach_add_(steps, 1)
        c, kw = math.count(ps, gs, sts, steps, group)
        device = ps[0].device
        counts_parts.append(c)
        passes.append((ps, gs, sts, steps, kw))
    if device is None:
        return None

    flat_info = [x for _, params, *_, info in work if params for x in info]
    order: dict[str, list[int]] = {}
    for i, (_, names, _kind) in enumerate(flat_info):
        for name in names:
            order.setdefault(name, []).append(i)
    if not order and isinstance(counts_parts[0], list):
        # compiled, nothing sharded: factors per tensor from 0-d counts (no stacking)
        return _per_tensor_step(opt, math, work, passes, counts_parts, flat_info, device)
    if isinstance(counts_parts[0], list):
        counts_parts = [torch.stack(c) for c in counts_parts]
    counts = torch.cat(counts_parts) if len(counts_parts) > 1 else counts_parts[0]

    # reduce: one functional all-reduce per process group over every piece it shards
    if order:
        import torch.distributed._functional_collectives as funcol

        for name, idx in order.items():
            if len(idx) == len(flat_info):
                counts = funcol.all_reduce(counts, "sum", name)
            else:
                ii = _index(idx, device)
                summed = funcol.all_reduce(counts.index_select(0, ii), "sum", name)
                counts = counts.index_copy(0, ii, summed)
    numels = _index([n for n, _, _ in flat_info], device)

    # factors and pass 2, per param group
    kept, elems = [], []
    off = 0
    for (group, params, *_, prevs, info), pa in zip(work, passes):
        if pa is None:
            kept.append(torch.zeros((), dtype=torch.int64, device=device))
            elems.append(torch.zeros((), dtype=torch.int64, device=device))
            continue
        ps, gs, sts, steps, kw = pa
        c, nn = counts[off : off + len(ps)], numels[off : off + len(ps)]
        off += len(ps)
        kinds = [k for _, _, k in info]
        if all(k == LAGGED for k in kinds):  # the factors need none of this step's counts
            used = torch.stack(prevs)
        elif any(k == LAGGED for k in kinds):
            used = torch.stack(_factor_counts(c.unbind(), kinds, prevs))
        else:
            used = c
        alphas = cautious_factor(used, nn, group["formula"], float(group["clamp"]), torch.float64)
        math.update(ps, gs, sts, steps, alphas, group, kw)
        # after the update: this step's (summed) counts, kept for the next step
        _keep(opt, params, kinds, prevs, c.unbind() if kinds[0] != NO_LAG else ())
        kept.append(c.sum())
        elems.append(nn.sum())
    return torch.stack(kept), torch.stack(elems)


def _factor_counts(counts: Any, kinds: list[int], prevs: list[Tensor]) -> list[Tensor]:
    """Per tensor, the counts its factor is computed from: a lagged tensor's previous counts
    (``prevs``, in order), this step's (``counts``) for every other."""
    it = iter(prevs)
    return [next(it) if k == LAGGED else c for c, k in zip(counts, kinds)]


def _keep(
    opt: Any, params: list[Tensor], kinds: list[int], prevs: list[Tensor], counts: Any
) -> None:
    """``factor_lag=1``: this step's counts (0-d tensors) become the previous counts, in place
    where the state holds them, as a new state entry where it does not (under
    ``torch.compile`` that entry changes the state's keys: the next call retraces)."""
    if not kinds or kinds[0] == NO_LAG:
        return
    counts = list(counts)
    lagged = [c for c, k in zip(counts, kinds) if k == LAGGED]
    if lagged:
        torch._foreach_copy_(prevs, lagged)
    for p, c, k in zip(params, counts, kinds):
        if k == FRESH:
            opt.state[p][COUNT_KEY] = c.clone()


def _alpha(c: Tensor, n: int, formula: str, clamp: float) -> Tensor:
    """:func:`~dist_cautious.kernels.cautious_factor` of one 0-d count (``n`` a constant)."""
    if n == 0:
        return torch.ones((), dtype=torch.float64, device=c.device)
    c64 = c.to(torch.float64)
    if formula == "clamp":
        return n / torch.clamp_min(c64, clamp * n)
    return n / (c64 + 1)


def _per_tensor_step(
    opt: Any,
    math: Any,
    work: list,
    passes: list,
    counts_parts: list[list[Tensor]],
    flat_info: list,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Pass 2 of a compiled step without sharded tensors: every scalar per tensor."""
    kept, elems = [], []
    parts = iter(counts_parts)
    off = 0
    for (group, params, *_, prevs, info), pa in zip(work, passes):
        if pa is None:
            kept.append(torch.zeros((), dtype=torch.int64, device=device))
            elems.append(0)
            continue
        ps, gs, sts, steps, kw = pa
        cs = next(parts)
        ns = [n for n, _, _ in flat_info[off : off + len(ps)]]
        kinds = [k for _, _, k in info]
        off += len(ps)
        f, clamp = group["formula"], float(group["clamp"])
        used = _factor_counts(cs, kinds, prevs)
        alphas = [_alpha(c, n, f, clamp) for c, n in zip(used, ns)]
        math.update(ps, gs, sts, steps, alphas, group, kw)
        _keep(opt, params, kinds, prevs, cs)
        total = cs[0]
        for c in cs[1:]:
            total = total + c
        kept.append(total)
        elems.append(sum(ns))
    return torch.stack(kept), torch.tensor(elems, dtype=torch.int64, device=device)
