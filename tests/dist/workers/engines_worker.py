"""launch/engines.py under every engine (torchrun, gloo on CPU, world 2).

Usage: torchrun --nproc-per-node=2 engines_worker.py OUT.json ENGINE [ENGINE ...]

ENGINE: ddp, fsdp2, hsdp (a 1 x world mesh), fsdp1 (use_orig_params=True), fsdp1-flat
(use_orig_params=False), zero0 .. zero3. Each builds the same seeded model with
``engines.build``, trains STEPS steps of CAdamW (each rank on its half of the global batch)
and reads the parameters back with ``engines.full_params``. The references run in every
process, on whole tensors and the whole batch: CAdamW in one process, and the float64
oracle (tests/oracle.py) fed the same gradients. Rank 0 writes, per engine, the relative
errors, ``count_sharded`` and every rank's ``state_bytes``; tests/dist/test_engines.py
asserts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dist_cautious import CAdamW  # noqa: E402
from launch import engines  # noqa: E402
from tests.oracle import Float64CAdamW, rel_err  # noqa: E402

STEPS = 2
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
ROWS = 8  # global batch


class Tiny(nn.Module):
    """Two Linear units and a root parameter of 3 elements (uneven on 2 ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)
        self.w = nn.Parameter(torch.randn(3) * 0.5 + 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) * self.w


def fresh() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(77 + step)
    return torch.randn(ROWS, 5, generator=gen), torch.randn(ROWS, 3, generator=gen)


def reference() -> tuple[dict, dict, dict]:
    """(initial, single-process CAdamW, float64 oracle) parameters by name after STEPS."""
    net = fresh()
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    init = {n: p.detach().clone() for n, p in zip(names, params)}
    opt = CAdamW(params, backend="foreach", **HYPER)
    oracle = Float64CAdamW([p.detach() for p in params], **HYPER)
    for s in range(STEPS):
        x, y = batch(s)
        F.mse_loss(net(x), y).backward()
        oracle.step([p.grad for p in params])
        opt.step()
        opt.zero_grad()
    return init, dict(zip(names, (p.detach().clone() for p in params))), dict(zip(names, oracle.p))


def run(name: str, rank: int, world: int, ref: tuple[dict, dict, dict]) -> dict:
    kw: dict = {}
    engine = name
    if name == "hsdp":
        kw["hsdp_shape"] = (1, world)
    if name in ("fsdp2", "hsdp"):
        kw["units"] = lambda m: [m.a, m.b]
    if name == "zero3":  # partition every tensor (small ones persist whole by default)
        kw["ds_config"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    if name.startswith("fsdp1"):
        engine = "fsdp1"
        kw.update(fsdp1_wrap={nn.Linear}, use_orig_params=(name == "fsdp1"))
    setup = engines.build(
        engine, fresh(), lambda m: CAdamW(m.parameters(), backend="foreach", **HYPER), **kw
    )
    rows = ROWS // world
    for s in range(STEPS):
        x, y = batch(s)
        sl = slice(rank * rows, (rank + 1) * rows)
        setup.step(F.mse_loss(setup.wrapped(x[sl]), y[sl]))
    got = engines.full_params(setup)
    sb: list = [None] * world
    dist.all_gather_object(sb, engines.state_bytes(setup))
    init, single, oracle = ref
    out = {
        "label": setup.label,
        "names": sorted(got),
        "count_sharded": engines.count_sharded(setup),
        "state_bytes": sb,
        "shard_group_size": dist.get_world_size(setup.shard_group) if setup.shard_group else 0,
    }
    out["shapes_equal"] = sorted(got) == sorted(single) and all(
        got[n].shape == single[n].shape for n in single
    )
    if out["shapes_equal"]:
        out["single_param"] = max(rel_err(got[n], single[n]) for n in single)
        out["oracle_param"] = max(rel_err(got[n], oracle[n]) for n in single)
        out["oracle_delta"] = max(
            rel_err(got[n].double() - init[n].double(), oracle[n] - init[n].double())
            for n in single
        )
    setup.close()
    dist.barrier()
    return out


def main() -> None:
    out_path, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = reference()
    res = {n: run(n, rank, world, ref) for n in names}
    init = ref[0]
    res["_model"] = {"tensors": len(init), "numel": sum(t.numel() for t in init.values())}
    dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(res, indent=1, sort_keys=True))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
