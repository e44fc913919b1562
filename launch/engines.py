"""One answer to "which engine am I under": build a model under a data-parallel engine and
read it back, for ``launch/bench.py`` and the distributed test workers (``tests/dist/workers``).

Import it as ``engines`` from ``launch/`` (``bench.py`` puts its own folder on ``sys.path``)
or as ``launch.engines`` from the repository root (the test workers put the root on
``sys.path``; ``launch`` is a namespace package). It imports nothing from ``launch/``, only
torch, ``dist_cautious`` and, for DeepSpeed, ``deepspeed``, so both ways load the same code.
It lives in ``launch/`` rather than in the package (an engine harness is not optimizer API)
or in ``tests/`` (bench.py, a user-facing script, must not import the test suite).

Engines (``ENGINES``; :func:`parse_engine` also takes ``zero0`` .. ``zero3``):

================  =====================================================================
``ddp``           ``DistributedDataParallel``: whole tensors on every rank
``fsdp2``         ``fully_shard`` on a 1-D mesh (dim ``"shard"``): DTensor ``Shard(0)``
``hsdp``          ``fully_shard`` on a 2-D mesh (``"replicate"``, ``"shard"``)
``fsdp1``         ``FullyShardedDataParallel``: flat parameters (``FlatParameter``)
``deepspeed``     DeepSpeed ZeRO stage 0-3 (``zero_stage``), through
                  ``dist_cautious.deepspeed.initialize`` for a cautious optimizer
================  =====================================================================

Public surface:

* :func:`build` ``(engine, model, make_optimizer, ...) -> Setup``: wrap ``model`` (already
  on its device or moved there) under the engine and build its optimizer with
  ``make_optimizer(module)``, called with the module whose ``parameters()`` /
  ``named_parameters()`` the optimizer must step (after ``fully_shard`` / FSDP1 wrapping;
  before DDP / DeepSpeed wrapping, whose parameters are the model's own), or None to build
  the model only (scenarios that make their own optimizers).
* :class:`Setup`: ``engine``, ``zero_stage``, ``model`` (the parameter-holding module, with
  the unwrapped model's parameter names), ``wrapped`` (what the forward is called on),
  ``opt``, ``mesh``, ``shard_group`` (the group tensors are split over; None when nothing
  is split), ``ds_engine``; :meth:`Setup.step` (backward + optimizer step + zero_grad, as
  the engine wants it), :meth:`Setup.close`.
* :func:`full_params` ``(setup, dtype=float32, device="cpu", rank0_only=False) ->
  {name: tensor}``: every parameter whole, cloned (DTensor ``full_tensor``, FSDP1's full
  state dict, ZeRO-3's ``GatheredParameters``, DDP / ZeRO 0-2 as they are). Collective:
  every rank must call it.
* :func:`count_sharded` ``(setup) -> int``: parameter tensors whose mask count is summed
  over ranks (DTensors with a ``Shard`` placement; every original tensor of a sharded FSDP1
  flat parameter; every tensor under ZeRO 1-3; none under DDP and ZeRO-0).
* :func:`state_bytes` ``(setup_or_optimizer) -> int``: bytes of optimizer state (tensors
  of more than one element; local shards of DTensors) held on this rank.
* :func:`full_tensor`, :func:`local_tensor`: one tensor whole / this rank's part;
  :func:`parse_engine`, :func:`clean_name` (FSDP1 prefixes), :func:`fp64_allreduce_hook`.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

ENGINES = ("ddp", "fsdp2", "hsdp", "fsdp1", "deepspeed")
FSDP_PREFIX = "_fsdp_wrapped_module."


def parse_engine(name: str, zero_stage: int | None = None) -> tuple[str, int | None]:
    """``(engine, zero_stage)`` from an engine name; ``zero0`` .. ``zero3`` mean DeepSpeed."""
    if name.startswith("zero") and name[4:] in ("0", "1", "2", "3"):
        return "deepspeed", int(name[4:])
    if name not in ENGINES:
        raise ValueError(
            f"unknown engine {name!r}: use one of {', '.join(ENGINES)} or zero0 .. zero3"
        )
    if name == "deepspeed":
        return name, 2 if zero_stage is None else zero_stage
    if zero_stage is not None:
        raise ValueError(f"zero_stage={zero_stage} applies to DeepSpeed only, not {name!r}")
    return name, None


@dataclass
class Setup:
    """A model under one engine, with its optimizer (what :func:`build` returns)."""

    engine: str
    model: nn.Module
    wrapped: Any
    opt: Any
    zero_stage: int | None = None
    mesh: Any = None
    shard_group: Any = None
    ds_engine: Any = None

    @property
    def label(self) -> str:
        """``fsdp2``, ``deepspeed-z2``, ..."""
        return f"{self.engine}-z{self.zero_stage}" if self.engine == "deepspeed" else self.engine

    def step(self, loss: Tensor) -> None:
        """Backward of ``loss`` and one optimizer step (DeepSpeed: its engine's), then the
        gradients set to None."""
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)
            self.ds_engine.step()
        else:
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Release the engine (DeepSpeed's ``destroy``) and the references held here."""
        if self.ds_engine is not None and hasattr(self.ds_engine, "destroy"):
            try:
                self.ds_engine.destroy()
            except Exception:  # best effort: older DeepSpeed versions
                pass
        self.ds_engine = self.wrapped = self.model = self.opt = None  # type: ignore[assignment]
        gc.collect()


def fp64_allreduce_hook(state, bucket):  # no annotations: DDP inspects them
    """DDP comm hook: average the bucket in float64 (sum order then cannot change the result)."""
    buf = bucket.buffer()
    wide = buf.to(torch.float64)
    fut = dist.all_reduce(wide, async_op=True).get_future()

    def done(f: Any) -> Any:
        out = f.value()[0].div_(dist.get_world_size())
        buf.copy_(out)
        return buf

    return fut.then(done)


def _units(model: nn.Module, units: Any) -> list[nn.Module]:
    if units is None:
        return []
    if callable(units) and not isinstance(units, nn.Module):  # a ModuleList is callable too
        units = units(model)
    return list(units)


def build(
    engine: str,
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], Any] | None,
    *,
    zero_stage: int | None = None,
    device: torch.device | str | None = None,
    units: Iterable[nn.Module] | Callable[[nn.Module], Iterable[nn.Module]] | None = None,
    mesh: Any = None,
    hsdp_shape: tuple[int, int] | None = None,
    reduce_dtype: torch.dtype | None = None,
    fsdp_kwargs: dict[str, Any] | None = None,
    fsdp1_wrap: Iterable[type[nn.Module]] | None = None,
    sharding_strategy: Any = "FULL_SHARD",
    use_orig_params: bool = True,
    ds_config: dict[str, Any] | None = None,
    z3_leaf_modules: Iterable[type[nn.Module]] = (),
) -> Setup:
    """``model`` under ``engine`` (see :data:`ENGINES`; ``zero0`` .. ``zero3`` too) with the
    optimizer ``make_optimizer(module)`` (None: no optimizer, ``Setup.opt`` is None; not for
    DeepSpeed, which needs its client optimizer). The process group must be initialised.

    * ``device``: where the model goes (default: where it is).
    * fsdp2 / hsdp: ``units`` (submodules, or a function of the model returning them) are
      ``fully_shard``-ed before the root; ``mesh`` overrides the default mesh (fsdp2: 1-D
      ``("shard",)`` of the world; hsdp: ``hsdp_shape`` = (replicate, shard), default
      (2, world // 2), dims ``("replicate", "shard")``); ``reduce_dtype`` sets the gradient
      reduction dtype (``MixedPrecisionPolicy``); ``fsdp_kwargs`` go to every ``fully_shard``
      call (``offload_policy``, ``mp_policy``).
    * ddp: ``reduce_dtype=torch.float64`` averages gradients in float64 (a comm hook).
    * fsdp1: ``fsdp1_wrap`` (module classes: ``ModuleWrapPolicy``), ``sharding_strategy`` (a
      ``ShardingStrategy`` or its name), ``use_orig_params``, ``mesh`` / ``hsdp_shape`` for the
      hybrid strategies, ``fsdp_kwargs`` (``mixed_precision``, ...).
    * deepspeed: ``zero_stage`` (default 2), ``ds_config`` (merged over a default of micro
      batch 1, no accumulation, no step prints; ``dist_cautious.deepspeed.config`` adds what a
      client optimizer needs), ``z3_leaf_modules`` (ZeRO-3: module classes whose submodules
      get no hooks of their own, ``deepspeed.utils.set_z3_leaf_modules``).
    """
    engine, zero_stage = parse_engine(engine, zero_stage)
    if make_optimizer is None and engine == "deepspeed":
        raise ValueError("deepspeed: build needs make_optimizer (DeepSpeed wraps the optimizer)")
    make = make_optimizer if make_optimizer is not None else (lambda m: None)
    if device is not None:
        model = model.to(device)
    dev = torch.device(device) if device is not None else _device_of(model)
    world = dist.get_world_size()
    kw = dict(fsdp_kwargs or {})
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        opt = make(model)
        wrapped = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if reduce_dtype == torch.float64:
            wrapped.register_comm_hook(None, fp64_allreduce_hook)
        elif reduce_dtype not in (None, torch.float32):
            raise ValueError(f"ddp: reduce_dtype={reduce_dtype} is not supported (float64 is)")
        return Setup(engine, model, wrapped, opt)
    if engine in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if mesh is None and engine == "fsdp2":
            mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("shard",))
        elif mesh is None:
            shape = hsdp_shape or (2, world // 2)
            mesh = init_device_mesh(dev.type, shape, mesh_dim_names=("replicate", "shard"))
        if reduce_dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
        for unit in _units(model, units):
            fully_shard(unit, mesh=mesh, **kw)
        fully_shard(model, mesh=mesh, **kw)
        group = mesh.get_group(mesh.ndim - 1) if mesh.ndim > 1 else mesh.get_group()
        return Setup(engine, model, model, make(model), mesh=mesh, shard_group=group)
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        strategy = (
            ShardingStrategy[sharding_strategy]
            if isinstance(sharding_strategy, str)
            else sharding_strategy
        )
        hybrid = strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)
        if hybrid and mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            shape = hsdp_shape or (2, world // 2)
            mesh = init_device_mesh(dev.type, shape, mesh_dim_names=("replicate", "shard"))
        if mesh is not None:
            kw["device_mesh"] = mesh
        if fsdp1_wrap is not None:
            kw["auto_wrap_policy"] = ModuleWrapPolicy(set(fsdp1_wrap))
        wrapped = FSDP(
            model, sharding_strategy=strategy, use_orig_params=use_orig_params, device_id=dev, **kw
        )
        group = wrapped.process_group if strategy != ShardingStrategy.NO_SHARD else None
        return Setup(engine, wrapped, wrapped, make(wrapped), mesh=mesh, shard_group=group)
    # deepspeed
    if dev.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: don't pick a GPU
    import logging

    import deepspeed

    from dist_cautious import CautiousOptimizer
    from dist_cautious import deepspeed as dc_ds

    deepspeed.utils.logger.setLevel(logging.WARNING)
    leaves = list(z3_leaf_modules)
    if zero_stage == 3 and leaves:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, leaves)
    client = make_optimizer(model)
    conf: dict[str, Any] = {
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": zero_stage},
    }
    batch_keys = (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
    )
    if not any(k in (ds_config or {}) for k in batch_keys):
        conf.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    conf = dc_ds.config(conf, **(ds_config or {}))  # ds_config's keys win, dicts merged
    if conf["zero_optimization"].get("stage") != zero_stage:
        raise ValueError(
            f"ds_config's zero_optimization.stage {conf['zero_optimization'].get('stage')} "
            f"differs from zero_stage={zero_stage}: give the stage once"
        )
    init = dc_ds.initialize if isinstance(client, CautiousOptimizer) else deepspeed.initialize
    ds_engine, *_ = init(model=model, optimizer=client, config=conf)
    group = getattr(ds_engine, "data_parallel_group", None) or dist.group.WORLD
    return Setup(
        engine,
        ds_engine.module,
        ds_engine,
        client,
        zero_stage=zero_stage,
        shard_group=group if zero_stage >= 1 else None,
        ds_engine=ds_engine,
    )


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _is_dtensor(t: Any) -> bool:
    from dist_cautious.layout import is_dtensor

    return is_dtensor(t)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor, detached (an all-gather for a DTensor: every rank must call it)."""
    return t.full_tensor() if _is_dtensor(t) else t.detach()


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part (a DTensor's local shard; anything else as it is)."""
    return t.to_local() if _is_dtensor(t) else t


def clean_name(name: str) -> str:
    """A parameter name without FSDP1's wrapper prefixes."""
    return name.replace(FSDP_PREFIX, "").replace("_fsdp_wrapped_module", "")


def full_params(
    setup: Setup,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str | None = "cpu",
    rank0_only: bool = False,
) -> dict[str, Tensor] | None:
    """Every parameter of ``setup.model``, whole, by name (the unwrapped model's names),
    cloned, cast to ``dtype`` and moved to ``device`` (None: keep). Collective: every rank
    calls it; with ``rank0_only`` the other ranks get None (they still take part)."""
    keep = not rank0_only or dist.get_rank() == 0

    def out(t: Tensor) -> Tensor:
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t.clone()

    model = setup.model
    res: dict[str, Tensor] = {}
    if setup.engine == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        buffers = {clean_name(n) for n, _ in model.named_buffers()}
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
            sd = model.state_dict()
        for k, v in sd.items():
            k = clean_name(k)
            if keep and k not in buffers:
                res[k] = out(v)
        return res if keep else None
    ctx: Any = contextlib.nullcontext()
    if setup.engine == "deepspeed" and setup.zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with ctx:
        for name, p in model.named_parameters():
            t = full_tensor(p)
            if keep:
                res[name] = out(t)
    return res if keep else None


def count_sharded(setup: Setup) -> int:
    """Parameter tensors whose mask count is summed over ranks (what ``scale="global"``
    reduces): DTensors with a ``Shard`` placement, every original tensor of an FSDP1 flat
    parameter split over more than one rank, every tensor under ZeRO 1-3."""
    if setup.engine == "deepspeed":
        return sum(1 for _ in setup.model.parameters()) if setup.zero_stage >= 1 else 0
    if setup.engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        n = 0
        for m in FSDP.fsdp_modules(setup.model):
            h = m._handle
            if h is not None and h.uses_sharded_strategy and h.world_size > 1:
                n += len(h.flat_param._shapes)
        return n
    return sum(
        1
        for p in setup.model.parameters()
        if _is_dtensor(p) and any(pl.is_shard() for pl in p.placements)
    )


def state_bytes(setup: Setup | Any) -> int:
    """Bytes of optimizer state held on this rank: tensors of more than one element (not
    ``step`` or a 0-d count), a DTensor's local shard. Takes a :class:`Setup` or an
    optimizer."""
    opt = setup.opt if isinstance(setup, Setup) else setup
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if hasattr(v, "numel") and v.numel() > 1:
                t = local_tensor(v)
                total += t.numel() * t.element_size()
    return total
