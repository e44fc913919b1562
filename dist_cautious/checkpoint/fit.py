"""Whether a checkpoint fits the run that loads it: the caller's ``meta`` and the optimizer's
class and group options (the checks every backend makes before loading anything).

The functions return an error message (naming what differs and the fix) or None; the caller
raises it on every rank (:func:`dist_cautious.checkpoint.protocol.agree`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FREE_GROUP_KEYS = frozenset(
    {"params", "lr", "initial_lr", "backend", "foreach", "fused", "capturable", "differentiable"}
)
# Group keys that LR schedulers own (OneCycleLR, CyclicLR; ``initial_lr``: every scheduler):
# not options of the optimizer. They are not compared at load and their values come from the
# checkpoint, as with torch's ``load_state_dict``. With ``base_momentum`` / ``max_momentum``
# in a group (momentum cycling) the scheduler also owns ``momentum`` and ``betas[0]``.
SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})


def jsonable(x: Any) -> Any:
    """Group option values as JSON keeps them (tuples as lists, dtypes as strings)."""
    return json.loads(json.dumps(x, default=str))


def group_options(optimizer: torch.optim.Optimizer | None) -> list[dict[str, Any]]:
    """Every param group's options (not ``params``), as they are compared at load."""
    if optimizer is None:
        return []
    return [{k: jsonable(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def diff_meta(path: Path, saved: dict, now: dict) -> str | None:
    now = jsonable(now)
    diffs = [
        f"{k}={saved.get(k, '<absent>')!r} (now {now.get(k, '<absent>')!r})"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if not diffs:
        return None
    return (
        f"checkpoint {path} was written with other settings: {', '.join(diffs)}. Resume with "
        "the settings it was written with, or point the checkpoint directory elsewhere to "
        "start a new run"
    )


def diff_groups(path: Path, info: dict, optimizer: Any) -> str | None:
    if optimizer is None:
        return None
    want = info.get("optimizer")
    have = type(optimizer).__name__
    if want is None:
        return (
            f"checkpoint {path} was saved without an optimizer: load it with optimizer=None "
            f"(model only), then train the {have} from fresh state"
        )
    if want is not None and want != have:
        return (
            f"checkpoint {path} holds the state of a {want} optimizer, not of this {have}: "
            f"build a {want}, or start a new run in another directory"
        )
    saved, now = info.get("param_groups", []), group_options(optimizer)
    if len(saved) != len(now):
        return (
            f"checkpoint {path} has {len(saved)} param group(s), this optimizer {len(now)}: "
            "build the optimizer with the same groups"
        )
    diffs = []
    for i, (a, b) in enumerate(zip(saved, now)):
        cycling = any(k in g for g in (a, b) for k in ("base_momentum", "max_momentum"))
        for k in sorted(set(a) | set(b)):
            if k in FREE_GROUP_KEYS or k in SCHEDULER_KEYS or (cycling and k == "momentum"):
                continue
            if (
                cycling
                and k == "betas"
                and isinstance(a.get(k), list)
                and isinstance(b.get(k), list)
            ):
                if a[k][1:] != b[k][1:]:  # the scheduler cycles betas[0] only
                    diffs.append(f"group {i} betas[1:]: saved {a[k][1:]!r}, now {b[k][1:]!r}")
                continue
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                diffs.append(
                    f"group {i} {k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
                )
    if diffs:
        return (
            f"checkpoint {path} was written by an optimizer with other options ({'; '.join(diffs)}): "
            "build the optimizer with the saved values, or pass check_groups=False to let the "
            "checkpoint's values win (torch's load_state_dict rule)"
        )
    return None
