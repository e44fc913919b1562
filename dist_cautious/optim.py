"""The cautious optimizers: ``CAdamW``, ``CLion``, ``CSGD``. Each is its math and nothing else.

Everything they share (options, state, copies, the step plan, counting, the reduction over
shards, statistics, every sharded layout) lives in :class:`~dist_cautious.base.CautiousOptimizer`.
A class here declares its hyperparameters and their checks, its ``state_keys`` (compatible
with its torch counterpart's state), and calls its kernels (``dist_cautious.kernels``:
``reference`` / ``foreach`` / ``triton`` for each algorithm) in the base's two passes.

The cautious rule is the same for all (arXiv 2411.16085): with ``u`` the optimizer's update
direction and ``g`` the gradient, ``mask = (u * g > 0)`` and, per original tensor of ``N``
elements, ``alpha = N / max(nnz(mask), clamp * N)`` (``formula="clamp"``) or
``N / (nnz(mask) + 1)`` (``"paper"``); the step applies ``alpha * mask * u``.

``cautious_weight_decay=True`` (arXiv 2510.12402) decays only the coordinates where the
update direction *before* the mask agrees in sign with the parameter (the paper's ``I(u * p >= 0)``: a zero direction decays):
``p <- p - lr * wd * 1[u * p >= 0] * p`` (decoupled; for ``CSGD`` it replaces torch SGD's L2
term).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .base import (
    FORMULAS,
    OPTION_KEYS,
    SCALES,
    STATE_DTYPES,
    CautiousOptimizer,
    check_betas,
    check_lr,
    check_nonneg,
    real,
)
from .kernels import UpdateHyper
from .plan import Bucket

__all__ = ["CAdamW", "CLion", "CSGD", "FORMULAS", "OPTION_KEYS", "SCALES", "STATE_DTYPES"]


def _options(**kw: Any) -> dict[str, Any]:
    return kw


def _torch_flags(
    foreach: bool | None, fused: bool | None, capturable: bool, differentiable: bool, amsgrad: bool
) -> dict[str, Any]:
    """torch.optim's keywords, kept as group keys as torch keeps them (checked by the base,
    ``check_torch_flags``: ``foreach`` / ``fused`` pick the backend, ``amsgrad`` and
    ``differentiable`` must be False). ``capturable``'s meaning (tensor lr, no host sync)
    belongs to the step and its lr check (``check_lr``), not to this function."""
    return dict(
        foreach=foreach,
        fused=fused,
        capturable=capturable,
        differentiable=differentiable,
        amsgrad=amsgrad,
    )


# --------------------------------------------------------------------------- AdamW

# Keys torch.optim.AdamW keeps in every group. We keep them too (with AdamW's meaning) so
# that a CAdamW state_dict loads into torch.optim.AdamW and means the same thing there:
# without ``decoupled_weight_decay=True`` AdamW's __setstate__ would fall back to Adam's
# L2 penalty.
_ADAMW_GROUP_KEYS = dict(
    amsgrad=False,
    foreach=None,
    capturable=False,
    differentiable=False,
    fused=None,
    decoupled_weight_decay=True,
)


class CAdamW(CautiousOptimizer):
    r"""Cautious AdamW (arXiv 2411.16085) that stays exact under FSDP1/2, HSDP, TP and ZeRO.

    Per original parameter tensor :math:`W` with :math:`N` elements::

        m     <- beta1 m + (1 - beta1) g          v <- beta2 v + (1 - beta2) g^2
        mask   = (m * g > 0)
        alpha  = N / max(nnz(mask), clamp * N)     (formula="clamp", default)
               | N / (nnz(mask) + 1)               (formula="paper")
        W     <- W (1 - lr wd) - lr / bc1 * alpha * mask * m / (sqrt(v / bc2) + eps)

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay,
            applied to every element, masked or not). Per-group overrides work.
        scale: ``"global"`` (default) computes ``nnz`` and ``N`` over the whole original
            tensor wherever its shards live (one small all-reduce per shard process group per
            step); ``"shard"`` uses the local piece only (no communication; the factor then
            depends on how the tensor is split). Identical on a single process.
        formula: ``"clamp"`` (timm and the reference repository) or ``"paper"``.
        clamp: lower bound on the kept fraction in the ``"clamp"`` formula (default 1e-3).
        maximize: maximize the objective instead of minimizing it.
        backend: ``"auto"`` (Triton on CUDA when available; on CPU the fused ``"cpu"``
            kernel when it can be built, else ``"foreach"``), ``"foreach"``, ``"triton"``,
            ``"cpu"`` or ``"reference"`` (slow, readable; the test oracle).
        state_dtype: dtype of ``exp_avg`` / ``exp_avg_sq``. ``None`` (default): float32 for
            float16/bfloat16 parameters, the parameter's dtype otherwise.
        cautious_weight_decay: decay only where ``m * W >= 0`` (the Adam direction agrees in
            sign with the weight), arXiv 2510.12402. Default False (AdamW's decay).
        factor_lag: ``0`` (default): this step's exact factor. ``1``: the factor of the
            parameter's previous step (its first step uses the exact one); the count
            all-reduce of a step is then waited for at the next step, off the critical path
            (the capturable / compiled step waits for it within the step, after the update
            pass, which does not need it). Needs ``scale="global"``. The previous counts are
            state (``cautious_count``).
        foreach, fused, capturable, differentiable, amsgrad: torch.optim's keywords, kept as
            group keys like torch's. With ``backend="auto"``: ``foreach=True`` runs the
            ``foreach`` backend, ``foreach=False`` the single-tensor ``reference`` one,
            ``fused=True`` the ``triton`` backend (CUDA only: elsewhere it raises, naming
            ``foreach=True``); a contradiction (``fused=True, foreach=True``, or either
            against an explicit ``backend``) raises. ``amsgrad=True`` and
            ``differentiable=True`` raise (not implemented).

    Every option is a param-group key: set it per group, it travels in ``state_dict()``.
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    compat_keys = _ADAMW_GROUP_KEYS

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        scale: str = "global",
        formula: str = "clamp",
        clamp: float = 1e-3,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        cautious_weight_decay: bool = False,
        factor_lag: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        amsgrad: bool = False,
    ) -> None:
        check_betas(betas, "CAdamW")  # before tuple(betas) can fail without a message
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize
        )
        options = _options(
            scale=scale,
            formula=formula,
            clamp=clamp,
            backend=backend,
            state_dtype=state_dtype,
            cautious_weight_decay=cautious_weight_decay,
            factor_lag=factor_lag,
            **_torch_flags(foreach, fused, capturable, differentiable, amsgrad),
        )
        super().__init__(params, defaults, options)

    def _check_hyper(self, group: dict[str, Any], where: str) -> None:
        check_lr(group["lr"], where, group.get("capturable", False))
        check_betas(group["betas"], where)
        check_nonneg("eps", group["eps"], where, positive=True)
        check_nonneg("weight_decay", group["weight_decay"], where)
        # amsgrad=True / differentiable=True: refused by the base (check_torch_flags)
        if not group.get("decoupled_weight_decay", True):
            raise ValueError(
                f"{where} has decoupled_weight_decay=False (an Adam state dict?); "
                "CAdamW always decouples weight decay, as AdamW does. Set it to True."
            )

    def _resolve(self, name: str, device: torch.device) -> Any:
        if name == "auto" and device.type == "cpu":  # fused CPU kernel when it builds
            from .kernels import cpu_fused

            if cpu_fused.auto_enabled():
                return cpu_fused
        return kernels.get_backend(kernels.resolve(name, device))

    def _count(self, b: Bucket, grads: list[Tensor], group: dict[str, Any]) -> tuple[Tensor, dict]:
        beta1, maximize = group["betas"][0], bool(group["maximize"])
        exp_avgs = b.states[0]
        if b.backend.caps.deferred_exp_avg:
            # triton: pass 1 read-only, the exp_avg write deferred to pass 2 if it says so
            c, deferred = b.backend.count_pass(grads, exp_avgs, beta1, maximize, defer_exp_avg=True)
            return c, ({"exp_avg_pending": True} if deferred else {})
        return b.backend.count_pass(grads, exp_avgs, beta1, maximize, **b.scratch_kw), dict(
            b.scratch_kw
        )

    def _update(
        self,
        b: Bucket,
        grads: list[Tensor],
        group: dict[str, Any],
        alphas: Tensor | None,
        kw: dict[str, Any],
    ) -> None:
        h = adamw_hyper(group, b.step)
        b.backend.update_pass(b.params, grads, b.states[0], b.states[1], alphas, h, **kw)

    def _one_pass(
        self, b: Bucket, grads: list[Tensor], group: dict[str, Any], alphas: Tensor
    ) -> Tensor:
        h = adamw_hyper(group, b.step)
        m, v = b.states
        return b.backend.one_pass(b.params, grads, m, v, alphas, h, **b.scratch_kw)


def adamw_hyper(group: dict[str, Any], step: int) -> UpdateHyper:
    """The scalars of C-AdamW's update pass for ``group`` at ``step`` (also used by
    :class:`~dist_cautious.baselines.AllGatherCAdamW`, so both run one update)."""
    extra = {"cautious_wd": True} if group["cautious_weight_decay"] else {}
    return UpdateHyper(
        lr=float(group["lr"]),
        beta1=group["betas"][0],
        beta2=group["betas"][1],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        step=step,
        maximize=bool(group["maximize"]),
        **extra,
    )


# --------------------------------------------------------------------------- Lion


def _backend_of(module_name: str, name: str, device: torch.device) -> Any:
    """A Lion / SGD kernel backend: ``auto`` is Triton on CUDA when available, else foreach."""
    return kernels.get_backend(kernels.resolve(name, device), module_name)


class CLion(CautiousOptimizer):
    r"""Cautious Lion (the paper's C-Lion), exact under the same sharded layouts as CAdamW.

    Per original parameter tensor :math:`W` with :math:`N` elements (``exp_avg`` as in
    lion-pytorch and timm, so their state dicts load)::

        c     = beta1 m + (1 - beta1) g            u = sign(c)
        mask  = (u * g > 0)                        alpha as in CAdamW (formula, clamp)
        W    <- W (1 - lr wd) - lr * alpha * mask * u
        m    <- beta2 m + (1 - beta2) g

    Args: ``lr`` (default 1e-4), ``betas`` (default (0.9, 0.99)), ``weight_decay`` (default
    0, decoupled), ``maximize`` and the cautious options of :class:`CAdamW` (``scale``,
    ``formula``, ``clamp``, ``backend``, ``state_dtype``, ``cautious_weight_decay``: decay
    only where ``u * W >= 0``, ``factor_lag``) and torch's keywords (``foreach``, ``fused``, ...). State
    dicts of lion-pytorch and timm's Lion (``exp_avg``, no ``step``) load.
    """

    state_keys = ("exp_avg",)
    compat_keys: dict[str, Any] = {}
    step_optional = True  # lion-pytorch and timm Lion keep no step counter (Lion needs none)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        scale: str = "global",
        formula: str = "clamp",
        clamp: float = 1e-3,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        cautious_weight_decay: bool = False,
        factor_lag: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        amsgrad: bool = False,
    ) -> None:
        check_betas(betas, "CLion")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize)
        options = _options(
            scale=scale,
            formula=formula,
            clamp=clamp,
            backend=backend,
            state_dtype=state_dtype,
            cautious_weight_decay=cautious_weight_decay,
            factor_lag=factor_lag,
            **_torch_flags(foreach, fused, capturable, differentiable, amsgrad),
        )
        super().__init__(params, defaults, options)

    def _check_hyper(self, group: dict[str, Any], where: str) -> None:
        check_lr(group["lr"], where, group.get("capturable", False))
        check_betas(group["betas"], where)
        check_nonneg("weight_decay", group["weight_decay"], where)

    def _resolve(self, name: str, device: torch.device) -> Any:
        return _backend_of("lion", name, device)

    def _hyper(self, group: dict[str, Any]) -> Any:
        from .kernels.common import LionHyper

        return LionHyper(
            lr=float(group["lr"]),
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=group["weight_decay"],
            maximize=bool(group["maximize"]),
            cautious_wd=bool(group["cautious_weight_decay"]),
        )

    def _count(self, b: Bucket, grads: list[Tensor], group: dict[str, Any]) -> tuple[Tensor, dict]:
        c = b.backend.count_pass(b.params, grads, b.states, self._hyper(group), **b.scratch_kw)
        return c, dict(b.scratch_kw)

    def _update(
        self,
        b: Bucket,
        grads: list[Tensor],
        group: dict[str, Any],
        alphas: Tensor | None,
        kw: dict[str, Any],
    ) -> None:
        b.backend.update_pass(b.params, grads, b.states, alphas, self._hyper(group), **kw)

    def _one_pass(
        self, b: Bucket, grads: list[Tensor], group: dict[str, Any], alphas: Tensor
    ) -> Tensor:
        h = self._hyper(group)
        return b.backend.one_pass(b.params, grads, b.states, alphas, h, **b.scratch_kw)


# --------------------------------------------------------------------------- SGD

# Keys torch.optim.SGD keeps in every group (so a CSGD state_dict loads there).
_SGD_GROUP_KEYS = dict(foreach=None, differentiable=False, fused=None)


class CSGD(CautiousOptimizer):
    r"""Cautious SGD with heavy-ball or Nesterov momentum, exact under sharded layouts.

    As ``torch.optim.SGD`` (``momentum_buffer`` state, L2 ``weight_decay`` added to the
    gradient, ``dampening``, ``nesterov``, ``maximize``; its state dicts load), with the
    cautious mask on its update direction ``d``::

        g'    = g + wd W                     (not with cautious_weight_decay, see below)
        buf  <- g' (first step) | momentum buf + (1 - dampening) g'
        d     = g' + momentum buf (nesterov) | buf
        mask  = (d * g' > 0)                 alpha as in CAdamW (formula, clamp)
        W    <- W - lr * alpha * mask * d

    ``momentum`` must be > 0 (without momentum every sign agrees and the mask does
    nothing: use ``torch.optim.SGD``). ``cautious_weight_decay=True`` replaces the L2 term
    by a decoupled decay applied only where ``d * W >= 0``:
    ``W <- W - lr * wd * 1[d * W >= 0] * W - lr * alpha * mask * d`` (with ``g' = g``).
    The cautious options (``factor_lag`` included) and torch's keywords (``foreach``,
    ``fused``, ...) are :class:`CAdamW`'s.
    """

    state_keys = ("momentum_buffer",)
    compat_keys = _SGD_GROUP_KEYS
    step_optional = True  # torch SGD keeps no step counter
    healed_keys = (*CautiousOptimizer.healed_keys, "nesterov")  # as torch SGD heals it

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        scale: str = "global",
        formula: str = "clamp",
        clamp: float = 1e-3,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        cautious_weight_decay: bool = False,
        factor_lag: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        amsgrad: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        options = _options(
            scale=scale,
            formula=formula,
            clamp=clamp,
            backend=backend,
            state_dtype=state_dtype,
            cautious_weight_decay=cautious_weight_decay,
            factor_lag=factor_lag,
            **_torch_flags(foreach, fused, capturable, differentiable, amsgrad),
        )
        super().__init__(params, defaults, options)

    def _check_hyper(self, group: dict[str, Any], where: str) -> None:
        check_lr(group["lr"], where, group.get("capturable", False))
        m, d = group["momentum"], group["dampening"]
        if not real(m) or not 0 < m < 1:
            raise ValueError(
                f"{where}: invalid momentum={m!r}; CSGD needs 0 < momentum < 1 (without "
                "momentum every sign agrees and caution does nothing: use torch.optim.SGD)"
            )
        if not real(d) or not 0 <= d < 1:
            raise ValueError(f"{where}: invalid dampening={d!r}; it must be a float in [0, 1)")
        check_nonneg("weight_decay", group["weight_decay"], where)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"{where}: nesterov={group['nesterov']!r} must be True or False")
        if group["nesterov"] and d != 0:
            raise ValueError(
                f"{where}: nesterov=True needs dampening=0 (got {d!r}), as torch.optim.SGD"
            )

    def _resolve(self, name: str, device: torch.device) -> Any:
        return _backend_of("sgd", name, device)

    def _hyper(self, b: Bucket, group: dict[str, Any]) -> Any:
        from .kernels.common import SGDHyper

        return SGDHyper(
            lr=float(group["lr"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=bool(group["nesterov"]),
            weight_decay=group["weight_decay"],
            first_step=int(b.step) == 1,
            maximize=bool(group["maximize"]),
            cautious_wd=bool(group["cautious_weight_decay"]),
        )

    def _count(self, b: Bucket, grads: list[Tensor], group: dict[str, Any]) -> tuple[Tensor, dict]:
        h = self._hyper(b, group)
        return b.backend.count_pass(b.params, grads, b.states, h, **b.scratch_kw), dict(
            b.scratch_kw
        )

    def _update(
        self,
        b: Bucket,
        grads: list[Tensor],
        group: dict[str, Any],
        alphas: Tensor | None,
        kw: dict[str, Any],
    ) -> None:
        b.backend.update_pass(b.params, grads, b.states, alphas, self._hyper(b, group), **kw)
