"""FSDP1 (FullyShardedDataParallel) scenarios for the cautious optimizers, under torchrun
(gloo, CPU).

Usage: torchrun --nproc-per-node=N fsdp1_worker.py OUT.json SCENARIO [SCENARIO ...]

The optimizer is a ``tests/optimizers.py`` row: the one named by ``DC_OPTIMIZER`` (default
cadamw), or, for ``subset:NAME`` scenarios, the row NAME (several rows in one launch).
Every case trains ``FNet`` (tensors (3, 5), (1, 7), (40, 5), (40,), (6, 47), (6,); one
FlatParameter for the root and one per Linear) for 10 steps with a real forward/backward,
different data per rank, and feeds FSDP1's own gradients (all-gathered outside the counted
step) to two references: the row's optimizer on whole tensors in one process and the row's
float64 oracle, with the same two param groups. The final full parameters come from
FSDP1's FULL_STATE_DICT. Rank 0 writes {scenario: numbers} to OUT.json;
tests/dist/test_fsdp1.py asserts on them.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from fsdp_common import CollectiveCounter, gather_all, gather_max, setup
from fsdp_worker import counts_summary
from models import FNET_NAMES as NAMES
from models import FNet
from row_oracle import GroupedOracle
from torch import Tensor
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    MixedPrecision,
    ShardingStrategy,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from dist_cautious.fsdp1 import layout_for
from launch import engines
from tests.optimizers import ROWS, Row, selected
from tests.oracle import rel_err

STEPS = 10
SUBSET_STEPS = 6  # subset:NAME scenarios (the other rows): fewer steps, same assertions
WD = (0.1, 0.0)  # weight decay of param group 0 / 1: the groups really differ


def batch(rank: int, step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 3, generator=gen), torch.randn(6, 6, generator=gen)


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_fsdp_wrapped_module", "")


def full_grads(model: nn.Module) -> dict[str, Tensor]:
    """FSDP1's reduced gradients as whole tensors: each unit's sharded flat gradient,
    all-gathered over its shard group, unflattened (an all-gather: outside counted steps)."""
    out: dict[str, Tensor] = {}
    for mname, m in model.named_modules():
        if not isinstance(m, FSDP) or m._handle is None:
            continue
        h = m._handle
        fp = h.flat_param
        g = fp.grad.detach()
        if h.uses_sharded_strategy:
            buf = g.new_empty(g.numel() * h.world_size)
            dist.all_gather_into_tensor(buf, g.contiguous(), group=h.process_group)
            g = buf
        prefix = _clean(mname)
        off, k = 0, 0
        for n, pad in zip(fp._numels_with_padding, fp._is_padding_mask):
            if not pad:
                name = fp._fqns[k] if not prefix else f"{prefix}.{fp._fqns[k]}"
                out[name] = g[off : off + n].reshape(fp._shapes[k]).clone()
                k += 1
            off += n
    return out


def no_wd(row: Row) -> dict:
    """The row's hyperparameters without weight decay (the param groups set it: WD)."""
    return {k: v for k, v in row.hyper.items() if k != "weight_decay"}


class GroupReference:
    """The row's optimizer in one process on whole tensors (two groups: weight decay WD[g])
    and its float64 oracle with the same per-tensor weight decays, fed the same global
    gradients."""

    def __init__(
        self, init: dict[str, Tensor], group_of: dict[str, int], row: Row, **lag: int
    ) -> None:
        self.params = [nn.Parameter(init[n].clone()) for n in NAMES]
        groups = [
            {"params": [p for n, p in zip(NAMES, self.params) if group_of[n] == gi], "weight_decay": wd}
            for gi, wd in enumerate(WD)
        ]  # fmt: skip
        self.opt = row.cls(groups, backend="foreach", **no_wd(row), **lag)
        self.oracle = GroupedOracle(
            row, [init[n] for n in NAMES], [WD[group_of[n]] for n in NAMES], **lag
        )

    def step(self, grads: dict[str, Tensor]) -> None:
        for n, p in zip(NAMES, self.params):
            p.grad = grads[n].clone()
        self.opt.step()
        self.oracle.step([grads[n] for n in NAMES])


def build(strategy: ShardingStrategy, uop: bool, make_optimizer, mp: bool = False) -> engines.Setup:
    """FNet (seed 0) under FSDP1, one unit per Linear (hybrid strategies: a 2 x world/2
    mesh), with the optimizer ``make_optimizer(wrapped model)``."""
    torch.manual_seed(0)
    kw: dict = {}
    if mp:  # bf16 compute and gradient reduction; the optimizer steps the fp32 shards
        kw["mixed_precision"] = MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16
        )
    return engines.build(
        "fsdp1",
        FNet(),
        make_optimizer,
        fsdp1_wrap={nn.Linear},
        sharding_strategy=strategy,
        use_orig_params=uop,
        fsdp_kwargs=kw,
    )


def grouped(uop: bool, row: Row, **kw):
    """``make_optimizer`` for :func:`build`: the row's optimizer on ``param_groups``."""
    return lambda model: row.cls(param_groups(model, uop)[0], **no_wd(row), **kw)


def param_groups(model: nn.Module, uop: bool) -> tuple[list[dict], dict[str, int]]:
    """Two groups. use_orig_params=True: original tensors split across groups; False:
    the root's FlatParameter in group 0, the Linears' in group 1."""
    if uop:
        group_of = {n: (0 if n in ("w35", "fc1.weight", "fc2.bias") else 1) for n in NAMES}
        named = {_clean(n): p for n, p in model.named_parameters()}
        groups = [[named[n] for n in NAMES if group_of[n] == gi] for gi in (0, 1)]
    else:
        group_of = {n: (0 if n in ("w35", "w17") else 1) for n in NAMES}
        groups = [[], []]
        for mname, m in model.named_modules():
            if isinstance(m, FSDP) and m._handle is not None:
                groups[0 if _clean(mname) == "" else 1].append(m._handle.flat_param)
    return [{"params": g, "weight_decay": wd} for g, wd in zip(groups, WD)], group_of


def local_pieces(opt_params: list[Tensor]) -> list[tuple[int, int, int]]:
    """(param index, offset, length) of every non-empty local piece (per-piece semantics):
    the FlatParameter's in-shard fragments as FSDP1 records them, or the whole 1-D view."""
    out = []
    for i, p in enumerate(opt_params):
        if isinstance(p, torch.distributed.fsdp._flat_param.FlatParameter):
            for info in p._shard_param_infos:
                if info.in_shard and info.numel_in_shard:
                    out.append((i, info.offset_in_shard, info.numel_in_shard))
        elif p.numel():
            out.append((i, 0, p.numel()))
    return out


def run_case(
    strategy: ShardingStrategy,
    uop: bool,
    scale: str = "global",
    steps: int = STEPS,
    mp: bool = False,
    row: Row | None = None,
    factor_lag: int = 0,
) -> dict:
    row = row or selected()
    lag = {"factor_lag": factor_lag} if factor_lag else {}
    rank = dist.get_rank()
    eng = build(strategy, uop, grouped(uop, row, scale=scale, **lag), mp)
    model, opt = eng.model, eng.opt
    init = engines.full_params(eng)
    groups, group_of = param_groups(model, uop)
    opt_params = [p for g in groups for p in g["params"]]
    ref = GroupReference(init, group_of, row, **lag)
    pieces = local_pieces(opt_params)
    piece_wd = [WD[next(gi for gi, g in enumerate(groups) if any(q is opt_params[i] for q in g["params"]))] for i, _, _ in pieces]  # fmt: skip
    piece_oracle = GroupedOracle(
        row, [opt_params[i].detach().reshape(-1)[o : o + n] for i, o, n in pieces], piece_wd
    )
    counter = CollectiveCounter()
    layouts = {type(layout_for(p)).__name__ for p in opt_params}
    for s in range(steps):
        x, y = batch(rank, s)
        ((model(x) - y) ** 2).mean().backward()
        gfull = full_grads(model)
        local_grads = [opt_params[i].grad.detach().reshape(-1)[o : o + n] for i, o, n in pieces]
        with counter.count():
            opt.step()
        opt.zero_grad()
        ref.step(gfull)
        piece_oracle.step(local_grads)
    fin = engines.full_params(eng)
    fp = [fin[n].double() for n in NAMES]
    op = ref.oracle.p
    piece_p = piece_oracle.p
    out = {
        "oracle_param": max(rel_err(a, b) for a, b in zip(fp, op)),
        "oracle_delta": max(
            rel_err(a - init[n].double(), b - init[n].double()) for a, b, n in zip(fp, op, NAMES)
        ),
        # the row's optimizer on whole tensors in one process
        "single_param": max(rel_err(a, b) for a, b in zip(fp, ref.params)),
        "single_delta": max(
            rel_err(a - init[n].double(), b.detach().double() - init[n].double())
            for a, b, n in zip(fp, ref.params, NAMES)
        ),
        "piece_oracle_param": max(
            (
                rel_err(opt_params[i].detach().reshape(-1)[off : off + n], piece_p[j])
                for j, (i, off, n) in enumerate(pieces)
            ),
            default=0.0,
        ),
        # every state tensor of the row (AdamW: exp_avg, exp_avg_sq; Lion: exp_avg; SGD:
        # momentum_buffer) on each local piece vs the per-piece oracle's (scale="shard")
        "piece_oracle_state": max(
            (
                rel_err(opt.state[opt_params[i]][key].reshape(-1)[off : off + n], refs[j])
                for key, refs in zip(row.state_keys, piece_oracle.states())
                for j, (i, off, n) in enumerate(pieces)
            ),
            default=0.0,
        ),
    }
    out = {k: gather_max(v) for k, v in out.items()}
    out.update(counts_summary(counter, steps))
    out["in_flight"] = bool(opt._pending)  # factor_lag=1: the last all-reduce
    out["optimizer"] = type(opt).__name__
    out["steps"] = steps
    out["layouts"] = sorted(set().union(*gather_all(sorted(layouts))))
    out["local_numels"] = gather_all([p.numel() for p in opt_params])
    out["final"] = {n: fin[n].tolist() for n in NAMES}
    out["init"] = {n: init[n].tolist() for n in NAMES}
    if strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
        h = next(m._handle for m in model.modules() if isinstance(m, FSDP) and m._handle)
        mesh = eng.mesh
        out["shard_group"] = str(mesh.get_group("shard").group_name)
        out["replicate_group"] = str(mesh.get_group("replicate").group_name)
        out["handle_group"] = str(h.process_group.group_name)
    del eng, model, opt
    return out


def _delta_diff(a: dict, b: dict) -> float:
    """Relative difference of the total updates of two runs (all tensors together)."""
    da = torch.cat(
        [(torch.tensor(a["final"][n]) - torch.tensor(a["init"][n])).flatten() for n in NAMES]
    )
    db = torch.cat(
        [(torch.tensor(b["final"][n]) - torch.tensor(b["init"][n])).flatten() for n in NAMES]
    )
    return rel_err(da, db)  # fmt: skip


SS = ShardingStrategy


def sc_strategies(rank: int, world: int) -> dict:
    """Every strategy that runs at this world size, both use_orig_params settings."""
    strategies = [SS.FULL_SHARD, SS.SHARD_GRAD_OP, SS.NO_SHARD]
    if world == 4:
        strategies = [SS.FULL_SHARD, SS.HYBRID_SHARD, SS._HYBRID_SHARD_ZERO2]
    out = {}
    for st in strategies:
        for uop in (False, True):
            out[f"{st.name}.uop={uop}"] = run_case(st, uop)
    if world == 2:
        for uop in (False, True):
            out[f"FULL_SHARD.bf16.uop={uop}"] = run_case(SS.FULL_SHARD, uop, mp=True)
    return out


def _train(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for s in range(start, stop):
        x, y = batch(dist.get_rank(), s)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def _fresh(uop: bool, **kw: int) -> engines.Setup:
    return build(SS.FULL_SHARD, uop, grouped(uop, selected(), **kw))


def sc_ckpt(rank: int, world: int, **kw: int) -> dict:
    """FSDP1's full optimizer state dict: 5 steps, save, load into a fresh model and
    optimizer, 5 more steps == 10 uninterrupted steps."""
    out = {}
    cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    ocfg = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False)
    full = StateDictType.FULL_STATE_DICT
    for uop in (False, True):
        eng = _fresh(uop, **kw)
        _train(eng.model, eng.opt, 0, STEPS)
        ref = engines.full_params(eng)
        eng = _fresh(uop, **kw)
        model, opt = eng.model, eng.opt
        _train(model, opt, 0, STEPS // 2)
        with FSDP.state_dict_type(model, full, cfg, ocfg):
            msd, osd = model.state_dict(), FSDP.optim_state_dict(model, opt)
        steps_saved = sorted({float(v["step"]) for v in osd["state"].values()})
        eng = _fresh(uop, **kw)
        model, opt = eng.model, eng.opt
        with FSDP.state_dict_type(model, full, cfg, ocfg):
            model.load_state_dict(msd)
            opt.load_state_dict(FSDP.optim_state_dict_to_load(model, opt, osd))
        _train(model, opt, STEPS // 2, STEPS)
        fin = engines.full_params(eng)
        out[f"uop={uop}"] = {
            "resume_vs_straight": gather_max(max(rel_err(fin[n], ref[n]) for n in NAMES)),
            "saved_steps": steps_saved,
            "saved_tensors": sorted(osd["state"]),
        }
        del eng, model, opt
    return out


def sc_lag_ckpt(rank: int, world: int) -> dict:
    """sc_ckpt with factor_lag=1: FSDP1's full optimizer state dict carries the counts."""
    return sc_ckpt(rank, world, factor_lag=1)


def sc_shard(rank: int, world: int) -> dict:
    """scale='shard' (per-piece semantics) against scale='global', FULL_SHARD."""
    out = {}
    for uop in (False, True):
        g = run_case(SS.FULL_SHARD, uop, "global")
        s = run_case(SS.FULL_SHARD, uop, "shard")
        s["shard_vs_global_delta_rel"] = _delta_diff(s, g)
        out[f"uop={uop}"] = s
    return out


def sc_lag(rank: int, world: int) -> dict:
    """factor_lag=1, FULL_SHARD (FlatParameters mixing tensors, uneven windows): the lagged
    float64 oracle and the single-process factor_lag=1 optimizer; the difference to
    factor_lag=0 shows the lag is real."""
    out = {}
    for uop in (False, True):
        out[f"uop={uop}"] = run_case(SS.FULL_SHARD, uop, factor_lag=1)
    exact = run_case(SS.FULL_SHARD, False)
    out["exact_vs_lag_delta"] = _delta_diff(out["uop=False"], exact)
    return out


def sc_subset(rank: int, world: int, name: str) -> dict:
    """Another row (``subset:clion``, ``subset:csgd``) on a subset of the cases, SUBSET_STEPS
    steps: FULL_SHARD on 2 ranks, HYBRID_SHARD 2x2 on 4, both use_orig_params, scale
    'global' (vs single process and the oracle) and 'shard' (vs the per-piece oracle)."""
    row = ROWS[name]
    st = SS.HYBRID_SHARD if world == 4 else SS.FULL_SHARD
    out = {}
    for uop in (False, True):
        g = run_case(st, uop, "global", SUBSET_STEPS, row=row)
        s = run_case(st, uop, "shard", SUBSET_STEPS, row=row)
        s["shard_vs_global_delta_rel"] = _delta_diff(s, g)
        out[f"{st.name}.global.uop={uop}"] = g
        out[f"{st.name}.shard.uop={uop}"] = s
    return out


def _err(fn) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def sc_errors(rank: int, world: int) -> dict:
    """Unreadable FSDP1 metadata raises instead of stepping (on every rank, no collective)."""
    row = selected()
    out: dict = {}
    for uop in (False, True):
        eng = build(SS.FULL_SHARD, uop, lambda m: row.cls(list(m.parameters()), **row.hyper))
        model, opt = eng.model, eng.opt
        params = list(model.parameters())
        x, y = batch(rank, 0)
        ((model(x) - y) ** 2).mean().backward()
        root = model._handle.flat_param
        before = [p.detach().clone() for p in params]
        # 1. an attribute missing (another torch version)
        saved = root._shard_numel_padded
        del root._shard_numel_padded
        out[f"missing.uop={uop}"] = _err(opt.step)
        root._shard_numel_padded = saved
        # 2. shard infos that disagree with the flattening (corrupted metadata)
        infos = root._shard_param_infos
        bad = list(infos)
        i = next(k for k, f in enumerate(bad) if f.in_shard)
        bad[i] = bad[i]._replace(intra_param_start_idx=bad[i].intra_param_start_idx + 1)
        root._shard_param_infos = tuple(bad)
        out[f"corrupt.uop={uop}"] = _err(opt.step)
        root._shard_param_infos = infos
        out[f"unchanged.uop={uop}"] = all(
            torch.equal(a, b.detach()) for a, b in zip(before, params)
        )
        # 3. the metadata restored: the step goes through
        out[f"restored.uop={uop}"] = _err(opt.step)
        if uop:  # 4. a sharded view stepped while FSDP1 holds the unsharded parameters
            opt.zero_grad()
            with FSDP.summon_full_params(model):
                for p in params:
                    p.grad = torch.zeros_like(p)
                out["unsharded_view"] = _err(opt.step)
        del eng, model, opt
    # 5. a tensor marked as FSDP1-flattened that no FSDP1 handle owns
    t = nn.Parameter(torch.randn(12))
    t._fsdp_flattened = True
    t.grad = torch.randn(12)
    out["orphan"] = _err(row.cls([t], **row.hyper).step)
    out["plain_is_none"] = layout_for(nn.Parameter(torch.randn(3))) is None
    return out


def sc_cost(rank: int, world: int) -> dict:
    """Host cost of a step on a 300-tensor model (tiny tensors: the step is all host
    work), FULL_SHARD, against the same optimizer on the tensors unsharded (cached plan)."""
    row = selected()
    out = {}
    for uop in (False, True):
        torch.manual_seed(0)
        layers = [nn.Linear(8, 8) for _ in range(150)]
        net = nn.Sequential(*[nn.Sequential(*layers[i : i + 10]) for i in range(0, 150, 10)])
        plain = [nn.Parameter(p.detach().clone()) for p in net.parameters()]
        eng = engines.build(
            "fsdp1",
            net,
            lambda m: row.cls(list(m.parameters()), **row.hyper),
            fsdp1_wrap={nn.Sequential},
            use_orig_params=uop,
        )
        model, opt = eng.model, eng.opt
        model(torch.randn(4, 8)).sum().backward()
        params = list(model.parameters())
        for p in plain:
            p.grad = torch.randn_like(p)
        ref = row.cls(plain, **row.hyper)
        times: dict[str, list[float]] = {
            "fsdp1_step": [],
            "fsdp1_step_replanned": [],
            "plain_step": [],
            "layout_for": [],
        }
        for _ in range(12):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            times["fsdp1_step"].append(time.perf_counter() - t0)
            cached = opt._plan is not None
            dist.barrier()  # the same step planned from scratch (what every step did before)
            opt._plan = None
            t0 = time.perf_counter()
            opt.step()
            times["fsdp1_step_replanned"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref.step()
            times["plain_step"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for p in params:
                layout_for(p)
            times["layout_for"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}
        out[f"uop={uop}"] = {
            "tensors": len(plain),
            "optimizer_params": len(params),
            "plan_cached": cached,
            "ms": {k: gather_max(v) for k, v in med.items()},
        }
        del eng, model, opt
    return out


SCENARIOS = {
    "strategies": sc_strategies,
    "shard": sc_shard,
    "errors": sc_errors,
    "ckpt": sc_ckpt,
    "cost": sc_cost,
    "subset": sc_subset,  # subset:NAME
    "lag": sc_lag,
    "lag_ckpt": sc_lag_ckpt,
}


def main() -> None:
    from fsdp_common import finish

    out_path, *names = sys.argv[1:]
    rank, world = setup()
    results = {}
    for name in names:
        t0 = time.perf_counter()
        base, _, arg = name.partition(":")  # subset:clion -> sc_subset(rank, world, "clion")
        results[name] = SCENARIOS[base](rank, world, *([arg] if arg else []))
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        dist.barrier()
    finish(results, out_path)


if __name__ == "__main__":
    main()
