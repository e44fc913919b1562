"""What every backend shares: per-call hyperparameters and the cautious factor."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class UpdateHyper:
    """Scalars of one update pass (one param group, one step value)."""

    lr: float
    beta2: float
    eps: float
    weight_decay: float
    step: int
    beta1: float
    maximize: bool = False
    cautious_wd: bool = False  # decay only where m_new * p >= 0 (see reference.update_pass)

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return math.sqrt(1 - self.beta2**self.step)


def compute_dtype(state: Tensor) -> torch.dtype:
    """float32 arithmetic, or float64 when the state itself is float64."""
    return torch.float64 if state.dtype == torch.float64 else torch.float32


def cautious_factor(
    counts: Tensor, numels: Tensor, formula: str, clamp: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Per-tensor factor ``alpha`` from exact int64 counts, on the counts' device (no sync).

    ``formula="clamp"``: ``N / max(nnz, clamp * N)`` (timm and the reference repository);
    ``formula="paper"``: ``N / (nnz + 1)`` (the paper's original listing).
    Empty tensors get 1. The division is done in float64 so that the factor is the
    correctly rounded value of the exact integer ratio for any tensor size; ``dtype`` is the
    result's (float32 for float32 / 16-bit moments, float64 for float64 moments).
    """
    n = numels.to(torch.float64)
    c = counts.to(torch.float64)
    if formula == "clamp":
        alpha = n / torch.maximum(c, clamp * n)
    elif formula == "paper":
        alpha = n / (c + 1)
    else:  # validated by the optimizer; kept for direct callers
        raise ValueError(f"unknown cautious formula {formula!r}; use 'clamp' or 'paper'")
    return torch.where(n > 0, alpha, torch.ones_like(alpha)).to(dtype)


def masked_step(p: Tensor, pc: Tensor, mask: Tensor, d: Tensor, alpha: Tensor, lr: float) -> None:
    """Reference C-Lion / C-SGD step of one tensor: ``p <- pc - (lr * alpha) * mask * d``,
    ``pc`` the (decayed) parameter in the compute dtype, ``lr * alpha`` rounded once to it."""
    step = alpha.to(pc.dtype) * lr
    p.copy_(pc - step * torch.where(mask, d, 0))


@dataclass(frozen=True)
class LionHyper:
    """Scalars of one C-Lion call (one param group): see :mod:`.lion` for the math."""

    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    maximize: bool = False
    cautious_wd: bool = False


@dataclass(frozen=True)
class SGDHyper:
    """Scalars of one cautious SGD-momentum call (one param group): see :mod:`.sgd`.

    ``first_step``: the momentum buffers are fresh (torch's ``momentum_buffer`` is None):
    they are set to the (decayed) gradient instead of being averaged into.
    """

    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    first_step: bool
    maximize: bool = False
    cautious_wd: bool = False


# --------------------------------------------------------------------------- backend contract


@dataclass(frozen=True)
class Capabilities:
    """What a kernel backend declares about itself; the engine reads it once per bucket.

    ``takes_scratch``: the passes take the caller's per-bucket ``scratch`` dict (foreach hands
    the mask from count to update through it). ``fused_factor``: ``update_pass(..., alphas=None,
    factor=(counts, numels, formula, clamp))`` computes the factor itself (no separate
    launches). ``deferred_exp_avg`` (AdamW): ``count_pass(..., defer_exp_avg=True)`` returns
    ``(counts, deferred)`` and leaves the exp_avg write to the update pass.
    ``one_pass_lagged``: ``one_pass(<update_pass's arguments with per-piece alphas>) -> int64
    counts`` does a ``factor_lag=1`` step in one pass over memory: the update with the given
    (previous step's) factors, and this step's mask counts for the next step's factors;
    equal to ``count_pass`` then ``update_pass`` with those factors."""

    takes_scratch: bool = False
    fused_factor: bool = False
    deferred_exp_avg: bool = False
    one_pass_lagged: bool = False


class Backend(Protocol):
    """A kernel backend: two passes and its capabilities. The pass signatures are the
    optimizer's: AdamW ``count_pass(grads, exp_avgs, beta1, maximize)`` /
    ``update_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h)``; Lion and SGD
    ``count_pass(params, grads, states, h)`` / ``update_pass(params, grads, states, alphas, h)``
    (plus ``scratch=`` / ``factor=`` / ``defer_exp_avg=`` as ``caps`` declares), and
    ``one_pass`` (``update_pass``'s arguments, returns the counts) where ``caps`` declares
    ``one_pass_lagged``."""

    caps: Capabilities
    count_pass: Callable[..., Any]
    update_pass: Callable[..., Any]


@dataclass(frozen=True)
class Functions:
    """A backend made of plain functions (reference, foreach): two passes, and ``one_pass``
    where ``caps.one_pass_lagged``."""

    count_pass: Callable[..., Any]
    update_pass: Callable[..., Any]
    caps: Capabilities = Capabilities()
    one_pass: Callable[..., Any] | None = None
