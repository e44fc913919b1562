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
        cautious_wd: bool = False,
        factor_lag: int = 0,
    ) -> None:
        self.cautious_wd = cautious_wd  # decay only where u * p >= 0 (arXiv 2510.12402)
        self.factor_lag = factor_lag
        self.prev: list[int | None] = [None for _ in params]
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
            a = self.alpha(lagged(self, i, nnz), n)
            u = (m_new / (1 - b1**t)) / ((v_new / (1 - b2**t)).sqrt() + self.eps)
            if self.cautious_wd:
                dmask = (u * self.p[i] >= 0).to(g.dtype)
                p_new = (
                    self.p[i] - self.lr * self.wd[i] * dmask * self.p[i] - self.lr * a * mask * u
                )
            else:
                p_new = self.p[i] * (1 - self.lr * self.wd[i]) - self.lr * a * mask * u
            self.m[i] = torch.where(live, m_new, self.m[i])
            self.v[i] = torch.where(live, v_new, self.v[i])
            self.p[i] = torch.where(live, p_new, self.p[i])


def lagged(oracle: object, i: int, nnz: int) -> int:
    """The count parameter ``i``'s factor uses this step: with ``factor_lag=1`` the count of
    its previous step (its first step, or after ``prev[i] = None``: this step's); this
    step's count is remembered for the next."""
    prev = oracle.prev[i]  # type: ignore[attr-defined]
    oracle.prev[i] = nnz  # type: ignore[attr-defined]
    return prev if oracle.factor_lag and prev is not None else nnz  # type: ignore[attr-defined]


def rel_err(a: Tensor, b: Tensor) -> float:
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def _factor(formula: str, clamp: float, nnz: int, n: int) -> float:
    if n == 0:
        return 1.0
    if formula == "clamp":
        return n / max(nnz, clamp * n)
    if formula == "paper":
        return n / (nnz + 1)
    raise ValueError(f"unknown formula {formula!r}")


class Float64CLion:
    """C-Lion (lion-pytorch / timm Lion with the cautious mask), float64, whole tensors.

    ``c = b1 m + (1 - b1) g``, ``u = sign(c)``, ``mask = u g > 0``,
    ``p <- p - lr wd [u p >= 0 if cautious_wd] p - lr alpha mask u``, ``m <- b2 m + (1 - b2) g``.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        formula: str = "clamp",
        clamp: float = 1e-3,
        maximize: bool = False,
        cautious_wd: bool = False,
        factor_lag: int = 0,
    ) -> None:
        self.p = [t.detach().to(torch.float64).clone() for t in params]
        self.m = [torch.zeros_like(t) for t in self.p]
        self.factor_lag, self.prev = factor_lag, [None for _ in self.p]
        self.lr, self.betas, self.wd = lr, betas, weight_decay
        self.formula, self.clamp, self.maximize, self.cautious_wd = (
            formula,
            clamp,
            maximize,
            cautious_wd,
        )
        self.kept: list[int] = []

    def step(self, grads: list[Tensor | None]) -> None:
        b1, b2 = self.betas
        self.kept = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().to(torch.float64)
            if self.maximize:
                g = -g
            p, m = self.p[i], self.m[i]
            u = torch.sign(b1 * m + (1 - b1) * g)
            mask = (u * g > 0).to(g.dtype)
            nnz = int(mask.sum().item())
            self.kept.append(nnz)
            a = _factor(self.formula, self.clamp, lagged(self, i, nnz), g.numel())
            dmask = (u * p >= 0).to(g.dtype) if self.cautious_wd else torch.ones_like(p)
            self.p[i] = p - self.lr * self.wd * dmask * p - self.lr * a * mask * u
            self.m[i] = b2 * m + (1 - b2) * g


class Float64CSGD:
    """Cautious SGD with momentum (torch.optim.SGD semantics), float64, whole tensors.

    ``g <- g + wd p`` (L2; not with ``cautious_wd``), ``buf <- g`` on the first step else
    ``momentum buf + (1 - dampening) g``, ``d = g + momentum buf`` (nesterov) or ``buf``,
    ``mask = d g > 0``, ``p <- p - lr wd [d p >= 0] p (cautious_wd only) - lr alpha mask d``.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-2,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        formula: str = "clamp",
        clamp: float = 1e-3,
        maximize: bool = False,
        cautious_wd: bool = False,
        factor_lag: int = 0,
    ) -> None:
        self.p = [t.detach().to(torch.float64).clone() for t in params]
        self.buf: list[Tensor | None] = [None for _ in self.p]
        self.factor_lag, self.prev = factor_lag, [None for _ in self.p]
        self.lr, self.momentum, self.dampening, self.nesterov = lr, momentum, dampening, nesterov
        self.wd, self.formula, self.clamp = weight_decay, formula, clamp
        self.maximize, self.cautious_wd = maximize, cautious_wd
        self.kept: list[int] = []

    def step(self, grads: list[Tensor | None]) -> None:
        self.kept = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().to(torch.float64)
            if self.maximize:
                g = -g
            p = self.p[i]
            if self.wd != 0 and not self.cautious_wd:
                g = g + self.wd * p
            buf = self.buf[i]
            buf = g.clone() if buf is None else self.momentum * buf + (1 - self.dampening) * g
            self.buf[i] = buf
            d = g + self.momentum * buf if self.nesterov else buf
            mask = (d * g > 0).to(g.dtype)
            nnz = int(mask.sum().item())
            self.kept.append(nnz)
            a = _factor(self.formula, self.clamp, lagged(self, i, nnz), g.numel())
            decay = self.lr * self.wd * (d * p >= 0).to(g.dtype) * p if self.cautious_wd else 0.0
            self.p[i] = p - decay - self.lr * a * mask * d
