"""FSDP2 / HSDP / FSDP+TP / DDP scenarios, run under torchrun (gloo, CPU).

``backward``, ``handset``, ``hsdp`` and ``tp`` step the optimizer of the
``tests/optimizers.py`` row named by ``DC_OPTIMIZER`` (CAdamW, CLion, CSGD); the other
scenarios are CAdamW's (run with the default row).

Usage: torchrun --nproc-per-node=N fsdp_worker.py OUT.json CKPT_DIR SCENARIO [SCENARIO ...]

Each scenario returns a dict of numbers (relative errors against the references in
fsdp_common, collective counts); rank 0 writes {scenario: numbers} to OUT.json and
tests/dist/test_fsdp2.py asserts on them. Several scenarios share one launch because a
torchrun launch costs seconds on a 2-core machine.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from fsdp_common import (
    HYPER,
    ROW,
    CollectiveCounter,
    FullReference,
    compare,
    fresh_net,
    full,
    gather_all,
    gather_max,
    local,
    net_batch,
    seeded_grads,
    setup,
    shard_like,
    shard_net,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from dist_cautious import CAdamW
from dist_cautious.baselines import AllGatherCAdamW
from dist_cautious.layout import shard_reduction
from launch import engines
from tests.oracle import Float64CAdamW, rel_err

STEPS = 10


def counts_summary(counter: CollectiveCounter, steps: int) -> dict:
    calls = counter.all_reduce_calls
    return {
        "all_reduce_total": len(calls),
        "all_reduce_per_step": len(calls) / steps,
        "all_reduce_groups": sorted({c[0] for c in calls}),
        "all_reduce_group_sizes": sorted({c[1] for c in calls}),
        "all_reduce_numels": sorted({c[2] for c in calls}),
        # one fixed-size check (3 lanes: n and two fingerprints) per group, first step only
        "agreement_checks": sorted(counter.agreement_calls),
        "other_collectives": counter.other_ops(),
        "same_sequence_per_group": same_sequence_per_group(calls),
    }


def same_sequence_per_group(calls: list[tuple[str, int, int]]) -> bool:
    """Every member of every group issued the same sequence of (size, numel) on it."""
    by_group: dict[str, dict[int, list]] = {}
    for r, seq in enumerate(gather_all(calls)):
        for g, size, numel in seq:
            by_group.setdefault(g, {}).setdefault(r, []).append((size, numel))
    for ranks in by_group.values():
        seqs = list(ranks.values())
        if len(ranks) != seqs[0][0][0] or any(s != seqs[0] for s in seqs):
            return False
    return True


def run_backward(data_rank: int, net, init, steps: int = STEPS, **kw) -> dict:
    """Real forward/backward through an FSDP2 (or HSDP / TP) model, scale='global'; ``kw``:
    more options for the optimizer and its references (factor_lag)."""
    params = list(net.parameters())
    opt = ROW.cls(params, **HYPER, **kw)
    ref = FullReference(init, **HYPER, **kw)
    counter = CollectiveCounter()
    for s in range(steps):
        x, y = net_batch(data_rank, s)
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        gfull = [full(p.grad) for p in params]  # all-gathers, outside the counted step
        with counter.count():
            opt.step()
        opt.zero_grad()
        ref.step(gfull)
    out = compare(params, ref, init, opt)
    out = {k: gather_max(v) for k, v in out.items()}
    out.update(counts_summary(counter, steps))
    out["state_is_dtensor"] = all(
        isinstance(opt.state[p][ROW.state_keys[0]], DTensor)
        and opt.state[p][ROW.state_keys[0]].placements == p.placements
        for p in params
        if isinstance(p, DTensor)
    )
    out["placements"] = sorted({str(p.placements) for p in params if isinstance(p, DTensor)})
    out["kept_fraction"] = opt.kept_fraction
    return out


# ----------------------------------------------------------------------------- scenarios


def sc_backward(rank: int, world: int, ckpt: str) -> dict:
    """FSDP2 1-D, real backward, different data per rank."""
    net, init = fresh_net()
    out = run_backward(rank, shard_net(net), init)
    out["local_shapes"] = gather_all([tuple(local(p).shape) for p in net.parameters()])
    return out


def sc_cpu_offload(rank: int, world: int, ckpt: str) -> dict:
    """FSDP2 with ``CPUOffloadPolicy``: sharded parameters, their gradients and the optimizer
    state live on the CPU and the step runs there (here the compute device is the CPU too,
    so this checks the offload code path and the layouts, not host/device copies)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    net, init = fresh_net()
    policy = CPUOffloadPolicy(pin_memory=False)  # pinning needs an accelerator
    out = run_backward(rank, shard_net(net, offload_policy=policy), init)
    params = list(net.parameters())
    out["offload_policy"] = all(  # FSDP2's own record of the policy, per parameter group
        isinstance(fully_shard.state(m)._fsdp_param_group.offload_policy, CPUOffloadPolicy)
        for m in (net, net.fc1, net.fc2)
    )
    out["local_on_cpu"] = all(local(p).device.type == "cpu" for p in params)
    return out


def split_signal_grads(shapes, step: int) -> list[torch.Tensor]:
    """Seeded global grads; fc2.weight (8, 64) gets a consistent-sign top half (kept fraction
    ~1) and a noisy bottom half, so per-shard kept fractions differ a lot from the global one."""
    gs = seeded_grads(shapes, step)
    gs[3][:4] = gs[3][:4].abs() + 0.5
    return gs


def sc_handset(rank: int, world: int, ckpt: str) -> dict:
    """Hand-set global grads, three optimizers side by side: global, shard, all-gather."""
    base, init = fresh_net()
    shapes = [p.shape for p in init]
    modes = ("global", "shard", "allgather") if ROW.name == "cadamw" else ("global", "shard")
    nets = {m: shard_net(copy.deepcopy(base)) for m in modes}
    params = {m: list(n.parameters()) for m, n in nets.items()}
    opts = {
        "global": ROW.cls(params["global"], scale="global", **HYPER),
        "shard": ROW.cls(params["shard"], scale="shard", **HYPER),
    }
    if "allgather" in modes:  # the reference repository's approach exists for AdamW only
        opts["allgather"] = AllGatherCAdamW(params["allgather"], **HYPER)
    ref = FullReference(init, **HYPER)
    # per-piece oracle for scale="shard": this rank's non-empty local shards as whole tensors
    live = [i for i, p in enumerate(params["shard"]) if local(p).numel() > 0]
    piece_oracle = ROW.oracle([local(params["shard"][i]).detach() for i in live], **HYPER)
    counters = {m: CollectiveCounter() for m in opts}
    for s in range(STEPS):
        gs = split_signal_grads(shapes, s)
        for m, opt in opts.items():
            for p, g in zip(params[m], gs):
                p.grad = shard_like(g, p)
            with counters[m].count():
                opt.step()
        ref.step(gs)
        piece_oracle.step([local(params["shard"][i].grad) for i in live])
    out: dict = {}
    for m in [m for m in ("global", "allgather") if m in modes]:
        r = compare(params[m], ref, init, opts[m], with_cadamw=(m == "global"))
        out[m] = {k: gather_max(v) for k, v in r.items()}
        out[m].update(counts_summary(counters[m], STEPS))
    errs = [rel_err(local(params["shard"][i]), piece_oracle.p[j]) for j, i in enumerate(live)]
    out["shard"] = {"piece_oracle_param": gather_max(max(errs, default=0.0))}
    out["shard"]["piece_oracle_delta"] = gather_max(
        max(
            (
                rel_err(
                    local(params["shard"][i]).double() - local_init, piece_oracle.p[j] - local_init
                )
                for j, i in enumerate(live)
                for local_init in [shard_like(init[i], params["shard"][i]).to_local().double()]
            ),
            default=0.0,
        )
    )
    out["shard"].update(counts_summary(counters["shard"], STEPS))
    # shard vs global on the split tensor fc2.weight: the difference must be real
    i = 3
    dg = full(params["global"][i]) - init[i]
    ds = full(params["shard"][i]) - init[i]
    out["shard_vs_global_delta_rel"] = rel_err(ds, dg)
    out["local_numels_fc2_weight"] = gather_all(local(params["global"][i]).numel())
    return out


def sc_frozen(rank: int, world: int, ckpt: str) -> dict:
    """Rank 1 has no gradient for fc1.weight (every step); w164's shard is empty on ranks >= 1."""
    net, init = fresh_net()
    shard_net(net)
    params = list(net.parameters())
    shapes = [p.shape for p in init]
    fi = 2  # fc1.weight (64, 5)
    idx = shard_like(torch.arange(init[fi].numel()).reshape(shapes[fi]), params[fi]).to_local()
    idx_by_rank = gather_all(idx.flatten().tolist())
    frozen_mask = torch.zeros(init[fi].numel(), dtype=torch.bool)
    frozen_mask[idx_by_rank[1]] = True
    frozen = [None] * len(params)
    frozen[fi] = frozen_mask.reshape(shapes[fi])
    opt = CAdamW(params, **HYPER)
    ref = FullReference(init, **HYPER)
    counter = CollectiveCounter()
    for s in range(STEPS):
        gs = seeded_grads(shapes, s, seed=99)
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if (i == fi and rank == 1) else shard_like(g, p)
        with counter.count():
            opt.step()
        ref.step(gs, frozen=frozen)
    out = {k: gather_max(v) for k, v in compare(params, ref, init, with_cadamw=False).items()}
    out.update(counts_summary(counter, STEPS))
    out["rank1_has_state_for_frozen"] = gather_all(params[fi] in opt.state)[1]
    # rank 1's frozen rows must be exactly the initial values (no weight decay, no update)
    p_full = full(params[fi]).flatten()
    out["frozen_rows_unchanged"] = bool(
        torch.equal(p_full[idx_by_rank[1]], init[fi].flatten()[idx_by_rank[1]])
    )
    # A gradient missing on rank 0 at one step only (the plan changes twice): completes,
    # and every group still sees the same all-reduce sequence on all its members.
    net2, _ = fresh_net()
    shard_net(net2)
    params2 = list(net2.parameters())
    opt2 = CAdamW(params2, **HYPER)
    counter2 = CollectiveCounter()
    for s in range(4):
        gs = seeded_grads(shapes, s, seed=5)
        for i, (p, g) in enumerate(zip(params2, gs)):
            p.grad = None if (i == 4 and rank == 0 and s == 2) else shard_like(g, p)
        with counter2.count():
            opt2.step()
    out["intermittent"] = counts_summary(counter2, 4)
    out["intermittent"]["steps_by_rank"] = gather_all(float(opt2.state[params2[4]]["step"]))
    return out


def sc_ddp(rank: int, world: int, ckpt: str) -> dict:
    """DDP: plain tensors, already whole: no collective in the optimizer step."""
    net, init = fresh_net()
    ddp = engines.build("ddp", net, lambda m: CAdamW(list(m.parameters()), **HYPER))
    model, opt = ddp.wrapped, ddp.opt
    params = list(net.parameters())
    ref = FullReference(init, **HYPER)
    counter = CollectiveCounter()
    for s in range(STEPS):
        x, y = net_batch(rank, s)
        ((model(x) - y) ** 2).mean().backward()
        with counter.count():
            opt.step()
        ref.step([p.grad for p in params])
        opt.zero_grad()
    out = {k: gather_max(v) for k, v in compare(params, ref, init, opt).items()}
    out.update(counts_summary(counter, STEPS))
    return out


DCP_STEPS = 5  # steps before the checkpoint (world A) and after it (world B)


def _dcp_setup(world: int):
    net, init = fresh_net()
    shard_net(net)
    params = list(net.parameters())
    return net, init, params, CAdamW(params, **HYPER)


def _dcp_steps(params, opt, shapes, steps, ref=None):
    for s in steps:
        gs = seeded_grads(shapes, s, seed=4242)
        if params is not None:
            for p, g in zip(params, gs):
                p.grad = shard_like(g, p)
            opt.step()
            opt.zero_grad()
        if ref is not None:
            ref.step(gs)


def sc_dcp_save(rank: int, world: int, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    net, init, params, opt = _dcp_setup(world)
    _dcp_steps(params, opt, [p.shape for p in init], range(DCP_STEPS))
    msd, osd = get_state_dict(net, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    return {"saved_world": world}


def sc_dcp_load(rank: int, world: int, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    net, init, params, opt = _dcp_setup(world)
    shapes = [p.shape for p in init]
    msd, osd = get_state_dict(net, opt)  # initialises the optimizer state (a zero-lr step)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt)
    set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    out: dict = {
        "loaded_steps": sorted({float(opt.state[p]["step"]) for p in params}),
        "state_is_dtensor": all(
            isinstance(opt.state[p]["exp_avg"], DTensor)
            and opt.state[p]["exp_avg"].placements == p.placements
            and opt.state[p]["exp_avg"].device_mesh.size() == world
            for p in params
        ),
    }
    ref = FullReference(init, **HYPER)
    _dcp_steps(None, None, shapes, range(DCP_STEPS), ref=ref)  # replay the saved run
    r = compare(params, ref, init, opt)
    out["at_load"] = {k: gather_max(v) for k, v in r.items()}
    _dcp_steps(params, opt, shapes, range(DCP_STEPS, 2 * DCP_STEPS), ref=ref)
    r = compare(params, ref, init, opt)
    out["after"] = {k: gather_max(v) for k, v in r.items()}
    return out


def sc_hsdp(rank: int, world: int, ckpt: str) -> dict:
    """HSDP on a 2x2 mesh: (Replicate, Shard(0)); only the shard dim is summed."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    net, init = fresh_net()
    out = run_backward(rank, shard_net(net, mesh), init)
    red = shard_reduction(next(net.parameters()))
    out["reduction_is_shard_group"] = red is not None and [g.group_name for g in red.groups] == [
        mesh.get_group("shard").group_name
    ]
    out["shard_group"] = mesh.get_group("shard").group_name
    return out


class TPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(3, 12)
        self.w2 = nn.Linear(12, 8, bias=False)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.w2(torch.relu(self.w1(x))))


def sc_tp(rank: int, world: int, ckpt: str, **kw) -> dict:
    """FSDP + TP on a 2x2 (dp, tp) mesh: w1 colwise, w2 rowwise, norm FSDP only."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    net = TPNet()
    init = [p.detach().clone() for p in net.parameters()]
    parallelize_module(net, mesh["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    engines.build("fsdp2", net, None, mesh=mesh["dp"])
    dp_rank = mesh.get_local_rank("dp")  # TP ranks of one dp group see the same batch
    out = run_backward(dp_rank, net, init, **kw)
    out["expected_groups"] = sorted(
        {mesh.get_group("dp").group_name, mesh.get_group("tp").group_name}
    )
    return out


def sc_mixed(rank: int, world: int, ckpt: str) -> dict:
    """Plain tensors and DTensors on two meshes (one 1-D, one 2x2) in one optimizer."""
    m1 = init_device_mesh("cpu", (world,))
    m2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("a", "b"))
    torch.manual_seed(1)
    spec = [  # (shape, mesh, placements); None: plain tensor
        ((6, 7), None, None),
        ((10, 3), m1, [Shard(0)]),
        ((6, 4), m2, [Replicate(), Shard(0)]),
        ((8, 6), m2, [Shard(0), Shard(1)]),
        ((5,), m2, [Shard(0), Replicate()]),
        ((4, 4), m2, [Replicate(), Replicate()]),
        ((7, 2), m1, [Shard(1)]),  # 2 columns on 4 ranks: ranks 2, 3 empty
    ]
    init = [torch.randn(s) for s, _, _ in spec]
    params = [
        nn.Parameter(
            t.clone()
            if mesh is None
            else distribute_tensor(t.clone(), mesh, pl, src_data_rank=None)
        )
        for t, (_, mesh, pl) in zip(init, spec)
    ]
    opts = {"global": CAdamW(params, **HYPER)}
    params_s = [nn.Parameter(p.detach().clone()) for p in params]
    opts["shard"] = CAdamW(params_s, scale="shard", **HYPER)
    ref = FullReference(init, **HYPER)
    counters = {m: CollectiveCounter() for m in opts}
    for s in range(STEPS):
        gs = seeded_grads([t.shape for t in init], s, seed=7)
        for ps, m in ((params, "global"), (params_s, "shard")):
            for p, g in zip(ps, gs):
                p.grad = shard_like(g, p)
            with counters[m].count():
                opts[m].step()
        ref.step(gs)
    out = {k: gather_max(v) for k, v in compare(params, ref, init, opts["global"]).items()}
    out.update(counts_summary(counters["global"], STEPS))
    out["expected_groups"] = sorted(
        {m1.get_group(0).group_name, m2.get_group("a").group_name, m2.get_group("b").group_name}
    )
    out["shard"] = counts_summary(counters["shard"], STEPS)
    return out


def sc_errors(rank: int, world: int, ckpt: str) -> dict:
    """Unsupported layouts raise on every rank before any collective (so nothing hangs)."""
    mesh = init_device_mesh("cpu", (world,))
    out = {}

    def attempt(name, make):
        try:
            p, g = make()
            p.grad = g
            CAdamW([p], **HYPER).step()
            out[name] = "no error"
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"

    def partial():
        t = DTensor.from_local(torch.ones(4), mesh, [Partial()])
        return nn.Parameter(t), DTensor.from_local(torch.ones(4), mesh, [Partial()])

    def misplaced_grad():
        p = nn.Parameter(distribute_tensor(torch.ones(8, 2), mesh, [Shard(0)], src_data_rank=None))
        g = distribute_tensor(torch.ones(8, 2), mesh, [Replicate()], src_data_rank=None)
        return p, g

    attempt("partial", partial)
    attempt("misplaced_grad", misplaced_grad)
    # mesh dims of size 1 split nothing: no reduction over them
    m = init_device_mesh("cpu", (1, world))
    t = distribute_tensor(torch.ones(8, 4), m, [Shard(0), Shard(1)], src_data_rank=None)
    red = shard_reduction(t)
    out["size1_dim_skipped"] = red is not None and [g.group_name for g in red.groups] == [
        m.get_group(1).group_name
    ]
    t = distribute_tensor(torch.ones(8, 4), m, [Shard(0), Replicate()], src_data_rank=None)
    out["only_size1_shard_is_whole"] = shard_reduction(t) is None
    dist.barrier()
    return out


def sc_mixed_scale(rank: int, world: int, ckpt: str) -> dict:
    """One param group with scale="global", one with scale="shard" (per-group options): the
    global group equals the float64 oracle on whole tensors, the shard group the per-piece
    oracle, with one all-reduce per step carrying only the global group's slots."""
    base, init = fresh_net()
    shapes = [p.shape for p in init]
    net = shard_net(copy.deepcopy(base))
    params = list(net.parameters())  # w35, w164, fc1.weight, fc2.weight, fc2.bias
    g_idx, s_idx = [0, 1, 2], [3, 4]
    opt = CAdamW(
        [
            {"params": [params[i] for i in g_idx]},
            {"params": [params[i] for i in s_idx], "scale": "shard"},
        ],
        **HYPER,
    )
    oracle = Float64CAdamW([init[i] for i in g_idx], **HYPER)
    live = [i for i in s_idx if local(params[i]).numel() > 0]
    piece_oracle = Float64CAdamW([local(params[i]).detach() for i in live], **HYPER)
    counter = CollectiveCounter()
    for s in range(STEPS):
        gs = split_signal_grads(shapes, s)
        for p, g in zip(params, gs):
            p.grad = shard_like(g, p)
        with counter.count():
            opt.step()
        oracle.step([gs[i] for i in g_idx])
        piece_oracle.step([local(params[i].grad) for i in live])
    out = {
        "global_oracle_param": gather_max(
            max(rel_err(full(params[i]), o) for i, o in zip(g_idx, oracle.p))
        ),
        "shard_piece_oracle_param": gather_max(
            max((rel_err(local(params[i]), o) for i, o in zip(live, piece_oracle.p)), default=0.0)
        ),
    }
    out.update(counts_summary(counter, STEPS))
    return out


def sc_guard(rank: int, world: int, ckpt: str) -> dict:
    """Ranks that disagree on the optimizer's parameters get a clear error on every rank,
    from the one-time agreement check, before anything is stepped (no hang, no wrong step)."""
    import time

    out: dict = {}

    def attempt(name: str, groups_of) -> None:
        base, init = fresh_net()
        net = shard_net(copy.deepcopy(base))
        params = list(net.parameters())
        for p, g in zip(params, seeded_grads([q.shape for q in init], 0)):
            p.grad = shard_like(g, p)
        before = [local(p).detach().clone() for p in params]
        opt = CAdamW(groups_of(params), **HYPER)
        t0 = time.perf_counter()
        try:
            opt.step()
            msg = "no error"
        except RuntimeError as e:
            msg = str(e)
        unchanged = all(torch.equal(local(p), b) for p, b in zip(params, before))
        out[name] = {
            "messages": gather_all(msg),
            "seconds": gather_max(time.perf_counter() - t0),
            "params_unchanged": all(gather_all(unchanged)),
            "no_state": all(gather_all(all(not opt.state.get(p) for p in params))),
        }
        dist.barrier()

    a = lambda ps: ps[:3]  # noqa: E731  w35, w164, fc1.weight
    b = lambda ps: ps[3:]  # noqa: E731  fc2.weight, fc2.bias
    attempt("agree", lambda ps: [{"params": a(ps)}, {"params": b(ps)}])
    attempt(
        "groups_swapped",
        lambda ps: (
            [{"params": a(ps)}, {"params": b(ps)}]
            if rank == 0
            else [{"params": b(ps)}, {"params": a(ps)}]
        ),
    )
    attempt(
        "group_missing",
        lambda ps: [{"params": a(ps)}, {"params": b(ps)}] if rank == 0 else [{"params": a(ps)}],
    )
    attempt(
        "param_missing",
        lambda ps: (
            [{"params": a(ps)}, {"params": b(ps)}]
            if rank == 0
            else [{"params": a(ps)}, {"params": b(ps)[:1]}]
        ),
    )
    return out


def sc_lag(rank: int, world: int, ckpt: str) -> dict:
    """factor_lag=1 on FSDP2 (uneven shards; w164's shard is empty on rank 1): equal to the
    single-process optimizer with factor_lag=1 and its float64 oracle (which differs from
    factor_lag=0's), the all-reduce left in flight after every step but the first, counts
    replicated on every rank (empty shards included), and a mid-run round trip through
    DCP's state_dict API equal (bitwise) to the uninterrupted run."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    base, init = fresh_net()
    shapes = [p.shape for p in init]
    nets = [shard_net(copy.deepcopy(base)) for _ in range(2)]
    params = [list(n.parameters()) for n in nets]
    opts = [ROW.cls(ps, factor_lag=1, **HYPER) for ps in params]
    ref = FullReference(init, factor_lag=1, **HYPER)
    exact = ROW.oracle(init, **HYPER)  # factor_lag=0: the lag must make a difference
    counter = CollectiveCounter()
    in_flight, settled, ref_stats = [], [], []
    for s in range(STEPS):
        gs = split_signal_grads(shapes, s)
        if s == STEPS // 2:  # the second run: through a state dict into a fresh optimizer
            sd = get_optimizer_state_dict(nets[1], opts[1])
            opts[1] = ROW.cls(params[1], factor_lag=1, **HYPER)
            set_optimizer_state_dict(nets[1], opts[1], sd)
        for k in range(2):
            for p, g in zip(params[k], gs):
                p.grad = shard_like(g, p)
            if k == 0:
                with counter.count():
                    opts[0].step()
                in_flight.append(bool(opts[0]._pending))
                st = opts[0].settled_mask_stats  # must not wait for the one in flight
                settled.append(
                    (int(st["kept"].sum()), int(st["elements"].sum()), bool(opts[0]._pending))
                )
            else:
                opts[1].step()
        ref.step(gs)
        rs = ref.opt.mask_stats
        ref_stats.append((int(rs["kept"].sum()), int(rs["elements"].sum())))
        exact.step(gs)
    out = {k: gather_max(v) for k, v in compare(params[0], ref, init, opts[0]).items()}
    out.update(counts_summary(counter, STEPS))
    out["in_flight"] = in_flight
    # settled_mask_stats: the previous step's (whole-tensor) statistics while this step's
    # all-reduce is in flight, left in flight; the step's own when nothing is pending
    out["settled_is_previous_step"] = [
        (k, e) == ref_stats[s - 1 if flying else s] and still == flying
        for s, ((k, e, still), flying) in enumerate(zip(settled, in_flight))
    ]
    opts[0].state_dict()  # waits for the last step's all-reduce: its counts are state
    counts = [int(opts[0].state[p]["cautious_count"]) for p in params[0]]
    out["counts_replicated"] = all(c == counts for c in gather_all(counts))
    out["counts_are_single_process"] = counts == [
        int(ref.opt.state[p]["cautious_count"]) for p in ref.params
    ]
    out["round_trip_max_abs"] = gather_max(
        max((local(a) - local(b)).abs().max().item() for a, b in zip(*params) if local(a).numel())
    )
    out["exact_vs_lag_delta"] = max(
        rel_err(full(p).double() - i.double(), e - i.double())
        for p, e, i in zip(params[0], exact.p, init)
    )
    return out


def sc_lag_dcp_save(rank: int, world: int, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    net, init, params, _ = _dcp_setup(world)
    opt = CAdamW(params, factor_lag=1, **HYPER)
    _dcp_steps(params, opt, [p.shape for p in init], range(DCP_STEPS))
    msd, osd = get_state_dict(net, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt + "_lag")
    return {"saved_world": world}


def sc_lag_dcp_load(rank: int, world: int, ckpt: str) -> dict:
    """The factor_lag=1 checkpoint of world 2 resumed on world 4 (resharded): equal to the
    single-process run with factor_lag=1 (the saved counts are used, not a fresh factor)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    net, init, params, _ = _dcp_setup(world)
    opt = CAdamW(params, factor_lag=1, **HYPER)
    shapes = [p.shape for p in init]
    msd, osd = get_state_dict(net, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt + "_lag")
    set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    ref = FullReference(init, factor_lag=1, **HYPER)
    _dcp_steps(None, None, shapes, range(DCP_STEPS), ref=ref)  # replay the saved run
    out: dict = {
        "counts_loaded": [int(opt.state[p]["cautious_count"]) for p in params]
        == [int(ref.opt.state[p]["cautious_count"]) for p in ref.params]
    }
    _dcp_steps(params, opt, shapes, range(DCP_STEPS, 2 * DCP_STEPS), ref=ref)
    out["after"] = {k: gather_max(v) for k, v in compare(params, ref, init, opt).items()}
    return out


def sc_lag_tp(rank: int, world: int, ckpt: str) -> dict:
    """factor_lag=1 on FSDP + TP: two all-reduce rounds (dp, then tp); the first is left in
    flight, the second is issued when the first is waited for, at the next step."""
    return sc_tp(rank, world, ckpt, factor_lag=1)


SCENARIOS = {
    "lag": sc_lag,
    "lag_tp": sc_lag_tp,
    "lag_dcp_save": sc_lag_dcp_save,
    "lag_dcp_load": sc_lag_dcp_load,
    "backward": sc_backward,
    "cpu_offload": sc_cpu_offload,
    "handset": sc_handset,
    "frozen": sc_frozen,
    "ddp": sc_ddp,
    "dcp_save": sc_dcp_save,
    "dcp_load": sc_dcp_load,
    "hsdp": sc_hsdp,
    "tp": sc_tp,
    "mixed": sc_mixed,
    "errors": sc_errors,
    "mixed_scale": sc_mixed_scale,
    "guard": sc_guard,
}


def main() -> None:
    out_path, ckpt, *names = sys.argv[1:]
    rank, world = setup()
    results = {}
    import time

    from fsdp_common import finish

    for name in names:
        t0 = time.perf_counter()
        results[name] = SCENARIOS[name](rank, world, ckpt)
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        dist.barrier()
    finish(results, out_path)


if __name__ == "__main__":
    main()
