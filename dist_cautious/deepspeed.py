"""DeepSpeed adapter: exact per-tensor cautious factors inside ZeRO's flat partitions.

DeepSpeed hands a client optimizer tensors it was never given: ZeRO 1/2 and the BF16
optimizer flatten each param group into one buffer and give every data-parallel rank an
fp32 *partition* of it (slices of several original tensors, with cuts inside tensors);
ZeRO 3 gives each rank one flat fp32 buffer per sub-group, the concatenation of its shard
of every parameter in that sub-group; the fp16/bf16 "unfused" wrapper used without ZeRO
gives fp32 copies of whole tensors. A per-tensor factor computed on those buffers would be
per-partition. :func:`attach` reads DeepSpeed's own partition metadata and registers on the
optimizer (``register_layout``: per optimizer, as only the engine knows its partitions; the
first resolver of the layout chain, :mod:`dist_cautious.resolve`), for every such buffer, a
:class:`ZeroFlatLayout` that cuts it back into per-tensor fragments:
each fragment is stepped in place, its mask counts go into one slot per original tensor,
and the slots are summed over the partition's data-parallel group (the expert data-parallel
group for MoE param groups) in one all-reduce per ``optimizer.step()`` call.

Usage::

    from dist_cautious import CAdamW
    from dist_cautious import deepspeed as dsc

    opt = CAdamW(param_groups, lr=3e-4, weight_decay=0.1)
    engine, opt_wrapper, _, _ = dsc.initialize(
        model=model, optimizer=opt,
        config=dsc.config({"train_micro_batch_size_per_gpu": 8,
                           "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))

or call :func:`attach` on the engine after a plain ``deepspeed.initialize``.

Supported wrappers (written and tested against DeepSpeed 0.19.8; attributes that older
versions lack have fallbacks, untested): ``DeepSpeedZeroOptimizer`` (ZeRO 1 and 2, any
dtype, round-robin gradients, parameter alignment), ``DeepSpeedZeroOptimizer_Stage3``
(ZeRO 3, any ``sub_group_size``), ``BF16_Optimizer`` (ZeRO 1 + bf16 with fp32 gradient
accumulation), ``FP16_UnfusedOptimizer`` (fp16/bf16 without ZeRO) and no wrapper (fp32
without ZeRO: DeepSpeed steps the model's own tensors, like DDP). ZeRO-Offload
(``offload_optimizer.device="cpu"``, ZeRO 1/2/3) is supported: the fp32 partitions and their
gradients then live on the CPU in the same flat layouts, and CAdamW steps them there
(:func:`config` sets ``zero_force_ds_cpu_optimizer: false``, without which DeepSpeed refuses
a client optimizer under offload; on CPU ``backend="auto"`` picks the fused CPU kernel,
``dist_cautious.kernels.cpu_fused``). Not supported, with a clear error: optimizer offload
to NVMe, partial offload (``offload_optimizer.ratio < 1``), ZenFlow, SuperOffload, NVMe
parameter offload.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .base import CautiousOptimizer
from .flat import FlatLayout, Fragment, group_reduction, packed_offsets, window_spans
from .layout import DEFAULT_LAYOUT
from .optim import CAdamW  # noqa: F401  (re-exported for ``dsc.CAdamW`` users)

__all__ = [
    "Fragment",
    "ZeroFlatLayout",
    "attach",
    "cautious",
    "check_config",
    "config",
    "initialize",
    "layouts",
]


# --------------------------------------------------------------------------- layout


# The flat-fragment machinery is shared with FSDP1 (dist_cautious.flat); the name
# ZeroFlatLayout is kept for compatibility.
ZeroFlatLayout = FlatLayout

_DS_MESSAGES = dict(
    source="DeepSpeed",
    stale_hint="DeepSpeed re-partitioned the optimizer after dist_cautious.deepspeed.attach(...) "
    "(call attach again)",
)


def _names(order: list[Tensor], names: dict | None, where: str) -> list[str] | None:
    """The count-slot names of a flat buffer's tensors, in flat order (``order``): the
    engine's parameter name with the tensor's position in the flattening. DeepSpeed itself
    needs every rank to flatten in the same order (its gradient reduce-scatter and the
    partitions are positional), so the position is part of the identity: ranks that listed
    the same tensors in different orders raise in the guard (:mod:`.reduce`) instead of
    stepping partitions that hold other tensors on other ranks. None when the engine's
    names are unknown (then only numels are compared)."""
    if not names:
        return None
    out = []
    for j, p in enumerate(order):
        n = names.get(p)
        if n is None:
            return None
        out.append(f"{n} ({where}, flat position {j})")
    return out


def _flat_layout(
    flat: Tensor,
    frags: list[Fragment],
    pg: Any,
    size: int,
    where: str,
    params: list,
    order: list,
    names: dict | None,
) -> tuple[Tensor, ZeroFlatLayout]:
    """``flat`` with its layout: ``frags`` over ``size`` local elements reduced over ``pg``;
    ``params`` indexed by the fragments, ``order`` their flat order (for the names)."""
    layout = ZeroFlatLayout(
        frags,
        group_reduction(pg),
        size,
        where,
        params,
        names=_names(order, names, where),
        **_DS_MESSAGES,
    )
    return flat, layout


def _stage12_layouts(opt: Any, names: dict | None = None) -> list[tuple[Tensor, ZeroFlatLayout]]:
    """ZeRO 1/2 (``DeepSpeedZeroOptimizer``): group ``i`` is flattened in
    ``round_robin_bit16_groups[i]`` order (at ``round_robin_bit16_offsets[i]`` when
    ``parameter_alignment`` pads between tensors), padded to a multiple of the dp size, and
    rank ``r`` of ``real_dp_process_group[i]`` owns ``[r * P, (r + 1) * P)`` with
    ``P = partition_size[i]``, as ``single_partition_of_fp32_groups[i]``."""
    out = []
    for i, group_params in enumerate(opt.bit16_groups):
        flat = opt.single_partition_of_fp32_groups[i]
        pg = opt.real_dp_process_group[i]
        rank = dist.get_rank(pg)
        psize = int(opt.partition_size[i])
        order = opt.round_robin_bit16_groups[i]
        metas = getattr(opt, "round_robin_bit16_meta", None)
        numels = [int(m.numel()) for m in metas[i]] if metas else [int(p.numel()) for p in order]
        offs_all = getattr(opt, "round_robin_bit16_offsets", None)
        if offs_all:
            offsets = [int(o) for o in offs_all[i]]
        else:  # DeepSpeed < 0.18: no padding between tensors
            offsets = packed_offsets(numels)
        if flat.numel() != psize:
            raise RuntimeError(
                f"ZeRO-1/2 group {i}: fp32 partition has {flat.numel()} elements, "
                f"partition_size says {psize}; DeepSpeed layout not understood"
            )
        index = {id(p): k for k, p in enumerate(group_params)}
        frags = [
            Fragment(index[id(p)], n, lp, hp, ln)
            for p, n, (lp, hp, ln) in zip(
                order, numels, window_spans(numels, offsets, rank * psize, psize)
            )
        ]
        where = f"ZeRO-1/2 param group {i}"
        out.append(_flat_layout(flat, frags, pg, psize, where, group_params, order, names))
    return out


def _bf16_layouts(opt: Any, names: dict | None = None) -> list[tuple[Tensor, ZeroFlatLayout]]:
    """``BF16_Optimizer``: group ``i`` is ``bf16_groups[i]`` flattened contiguously, padded at
    the end to a multiple of the dp size; rank ``r`` owns ``[r * P, (r + 1) * P)`` with
    ``P = len(bf16_groups_flat[i]) // dp``, as ``fp32_groups_flat_partition[i]``."""
    out = []
    for i, group_params in enumerate(opt.bf16_groups):
        flat = opt.fp32_groups_flat_partition[i]
        pg = opt.real_dp_process_group[i]
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        psize = opt.bf16_groups_flat[i].numel() // world
        numels = [int(p.numel()) for p in group_params]
        offsets = packed_offsets(numels)
        if flat.numel() != psize:
            raise RuntimeError(
                f"BF16_Optimizer group {i}: fp32 partition has {flat.numel()} elements, "
                f"expected {psize}; DeepSpeed layout not understood"
            )
        frags = [
            Fragment(k, n, lp, hp, ln)
            for k, (n, (lp, hp, ln)) in enumerate(
                zip(numels, window_spans(numels, offsets, rank * psize, psize))
            )
        ]
        where = f"BF16_Optimizer param group {i}"
        out.append(_flat_layout(flat, frags, pg, psize, where, group_params, group_params, names))
    return out


def _stage3_layouts(opt: Any, names: dict | None = None) -> list[tuple[Tensor, ZeroFlatLayout]]:
    """ZeRO 3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter ``p`` is split on its own:
    rank ``r`` of its partition group holds elements ``[r * q, (r + 1) * q)`` of the flattened
    tensor (``q = p.partition_numel()``, the last ranks zero-padded). Sub-group ``s`` is
    ``fp16_groups[s]``; its flat fp32 buffer ``fp32_partitioned_groups_flat[s]`` is the
    concatenation of those ``q``-element shards, and ``step()`` is called once per sub-group
    with only that buffer in ``param_groups``."""
    out = []
    for s, params in enumerate(opt.fp16_groups):
        flat = opt.fp32_partitioned_groups_flat[s]
        groups = getattr(opt, "sub_group_process_groups", None)
        pg = groups[s] if groups else getattr(params[0], "ds_process_group", opt.dp_process_group)
        rank = dist.get_rank(pg)
        frags, off = [], 0
        for k, p in enumerate(params):
            q = int(p.partition_numel())
            n = int(p.ds_numel)
            start = rank * q
            ln = max(0, min(q, n - start))
            frags.append(Fragment(k, n, start if ln else 0, off, ln))
            off += q
        if flat.numel() != off:
            raise RuntimeError(
                f"ZeRO-3 sub-group {s}: fp32 buffer has {flat.numel()} elements, the shards of "
                f"its parameters add up to {off}; DeepSpeed layout not understood (optimizer "
                "state swapped to NVMe?)"
            )
        gid = (
            opt.sub_group_to_group_id.get(s, "?") if hasattr(opt, "sub_group_to_group_id") else "?"
        )
        where = f"ZeRO-3 sub-group {s} (param group {gid})"
        out.append(_flat_layout(flat, frags, pg, off, where, params, params, names))
    return out


def _lp_fragment(layout: ZeroFlatLayout, f: Fragment, stage3: bool) -> Tensor | None:
    """The low-precision copy of fragment ``f`` (what DeepSpeed keeps in sync with the fp32
    master), or None where it is not in memory."""
    p = layout.params[f.index] if layout.params else None
    if p is None:
        return None
    if stage3:
        t = getattr(p, "ds_tensor", None)
        if t is None or t.numel() < f.length:
            return None
        return t.reshape(-1).narrow(0, 0, f.length)
    if p.numel() != f.numel:  # storage temporarily released (offload_states)
        return None
    return p.detach().reshape(-1).narrow(0, f.lp_start, f.length)


def _verify(flat: Tensor, layout: ZeroFlatLayout, stage3: bool) -> None:
    """Self-check of the mapping against the data: every fp32 fragment, rounded to the
    model's dtype, equals the model tensor's elements it claims to hold (DeepSpeed keeps
    the two in sync outside ``step()``)."""
    bad = []
    for f in layout.fragments:
        if f.length == 0:
            continue
        lp = _lp_fragment(layout, f, stage3)
        if lp is None:
            continue
        hp = flat.detach().narrow(0, f.hp_start, f.length).to(device=lp.device, dtype=lp.dtype)
        if not torch.equal(hp, lp):
            bad.append(f)
    if bad:
        raise RuntimeError(
            f"{layout.where}: the fp32 partition does not hold the elements DeepSpeed's metadata "
            f"says it holds (first mismatching fragment: {bad[0]}); this DeepSpeed version's "
            "layout is not understood by dist_cautious.deepspeed. Pass verify=False only if the "
            "model and master weights are deliberately out of sync."
        )


# --------------------------------------------------------------------------- finding things


_WRAPPERS = {
    "stage12": ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"),
    "stage3": ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3"),
    "bf16": ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer"),
    "fp16_unfused": ("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer"),
    "fp16_fused": ("deepspeed.runtime.fp16.fused_optimizer", "FP16_Optimizer"),
}


def _wrapper_types() -> dict[str, type]:
    """DeepSpeed's optimizer wrappers this version of DeepSpeed has, by role."""
    out: dict[str, type] = {}
    for role, (module, name) in _WRAPPERS.items():
        try:
            out[role] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # pragma: no cover - other DeepSpeed versions
            pass
    return out


def _find(obj: Any) -> tuple[Any, CautiousOptimizer]:
    """Walk ``.optimizer`` from an engine (or a DeepSpeed / accelerate optimizer wrapper) to
    the CAdamW inside; return (the object directly around it, the CAdamW)."""
    start = obj
    parent = None
    for _ in range(8):
        if isinstance(obj, CautiousOptimizer):  # CAdamW, CLion, CSGD
            return parent, obj
        if isinstance(obj, torch.optim.Optimizer) and not hasattr(obj, "optimizer"):
            raise TypeError(
                f"the optimizer inside {type(start).__name__} is "
                f"{type(obj).__module__}.{type(obj).__name__}, not dist_cautious.CAdamW; pass "
                "optimizer=CAdamW(...) to deepspeed.initialize and leave the config's "
                "'optimizer' section out"
            )
        nxt = getattr(obj, "optimizer", None)
        if nxt is None:
            raise TypeError(
                f"no CAdamW found inside {type(start).__name__}: {type(obj).__name__} has no "
                "optimizer (was deepspeed.initialize given optimizer=CAdamW(...)? an inference "
                "engine or ZeRO-3 without optimizer has none)"
            )
        parent, obj = obj, nxt
    raise TypeError(f"no CAdamW found inside {type(start).__name__} (nesting too deep)")


def cautious(engine: Any) -> CautiousOptimizer:
    """The cautious optimizer (``CAdamW`` / ``CLion`` / ``CSGD``) inside a DeepSpeed engine or
    optimizer wrapper: where its statistics live.

    ``deepspeed.initialize`` returns DeepSpeed's optimizer wrapper, not the client optimizer,
    so ``opt.kept_fraction`` does not exist there; ``dsc.cautious(engine).kept_fraction`` and
    ``.mask_stats`` do. Accepts what :func:`attach` accepts (the engine, ``engine.optimizer``,
    HF accelerate's wrapper around it). Raises ``TypeError`` when there is none inside."""
    return _find(engine)[1]


def _unsupported(wrapper: Any, kinds: dict[str, type]) -> str | None:
    name = type(wrapper).__name__
    if getattr(wrapper, "zenflow", False) or "ZenFlow" in name:
        return "ZenFlow (zero_optimization.zenflow)"
    if "SuperOffload" in name:
        return "SuperOffload (zero_optimization.super_offload)"
    if "stage3" in kinds and isinstance(wrapper, kinds["stage3"]):
        if getattr(wrapper, "swap_optimizer", False):
            return "optimizer offload to NVMe (zero_optimization.offload_optimizer.device='nvme')"
        if getattr(wrapper, "params_in_nvme_and_cpu", False):
            return "NVMe parameter offload (zero_optimization.offload_param.device='nvme')"
    return None


def attach(engine: Any, *, verify: bool = True) -> CautiousOptimizer:
    """Make the CAdamW inside a DeepSpeed engine step ZeRO's flat partitions per tensor.

    Call once after ``deepspeed.initialize(model=..., optimizer=CAdamW(...), config=...)``
    (idempotent: calling again re-reads DeepSpeed's metadata and replaces the layouts).
    ``engine`` may be the ``DeepSpeedEngine``, DeepSpeed's optimizer wrapper
    (``engine.optimizer``) or a wrapper around that (HF accelerate's
    ``DeepSpeedOptimizerWrapper``, as the HF ``Trainer`` hands to callbacks).

    ``verify`` (default True) checks the mapping against the data once: every fp32
    fragment, rounded to the model dtype, must equal the model elements it maps to.

    Returns the CAdamW. Raises ``TypeError`` if there is no CAdamW inside, and
    ``NotImplementedError`` for wrappers or options this adapter does not support.
    """
    parent, opt = _find(engine)
    cfg = getattr(engine, "_config", None)  # a DeepSpeedEngine's parsed config
    name = getattr(cfg, "optimizer_name", None)
    if name is not None:
        raise ValueError(
            f"the DeepSpeed config has an 'optimizer' section (type {name!r}) next to the client "
            "CAdamW: DeepSpeed then steps CAdamW with CAdamW's own lr while its config (and "
            "its LR scheduler) report another. Remove the 'optimizer' section; set lr and "
            "betas on CAdamW(...) (dist_cautious.deepspeed.config() checks this for you)"
        )
    kinds = _wrapper_types()
    if parent is not None:
        why = _unsupported(parent, kinds)
        if why is not None:
            raise NotImplementedError(
                f"dist_cautious.deepspeed does not support {why} ({type(parent).__name__}); "
                "remove it from the DeepSpeed config (ZeRO 0-3, with or without bf16/fp16, "
                "offload_optimizer='cpu' and, under ZeRO-3, offload_param='cpu' are supported)"
            )
    # the module's parameter names (DeepSpeedEngine.param_names: {param: name}) identify the
    # count slots across ranks; absent when attach() is given a wrapper, not the engine
    names = getattr(engine, "param_names", None)
    found = layouts(parent, kinds, names=names if isinstance(names, dict) else None)
    if found is None:
        # No DeepSpeed optimizer wrapper around CAdamW: it steps the tensors it was given
        # (ZeRO disabled, fp32). Anything else it would be handed is unknown to us.
        unknown = [
            p
            for g in opt.param_groups
            for p in g["params"]
            if not opt.was_given(p) and not opt.layout_registered(p)
        ]
        if unknown:
            raise NotImplementedError(
                f"CAdamW sits inside {type(parent).__name__}, which replaced "
                f"{len(unknown)} of its parameters by tensors dist_cautious.deepspeed does not "
                "know how to map; supported: DeepSpeedZeroOptimizer (ZeRO 1/2), "
                "DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer, FP16_UnfusedOptimizer"
            )
        return opt
    for flat, layout in found:
        if verify and isinstance(layout, ZeroFlatLayout):
            _verify(flat, layout, stage3="stage3" in kinds and isinstance(parent, kinds["stage3"]))
        opt.register_layout(flat, layout)
    return opt


def layouts(
    wrapper: Any, kinds: dict[str, type] | None = None, names: dict | None = None
) -> list[tuple[Tensor, Any]] | None:
    """``[(flat tensor, layout)]`` for a DeepSpeed optimizer wrapper, from its metadata;
    ``None`` when ``wrapper`` is not a DeepSpeed optimizer wrapper. (What :func:`attach`
    registers; public for tests and debugging.) ``names``: ``{parameter: name}`` of the
    model (``engine.param_names``), which name the count slots (see :func:`_names`)."""
    kinds = _wrapper_types() if kinds is None else kinds
    if wrapper is None:
        return None
    if "stage3" in kinds and isinstance(wrapper, kinds["stage3"]):
        return _stage3_layouts(wrapper, names)
    if "stage12" in kinds and isinstance(wrapper, kinds["stage12"]):
        return _stage12_layouts(wrapper, names)
    if "bf16" in kinds and isinstance(wrapper, kinds["bf16"]):
        if not getattr(wrapper, "using_real_optimizer", True):
            return []
        return _bf16_layouts(wrapper, names)
    if "fp16_unfused" in kinds and isinstance(wrapper, kinds["fp16_unfused"]):
        # fp32 master copies of whole tensors: plain per-tensor layout, no communication.
        return [(p, DEFAULT_LAYOUT) for group in wrapper.fp32_groups for p in group]
    if "fp16_fused" in kinds and isinstance(wrapper, kinds["fp16_fused"]):
        raise NotImplementedError(
            "FP16_Optimizer (DeepSpeed's fused fp16 wrapper) only wraps FusedAdam and steps the "
            "optimizer while it is being built; with CAdamW DeepSpeed uses "
            "FP16_UnfusedOptimizer, which is supported"
        )
    return None


# --------------------------------------------------------------------------- config


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _device(section: Any) -> str:
    if not isinstance(section, dict):
        return "none"
    return str(section.get("device", "none")).lower()


def check_config(cfg: dict) -> None:
    """Raise ``ValueError`` / ``NotImplementedError`` for DeepSpeed config entries that do not
    work with a client CAdamW through this adapter. Does not modify ``cfg``."""
    if not isinstance(cfg, dict):
        raise TypeError(f"DeepSpeed config must be a dict, got {type(cfg).__name__}")
    if "optimizer" in cfg:
        raise ValueError(
            f"the DeepSpeed config has an 'optimizer' section ({cfg['optimizer']!r}); with "
            "CAdamW the optimizer is passed to deepspeed.initialize(optimizer=CAdamW(...)), so "
            "remove that section (DeepSpeed would otherwise build its own optimizer or refuse)"
        )
    zero = cfg.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise ValueError(f"zero_optimization must be a dict, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r}; use 0, 1, 2 or 3")
    if stage > 0 and cfg.get("zero_allow_untested_optimizer") is False:
        raise ValueError(
            "zero_allow_untested_optimizer=False: DeepSpeed refuses client optimizers under "
            f"ZeRO stage {stage} unless it is True; remove the entry or set it to True"
        )
    off_opt = _device(zero.get("offload_optimizer"))
    if off_opt not in ("none", "", "cpu"):
        raise NotImplementedError(
            f"zero_optimization.offload_optimizer.device={off_opt!r} is not supported with "
            "dist_cautious optimizers (the NVMe swapper pages optimizer state in and out behind "
            "the optimizer's back); use device 'cpu' (ZeRO-Offload) or 'none'"
        )
    if off_opt == "cpu":
        ratio = zero["offload_optimizer"].get("ratio", 1.0)
        if ratio != 1.0:
            raise NotImplementedError(
                f"zero_optimization.offload_optimizer.ratio={ratio!r}: partial offload steps "
                "the rest with a DeepSpeed-built torch AdamW (and requires DeepSpeedCPUAdam); "
                "remove ratio (full CPU offload is supported)"
            )
        if cfg.get("zero_force_ds_cpu_optimizer", True) is not False:
            raise ValueError(
                "zero_optimization.offload_optimizer.device='cpu' with a client optimizer needs "
                '"zero_force_ds_cpu_optimizer": false (DeepSpeed refuses anything but '
                "DeepSpeedCPUAdam otherwise); set it, or build the config with "
                "dist_cautious.deepspeed.config(...), which sets it"
            )
    off_par = _device(zero.get("offload_param"))
    if off_par == "nvme":
        raise NotImplementedError(
            "zero_optimization.offload_param.device='nvme' is not supported by "
            "dist_cautious.deepspeed; use 'cpu' or 'none'"
        )
    for key, what in (("zenflow", "ZenFlow"), ("super_offload", "SuperOffload")):
        if zero.get(key):
            raise NotImplementedError(
                f"zero_optimization.{key} ({what}) is not supported by dist_cautious.deepspeed; "
                "remove it"
            )
    clip = cfg.get("gradient_clipping", 0.0)
    if clip == "auto":  # filled in by the HF Trainer (from TrainingArguments.max_grad_norm)
        return
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ValueError(
            f"gradient_clipping={clip!r}; use a float >= 0 (0.0 disables clipping), or "
            "'auto' when the HF Trainer fills the config (it uses max_grad_norm, default 1.0)"
        )


def config(base: dict | None = None, **overrides: Any) -> dict:
    """A DeepSpeed config dict for a client :class:`~dist_cautious.CAdamW`, validated.

    ``base`` (not modified) and then ``overrides`` (top-level keys, dicts merged
    recursively: ``zero_optimization={"stage": 3}``) are merged, then:

    * ``"zero_allow_untested_optimizer": True`` is set (DeepSpeed refuses client
      optimizers under ZeRO without it);
    * ``"zero_force_ds_cpu_optimizer": False`` is set under ZeRO-Offload
      (``offload_optimizer.device="cpu"``) unless given: DeepSpeed otherwise refuses any
      optimizer but its own ``DeepSpeedCPUAdam`` there;
    * ``"gradient_clipping": 0.0`` is set unless given (``"auto"`` is kept for the HF
      Trainer, which replaces it by ``TrainingArguments.max_grad_norm``). DeepSpeed (0.19) clips at 1.0 when
      the key is absent; we default to no clipping so that the result equals plain
      single-GPU C-AdamW, as ``torch.optim`` does. Set it explicitly to clip: C-AdamW then
      sees the clipped gradient, like any optimizer.

    Raises (see :func:`check_config`) for an ``optimizer`` section (the optimizer is passed
    to ``deepspeed.initialize``), optimizer offload to NVMe, partial optimizer offload
    (``ratio``), NVMe parameter offload,
    ZenFlow, SuperOffload, a bad ZeRO stage or ``zero_allow_untested_optimizer=False``.
    """
    cfg: dict = copy.deepcopy(dict(base)) if base is not None else {}
    _merge(cfg, overrides)
    if cfg.get("zero_allow_untested_optimizer") is False:
        check_config(cfg)  # raises with the explanation
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("gradient_clipping", 0.0)
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict) and _device(zero.get("offload_optimizer")) == "cpu":
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # ZeRO-Offload: client optimizer
    check_config(cfg)
    return cfg


@contextlib.contextmanager
def _skip_construction_steps(opt: CautiousOptimizer) -> Iterator[dict]:
    """Skip ``opt.step()`` calls made while DeepSpeed builds its wrapper.

    ``FP16_UnfusedOptimizer`` (fp16/bf16 without ZeRO) steps the optimizer once with
    all-zero gradients while it is constructed, to create the state: with AdamW that step
    decays every weight once and sets ``step`` to 1 before training starts; with CAdamW it
    would also fail, since the fp32 copies it steps cannot be registered before they exist.
    A single-GPU run takes no such step, so we skip it: the state is created at the first
    real step, as in plain PyTorch.
    """
    info = {"active": True, "skipped": 0}
    had = "step" in opt.__dict__  # e.g. an LR scheduler's counting wrapper
    saved = opt.__dict__.get("step")
    inner = opt.step

    def step(*a: Any, **k: Any) -> Any:
        if info["active"]:
            info["skipped"] += 1
            return None
        return inner(*a, **k)

    opt.step = step  # type: ignore[method-assign]
    try:
        yield info
    finally:
        info["active"] = False
        if opt.__dict__.get("step") is step:  # nobody wrapped it meanwhile: restore
            if had:
                opt.step = saved  # type: ignore[method-assign]
            else:
                del opt.step


def _announce_op_build() -> str | None:
    """Say so before DeepSpeed silently JIT-compiles its C++ op on the CPU accelerator.

    On ``DS_ACCELERATOR=cpu`` DeepSpeed's communication backend builds
    ``deepspeed_shm_comm`` with ``torch.utils.cpp_extension`` the first time it starts (1 to 6
    minutes on 2 cores, measured, with no output), into ``$TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions/<python>_<device>``, shared by every environment of the user:
    a build made by another environment is rebuilt, and then rebuilt again there). Returns the
    message logged (a warning), or None where the op is already built for this environment
    or this is not the CPU accelerator. Never raises."""
    try:
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory, include_paths

        acc = get_accelerator()
        if acc.device_name() != "cpu":
            return None
        builder = acc.create_op_builder("ShareMemCommBuilder")
        if builder is None or builder.name in getattr(type(builder), "_loaded_ops", {}):
            return None
        where = _get_build_directory(builder.name, verbose=False)
        so = os.path.join(where, f"{builder.name}.so")
        ninja = os.path.join(where, "build.ninja")
        if os.path.exists(so) and os.path.exists(ninja):
            with open(ninja) as f:
                if include_paths()[0] in f.read():
                    return None
            why = "was built by another Python environment and will be rebuilt"
        else:
            why = "is not built yet"
    except Exception:  # a diagnostic only
        return None
    msg = (
        f"dist_cautious.deepspeed: DeepSpeed's C++ op {builder.name!r} {why}; DeepSpeed now "
        f"JIT-compiles it into {where} (minutes on a small CPU, silently; once per "
        "environment). Set TORCH_EXTENSIONS_DIR to a directory of this environment (e.g. "
        "$VIRTUAL_ENV/torch_extensions) so that environments do not rebuild each other's ops."
    )
    import logging

    logging.getLogger(__name__).warning(msg)
    return msg


def initialize(*args: Any, **kwargs: Any) -> Any:
    """``deepspeed.initialize(*args, **kwargs)`` followed by :func:`attach` on the engine.

    A ``config`` / ``config_params`` (a dict or a JSON file path) is checked first (:func:`check_config`); the
    optimizer must be a :class:`~dist_cautious.CAdamW` (or a callable returning one).
    Optimizer steps that DeepSpeed takes while it builds its wrapper (the fp16/bf16
    wrapper without ZeRO steps once with zero gradients) are skipped, so training starts
    from the model as given, as on a single GPU. This is why fp16/bf16 *without* ZeRO needs
    this function rather than ``deepspeed.initialize`` + :func:`attach`.
    Returns what ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader,
    lr_scheduler)``.
    """
    import deepspeed

    for key in ("config", "config_params"):
        cfg = kwargs.get(key)
        if isinstance(cfg, (str, os.PathLike)):  # a JSON file, as deepspeed.initialize takes
            with open(cfg) as f:
                cfg = json.load(f)
        if isinstance(cfg, dict):
            check_config(cfg)
    opt = kwargs.get("optimizer")
    if opt is None:
        raise TypeError(
            "dist_cautious.deepspeed.initialize needs optimizer=CAdamW(...) (a client optimizer)"
        )
    if isinstance(opt, torch.optim.Optimizer) and not isinstance(opt, CautiousOptimizer):
        raise TypeError(
            f"optimizer is {type(opt).__name__}, not dist_cautious.CAdamW; use "
            "deepspeed.initialize directly for other optimizers"
        )
    if not dist.is_initialized() or dist.get_rank() == 0:
        _announce_op_build()
    if isinstance(opt, CautiousOptimizer):
        with _skip_construction_steps(opt):
            out = deepspeed.initialize(*args, **kwargs)
    else:  # a callable building the optimizer inside deepspeed.initialize
        out = deepspeed.initialize(*args, **kwargs)
    attach(out[0])
    return out
