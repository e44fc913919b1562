"""The cautious options and torch's flags: their defaults and the checks every optimizer
runs on them (constructor arguments, param groups, loaded param groups); the checks of a
param group's keys and tensors (misspelt keys, names, repeated or complex parameters).

The options (``scale``, ``formula``, ``clamp``, ``backend``, ``state_dtype``,
``cautious_weight_decay``, ``factor_lag``) are param-group keys like ``lr``;
:func:`option_property` makes ``opt.scale`` & co read the default and set it everywhere.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import kernels
from .lag import check_factor_lag
from .layout import is_dtensor

SCALES = ("global", "shard")
FORMULAS = ("clamp", "paper")
STATE_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16, torch.float16)

# The cautious options. Like every torch hyperparameter they live in each param group (so
# they work per group, travel in ``state_dict()``, are restored by ``load_state_dict`` and
# survive ``copy.deepcopy`` / ``pickle``); the constructor arguments are the defaults.
OPTION_KEYS = (
    "scale",
    "formula",
    "clamp",
    "backend",
    "state_dtype",
    "cautious_weight_decay",
    "factor_lag",
)
OPTION_DEFAULTS: dict[str, Any] = dict(
    scale="global",
    formula="clamp",
    clamp=1e-3,
    backend="auto",
    state_dtype=None,
    cautious_weight_decay=False,
    factor_lag=0,  # 1: the previous step's factor, the all-reduce off the critical path (lag.py)
)


def real(x: Any) -> bool:
    """A real number (Python or NumPy scalar), not a bool and not a Tensor."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, Tensor))


def check_lr(lr: Any, where: str, capturable: bool = False) -> None:
    """``lr``: a real number, or a 1-element floating tensor (a scheduler may update it in
    place). A tensor's value is checked only without ``capturable`` (reading it is a host
    synchronisation, which a capturable step must not do)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise TypeError(
                f"{where}: lr given as a Tensor of {lr.numel()} elements and dtype {lr.dtype}; "
                "a tensor lr must be a 0-d floating tensor, e.g. torch.tensor(1e-3)"
            )
        if capturable or torch.compiler.is_compiling():
            return
        lr = float(lr)
    if not real(lr):
        raise TypeError(
            f"{where}: lr={lr!r} of type {type(lr).__name__}; it must be a real number "
            "(a Python float or a NumPy scalar)"
        )
    if math.isnan(lr) or lr < 0:
        raise ValueError(f"{where}: invalid learning rate lr={lr!r}; it must be a float >= 0")


def check_betas(betas: Any, where: str) -> None:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{where}: betas={betas!r} must be a pair (beta1, beta2)") from None
    for i, b in enumerate((b1, b2)):
        if not real(b) or not 0.0 <= b < 1.0:
            raise ValueError(
                f"{where}: invalid beta{i + 1}={b!r} in betas={betas!r}; each must be a float in [0, 1)"
            )


def check_nonneg(name: str, value: Any, where: str, positive: bool = False) -> None:
    if not real(value) or math.isnan(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{where}: invalid {name}={value!r}; it must be a float {bound}")


def check_options(opts: dict[str, Any], where: str) -> None:
    """Validate the cautious options (constructor arguments or a param group's values)."""
    scale, formula, clamp = opts["scale"], opts["formula"], opts["clamp"]
    backend, state_dtype = opts["backend"], opts["state_dtype"]
    if scale not in SCALES:
        raise ValueError(
            f"{where}: unknown scale={scale!r}; use 'global' (exact, one all-reduce per step) "
            "or 'shard' (local piece only, no communication)"
        )
    if formula not in FORMULAS:
        raise ValueError(
            f"{where}: unknown formula={formula!r}; use 'clamp' (N / max(nnz, clamp*N)) or "
            "'paper' (N / (nnz + 1))"
        )
    if not real(clamp) or not 0 < clamp <= 1:
        raise ValueError(f"{where}: invalid clamp={clamp!r}; it must be a float in (0, 1]")
    if backend not in kernels.BACKENDS:
        raise ValueError(f"{where}: unknown backend={backend!r}; choose one of {kernels.BACKENDS}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"{where}: invalid state_dtype={state_dtype!r}; use None, torch.float32, "
            "torch.float64, torch.bfloat16 or torch.float16"
        )
    cwd = opts.get("cautious_weight_decay", False)
    if not isinstance(cwd, bool):
        raise ValueError(f"{where}: cautious_weight_decay={cwd!r} must be True or False")
    cap = opts.get("capturable", False)
    if not isinstance(cap, bool):
        raise ValueError(f"{where}: capturable={cap!r} must be True or False")
    check_factor_lag(opts.get("factor_lag", 0), scale, where)
    check_torch_flags(opts, where)


# ---------------------------------------------------------------------- torch's flags
#
# torch.optim's implementation keywords. Every optimizer here accepts them and keeps them as
# group keys, as torch does, with torch's meaning where it maps: ``foreach``/``fused`` pick
# the backend (``backend_name``), ``amsgrad=True`` and ``differentiable=True`` are refused.
TORCH_FLAG_DEFAULTS: dict[str, Any] = dict(
    foreach=None, fused=None, capturable=False, differentiable=False
)
# Group keys older torch versions did not save, healed at load as torch heals them (with
# this optimizer's default). Any other missing hyperparameter is refused at load.
HEALED_KEYS = ("maximize", "foreach", "fused", "capturable", "differentiable")


def check_torch_flags(opts: dict[str, Any], where: str) -> None:
    """``foreach`` / ``fused`` against each other and ``backend``; ``amsgrad`` and
    ``differentiable`` (not implemented) refused. Device checks: :func:`check_fused`."""
    foreach, fused, backend = opts.get("foreach"), opts.get("fused"), opts.get("backend", "auto")
    for key, v in (("foreach", foreach), ("fused", fused)):
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{where}: {key}={v!r} must be True, False or None (torch's meaning)")
    if foreach and fused:
        raise ValueError(
            f"{where}: fused=True and foreach=True together (torch refuses them too); choose "
            "one: fused=True (the triton backend, CUDA) or foreach=True (the foreach backend)"
        )
    for key, v, means in (("foreach", foreach, "foreach"), ("fused", fused, "triton")):
        if v is None or backend == "auto":
            continue
        if v and backend != means or not v and backend == means:
            raise ValueError(
                f"{where}: {key}={v!r} contradicts backend={backend!r} ({key}=True means "
                f"backend={means!r}); pass one of them"
            )
    if opts.get("amsgrad", False):
        raise ValueError(
            f"{where}: amsgrad=True is not supported (the cautious mask is defined on the "
            "plain update); use amsgrad=False, or torch.optim.AdamW(amsgrad=True) without "
            "the mask"
        )
    if opts.get("differentiable", False):
        raise ValueError(
            f"{where}: differentiable=True is not supported (the step runs under no_grad, "
            "with in-place kernels and a non-differentiable mask); use differentiable=False, "
            "or torch.optim's differentiable optimizers to differentiate through a step"
        )


def check_fused(group: dict[str, Any], devices: Iterable[torch.device], where: str) -> None:
    """``fused=True`` needs the fused (triton) backend: a CUDA device with Triton."""
    if not group.get("fused"):
        return
    for device in devices:
        if device.type != "cuda":
            raise ValueError(
                f"{where}: fused=True asks for the fused (triton) backend, which runs on CUDA; "
                f"this group's parameters are on {device.type}. Use foreach=True (the foreach "
                "backend, the fast one there) or leave fused unset"
            )
        if not kernels.triton_available():
            raise ValueError(
                f"{where}: fused=True asks for the fused (triton) backend, but Triton cannot be "
                "imported (pip install triton); or use foreach=True (the foreach backend)"
            )


def param_devices(params: Iterable[Tensor]) -> set[torch.device]:
    return {(p.to_local() if is_dtensor(p) else p).device for p in params}


# Keys that torch.optim's optimizers, its LR schedulers and common recipes put into param
# groups: not ours, kept and ignored (as torch keeps them). Other unknown keys are kept too,
# unless they look like a misspelling of one of the optimizer's own keys (check_group_keys).
_SCHEDULER_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum", "momentum",
     "betas", "param_names", "lr_scale", "weight_decay_scale"}
)  # fmt: skip
TYPO_CUTOFF = 0.8  # difflib similarity above which an unknown key is taken for a misspelling


def _torch_keys() -> frozenset[str]:
    keys = getattr(_torch_keys, "cache", None)
    if keys is None:
        import inspect

        found = set(_SCHEDULER_KEYS)
        for attr in dir(torch.optim):
            cls = getattr(torch.optim, attr)
            if isinstance(cls, type) and issubclass(cls, Optimizer) and cls is not Optimizer:
                try:
                    found |= set(inspect.signature(cls.__init__).parameters) - {"self"}
                except (TypeError, ValueError):  # pragma: no cover
                    pass
        keys = _torch_keys.cache = frozenset(found)  # type: ignore[attr-defined]
    return keys


def check_group_keys(group: dict[str, Any], ours: Iterable[str], where: str) -> None:
    """Raise for an unknown key that looks like a misspelling of one of ``ours`` (difflib
    similarity >= TYPO_CUTOFF); keys torch.optim or its schedulers use, and other custom
    keys (``name``, ``layer_id``, ...), are kept, as torch keeps them."""
    import difflib

    ours = list(ours)
    known = {"params", *ours}
    for key in group:
        if key in known or not isinstance(key, str) or key in _torch_keys():
            continue
        close = difflib.get_close_matches(key, ours, n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise ValueError(
                f"{where} has unknown key {key!r}; did you mean {close[0]!r}? (a misspelt key "
                f"would be ignored.) Rename it to {close[0]!r}, or give a custom key a name "
                "that is not this close to one of the optimizer's keys"
            )


def check_param_names(group: dict[str, Any], gi: int) -> None:
    """``param_names`` (torch >= 2.6: a group built from ``named_parameters()``) name the
    tensors across ranks (the guard in reduce.py): one string per parameter, unique."""
    names = group.get("param_names")
    if names is None:
        return
    n = len(group["params"])
    if not isinstance(names, (list, tuple)) or len(names) != n:
        raise ValueError(
            f"param group {gi}: param_names must be a list of one name per parameter ({n}), "
            f"got {names!r}; build the group from model.named_parameters()"
        )
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"param group {gi}: parameter name {name!r} is not a string")
        if name in seen:
            raise ValueError(
                f"param group {gi} names two parameters {name!r}; names identify tensors "
                "across ranks (dist_cautious matches count slots by name), so they must be "
                "unique in a group: use the names of model.named_parameters()"
            )
        seen.add(name)


def option_property(key: str) -> property:
    """``opt.<key>``: reads the default ``key``; assigning checks the value and sets it as
    the default and in every param group."""

    def set_option(opt: Any, value: Any) -> None:
        check_options({**opt.defaults, key: value}, type(opt).__name__)
        opt.defaults[key] = value
        for group in opt.param_groups:
            group[key] = value

    return property(
        lambda opt: opt.defaults[key],
        set_option,
        doc=f"The default ``{key}``; assigning it sets it in every param group.",
    )


def check_unique_params(params: Any, gi: int) -> None:
    """A new param group ``gi`` (``params``: tensors or ``(name, tensor)`` pairs) lists
    each tensor once."""
    if not isinstance(params, (list, tuple)):
        return
    seen: set[int] = set()
    for p in params:
        if isinstance(p, tuple) and len(p) == 2:  # (name, tensor): named_parameters()
            p = p[1]
        if id(p) in seen:
            raise ValueError(
                f"param group {gi} lists the same parameter (shape "
                f"{tuple(p.shape)}) twice; it would be stepped twice per step with "
                "one state. Pass each parameter once."
            )
        seen.add(id(p))


def check_real(p: Tensor) -> None:
    """``p`` is a real tensor (the sign mask is not defined for complex ones)."""
    if p.is_complex():
        raise ValueError(
            f"complex parameter of shape {tuple(p.shape)} and dtype {p.dtype}: the "
            "cautious sign mask is defined for real tensors; pass "
            "torch.view_as_real(param) views or keep this parameter in a torch optimizer"
        )
