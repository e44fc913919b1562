"""Same-shape tensors listed in different orders on two ranks (torchrun, gloo, CPU).

Usage: torchrun --nproc-per-node=2 guard_worker.py OUT.json SCENARIO [SCENARIO ...]

Each scenario lists the optimizer's parameters in one order on rank 0 and in another on
rank 1, among tensors of the same shape (a permutation the shape check cannot see), and
reports either the error every rank raised or the relative error of the result against an
independent reference (the float64 oracle, tests/oracle.py, fed the same global
gradients). Rank 0 writes {scenario: numbers}; tests/dist/test_guard.py asserts.

* ``fsdp2``: FSDP2 with ``named_parameters()`` (exact), the same without names (the
  documented limit: shapes only), names with a tensor in another param group on one rank
  and the per-step check (both raise);
* ``fsdp1``: FSDP1 ``use_orig_params`` True and False, plain parameters (no names given:
  the names come from the FlatParameters' ``_fqns``), real forward/backward (exact);
* ``deepspeed``: ZeRO-2, the same order (exact) and another order on rank 1 (DeepSpeed
  flattens positionally: raises on every rank).
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from fsdp_common import (
    HYPER,
    CollectiveCounter,
    gather_all,
    gather_max,
    local,
    seeded_grads,
    setup,
    shard_like,
)
from models import DNet, LinNormBlock, Twins

from dist_cautious import CAdamW
from launch import engines
from tests.oracle import Float64CAdamW, rel_err

STEPS = 4


def _msg(e: BaseException | None) -> str:
    return "no error" if e is None else f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------ FSDP2


def _twin_grads(step: int) -> list[torch.Tensor]:
    """``a`` gets gradients with a steady sign, ``b`` random ones, so their kept counts (and
    factors) really differ."""
    ga, gb, gc = seeded_grads([torch.Size((6, 5)), torch.Size((6, 5)), torch.Size((5, 6))], step)
    return [ga + 1.0, gb, gc]


def sc_fsdp2(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}

    def run(name: str, groups_of, steps: int = STEPS, **opt_kw) -> None:
        torch.manual_seed(0)
        m = Twins()
        init = [p.detach().clone() for p in m.parameters()]
        eng = engines.build(
            "fsdp2",
            m,
            lambda mod: CAdamW(groups_of(list(mod.named_parameters())), **HYPER, **opt_kw),
            mesh=mesh,
        )
        opt, params = eng.opt, list(m.parameters())
        oracle = Float64CAdamW([t.double() for t in init], **HYPER)
        counter = CollectiveCounter()
        before = None
        err: BaseException | None = None
        t0 = time.perf_counter()
        done = 0
        for s in range(steps):
            grads = _twin_grads(s)
            for p, g in zip(params, grads):
                p.grad = shard_like(g, p)
            before = [local(p).detach().clone() for p in params]
            try:
                with counter.count():
                    opt.step()
            except RuntimeError as e:
                err = e
                break
            oracle.step([g.double() for g in grads])
            done += 1
        r: dict = {
            "messages": gather_all(_msg(err)),
            "seconds": gather_max(time.perf_counter() - t0),
            "steps_done": done,
            "orders": gather_all([n for g in opt.param_groups for n in g.get("param_names", [])]),
        }
        if err is None:
            full = list(engines.full_params(eng, dtype=torch.float64).values())
            r["oracle_param"] = gather_max(max(rel_err(f, o) for f, o in zip(full, oracle.p)))
            r["oracle_delta"] = gather_max(
                max(
                    rel_err(f - i.double(), o - i.double()) for f, o, i in zip(full, oracle.p, init)
                )
            )
            r["all_reduce_per_step"] = len(counter.all_reduce_calls) / steps
            r["all_reduce_numels"] = sorted({c[2] for c in counter.all_reduce_calls})
            r["agreement_numels"] = sorted({c[2] for c in counter.agreement_calls})
        else:
            unchanged = all(torch.equal(local(p), b) for p, b in zip(params, before))
            r["params_unchanged"] = all(gather_all(unchanged))
            r["steps"] = gather_all(
                sorted(float(opt.state[p]["step"]) for p in params if opt.state.get(p))
            )
        out[name] = r
        dist.barrier()

    def swapped(named):  # rank 1: b before a (same shape)
        return named if rank == 0 else [named[1], named[0], named[2]]

    run("named", lambda named: swapped(named))
    # the capturable step (device_step.py) sums counts in walk order: named tensors in another
    # order raise there (before anything is stepped) instead of being reordered
    run("named_capturable", lambda named: swapped(named), capturable=True)
    run("unnamed", lambda named: [p for _, p in swapped(named)])
    run(
        "named_other_group",  # rank 1 puts `a` in the second group: refused before stepping
        lambda named: (
            [{"params": named[:2]}, {"params": named[2:]}]
            if rank == 0
            else [{"params": named[1:2]}, {"params": [named[0], named[2]]}]
        ),
    )

    # The per-step check (the fingerprint at the head of the count vector). Both ranks first
    # agree on order (a, b, c) and then on (c, b, a) (both layouts validated once); at step 2
    # only rank 1 goes back: the one-time check is skipped (each rank saw its layout agreed
    # before), and the head of the count all-reduce catches it.
    def belt_groups(named):
        return [{"params": [p for _, p in named]}]

    torch.manual_seed(0)
    out["belt"] = _belt(mesh, rank)
    run("unnamed_agree", belt_groups)  # control: same order everywhere, unnamed
    return out


def _belt(mesh, rank: int) -> dict:
    m = Twins()
    # (6, 5) and (5, 6): different tags
    opt = engines.build("fsdp2", m, lambda mod: CAdamW([mod.a, mod.c], **HYPER), mesh=mesh).opt
    params = list(m.parameters())
    grads = _twin_grads(0)
    for p, g in zip(params, grads):
        p.grad = shard_like(g, p)
    opt.step()  # order (a, c), agreed
    opt.param_groups[0]["params"].reverse()
    opt.step()  # order (c, a), agreed
    if rank == 1:
        opt.param_groups[0]["params"].reverse()  # back to (a, c) on rank 1 only
    before = [local(p).detach().clone() for p in params]
    err = None
    t0 = time.perf_counter()
    try:
        opt.step()
    except RuntimeError as e:
        err = e
    unchanged = all(torch.equal(local(p), b) for p, b in zip(params, before))
    return {
        "messages": gather_all(_msg(err)),
        "seconds": gather_max(time.perf_counter() - t0),
        "params_unchanged": all(gather_all(unchanged)),
    }


# ------------------------------------------------------------------ FSDP1


def sc_fsdp1(rank: int, world: int) -> dict:
    """Two Blocks, each its own FSDP1 unit: their FlatParameters' ``_fqns`` are the same
    (``lin.weight``, ``lin.bias``, ``norm.weight``, ``norm.bias``); six tensors of shape
    (7,), two of (7, 7). Rank 1 lists same-shape tensors (use_orig_params=True) or the two
    FlatParameters (False) in another order than rank 0; no names are passed."""
    from fsdp1_worker import full_grads
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def listed(model: nn.Module) -> list[torch.Tensor]:
        """The optimizer's tensors, in another order on rank 1 (same numels and shapes)."""
        if uop:
            params = list(model.parameters())
        else:
            params = [
                m._handle.flat_param for m in model.modules() if isinstance(m, FSDP) and m._handle
            ]
        if rank == 1 and uop:  # swap 0.lin.weight <-> 1.lin.weight (split across the
            # ranks), 0.lin.bias <-> 0.norm.weight: numels and shapes in the same order
            params = [params[i] for i in (4, 2, 1, 3, 0, 5, 6, 7)]
        elif rank == 1:  # the two FlatParameters (70 elements each), reversed
            params = params[::-1]
        return params

    out = {}
    for uop in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(LinNormBlock(), LinNormBlock())
        with torch.no_grad():  # norms away from their (1, 0) init: different updates
            for b in net:
                b.norm.weight.add_(0.3 * torch.randn(7))
                b.norm.bias.add_(0.3 * torch.randn(7))
        eng = engines.build(
            "fsdp1",
            net,
            lambda model: CAdamW(listed(model), **HYPER),
            fsdp1_wrap={LinNormBlock},
            use_orig_params=uop,
        )
        model, opt = eng.model, eng.opt
        init = engines.full_params(eng)
        names = list(init)
        oracle = Float64CAdamW([init[n].double() for n in names], **HYPER)
        err = None
        try:
            for s in range(STEPS + 1):
                gen = torch.Generator().manual_seed(100 * s + rank)
                x, y = torch.randn(6, 7, generator=gen), torch.randn(6, 7, generator=gen)
                ((model(x) - y) ** 2).mean().backward()
                g = full_grads(model)
                opt.step()
                opt.zero_grad()
                oracle.step([g[n].double() for n in names])
        except RuntimeError as e:
            err = e
        fin = engines.full_params(eng)
        out[f"uop={uop}"] = {
            "messages": gather_all(_msg(err)),
            "oracle_param": gather_max(
                max(rel_err(fin[n].double(), o) for n, o in zip(names, oracle.p))
            ),
            "oracle_delta": gather_max(
                max(
                    rel_err(fin[n].double() - init[n].double(), o - init[n].double())
                    for n, o in zip(names, oracle.p)
                )
            ),
            "names": names,
            "shapes": [list(init[n].shape) for n in names],
        }
        del eng, model, opt
        dist.barrier()
    return out


# ------------------------------------------------------------------ DeepSpeed ZeRO-2


def sc_deepspeed(rank: int, world: int) -> dict:
    import logging

    import deepspeed  # noqa: F401  (DS_ACCELERATOR=cpu is set in main)
    import torch.nn.functional as F
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)
    torch.manual_seed(0)
    net0 = DNet()

    def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(t)
        return torch.randn(4 * world, 5, generator=g), torch.randn(4 * world, 6, generator=g)

    # the reference: CAdamW on whole tensors in one process, full batch (fp32)
    ref = copy.deepcopy(net0)
    ref_opt = CAdamW(list(ref.parameters()), backend="reference", **HYPER)
    for t in range(STEPS):
        X, Y = batch(t)
        ref_opt.zero_grad()
        F.mse_loss(ref(X), Y).backward()
        ref_opt.step()

    out = {}
    for case in ("same_order", "other_order"):

        def listed(model: nn.Module, case=case) -> list[torch.Tensor]:
            params = list(model.parameters())
            if case == "other_order" and rank == 1:
                params = [params[2], params[1], params[0]]  # c before a: same shape
            return params

        net = copy.deepcopy(net0)
        eng = engines.build(
            "zero2",
            net,
            lambda model: CAdamW(listed(model), **HYPER),
            ds_config={"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1},
        )
        engine, opt = eng.ds_engine, eng.opt
        before = [p.detach().clone() for p in net.parameters()]
        err = None
        t0 = time.perf_counter()
        try:
            for t in range(STEPS):
                X, Y = batch(t)
                sl = slice(4 * rank, 4 * rank + 4)
                engine.backward(F.mse_loss(engine(X[sl]), Y[sl]))
                before = [p.detach().clone() for p in net.parameters()]
                engine.step()
        except RuntimeError as e:
            err = e
        r = {"messages": gather_all(_msg(err)), "seconds": gather_max(time.perf_counter() - t0)}
        if err is None:
            r["single_param"] = gather_max(
                max(
                    rel_err(p.detach().double(), q.detach().double())
                    for p, q in zip(net.parameters(), ref.parameters())
                )
            )
        else:
            unchanged = all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
            r["params_unchanged"] = all(gather_all(unchanged))
        out[case] = r
        del eng, engine, opt
        dist.barrier()
    return out


SCENARIOS = {"fsdp2": sc_fsdp2, "fsdp1": sc_fsdp1, "deepspeed": sc_deepspeed}


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out_path, *names = sys.argv[1:]
    rank, world = setup()
    from fsdp_common import finish

    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = SCENARIOS[name](rank, world)
        results[name]["seconds_total"] = round(time.perf_counter() - t0, 2)
        dist.barrier()
    finish(results, out_path)


if __name__ == "__main__":
    main()
