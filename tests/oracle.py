"""An independent float64 C-AdamW on whole tensors: the oracle the test suite trusts.

Written from the paper and ../shared/design.md, sharing no code with ``dist_cautious``.
Sharded scenarios are checked by running it on the *global* tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Float64CAdamW:
    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        formula: str = "clamp",
        clamp: float = 1e-3,
        maximize: bool = False,
        weight_decays: list[float] | None = None,
    ) -> None:
        self.p = [t.detach().to(torch.float64).clone() for t in params]
        self.m = [torch.zeros_like(t) for t in self.p]
        self.v = [torch.zeros_like(t) for t in self.p]
        self.t = [0 for _ in self.p]
        self.lr, self.betas, self.eps = lr, betas, eps
        self.wd = weight_decays if weight_decays is not None else [weight_decay] * len(self.p)
        self.formula, self.clamp, self.maximize = formula, clamp, maximize
        self.kept: list[int] = []

    def alpha(self, nnz: int, n: int) -> float:
        if n == 0:
            return 1.0
        if self.formula == "clamp":
            return n / max(nnz, self.clamp * n)
        return n / (nnz + 1)

    def step(self, grads: list[Tensor | None], frozen: list[Tensor | None] | None = None) -> None:
        """``frozen[i]``: optional bool mask of elements with no gradient (not stepped, counted in N)."""
        b1, b2 = self.betas
        self.kept = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().to(torch.float64)
            if self.maximize:
                g = -g
            self.t[i] += 1
            t = self.t[i]
            live = torch.ones_like(g, dtype=torch.bool)
            if frozen is not None and frozen[i] is not None:
                live = ~frozen[i]
            m_new = b1 * self.m[i] + (1 - b1) * g
            v_new = b2 * self.v[i] + (1 - b2) * g * g
            mask = ((m_new * g > 0) & live).to(g.dtype)  # not bool: bool * float is float32
            n = g.numel()
            nnz = int(mask.sum().item())
            self.kept.append(nnz)
            a = self.alpha(nnz, n)
            u = (m_new / (1 - b1**t)) / ((v_new / (1 - b2**t)).sqrt() + self.eps)
            p_new = self.p[i] * (1 - self.lr * self.wd[i]) - self.lr * a * mask * u
            self.m[i] = torch.where(live, m_new, self.m[i])
            self.v[i] = torch.where(live, v_new, self.v[i])
            self.p[i] = torch.where(live, p_new, self.p[i])


def rel_err(a: Tensor, b: Tensor) -> float:
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num
