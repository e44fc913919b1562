"""Optimizer state: creation, dtype, and what a loaded ``state_dict`` must satisfy.

Plain functions over what they need; :class:`~dist_cautious.base.CautiousOptimizer` calls
them (``state_for``, ``load_state_dict``, ``state_dict``). A parameter's state holds
``step`` (a float32 scalar tensor, torch's convention), the optimizer's ``state_keys``
tensors (in the state dtype) and, with ``factor_lag=1``, the counts of the last step
(:data:`~dist_cautious.lag.COUNT_KEY`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .lag import COUNT_KEY
from .layout import is_dtensor, zeros_state
from .options import (
    OPTION_DEFAULTS,
    OPTION_KEYS,
    TORCH_FLAG_DEFAULTS,
    check_fused,
    param_devices,
)
from .resolve import FSDP1, resolve


def state_dtype(p: Tensor, group: dict[str, Any], default: torch.dtype | None) -> torch.dtype:
    """The dtype of ``p``'s state tensors: the group's ``state_dtype`` (else ``default``),
    or, where that is None, float32 for 16-bit parameters and the parameter's dtype else."""
    dt = group.get("state_dtype", default)
    if dt is not None:
        return dt
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def prepare(
    state: dict[str, Any], p: Tensor, dt: torch.dtype, state_keys: Iterable[str]
) -> dict[str, Any]:
    """``state`` (``p``'s, in place) created (zeros, step 0) or brought to dtype ``dt``."""
    if len(state) == 0:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in state_keys:
            state[key] = zeros_state(p, dt)
    else:
        for key in state_keys:
            if state[key].dtype != dt:  # e.g. loaded from the torch counterpart
                state[key] = state[key].to(dt)
        if "step" not in state:  # a torch SGD state: its buffer exists, so >= 1 step
            state["step"] = torch.tensor(1.0, dtype=torch.float32)
        elif not torch.is_tensor(state["step"]):
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
    return state


def healable_keys(opt: Any) -> tuple[str, ...]:
    """The group keys a saved group may lack (torch's own state dicts, older versions),
    filled in with ``opt``'s defaults (:func:`heal`); a loaded group lacking any other key
    is refused (:func:`check_loadable`)."""
    return (*OPTION_KEYS, *opt.compat_keys, *opt.healed_keys)


def heal(opt: Any, defaults: bool = False) -> None:
    """Fill in what a restored ``opt`` lacks: each group's :func:`healable_keys` from the
    defaults, and first (``defaults``: unpickled) the defaults an older version did not save."""
    if defaults:
        older = {**OPTION_DEFAULTS, **TORCH_FLAG_DEFAULTS, **opt.compat_keys}
        for key, value in older.items():
            opt.defaults.setdefault(key, value)
    for group in opt.param_groups:
        for key in healable_keys(opt):
            group.setdefault(key, opt.defaults[key])


def run_load_pre_hooks(opt: Any, state_dict: Any, hooks: Iterable[Any]) -> Any:
    """torch's ``register_load_state_dict_pre_hook`` ``hooks``, run before the state dict is
    checked (as torch runs them first), on a shallow copy as torch does; returns the state
    dict they leave."""
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()
    for hook in hooks:
        out = hook(opt, state_dict)
        if out is not None:
            state_dict = out
    return state_dict


def check_loadable(opt: Any, state_dict: Any) -> None:
    """Raise a ``ValueError`` (naming the group or the parameter and the key) unless
    ``state_dict`` can be loaded into ``opt``: its groups' values pass ``opt.check_group``
    (and ``fused`` the device check), each saved state holds exactly ``step`` and
    ``opt.state_keys`` (``step`` optional where ``opt.step_optional``) shaped like the
    parameter, and no group lacks a key that cannot be healed."""
    name = type(opt).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            f"{name}.load_state_dict needs a dict with 'state' and 'param_groups' (what "
            f"optimizer.state_dict() returns); got {type(state_dict).__name__}"
            + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, dict) else "")
        )
    groups = state_dict["param_groups"]
    params = [p for g in opt.param_groups for p in g["params"]]
    saved_ids = [i for g in groups for i in g.get("params", ())]
    for gi, g in enumerate(groups):
        where = f"loaded param group {gi}"
        opt.check_group({**opt.defaults, **g}, gi, where=where)
        if gi < len(opt.param_groups):
            check_fused({**opt.defaults, **g}, param_devices(opt.param_groups[gi]["params"]), where)
    state_keys = tuple(opt.state_keys)
    required = state_keys if opt.step_optional else ("step", *state_keys)
    for k, (pid, p) in enumerate(zip(saved_ids, params)):
        st = state_dict["state"].get(pid)
        if not st:
            continue
        what = f"loaded state of parameter {k} (id {pid!r}, shape {tuple(p.shape)})"
        foreign = sorted(set(st) - {"step", COUNT_KEY, *state_keys})
        if foreign:
            raise ValueError(
                f"{what} has keys {foreign}, which {name} does not keep (its state is "
                f"{['step', *state_keys]}; a state dict of another optimizer?); load it "
                "into the optimizer that saved it"
            )
        missing = [key for key in required if st.get(key) is None]
        if missing:
            raise ValueError(
                f"{what} lacks {missing} (a truncated or foreign state dict); a {name} "
                f"state holds {['step', *state_keys]}"
            )
        for key in state_keys:
            v = st[key]
            if not torch.is_tensor(v) or tuple(v.shape) != tuple(p.shape):
                raise ValueError(
                    f"{what}: {key!r} has shape "
                    f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}, not "
                    "the parameter's; the state dict belongs to another model (or another "
                    "sharding: use torch.distributed.checkpoint to reshard)"
                )
    # A group key nobody can default (a hyperparameter) is refused here, not at the step.
    healable = {"params", *healable_keys(opt)}
    for gi, g in enumerate(groups):
        lacking = [key for key in opt.defaults if key not in g and key not in healable]
        if lacking:
            raise ValueError(
                f"loaded param group {gi} lacks {lacking} (a truncated or hand-edited "
                f"state dict, or another optimizer's): only {sorted(opt.healed_keys)} and "
                "the cautious options are filled in (as torch fills them in for older "
                f"state dicts); add the value(s) to state_dict['param_groups'][{gi}]"
            )


def restore_loaded(opt: Any, saved_state: dict[Any, Any], saved_ids: list[Any]) -> None:
    """After torch's ``load_state_dict`` filled ``opt.state``: each loaded state tensor
    again from its saved value, bitwise, in the group's state dtype (torch casts to the
    parameter's dtype), sharded like a DTensor parameter where it was saved full (each rank
    from its own copy, no collective), ``step`` healed to 1 where the saved state had none
    (torch SGD / Lion: a buffer exists) and the ``factor_lag=1`` counts exact int64 again.
    ``saved_ids``: the saved ids of ``opt``'s parameters, in order."""
    current = [(p, g) for g in opt.param_groups for p in g["params"]]
    default = opt.defaults["state_dtype"]
    for pid, (p, group) in zip(saved_ids, current):
        st = saved_state.get(pid)
        if not st:
            continue
        state = opt.state[p]
        if "step" not in state:  # torch SGD / Lion state: a buffer exists, >= 1 step
            state["step"] = torch.tensor(1.0, dtype=torch.float32)
        dt = state_dtype(p, group, default)
        for key in opt.state_keys:
            v = st[key]
            if state[key].dtype != dt or v.dtype != dt:
                state[key] = v.to(device=state[key].device, dtype=dt)
            if is_dtensor(p) and not is_dtensor(state[key]):
                # a single-device (full) state: shard it like the parameter (FSDP2, TP),
                # each rank from its own copy (no collective)
                from torch.distributed.tensor import distribute_tensor

                state[key] = distribute_tensor(
                    state[key], p.device_mesh, p.placements, src_data_rank=None
                )
        c = st.get(COUNT_KEY)  # factor_lag=1 counts: exact int64 again
        if torch.is_tensor(c) or isinstance(c, (tuple, list)):
            state[COUNT_KEY] = torch.as_tensor(c).to(torch.int64, copy=True)


def flat_counts_as_tuples(opt: Any, out: dict[str, Any]) -> dict[str, Any]:
    """``out`` (``opt``'s ``state_dict()``) with the ``factor_lag=1`` counts of FSDP1 flat
    parameters (one per original tensor, lag.py) as tuples of ints: FSDP1's optimizer
    state dicts would take a 1-D tensor for a flattened one."""
    params = [q for g in opt.param_groups for q in g["params"]]
    for i, p in enumerate(params):
        st = out["state"].get(i)
        c = st.get(COUNT_KEY) if st else None
        if torch.is_tensor(c) and c.dim() > 0:
            found = resolve(p, opt)
            if found is not None and found[0] == FSDP1:
                out["state"][i] = {**st, COUNT_KEY: tuple(c.tolist())}
    return out
