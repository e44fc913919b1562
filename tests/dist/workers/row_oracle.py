"""A ``tests/optimizers.py`` row's float64 oracle over tensors that differ in weight decay.

``Float64CLion`` and ``Float64CSGD`` take one ``weight_decay``; ``GroupedOracle`` runs one
oracle of the row per distinct weight decay (as param groups do) and hands tensors and
states back in the order given. Shared by the FSDP1 and DeepSpeed workers.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class GroupedOracle:
    def __init__(self, row: Any, tensors: list[Tensor], weight_decays: list[float], **hyper):
        hyper = {k: v for k, v in {**row.hyper, **hyper}.items() if k != "weight_decay"}
        self.row, self.n = row, len(tensors)
        self.parts: list[tuple[list[int], Any]] = []  # (input indices, oracle)
        for wd in dict.fromkeys(weight_decays):
            idx = [i for i, w in enumerate(weight_decays) if w == wd]
            o = row.oracle([tensors[i] for i in idx], weight_decay=wd, **hyper)
            self.parts.append((idx, o))

    def _collect(self, get) -> list:
        out: list = [None] * self.n
        for idx, o in self.parts:
            for i, v in zip(idx, get(o)):
                out[i] = v
        return out

    @property
    def p(self) -> list[Tensor]:
        return self._collect(lambda o: o.p)

    def states(self) -> list[list[Tensor]]:
        """Per state key of the row (``row.state_keys``), the tensors in input order."""
        return [
            self._collect(lambda o, j=j: self.row.oracle_states(o)[j])
            for j in range(len(self.row.state_keys))
        ]

    def load(self, states: list[list[Tensor]], step: int) -> None:
        """Start from given states after ``step`` steps (``step == 0``: the fresh state)."""
        if step == 0:
            return
        for idx, o in self.parts:
            for held, given in zip(self.row.oracle_states(o), states):
                held[:] = [given[i].clone() for i in idx]  # the oracle's own lists, in place
            if hasattr(o, "t"):  # bias correction (AdamW)
                o.t = [step] * len(idx)

    def step(self, grads: list[Tensor | None]) -> None:
        for idx, o in self.parts:
            o.step([grads[i] for i in idx])
