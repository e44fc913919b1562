"""FSDP2-style DTensor shards on 2 gloo ranks: the planned step, the capturable (eager
device-scalar) step and ``torch.compile(opt.step)`` side by side, against one process on
whole tensors and the float64 oracle (run by tests/dist/test_compile_fsdp2.py).

    torchrun --nproc-per-node=2 tests/dist/workers/compile_worker.py OUT.json

Shapes include an uneven split and a tensor whose shard on rank 1 is empty. Rank 0 writes
relative errors, dynamo's graph / graph-break counts and the break reasons.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

# One fresh inductor cache per rank: the ranks hold shards of different local shapes (uneven
# Shard(0)), and with a cache directory shared across ranks and runs (the default
# /tmp/torchinductor_<user>) a rank was seen to load a graph compiled for the other rank's
# shapes ("expected size 2==3" in assert_size_stride) on a warm cache. docs/kernels.md.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(
    prefix=f"inductor_rank{os.environ.get('RANK', '0')}_"
)

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.optimizers import ROWS  # noqa: E402
from tests.oracle import rel_err  # noqa: E402

SHAPES = [(6, 4), (5, 3), (1,), (9,)]  # (5, 3): 3 + 2 rows; (1,): rank 1's shard is empty
STEPS = 8
LAG_STEPS = 6


def grads_at(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    drift = 0.3 * torch.randn((), generator=g).item()
    return [torch.randn(s, generator=g) + drift for s in SHAPES]


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    row = ROWS["cadamw"]
    g0 = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g0) for s in SHAPES]

    def sharded() -> list[torch.Tensor]:
        return [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in init]

    whole = [torch.nn.Parameter(t.clone()) for t in init]
    planned_p, cap_p, comp_p = sharded(), sharded(), sharded()
    reference = row.cls(whole, **row.hyper)
    oracle = row.oracle(whole, **row.hyper)
    planned = row.cls(planned_p, **row.hyper)
    cap = row.cls(cap_p, **row.hyper)
    for g in cap.param_groups:
        g["capturable"] = True
    comp = row.cls(comp_p, **{**row.hyper, "lr": torch.tensor(row.hyper["lr"])})

    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(comp.step)
    results: dict = {"errors": []}
    for s in range(STEPS):
        gs = grads_at(s)
        for p, g in zip(whole, gs):
            p.grad = g.clone()
        for ps in (planned_p, cap_p, comp_p):
            for p, g in zip(ps, gs):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        reference.step()
        oracle.step(gs)
        planned.step()
        cap.step()
        compiled()
    results["graphs"] = counters["stats"]["unique_graphs"]
    results["graph_breaks"] = sum(counters["graph_break"].values())
    results["break_reasons"] = sorted(counters["graph_break"])

    def err(ps: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
        return max(rel_err(p.full_tensor(), r) for p, r in zip(ps, refs))

    results["planned_vs_whole"] = err(planned_p, whole)
    results["capturable_vs_whole"] = err(cap_p, whole)
    results["compiled_vs_whole"] = err(comp_p, whole)
    results["compiled_vs_planned"] = max(
        (a.full_tensor() - b.full_tensor()).abs().max().item() for a, b in zip(comp_p, planned_p)
    )
    results["capturable_vs_planned"] = max(
        (a.full_tensor() - b.full_tensor()).abs().max().item() for a, b in zip(cap_p, planned_p)
    )
    results["compiled_vs_oracle"] = max(
        rel_err(p.full_tensor(), r) for p, r in zip(comp_p, oracle.p)
    )
    results["steps"] = [float(comp.state[p]["step"]) for p in comp_p]
    results["is_dtensor_state"] = all(isinstance(comp.state[p]["exp_avg"], DTensor) for p in comp_p)
    results["kept_fraction"] = [comp.kept_fraction, reference.kept_fraction]
    results.update(lagged(row, init, mesh, sharded))
    dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def lagged(row, init, mesh, sharded) -> dict:
    """``factor_lag=1``: the compiled and the capturable step against the planned step (all
    on the shards) and the lagged float64 oracle on whole tensors."""
    from torch._dynamo.utils import counters

    planned_p, cap_p, comp_p = sharded(), sharded(), sharded()
    whole = [torch.nn.Parameter(t.clone()) for t in init]
    oracle = row.oracle(whole, factor_lag=1, **row.hyper)
    planned = row.cls(planned_p, factor_lag=1, **row.hyper)
    cap = row.cls(cap_p, factor_lag=1, capturable=True, **row.hyper)
    comp = row.cls(comp_p, factor_lag=1, **{**row.hyper, "lr": torch.tensor(row.hyper["lr"])})
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(comp.step)
    counts_match = True
    for s in range(LAG_STEPS):
        gs = grads_at(s)
        for ps in (planned_p, cap_p, comp_p):
            for p, g in zip(ps, gs):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        oracle.step(gs)
        planned.step()
        cap.step()
        compiled()
        for o in (comp, cap):  # this step's counts, summed over both shards, kept as state
            counts_match &= [
                int(o.state[p]["cautious_count"]) for p in o.param_groups[0]["params"]
            ] == oracle.prev

    def diff(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:  # per tensor, relative
        return max(rel_err(a.full_tensor(), b.full_tensor()) for a, b in zip(xs, ys))

    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    return {
        **update_independence(row, mesh, sharded),
        "lag_graphs": graphs,
        "lag_graph_breaks": breaks,
        "lag_compiled_vs_planned": diff(comp_p, planned_p),
        "lag_capturable_vs_planned": diff(cap_p, planned_p),
        "lag_compiled_vs_oracle": max(
            rel_err(p.full_tensor(), r) for p, r in zip(comp_p, oracle.p)
        ),
        "lag_counts_match_oracle": counts_match,
    }


def update_independence(row, mesh, sharded) -> dict:
    """The functional graphs of 3 compiled ``factor_lag=1`` steps: from the second on, no
    factor or update depends on this step's counts, hence not on their all-reduce."""
    from tests.unit.test_compile import from_counts, graph_capture

    graphs: list = []
    torch._dynamo.reset()
    ps = sharded()
    opt = row.cls(ps, factor_lag=1, **row.hyper)
    step = torch.compile(opt.step, backend=graph_capture(graphs))
    for s in range(3):
        for p, g in zip(ps, grads_at(s)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        step()
    torch._dynamo.reset()
    deps = [from_counts(g) for g in graphs]
    return {
        "dep_graphs": len(graphs),
        "dep_sums": [len(s) for s, _ in deps],
        "dep_float_tensors_from_counts": [len(b) for _, b in deps],
        "dep_all_reduces": [
            sum("all_reduce" in str(n.target) for n in g.graph.nodes) for g in graphs
        ],
    }


if __name__ == "__main__":
    main()
