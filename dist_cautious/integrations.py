"""Helpers that make the cautious optimizers selectable where frameworks pick optimizers.

* :func:`register_timm` -- ``timm.optim.create_optimizer_v2(model, "dc-cadamw", ...)``
  (also ``"dc-clion"``, ``"dc-csgd"``) builds :class:`~dist_cautious.CAdamW` & co.
* :func:`hf_optimizer_cls_and_kwargs` -- the HF Trainer one-liner:
  ``Trainer(..., optimizer_cls_and_kwargs=hf_optimizer_cls_and_kwargs(args))``.
* :func:`decay_groups` -- the usual decay / no-decay param groups, named (for Lightning's
  ``configure_optimizers``, Accelerate, plain loops).
* :func:`torchtitan_container` -- torchtitan's ``OptimizersContainer`` that also resolves
  ``"CAdamW"``, ``"CLion"`` and ``"CSGD"``.

None of these imports a framework at import time; docs/integrations.md has the recipes.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .optim import CSGD, CAdamW, CLion

CLASSES: dict[str, type] = {"cadamw": CAdamW, "clion": CLion, "csgd": CSGD}

# timm splits an optimizer name on "_" and looks up the LAST part ("lookahead_adamw" ->
# "adamw"): "dc_cadamw" would silently build timm's own "cadamw" (a per-process mask mean,
# not ours). Our names therefore use "-".
TIMM_NAMES = {"dc-cadamw": "cadamw", "dc-clion": "clion", "dc-csgd": "csgd"}


# What timm's registry says of each (its description, and which of timm's hyperparameters
# it passes on: betas, eps, momentum).
_TIMM_INFO: dict[str, tuple[str, dict[str, bool]]] = {
    "dc-cadamw": (
        "dist_cautious C-AdamW: exact per-tensor cautious factor under sharding",
        dict(has_betas=True),
    ),
    "dc-clion": (
        "dist_cautious C-Lion: exact per-tensor cautious factor under sharding",
        dict(has_eps=False, has_betas=True),
    ),
    "dc-csgd": (
        "dist_cautious C-SGD (momentum): exact per-tensor cautious factor",
        dict(has_eps=False, has_momentum=True),
    ),
}


def register_timm(registry: Any = None) -> list[str]:
    """Register ``dc-cadamw``, ``dc-clion`` and ``dc-csgd`` in timm's optimizer registry
    (``timm.optim._optim_factory.default_registry`` unless ``registry`` is given), so that
    ``timm.optim.create_optimizer_v2(model, "dc-cadamw", lr=..., weight_decay=...)`` builds
    :class:`~dist_cautious.CAdamW` with timm's parameter grouping (no decay for 1-D
    tensors and ``model.no_weight_decay()``). Idempotent; returns the names.

    Note the dash: timm resolves ``"dc_cadamw"`` to its own ``"cadamw"``.
    """
    from timm.optim._optim_factory import OptimInfo, default_registry

    registry = default_registry if registry is None else registry
    infos = {
        name: OptimInfo(name=name, opt_class=CLASSES[TIMM_NAMES[name]], description=text, **hyper)
        for name, (text, hyper) in _TIMM_INFO.items()
    }
    for name, info in infos.items():
        if name not in registry._optimizers or registry._optimizers[name].opt_class is not (
            info.opt_class
        ):
            registry.register(info)
    return list(infos)


def hf_optimizer_cls_and_kwargs(args: Any, optimizer: str = "cadamw", **overrides: Any):
    """``(cls, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)`` from a
    ``TrainingArguments``: ``lr = args.learning_rate``, ``betas = (args.adam_beta1,
    args.adam_beta2)``, ``eps = args.adam_epsilon`` (CAdamW; CLion takes lr and betas,
    CSGD lr). The Trainer builds the param groups itself (its decay / no-decay split by
    name, ``weight_decay = args.weight_decay`` on the decayed group) and passes only those,
    which is why lr, betas and eps must be in the kwargs. ``overrides`` are added to the
    kwargs (``scale=``, ``clamp=``, ``momentum=`` for CSGD, ...)::

        args = TrainingArguments(..., learning_rate=3e-4, adam_beta2=0.95, weight_decay=0.1)
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          optimizer_cls_and_kwargs=hf_optimizer_cls_and_kwargs(args))
    """
    key = optimizer.lower()
    if key not in CLASSES:
        raise ValueError(f"unknown optimizer={optimizer!r}; choose one of {sorted(CLASSES)}")
    cls = CLASSES[key]
    kw: dict[str, Any] = {"lr": float(args.learning_rate)}
    if cls in (CAdamW, CLion):
        kw["betas"] = (float(args.adam_beta1), float(args.adam_beta2))
    if cls is CAdamW:
        kw["eps"] = float(args.adam_epsilon)
    kw.update(overrides)
    return cls, kw


def no_decay(name: str, p: nn.Parameter) -> bool:
    """The usual rule: biases, norm weights and other tensors of <= 1 dimension."""
    return p.ndim <= 1 or name.endswith(".bias") or name == "bias"


def decay_groups(
    model: nn.Module, weight_decay: float, skip: Any = no_decay
) -> list[dict[str, Any]]:
    """Two param groups from ``model.named_parameters()`` (trainable only, in model order,
    never through a set, so every rank lists them in the same order): ``weight_decay`` on
    the tensors where ``skip(name, p)`` is false, 0 on the others. Each group carries
    ``param_names`` (torch >= 2.6), which the cross-rank guard uses. Empty groups are left
    out. For Lightning::

        def configure_optimizers(self):
            return CAdamW(decay_groups(self, 0.1), lr=3e-4, betas=(0.9, 0.95))
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for wd, pick in ((weight_decay, False), (0.0, True)):
        sel = [(n, p) for n, p in named if bool(skip(n, p)) is pick]
        if sel:
            out.append(
                {
                    "params": [p for _, p in sel],
                    "param_names": [n for n, _ in sel],
                    "weight_decay": wd,
                }
            )
    return out


def resolve_factory(name: str, fallback: Any) -> Any:
    """torchtitan's factory lookup, extended: ``"CAdamW"``, ``"CLion"``, ``"CSGD"`` (any
    case) give ours, everything else goes to ``fallback`` (torchtitan's own)."""
    cls = CLASSES.get(name.lower())
    return cls if cls is not None else fallback(name)


def torchtitan_container() -> type:
    """A subclass of torchtitan's ``OptimizersContainer`` whose ``Config`` builds it and
    whose factory also knows ``"CAdamW"`` / ``"CLion"`` / ``"CSGD"``; use its ``Config`` in
    your config function (docs/integrations.md, torchtitan)."""
    from dataclasses import dataclass

    from torchtitan.components.optimizer import OptimizersContainer

    class CautiousOptimizersContainer(OptimizersContainer):
        @dataclass(kw_only=True, slots=True)
        class Config(OptimizersContainer.Config):
            # torchtitan turns this into foreach / fused group keys, which pick our backend
            # as in torch: "for-loop" would mean foreach=False, the slow single-tensor
            # reference kernels; "fused" picks the Triton kernels on CUDA
            implementation: str = "foreach"

        @staticmethod
        def _resolve_optimizer_factory(name: str):
            return resolve_factory(name, OptimizersContainer._resolve_optimizer_factory)

    return CautiousOptimizersContainer
