"""DeepSpeed ZeRO worker (torchrun, gloo on CPU): runs scenarios, rank 0 writes JSON metrics.

usage: ds_worker.py OUT.json SPEC [SPEC ...]

A SPEC is dot-separated tokens, e.g. ``z2.global.fp32.gas2.rr``:

* ``z0`` .. ``z3``: ZeRO stage;
* ``global`` / ``shard``: the optimizer's ``scale``; ``mixed``: the decay group ``global``,
  the no-decay group ``shard`` (per-group options);
* ``clion`` / ``csgd`` (any ``tests/optimizers.py`` row name; default ``cadamw``): the
  optimizer, its hyperparameters (weight decay per param group: ``WD``) and float64 oracle;
* ``fp32`` / ``bf16`` / ``bf16acc32`` (bf16 model, fp32 gradient accumulation: ZeRO-1 then
  uses ``BF16_Optimizer``) / ``fp16`` (static loss scale);
* ``gasN``: gradient accumulation steps; ``rr``: ZeRO-2 round-robin gradients;
  ``subN``: ZeRO-3 ``sub_group_size``; ``offp``: ZeRO-3 ``offload_param`` to CPU;
  ``offo``: ZeRO-Offload (``offload_optimizer`` to CPU: fp32 partitions, their gradients
  and the optimizer state on the CPU, stepped there);
* ``fsdp``: also train the same model with FSDP2 + the same optimizer and compare;
* ``forgot``: plain ``deepspeed.initialize`` without the adapter; record the error;
* ``lag``: ``factor_lag=1`` (the references too; the per-step audit's one-step oracle does
  not know the previous counts, so only the trajectory and the resume are checked).

What is measured, against references computed here that share no code with the adapter:

* trajectory: final parameters after ``STEPS`` optimizer steps vs (a) the row's optimizer
  in one process on the full batch and (b) its float64 oracle ``tests/oracle.py`` with float64
  gradients of a float64 copy of the model; ``scale="shard"`` is compared with a float64
  oracle over the ZeRO *fragments* (each fragment its own tensor), computed from the
  documented ZeRO partitioning rules (``expected_*`` below);
* step audit, every ``optimizer.step()`` call: the flat fp32 partitions, gradients and
  moments of all ranks are gathered before and after the step, whole tensors rebuilt with
  the expected rules, one float64 oracle step applied to them (per tensor for ``global``,
  from the states of the row's ``state_keys``,
  per fragment for ``shard``) and compared with what the ranks computed; alignment padding
  must stay untouched; all-reduces inside the step are counted;
* layout: the adapter's fragments equal the expected rules and DeepSpeed's own
  ``param._hp_mapping`` fragment addresses (ZeRO-1/2, BF16_Optimizer).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
from deepspeed.utils import logger as ds_logger  # noqa: E402
from models import MoENet, straddle_net  # noqa: E402
from row_oracle import GroupedOracle  # noqa: E402

from dist_cautious import deepspeed as dc_ds  # noqa: E402
from dist_cautious.base import CautiousOptimizer  # noqa: E402
from launch import engines  # noqa: E402
from tests.optimizers import ROWS, Row  # noqa: E402
from tests.oracle import rel_err  # noqa: E402

ds_logger.setLevel(logging.ERROR)

STEPS = 10
MB = 4  # micro-batch per rank
WD = {"decay": 0.1, "no_decay": 0.0}  # per param group; the rest of a row's hyper as given
CKPT_ROOT = Path(".")  # set in main(): next to the output file
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "bf16acc32": torch.bfloat16,
    "fp16": torch.float16,
}


def moe_param_groups(net: nn.Module) -> list[dict]:
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(
        [{"params": list(net.parameters()), "name": "dense", "weight_decay": 0.1}]
    )


def group_names(net: nn.Module) -> dict[str, list[str]]:
    names = [n for n, _ in net.named_parameters()]
    return {
        "decay": [n for n in names if n.endswith("weight") and not n.startswith("ln")],
        "no_decay": [n for n in names if n.endswith("bias") or n.startswith("ln")],
    }


def param_groups(net: nn.Module) -> list[dict]:
    named = dict(net.named_parameters())
    return [
        {"params": [named[n] for n in ns], "weight_decay": WD[g]}
        for g, ns in group_names(net).items()
    ]


def hyper(row: Row) -> dict:
    """The row's hyperparameters but weight decay (set per param group: ``WD``)."""
    return {k: v for k, v in row.hyper.items() if k != "weight_decay"}


def make_opt(groups: list[dict], c: dict) -> CautiousOptimizer:
    row = ROWS[c["row"]]
    if c["lag"]:
        return row.cls(groups, scale=c["scale"], factor_lag=1, **hyper(row))
    if c["scale"] == "mixed":  # decay group (first) global, the other groups shard
        groups = [dict(g, scale="shard") if i else g for i, g in enumerate(groups)]
        return row.cls(groups, **hyper(row))
    return row.cls(groups, scale=c["scale"], **hyper(row))


def batch(t: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(rows, 13, generator=g), torch.randn(rows, 5, generator=g)


def rows_of(rank: int, world: int, k: int) -> slice:
    """Rows of the global batch that rank ``rank`` uses in micro-step ``k``."""
    i = k * world + rank
    return slice(i * MB, (i + 1) * MB)


# ----------------------------------------------------------------- expected ZeRO layout
# Written from DeepSpeed's documented partitioning rules, independently of the adapter.


def expected_flat(numels: list[int], world: int, pad: int = 1) -> tuple[list[list[tuple]], int]:
    """ZeRO-1/2 and BF16_Optimizer: tensors concatenated in order (with ZeRO-1/2
    ``parameter_alignment``, each but the last padded to a multiple of ``pad`` elements),
    padded at the end to a multiple of 2 * world; rank r owns [r P, (r+1) P). Returns per
    rank a list of (tensor k, lp_start, hp_start, length) and P."""
    offsets, total = [], 0
    for k, n in enumerate(numels):
        offsets.append(total)
        total += n + (0 if k == len(numels) - 1 else (-(total + n)) % pad)
    align = 2 * world
    padded = math.ceil(total / align) * align
    P = padded // world
    out = []
    for r in range(world):
        frs = []
        for k, (n, off) in enumerate(zip(numels, offsets)):
            lo, hi = max(off, r * P), min(off + n, (r + 1) * P)
            if hi > lo:
                frs.append((k, lo - off, lo - r * P, hi - lo))
        out.append(frs)
    return out, P


def pad_of(c: dict) -> int:
    """ZeRO-1/2 ``parameter_alignment``: tensors start at 16-byte boundaries of the model
    dtype (4 fp32 / 8 bf16 elements); 1 otherwise."""
    if not c["align"] or c["stage"] not in (1, 2):
        return 1
    return 4 if c["dtype"] == "fp32" else 8


def expected_stage3(numels: list[int], world: int) -> tuple[list[list[tuple]], int]:
    """ZeRO-3: each tensor split alone into world chunks of ceil(n / world) (last ones
    padded); a sub-group's flat buffer concatenates the chunks of its tensors."""
    out = []
    size = sum(math.ceil(n / world) for n in numels)
    for r in range(world):
        frs, off = [], 0
        for k, n in enumerate(numels):
            q = math.ceil(n / world)
            ln = max(0, min(q, n - r * q))
            if ln:
                frs.append((k, r * q, off, ln))
            off += q
        out.append(frs)
    return out, size


def round_robin(items: list, world: int) -> list:
    return [x for j in range(world) for x in items[j::world]]


# ----------------------------------------------------------------- references


def oracle_run(
    net0: nn.Module,
    world: int,
    gas: int,
    units_of: dict[str, list[tuple[int, int]]],
    row: Row,
    **lag: int,
):
    """The row's float64 oracle on float64 gradients of a float64 copy of ``net0``; each
    tensor is stepped as the list of element ranges ``units_of[name]`` (one range: whole
    tensor)."""
    m64 = copy.deepcopy(net0).double()
    names = [n for n, _ in m64.named_parameters()]
    wd_of = {n: WD[g] for g, ns in group_names(m64).items() for n in ns}
    start = {n: p.detach().reshape(-1).clone() for n, p in m64.named_parameters()}
    shapes = {n: p.shape for n, p in m64.named_parameters()}
    units = [(n, a, b) for n in names for (a, b) in units_of[n]]
    orc = GroupedOracle(
        row, [start[n][a:b] for n, a, b in units], [wd_of[n] for n, _, _ in units], **lag
    )

    def full() -> dict[str, torch.Tensor]:
        out = {n: torch.empty(shapes[n].numel(), dtype=torch.float64) for n in names}
        for (n, a, b), p in zip(units, orc.p):
            out[n][a:b] = p
        return {n: t.view(shapes[n]).requires_grad_(True) for n, t in out.items()}

    for t in range(STEPS):
        X, Y = batch(t, world * gas * MB)
        params = full()
        loss = F.mse_loss(torch.func.functional_call(m64, params, (X.double(),)), Y.double())
        grads = dict(zip(names, torch.autograd.grad(loss, list(params.values()))))
        orc.step([grads[n].reshape(-1)[a:b] for n, a, b in units])
    return {n: t.detach() for n, t in full().items()}


def single_process_run(
    net0: nn.Module, world: int, gas: int, row: Row, **lag: int
) -> dict[str, torch.Tensor]:
    """The row's optimizer in one process on the full global batch (fp32)."""
    net = copy.deepcopy(net0)
    opt = row.cls(param_groups(net), backend="reference", **hyper(row), **lag)
    for t in range(STEPS):
        X, Y = batch(t, world * gas * MB)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(net(X), Y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def fsdp2_run(net0: nn.Module, world: int, gas: int, row: Row) -> dict[str, torch.Tensor]:
    """The row's optimizer under FSDP2 (a unit per Linear), each rank on its ZeRO rows."""
    rank = dist.get_rank()
    fsdp = engines.build(
        "fsdp2",
        copy.deepcopy(net0),
        lambda net: row.cls(param_groups(net), **hyper(row)),
        units=lambda net: (net.l1, net.l2, net.l3),
    )
    for t in range(STEPS):
        X, Y = batch(t, world * gas * MB)
        idx = torch.cat(
            [torch.arange(world * gas * MB)[rows_of(rank, world, k)] for k in range(gas)]
        )
        fsdp.step(F.mse_loss(fsdp.wrapped(X[idx]), Y[idx]))
    return engines.full_params(fsdp)


# ----------------------------------------------------------------- step audit


class Audit:
    """Checks every optimizer.step() call of the optimizer inside an engine (see module doc).

    ``err``: the worst relative error of the parameters (``p``), of every state tensor of
    the row (by state key: ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) and of the
    update, over all calls."""

    def __init__(
        self, opt: CautiousOptimizer, specs: dict[int, dict], row: Row, world: int
    ) -> None:
        self.opt, self.specs, self.row, self.world = opt, specs, row, world
        self.keys = row.state_keys
        self.calls = 0
        self.err = {"p": 0.0, **{k: 0.0 for k in self.keys}, "update": 0.0}
        self.other_min_diff = math.inf  # min over calls of max diff to the other mode
        self.other_max_diff = 0.0
        self.padding_ok = True
        self.allreduces: list[int] = []
        self.agreement_checks = 0
        self.missing_specs = 0
        self._rec: list = []
        self._orig_all_reduce = None
        self._n = 0
        opt.register_step_pre_hook(self.pre)
        opt.register_step_post_hook(self.post)

    def _count(self, *a, **k):
        # frames: _count <- reduce._all_reduce <- its caller; the one-time cross-rank
        # agreement checks (first call with a new count-vector layout) are counted apart
        if sys._getframe(2).f_code.co_name == "check_agreement":
            self.agreement_checks += 1
        else:
            self._n += 1
        return self._orig_all_reduce(*a, **k)

    def pre(self, opt, args, kwargs) -> None:
        self.calls += 1
        self._rec = []
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = opt.state.get(p, {})
                t = int(st["step"]) if st else 0
                before = {  # the state before the step (zeros before the first: not used)
                    f"s0_{k}": st[k].double().reshape(-1).clone()
                    if t
                    else torch.zeros(p.numel(), dtype=torch.float64)
                    for k in self.keys
                }
                self._rec.append(
                    dict(
                        p=p,
                        old=p.detach().double().reshape(-1).clone(),
                        grad=p.grad.detach().double().reshape(-1).clone(),
                        **before,
                        t=t,
                        wd=g["weight_decay"],
                        scale=g["scale"],
                    )
                )
        self._n = 0
        self._orig_all_reduce = dist.all_reduce
        dist.all_reduce = self._count  # counts the adapter's collectives inside step()

    @staticmethod
    def _gather(t: torch.Tensor, spec: dict) -> list[torch.Tensor]:
        if spec["replicated"]:
            return [t]
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(spec["group"]))]
        dist.all_gather(out, t.contiguous(), group=spec["group"])
        return out

    def post(self, opt, args, kwargs) -> None:
        dist.all_reduce = self._orig_all_reduce
        self.allreduces.append(self._n)
        for r in self._rec:
            p = r["p"]
            spec = self.specs.get(id(p))
            if spec is None:
                self.missing_specs += 1
                continue
            st = opt.state[p]
            rep = spec["replicated"]
            cur = dict(
                old=r["old"],
                grad=r["grad"],
                **{f"s0_{k}": r[f"s0_{k}"] for k in self.keys},
                new=p.detach().double().reshape(-1),
                **{f"s1_{k}": st[k].double().reshape(-1) for k in self.keys},
            )
            gat = {k: self._gather(v, spec) for k, v in cur.items()}
            frs = spec["frags"]  # per rank of the partition group: (k, lp, hp, len)
            ranks = [0] if rep else range(len(gat["new"]))
            # padding of this rank's partition untouched
            mine = frs[0 if rep else dist.get_rank(spec["group"])]
            covered = torch.zeros(p.numel(), dtype=torch.bool)
            for _, _, hp, ln in mine:
                covered[hp : hp + ln] = True
            # (ZeRO-3 allocates its flat fp32 buffers with torch.empty: padding may hold any
            # bits, NaN included, and NaN != NaN; unchanged means same NaNs, same values)
            a, b = cur["new"][~covered], cur["old"][~covered]
            if not (
                torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
            ):
                self.padding_ok = False
            # whole tensors and fragments
            numels = spec["numels"]
            whole = {
                k: {key: torch.zeros(n, dtype=torch.float64) for key in cur}
                for k, n in enumerate(numels)
            }
            frag_units = []  # (k, r, lp, ln)
            for rr in ranks:
                for k, lp, hp, ln in frs[rr]:
                    for key in cur:
                        whole[k][key][lp : lp + ln] = gat[key][0 if rep else rr][hp : hp + ln]
                    frag_units.append((k, rr, lp, ln))
            straddling = {k for k in whole if sum(1 for u in frag_units if u[0] == k) > 1}

            def oracle(units, whole=whole, numels=numels, r=r):
                o = GroupedOracle(
                    self.row,
                    [whole[k]["old"][lp : lp + ln] for k, lp, ln in units],
                    [r["wd"]] * len(units),
                )
                o.load(
                    [[whole[k][f"s0_{key}"][lp : lp + ln] for k, lp, ln in units] for key in self.keys],
                    r["t"],
                )  # fmt: skip
                o.step([whole[k]["grad"][lp : lp + ln] for k, lp, ln in units])
                res = {
                    k: {key: torch.zeros(numels[k], dtype=torch.float64) for key in ("p", *self.keys)}
                    for k in whole
                }  # fmt: skip
                for key, got in zip(("p", *self.keys), (o.p, *o.states())):
                    for (k, lp, ln), a in zip(units, got):
                        res[k][key][lp : lp + ln] = a
                return res

            glob = oracle([(k, 0, numels[k]) for k in whole])
            shard = oracle([(k, lp, ln) for k, _, lp, ln in frag_units])
            mine_o, other_o = (glob, shard) if r["scale"] == "global" else (shard, glob)
            for k, w in whole.items():
                self.err["p"] = max(self.err["p"], rel_err(w["new"], mine_o[k]["p"]))
                for key in self.keys:
                    self.err[key] = max(self.err[key], rel_err(w[f"s1_{key}"], mine_o[k][key]))
                self.err["update"] = max(
                    self.err["update"], rel_err(w["new"] - w["old"], mine_o[k]["p"] - w["old"])
                )
            if straddling:
                d = max(
                    rel_err(whole[k]["new"] - whole[k]["old"], other_o[k]["p"] - whole[k]["old"])
                    for k in straddling
                )
                self.other_min_diff = min(self.other_min_diff, d)
                self.other_max_diff = max(self.other_max_diff, d)


# ----------------------------------------------------------------- scenario


FLAGS = ("rr", "align", "offp", "offo", "fsdp", "forgot", "moe", "ckpt", "lag")  # off by default


def parse(spec: str) -> dict:
    c = dict(stage=0, scale="global", dtype="fp32", gas=1, sub=None, row="cadamw")
    c.update(dict.fromkeys(FLAGS, False))
    for tok in spec.split("."):
        if tok in ROWS:
            c["row"] = tok
        elif tok.startswith("z"):
            c["stage"] = int(tok[1:])
        elif tok in ("global", "shard", "mixed"):
            c["scale"] = tok
        elif tok in DTYPES:
            c["dtype"] = tok
        elif tok.startswith("gas"):
            c["gas"] = int(tok[3:])
        elif tok.startswith("sub"):
            c["sub"] = int(tok[3:])
        elif tok in FLAGS:
            c[tok] = True
        else:
            raise ValueError(f"unknown token {tok!r} in {spec!r}")
    return c


def ds_config(c: dict, world: int) -> dict:
    zero: dict = {"stage": c["stage"]}
    if c["align"]:
        zero["parameter_alignment"] = True
    if c["rr"]:
        zero["round_robin_gradients"] = True
    if c["sub"]:
        zero["sub_group_size"] = c["sub"]
    if c["offp"]:
        zero["offload_param"] = {"device": "cpu"}
    if c["offo"]:  # dc_ds.config adds zero_force_ds_cpu_optimizer=False
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": c["gas"],
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if c["dtype"] in ("bf16", "bf16acc32"):
        cfg["bf16"] = {"enabled": True}
    if c["dtype"] == "bf16acc32":
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if c["dtype"] == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 128.0}
    return cfg


def specs_for(
    engine, opt: CautiousOptimizer, net: nn.Module, c: dict, orig: list[dict]
) -> tuple[dict, dict]:
    """Expected layout of every flat tensor the optimizer will step, and layout checks.

    ``orig``: the optimizer's param groups as the user built them (names, MoE name), taken
    before ``deepspeed.initialize`` replaced their tensors.
    """
    from deepspeed.utils import groups as ds_groups

    wrapper = engine.optimizer
    name_of = {id(p): n for n, p in net.named_parameters()}
    named = dict(net.named_parameters())
    kind = type(wrapper).__name__
    checks = {"layout_equal": True, "hp_mapping_checked": 0, "hp_mapping_equal": True, "kind": kind}
    # ZeRO-Offload: DeepSpeed's own flag that the optimizer runs on CPU partitions
    checks["offload_optimizer"] = bool(
        getattr(wrapper, "cpu_offload", False) or getattr(wrapper, "offload_optimizer", False)
    )

    def dp_group(g: dict):  # the data-parallel group a param group must be partitioned over
        if g.get("moe"):
            return ds_groups._get_expert_data_parallel_group(g["name"])
        return dist.group.WORLD

    flat_groups = []  # (flat tensor, [names in flat order], frags per group rank, replicated, group)
    if kind == "DeepSpeedZeroOptimizer":
        for i, g in enumerate(orig):
            pg = dp_group(g)
            ws = dist.get_world_size(pg)
            order = round_robin(g["names"], ws) if c["rr"] else g["names"]
            frs, _ = expected_flat([named[n].numel() for n in order], ws, pad_of(c))
            flat_groups.append((wrapper.single_partition_of_fp32_groups[i], order, frs, False, pg))
    elif kind == "BF16_Optimizer":
        for i, g in enumerate(orig):
            pg = dp_group(g)
            frs, _ = expected_flat([named[n].numel() for n in g["names"]], dist.get_world_size(pg))
            flat_groups.append((wrapper.fp32_groups_flat_partition[i], g["names"], frs, False, pg))
    elif kind == "DeepSpeedZeroOptimizer_Stage3":
        for s, params in enumerate(wrapper.fp16_groups):  # sub-group membership from DeepSpeed
            names = [name_of[id(p)] for p in params]
            pg = dist.group.WORLD
            frs, _ = expected_stage3([p.ds_numel for p in params], dist.get_world_size(pg))
            flat_groups.append((wrapper.fp32_partitioned_groups_flat[s], names, frs, False, pg))
    elif kind == "FP16_UnfusedOptimizer":
        for i, g in enumerate(orig):
            for n, p32 in zip(g["names"], wrapper.fp32_groups[i]):
                flat_groups.append((p32, [n], [[(0, 0, 0, named[n].numel())]], True, None))
    elif isinstance(wrapper, CautiousOptimizer):
        for n, p in named.items():
            flat_groups.append((p, [n], [[(0, 0, 0, p.numel())]], True, None))
    else:
        raise RuntimeError(f"unexpected wrapper {kind}")

    specs: dict[int, dict] = {}
    for flat, names, frs, rep, pg in flat_groups:
        numels = [named[n].ds_numel if c["stage"] == 3 else named[n].numel() for n in names]
        specs[id(flat)] = dict(names=names, numels=numels, frags=frs, replicated=rep, group=pg)
        lay = opt.registered_layout(flat)
        if isinstance(lay, dc_ds.ZeroFlatLayout):
            grank = dist.get_rank(pg)
            got = sorted(
                (names.index(name_of[id(lay.params[f.index])]), f.lp_start, f.hp_start, f.length)
                for f in lay.fragments
                if f.length
            )
            if got != sorted(frs[grank]):
                checks["layout_equal"] = False
                checks.setdefault("layout_mismatch", []).append([got, sorted(frs[grank])])
            for f in lay.fragments:
                hpm = getattr(lay.params[f.index], "_hp_mapping", None)
                if hpm is None or not f.length:
                    continue
                checks["hp_mapping_checked"] += 1
                if (
                    hpm.hp_fragment_address.start != f.hp_start
                    or hpm.hp_fragment_address.numel != f.length
                    or hpm.lp_fragment_address.start != f.lp_start
                ):
                    checks["hp_mapping_equal"] = False
    return specs, checks


def compare(a: dict, b: dict, start: dict | None = None) -> dict:
    """Relative L2 errors of parameters ``a`` vs ``b``: over all tensors, the worst tensor,
    and (with ``start``) of the total update ``a - start`` vs ``b - start``."""
    names = list(b)

    def cat(d):
        return torch.cat([d[n].reshape(-1).double() for n in names])

    out = {"all": rel_err(cat(a), cat(b)), "max_tensor": max(rel_err(a[n], b[n]) for n in names)}
    if start is not None:
        out["update"] = rel_err(cat(a) - cat(start), cat(b) - cat(start))
    return out


def fragments_of(net: nn.Module, c: dict, world: int) -> dict[str, list[tuple[int, int]]]:
    """Element ranges of each tensor that ZeRO gives to one rank (for the shard oracle)."""
    named = dict(net.named_parameters())
    if c["stage"] == 0:
        return {n: [(0, p.numel())] for n, p in named.items()}
    out: dict[str, list[tuple[int, int]]] = {n: [] for n in named}
    if c["stage"] == 3:
        for n, p in named.items():
            frs, _ = expected_stage3([p.numel()], world)
            out[n] = [(lp, lp + ln) for r in range(world) for _, lp, _, ln in frs[r]]
        return out
    for names in group_names(net).values():
        order = round_robin(names, world) if c["rr"] else names
        frs, _ = expected_flat([named[n].numel() for n in order], world, pad_of(c))
        for r in range(world):
            for k, lp, _, ln in frs[r]:
                out[order[k]].append((lp, lp + ln))
    return {n: sorted(v) for n, v in out.items()}


def train(engine, c: dict, t0: int, t1: int, audit: Audit | None = None) -> bool:
    """Optimizer steps t0 .. t1-1 (``gas`` micro-steps each); True if CAdamW stepped
    exactly at the accumulation boundaries."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[c["dtype"]]
    ok = True
    for t in range(t0, t1):
        X, Y = batch(t, world * c["gas"] * MB)
        for k in range(c["gas"]):
            sl = rows_of(rank, world, k)
            engine.backward(F.mse_loss(engine(X[sl].to(dtype)), Y[sl].to(dtype)))
            before = audit.calls if audit else 0
            engine.step()
            if audit and (audit.calls != before) != (k == c["gas"] - 1):
                ok = False
    return ok


def groups_of(net: nn.Module, c: dict) -> list[dict]:
    return moe_param_groups(net) if c["moe"] else param_groups(net)


def zero(net: nn.Module, c: dict, world: int) -> engines.Setup:
    """``net`` under ZeRO stage ``c["stage"]`` (the adapter's ``initialize``) with the
    scenario's optimizer on ``groups_of(net, c)``."""
    return engines.build(
        "deepspeed",
        net,
        lambda m: make_opt(groups_of(m, c), c),
        zero_stage=c["stage"],
        ds_config=ds_config(c, world),
    )


def run(spec: str, world: int) -> dict:
    c = parse(spec)
    if c["moe"]:
        torch.manual_seed(0)
        net0 = net = MoENet()
    else:
        net0 = straddle_net()
        net = copy.deepcopy(net0)
    name_of = {id(p): n for n, p in net.named_parameters()}
    orig = [dict(g, names=[name_of[id(p)] for p in g["params"]]) for g in groups_of(net, c)]
    res: dict = {"spec": spec}
    if c["forgot"]:  # plain deepspeed.initialize (the adapter's config, not its initialize)
        opt = make_opt(groups_of(net, c), c)
        res["where"] = "initialize"
        try:
            cfg = dc_ds.config(ds_config(c, world))
            engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
            res["wrapper"] = type(engine.optimizer).__name__
            res["where"] = "step"
            train(engine, c, 0, 1)
            res["error"] = None
            engine.destroy()
        except RuntimeError as e:
            res["error"] = str(e)
        return res

    ds = zero(net, c, world)
    engine, opt = ds.ds_engine, ds.opt
    assert dc_ds.attach(engine) is opt  # idempotent
    specs, checks = specs_for(engine, opt, net, c, orig)
    res.update(checks)
    row = ROWS[c["row"]]
    res["optimizer"] = type(opt).__name__
    audit = Audit(opt, specs, row, world)
    half = STEPS // 2
    boundary_ok = train(engine, c, 0, half if c["ckpt"] else STEPS, audit)
    if c["ckpt"]:
        ckdir = CKPT_ROOT / spec
        engine.save_checkpoint(str(ckdir), tag="half")
        boundary_ok &= train(engine, c, half, STEPS, audit)
        # a fresh engine resumes from the checkpoint and must land on the same parameters
        ds2 = zero(copy.deepcopy(net0), c, world)
        ds2.ds_engine.load_checkpoint(str(ckdir), tag="half")
        train(ds2.ds_engine, c, half, STEPS)
        res["ckpt_resume"] = compare(engines.full_params(ds2), engines.full_params(ds))
        res["ckpt_state_steps"] = sorted({int(st["step"]) for st in ds2.opt.state.values()})
        ds2.close()
    res["boundary_ok"] = boundary_ok
    res["step_calls"] = audit.calls
    res["flats"] = len(specs)
    res["state_steps"] = sorted({int(opt.state[p]["step"]) for g in [opt.state] for p in g})
    res["allreduces_per_call"] = sorted(set(audit.allreduces))
    res["agreement_checks"] = audit.agreement_checks
    res["audit"] = dict(audit.err)
    res["audit_missing"] = audit.missing_specs
    res["other_mode_min_diff"] = audit.other_min_diff if audit.other_min_diff < math.inf else None
    res["other_mode_max_diff"] = audit.other_max_diff
    res["padding_ok"] = audit.padding_ok
    got = engines.full_params(ds)
    gas = c["gas"]
    if c["moe"]:
        pass  # routing makes a single-process reference a different model; the audit checks
    else:
        p0 = {n: p.detach().clone() for n, p in net0.named_parameters()}
        whole = {n: [(0, p.numel())] for n, p in net0.named_parameters()}
        if c["lag"]:  # factor_lag=1 references; factor_lag=0's oracle must be far away
            lag = {"factor_lag": 1}
            res["vs_single_process"] = compare(
                got, single_process_run(net0, world, gas, row, **lag), p0
            )
            res["vs_oracle"] = compare(got, oracle_run(net0, world, gas, whole, row, **lag), p0)
            res["vs_exact_oracle"] = compare(got, oracle_run(net0, world, gas, whole, row), p0)
            res["in_flight"] = len(opt._pending)  # one per step() call (param group)
        elif c["scale"] == "global":
            res["vs_single_process"] = compare(got, single_process_run(net0, world, gas, row), p0)
            res["vs_oracle"] = compare(got, oracle_run(net0, world, gas, whole, row), p0)
        elif c["scale"] == "mixed":  # whole tensors in the decay group, fragments elsewhere
            frs = fragments_of(net0, c, world)
            decay = set(group_names(net0)["decay"])
            units = {n: whole[n] if n in decay else frs[n] for n in whole}
            res["vs_oracle"] = compare(got, oracle_run(net0, world, gas, units, row), p0)
        else:
            frs = fragments_of(net0, c, world)
            res["vs_oracle"] = compare(got, oracle_run(net0, world, gas, frs, row), p0)
            res["vs_global_oracle"] = compare(got, oracle_run(net0, world, gas, whole, row), p0)
        if c["fsdp"]:
            res["vs_fsdp2"] = compare(got, fsdp2_run(net0, world, gas, row), p0)
    res["kept_fraction"] = opt.kept_fraction
    ds.close()
    # max over ranks of every error; rank-local facts are AND-ed
    allres = [None] * world
    dist.all_gather_object(allres, res)
    return merge(allres)


def merge(rs: list[dict]) -> dict:
    out = copy.deepcopy(rs[0])

    def walk(dst, items):
        for key, v in dst.items():
            vals = [it.get(key) for it in items]
            if isinstance(v, dict):
                walk(v, vals)
            elif isinstance(v, bool):
                dst[key] = all(vals)
            elif isinstance(v, float) and key != "kept_fraction":
                if key == "other_mode_min_diff":
                    dst[key] = min(vals)
                else:
                    dst[key] = max(vals)
            elif key in ("hp_mapping_checked",):
                dst[key] = sum(vals)

    walk(out, rs)
    return out


def main() -> None:
    global CKPT_ROOT
    out, specs = sys.argv[1], sys.argv[2:]
    CKPT_ROOT = Path(out).parent / "ds_ckpt"
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    results = {}
    for spec in specs:
        try:
            results[spec] = run(spec, world)
        except Exception as e:  # report, keep the other scenarios going
            import traceback

            results[spec] = {
                "spec": spec,
                "crash": f"{type(e).__name__}: {e}",
                "tb": traceback.format_exc()[-3000:],
            }
            print(f"[rank {dist.get_rank()}] {spec} crashed: {traceback.format_exc()}", flush=True)
        dist.barrier()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
