"""Shared pieces of the FSDP2 / HSDP / TP workers (run under torchrun, gloo on CPU).

Workers compute numbers (relative errors against independent references, collective
counts) and rank 0 writes them as JSON; the pytest side (tests/dist/test_fsdp2.py) asserts.
References, all fed the same *global* gradients:

* ``FullReference``: the optimizer under test (the ``tests/optimizers.py`` row named by
  ``DC_OPTIMIZER``: CAdamW by default, CLion, CSGD) on plain full tensors in one process (no
  sharding, no collective), and the row's float64 oracle (``tests/oracle.py``).
* per-piece oracle: one float64 oracle over this rank's local shards (``scale="shard"``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launch import engines  # noqa: E402  the engine set-up bench.py uses too
from tests.optimizers import selected  # noqa: E402
from tests.oracle import rel_err  # noqa: E402

ROW = selected()  # the optimizer under test (env DC_OPTIMIZER, default cadamw)
HYPER = ROW.hyper


def setup() -> tuple[int, int]:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish(results: dict, out: str | None) -> None:
    dist.barrier()
    if out and dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1, sort_keys=True))
    dist.barrier()
    dist.destroy_process_group()


# The whole tensor (an all-gather for DTensors: call it outside counted regions); this rank's part.
full = engines.full_tensor
local = engines.local_tensor


def gather_max(x: float) -> float:
    """Max of a per-rank float over all ranks."""
    out: list[float] = [0.0] * dist.get_world_size()
    dist.all_gather_object(out, float(x))
    return max(out)


def gather_all(x: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


def shard_like(full_t: Tensor, like: Tensor) -> Tensor:
    """``full_t`` laid out like ``like`` (DTensor: local chunk, no communication)."""
    if isinstance(like, DTensor):
        return distribute_tensor(
            full_t.clone(), like.device_mesh, like.placements, src_data_rank=None
        )
    return full_t.clone()


def seeded_grads(shapes: list[torch.Size], step: int, seed: int = 1234) -> list[Tensor]:
    """Global gradients of one step, identical on every rank (a seeded CPU generator)."""
    gen = torch.Generator().manual_seed(seed + 7919 * step)
    return [torch.randn(s, generator=gen) for s in shapes]


class CollectiveCounter:
    """Counts collectives inside the ``with`` block.

    Two independent views: ``torch.distributed.all_reduce`` is wrapped (what reduce.py calls
    through the module attribute), recording (group name, group size, numel) per call; and
    ``CommDebugMode`` counts every c10d / functional collective op that reaches the
    dispatcher (all_gather, reduce_scatter, broadcast, ... from DTensor or anywhere).
    """

    def __init__(self) -> None:
        self.all_reduce_calls: list[tuple[str, int, int]] = []
        # the one-time cross-rank agreement checks (reduce.check_agreement), kept apart
        self.agreement_calls: list[tuple[str, int, int]] = []
        self.ops: Counter = Counter()

    @contextlib.contextmanager
    def count(self):
        orig = dist.all_reduce

        def wrapped(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            g = group if group is not None else dist.group.WORLD
            call = (str(getattr(g, "group_name", g)), dist.get_world_size(g), tensor.numel())
            # frames: wrapped <- reduce._all_reduce <- its caller
            if sys._getframe(2).f_code.co_name == "check_agreement":
                self.agreement_calls.append(call)
            else:
                self.all_reduce_calls.append(call)
            return orig(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = wrapped
        try:
            with CommDebugMode() as cm:
                yield self
        finally:
            dist.all_reduce = orig
        for k, v in cm.get_comm_counts().items():
            self.ops[str(k)] += v

    @property
    def n_all_reduce(self) -> int:
        return len(self.all_reduce_calls)

    def other_ops(self) -> dict[str, int]:
        """Collective ops other than the all-reduces the wrapper saw."""
        rest = dict(self.ops)
        n = rest.pop("c10d.allreduce_", 0) - len(self.agreement_calls)
        if n != self.n_all_reduce:
            rest["c10d.allreduce_ (unexplained)"] = n - self.n_all_reduce
        return {k: v for k, v in rest.items() if v}


class FullReference:
    """The optimizer on whole tensors in one process plus its float64 oracle, fed global grads."""

    def __init__(self, full_params: list[Tensor], **hyper) -> None:
        self.params = [nn.Parameter(p.detach().clone()) for p in full_params]
        self.opt = ROW.cls(self.params, backend="foreach", **hyper)
        self.oracle = ROW.oracle([p.detach() for p in full_params], **hyper)

    def step(self, grads: list[Tensor | None], frozen: list[Tensor | None] | None = None) -> None:
        if frozen is None:  # CAdamW on whole tensors cannot express a partly frozen tensor
            for p, g in zip(self.params, grads):
                p.grad = None if g is None else g.detach().clone()
            self.opt.step()
        gs = [None if g is None else g.detach() for g in grads]
        if frozen is None:
            self.oracle.step(gs)
        else:  # partly frozen tensors: Float64CAdamW's option (the frozen scenario is AdamW's)
            self.oracle.step(gs, frozen=frozen)


def compare(
    params: list[Tensor], ref: FullReference, init: list[Tensor], opt=None, with_cadamw=True
) -> dict[str, float]:
    """Relative errors of the (gathered) params and moments against both references.

    ``*_delta`` errors compare the total update ``p - p0`` (stricter than the parameter
    itself, whose norm is dominated by its initial value).
    """
    out: dict[str, float] = {}
    fp = [full(p).double() for p in params]
    o = ref.oracle
    out["oracle_param"] = max(rel_err(a, b) for a, b in zip(fp, o.p))
    out["oracle_delta"] = max(
        rel_err(a - i.double(), b - i.double()) for a, b, i in zip(fp, o.p, init)
    )
    if with_cadamw:
        out["cadamw_param"] = max(rel_err(a, b) for a, b in zip(fp, ref.params))
        out["cadamw_delta"] = max(
            rel_err(a - i.double(), b.detach() - i) for a, b, i in zip(fp, ref.params, init)
        )
    if opt is not None:  # every state tensor (AdamW: exp_avg, exp_avg_sq; ...) vs the oracle's
        for key, refs in zip(ROW.state_keys, ROW.oracle_states(o)):
            err = 0.0
            for p, ref in zip(params, refs):
                st = opt.state.get(p)
                if st:
                    err = max(err, rel_err(full(st[key]), ref))
            out[f"oracle_{key}"] = err
    return out


class Net(nn.Module):
    """Small model whose tensors give uneven and empty FSDP shards on 4 ranks.

    ``w35`` (3, 5): rows 1/1/1/0 on 4 ranks; ``w164`` (1, 64): rank 0 only; ``fc1`` (64, 5)
    and ``fc2`` (8, 64) split evenly; ``fc2.bias`` (8,). All take part in the forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w35 = nn.Parameter(torch.randn(3, 5) * 0.5)
        self.w164 = nn.Parameter(torch.randn(1, 64) * 0.5 + 1.0)
        self.fc1 = nn.Linear(5, 64, bias=False)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.w35  # (B, 3) -> (B, 5)
        h = torch.tanh(self.fc1(h)) * self.w164
        return self.fc2(h)


def shard_net(net: Net, mesh=None, **fsdp_kwargs) -> Net:
    """``net`` under FSDP2 through launch/engines.py: ``fully_shard`` on fc1, fc2, then the
    root, on ``mesh`` (default: 1-D over the world; a 2-D mesh: HSDP); ``fsdp_kwargs`` go
    to every ``fully_shard`` call."""
    engine = "hsdp" if mesh is not None and mesh.ndim == 2 else "fsdp2"
    units = lambda m: [m.fc1, m.fc2]  # noqa: E731
    return engines.build(engine, net, None, mesh=mesh, units=units, fsdp_kwargs=fsdp_kwargs).model


def fresh_net() -> tuple[Net, list[Tensor]]:
    """The seeded ``Net`` and copies of its initial parameters."""
    torch.manual_seed(0)
    net = Net()
    return net, [p.detach().clone() for p in net.parameters()]


def net_batch(rank: int, step: int, batch: int = 6) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(batch, 3, generator=gen), torch.randn(batch, 8, generator=gen)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
