"""``CAdamW``: Cautious AdamW with an exact per-tensor factor on sharded parameters.

A step, in four stages (each in its own module):

1. plan (:mod:`.layout`): walk every parameter of every group, reserve count slots for
   tensors split across ranks, and cut the local pieces the kernels will step;
2. count pass (:mod:`.kernels`): update ``exp_avg`` and count ``exp_avg * grad > 0`` per piece;
3. reduce (:mod:`.reduce`): sum counts over shards (one all-reduce per reduction group),
   then ``alpha = N / max(nnz, clamp * N)`` per piece, on the device;
4. update pass (:mod:`.kernels`): ``exp_avg_sq``, decoupled weight decay, masked step.

No host synchronisation happens inside ``step()`` on CUDA (counts and factors stay on the
device); the kept-mask statistics are device tensors read only when you ask for them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import kernels
from .kernels import UpdateHyper, cautious_factor
from .layout import DEFAULT_LAYOUT, ParamLayout, Piece, SlotTable, is_dtensor, zeros_state
from .reduce import ReducedCounts, reduce_counts

SCALES = ("global", "shard")
FORMULAS = ("clamp", "paper")

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


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any, where: str) -> None:
    if isinstance(lr, Tensor):
        raise TypeError(
            f"{where}: lr given as a Tensor ({lr!r}); CAdamW takes a Python float "
            "(pass float(lr); LR schedulers already set floats)"
        )
    if not isinstance(lr, (int, float)) or math.isnan(lr) or lr < 0:
        raise ValueError(f"{where}: invalid learning rate lr={lr!r}; it must be a float >= 0")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{where}: betas={betas!r} must be a pair (beta1, beta2)") from None
    for i, b in enumerate((b1, b2)):
        if isinstance(b, Tensor) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(
                f"{where}: invalid beta{i + 1}={b!r} in betas={betas!r}; each must be a float in [0, 1)"
            )
    if not isinstance(eps, (int, float)) or math.isnan(eps) or eps <= 0:
        raise ValueError(f"{where}: invalid eps={eps!r}; it must be a float > 0")
    if (
        not isinstance(weight_decay, (int, float))
        or math.isnan(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(
            f"{where}: invalid weight_decay={weight_decay!r}; it must be a float >= 0"
        )


class CAdamW(Optimizer):
    r"""Cautious AdamW (arXiv 2411.16085) that stays exact under FSDP2, HSDP, TP and ZeRO.

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
            tensor wherever its shards live (one small all-reduce per reduction group per
            step); ``"shard"`` uses the local piece only (no communication; the factor then
            depends on how the tensor is split). Identical on a single process.
        formula: ``"clamp"`` (timm and the reference repository) or ``"paper"``.
        clamp: lower bound on the kept fraction in the ``"clamp"`` formula (default 1e-3).
        maximize: maximize the objective instead of minimizing it.
        backend: ``"auto"`` (Triton on CUDA when available, else ``"foreach"``),
            ``"foreach"``, ``"triton"`` or ``"reference"`` (slow, readable; the test oracle).
        state_dtype: dtype of ``exp_avg`` / ``exp_avg_sq``. ``None`` (default): float32 for
            float16/bfloat16 parameters, the parameter's dtype otherwise.
    """

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
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay, "CAdamW")
        if scale not in SCALES:
            raise ValueError(
                f"unknown scale={scale!r}; use 'global' (exact, one all-reduce per step) "
                "or 'shard' (local piece only, no communication)"
            )
        if formula not in FORMULAS:
            raise ValueError(
                f"unknown formula={formula!r}; use 'clamp' (N / max(nnz, clamp*N)) or "
                "'paper' (N / (nnz + 1))"
            )
        if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 < clamp <= 1:
            raise ValueError(f"invalid clamp={clamp!r}; it must be a float in (0, 1]")
        if backend not in kernels.BACKENDS:
            raise ValueError(f"unknown backend={backend!r}; choose one of {kernels.BACKENDS}")
        if state_dtype is not None and state_dtype not in (
            torch.float32,
            torch.float64,
            torch.bfloat16,
            torch.float16,
        ):
            raise ValueError(
                f"invalid state_dtype={state_dtype!r}; use None, torch.float32, torch.float64, "
                "torch.bfloat16 or torch.float16"
            )
        self.scale = scale
        self.formula = formula
        self.clamp = float(clamp)
        self.backend = backend
        self.state_dtype = state_dtype
        self._known_params: set[int] = set()
        self._layouts: dict[int, ParamLayout] = {}
        self._stats: ReducedCounts | None = None
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize
        )
        defaults.update(_ADAMW_GROUP_KEYS)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ set-up

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(
            group["lr"],
            group["betas"],
            group["eps"],
            group["weight_decay"],
            f"param group {len(self.param_groups) - 1}",
        )
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(
                    f"complex parameter of shape {tuple(p.shape)} and dtype {p.dtype}: CAdamW's "
                    "sign mask is defined for real tensors; pass torch.view_as_real(param) "
                    "views or keep this parameter in torch.optim.AdamW"
                )
            self._known_params.add(id(p))

    def register_layout(self, param: Tensor, layout: ParamLayout) -> None:
        """Tell the optimizer how ``param`` maps to pieces of original tensors.

        Used by adapters whose parameters are not the model's tensors (DeepSpeed ZeRO's
        flat partitions, see :mod:`dist_cautious.deepspeed`).
        """
        self._layouts[id(param)] = layout
        self._known_params.add(id(param))

    def _layout_for(self, p: Tensor) -> ParamLayout:
        layout = self._layouts.get(id(p))
        if layout is not None:
            return layout
        if id(p) not in self._known_params:
            raise RuntimeError(
                f"CAdamW is asked to step a tensor it was never given (shape {tuple(p.shape)}, "
                f"dtype {p.dtype}). DeepSpeed ZeRO does this when it swaps the model's "
                "parameters for flat partitions that mix slices of many tensors; a factor "
                "computed on them would be per-partition, not per-tensor. Call "
                "dist_cautious.deepspeed.attach(engine) after deepspeed.initialize(...) "
                "(or use dist_cautious.deepspeed.initialize). If you changed param_groups "
                "by hand, use optimizer.add_param_group instead."
            )
        return DEFAULT_LAYOUT

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict`` (AdamW state dicts load too), except
        that float32 moments of float16/bfloat16 parameters stay float32: torch would cast
        them to the parameter's dtype and lose the precision the optimizer keeps them in."""
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        current = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, current):
            st = saved_state.get(pid)
            if not st or p.dtype not in (torch.float16, torch.bfloat16):
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                v = st.get(key)
                if torch.is_tensor(v) and v.dtype in (torch.float32, torch.float64):
                    self.state[p][key] = v.to(device=p.device, dtype=self._state_dtype_for(p))

    def _state_dtype_for(self, p: Tensor) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    def _state_for(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        dt = self._state_dtype_for(p)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = zeros_state(p, dt)
            state["exp_avg_sq"] = zeros_state(p, dt)
        else:
            for k in ("exp_avg", "exp_avg_sq"):
                if state[k].dtype != dt:  # e.g. loaded from an AdamW state dict
                    state[k] = state[k].to(dt)
            if not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        return state

    @staticmethod
    def _check_group(group: dict[str, Any], gi: int) -> None:
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"], f"param group {gi}")
        for key, ok in (("amsgrad", False), ("capturable", False), ("differentiable", False)):
            if group.get(key, ok) != ok:
                raise ValueError(
                    f"param group {gi} has {key}={group[key]!r}, which CAdamW does not implement; "
                    f"set it to {ok} (it may come from a loaded Adam/AdamW state dict)"
                )
        if not group.get("decoupled_weight_decay", True):
            raise ValueError(
                f"param group {gi} has decoupled_weight_decay=False (an Adam state dict?); "
                "CAdamW always decouples weight decay, as AdamW does. Set it to True."
            )

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        table = SlotTable()
        buckets: dict[tuple, list[tuple[Piece, int]]] = defaultdict(list)
        home: torch.device | None = None
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            table.current_group = gi
            for p in group["params"]:
                layout = self._layout_for(p)
                # Reserve slots for every parameter, gradient or not (see reduce.py).
                token = layout.reserve(p, table) if self.scale == "global" else None
                if home is None:
                    home = (p.to_local() if is_dtensor(p) else p).device
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"sparse gradient for a parameter of shape {tuple(p.shape)}: CAdamW does "
                        "not support sparse gradients (use torch.optim.SparseAdam for them)"
                    )
                state = self._state_for(p)
                state["step"] += 1
                step = int(state["step"].item())  # a CPU tensor: no device sync
                for pc in layout.pieces(p, g, state["exp_avg"], state["exp_avg_sq"], token):
                    if pc.param.numel() == 0:
                        continue  # its slot (if any) stays reserved and contributes 0
                    key = (
                        gi,
                        step,
                        pc.param.device,
                        pc.param.dtype,
                        pc.grad.dtype,
                        pc.exp_avg.dtype,
                    )
                    buckets[key].append((pc, gi))

        if not buckets and not table.sizes:
            return loss
        if home is None:
            return loss

        # Pass 1: moments and local counts, one backend call per bucket.
        ordered: list[tuple[tuple, list[Piece]]] = []
        counts_parts = []
        for key, items in buckets.items():
            gi = key[0]
            ps = [pc for pc, _ in items]
            beta1 = self.param_groups[gi]["betas"][0]
            maximize = bool(self.param_groups[gi]["maximize"])
            be = kernels.get_backend(kernels.resolve(self.backend, ps[0].param.device))
            c = be.count_pass([pc.grad for pc in ps], [pc.exp_avg for pc in ps], beta1, maximize)
            counts_parts.append(c.to(home))
            ordered.append((key, ps))

        pieces = [pc for _, ps in ordered for pc in ps]
        piece_group = [key[0] for key, ps in ordered for _ in ps]
        local_counts = (
            torch.cat(counts_parts) if counts_parts else torch.zeros(0, dtype=torch.int64, device=home)
        )

        # Reduce counts over shards (no-op for whole tensors and for scale="shard").
        red = reduce_counts(
            pieces, piece_group, local_counts, table, len(self.param_groups), self.scale
        )
        self._stats = red
        alphas = cautious_factor(red.counts, red.numels, self.formula, self.clamp)

        # Pass 2: second moment, weight decay and the masked, rescaled step.
        start = 0
        for key, ps in ordered:
            gi, step = key[0], key[1]
            group = self.param_groups[gi]
            h = UpdateHyper(
                lr=float(group["lr"]),
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                step=step,
                maximize=bool(group["maximize"]),
            )
            a = alphas[start : start + len(ps)]
            start += len(ps)
            dev = ps[0].param.device
            be = kernels.get_backend(kernels.resolve(self.backend, dev))
            be.update_pass(
                [pc.param for pc in ps],
                [pc.grad for pc in ps],
                [pc.exp_avg for pc in ps],
                [pc.exp_avg_sq for pc in ps],
                a.to(dev),
                h,
            )
        return loss

    # ------------------------------------------------------------------ statistics

    @property
    def mask_stats(self) -> dict[str, Tensor] | None:
        """Device tensors of the last step, per param group: ``kept`` (elements the mask
        kept) and ``elements`` (elements stepped). Reading them does not synchronise."""
        if self._stats is None:
            return None
        return {"kept": self._stats.kept_per_group, "elements": self._stats.elements_per_group}

    @property
    def kept_fraction(self) -> float | None:
        """Fraction of elements the mask kept in the last step, over all groups.

        With ``scale="global"`` it covers whole tensors (counts summed over shards); with
        ``scale="shard"`` this rank's pieces only. ``None`` before the first step.
        Reading it synchronises with the device (it calls ``.item()``).
        """
        if self._stats is None:
            return None
        e = int(self._stats.elements_per_group.sum().item())
        k = int(self._stats.kept_per_group.sum().item())
        return k / e if e else None

    @property
    def kept_fraction_per_group(self) -> list[float | None]:
        """Like :attr:`kept_fraction`, one value per param group (``None`` where nothing stepped)."""
        if self._stats is None:
            return [None] * len(self.param_groups)
        k = self._stats.kept_per_group.tolist()
        e = self._stats.elements_per_group.tolist()
        return [ki / ei if ei else None for ki, ei in zip(k, e)]
