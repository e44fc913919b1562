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


def gather(
    opt: Any,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    states: list[Tensor],
) -> tuple[tuple, SlotTable, bool]:
    """Fill the lists for ``group`` (``states`` key-major: every parameter's first state
    tensor, then every second one). Returns per parameter ``(N, process group names)``, the
    slot table the optimizer checks the ranks' agreement on, and whether a step counter was
    taken out of the cached plan's shared buffer (the plan is then stale)."""
    gi = next(i for i, g in enumerate(opt.param_groups) if g is group)
    opt.check_group(group, gi)
    if group.get("factor_lag", 0):
        raise ValueError(
            f"param group {gi}: factor_lag={group['factor_lag']!r} is not implemented by the "
            "capturable / torch.compile step; use factor_lag=0 there, or capturable=False "
            "without torch.compile"
        )
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
        params.append(p)
        grads.append(g)
        steps.append(state["step"])
        for lst, key in zip(per_key, opt.state_keys):
            lst.append(state[key])
        info.append((int(p.numel()) if red is not None else int(local.numel()), names))
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
        info = opt._init_group(group, params, grads, steps, states)  # torch's name: see (1)
        work.append((group, params, grads, steps, states, info))

    # pass 1, per param group
    counts_parts = []
    passes = []
    device = None
    for group, params, grads, steps, states, _info in work:
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
    for i, (_, names) in enumerate(flat_info):
        for name in names:
            order.setdefault(name, []).append(i)
    if not order and isinstance(counts_parts[0], list):
        # compiled, nothing sharded: factors per tensor from 0-d counts (no stacking)
        return _per_tensor_step(math, work, passes, counts_parts, flat_info, device)
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
    numels = _index([n for n, _ in flat_info], device)

    # factors and pass 2, per param group
    kept, elems = [], []
    off = 0
    for (group, *_), pa in zip(work, passes):
        if pa is None:
            kept.append(torch.zeros((), dtype=torch.int64, device=device))
            elems.append(torch.zeros((), dtype=torch.int64, device=device))
            continue
        ps, gs, sts, steps, kw = pa
        c, nn = counts[off : off + len(ps)], numels[off : off + len(ps)]
        off += len(ps)
        alphas = cautious_factor(c, nn, group["formula"], float(group["clamp"]), torch.float64)
        math.update(ps, gs, sts, steps, alphas, group, kw)
        kept.append(c.sum())
        elems.append(nn.sum())
    return torch.stack(kept), torch.stack(elems)


def _alpha(c: Tensor, n: int, formula: str, clamp: float) -> Tensor:
    """:func:`~dist_cautious.kernels.cautious_factor` of one 0-d count (``n`` a constant)."""
    if n == 0:
        return torch.ones((), dtype=torch.float64, device=c.device)
    c64 = c.to(torch.float64)
    if formula == "clamp":
        return n / torch.clamp_min(c64, clamp * n)
    return n / (c64 + 1)


def _per_tensor_step(
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
    for (group, *_), pa in zip(work, passes):
        if pa is None:
            kept.append(torch.zeros((), dtype=torch.int64, device=device))
            elems.append(0)
            continue
        ps, gs, sts, steps, kw = pa
        cs = next(parts)
        ns = [n for n, _ in flat_info[off : off + len(ps)]]
        off += len(ps)
        f, clamp = group["formula"], float(group["clamp"])
        alphas = [_alpha(c, n, f, clamp) for c, n in zip(cs, ns)]
        math.update(ps, gs, sts, steps, alphas, group, kw)
        total = cs[0]
        for c in cs[1:]:
            total = total + c
        kept.append(total)
        elems.append(sum(ns))
    return torch.stack(kept), torch.tensor(elems, dtype=torch.int64, device=device)
