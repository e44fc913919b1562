"""One row per cautious optimizer (torch's ``optim_db`` style): the suite's single and
multi-process tests take a row's name, so a new optimizer is covered by adding a row.

A row gives the class, its independent float64 oracle (``tests/oracle.py``), hyperparameters
where the mask acts (a few steps keep between 20% and 95%), the state keys, and how to read
the oracle's state in the same order. Workers select the row from ``DC_OPTIMIZER``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dist_cautious import CSGD, CAdamW, CLion
from tests.oracle import Float64CAdamW, Float64CLion, Float64CSGD


@dataclass(frozen=True)
class Row:
    name: str
    cls: type
    oracle: type
    hyper: dict[str, Any]
    state_keys: tuple[str, ...]
    oracle_states: Callable[[Any], list[list[Any]]]  # per state key, the oracle's tensors
    bad: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # kwargs, match


ROWS: dict[str, Row] = {
    "cadamw": Row(
        "cadamw",
        CAdamW,
        Float64CAdamW,
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
        ("exp_avg", "exp_avg_sq"),
        lambda o: [o.m, o.v],
        [
            (dict(lr=-1.0), "invalid learning rate lr=-1.0"),
            (dict(betas=(0.9, 1.0)), "invalid beta2=1.0"),
            (dict(eps=0.0), "invalid eps=0.0"),
        ],
    ),
    "clion": Row(
        "clion",
        CLion,
        Float64CLion,
        dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        ("exp_avg",),
        lambda o: [o.m],
        [
            (dict(lr=float("nan")), "invalid learning rate lr=nan"),
            (dict(betas=(1.2, 0.99)), "invalid beta1=1.2"),
            (dict(weight_decay=-0.1), "invalid weight_decay=-0.1"),
        ],
    ),
    "csgd": Row(
        "csgd",
        CSGD,
        Float64CSGD,
        dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
        ("momentum_buffer",),
        lambda o: [o.buf],
        [
            (dict(momentum=0.0), "invalid momentum=0.0"),
            (dict(dampening=1.5), "invalid dampening=1.5"),
            (dict(nesterov=True, dampening=0.1), "nesterov=True needs dampening=0"),
        ],
    ),
}


def selected() -> Row:
    """The row named by ``DC_OPTIMIZER`` (default: cadamw)."""
    name = os.environ.get("DC_OPTIMIZER", "cadamw")
    if name not in ROWS:
        raise ValueError(f"DC_OPTIMIZER={name!r}; choose one of {sorted(ROWS)}")
    return ROWS[name]
