"""Baselines to measure :class:`~dist_cautious.CAdamW` against (benchmarks, not training).

:class:`AllGatherCAdamW` does for DTensor parameters what the reference C-AdamW repository
(kyleliang919/C-Optim) does: for every parameter, every step, it all-gathers the full
``exp_avg`` and the full gradient (``full_tensor()``: two parameter-sized all-gathers),
builds the full mask, scales it by ``1 / max(mean, clamp)`` and sends it back to the
shards with ``distribute_tensor`` (a scatter from rank 0), then updates the local shard
with it. The result is the exact per-tensor factor (it matches ``CAdamW(scale="global")``
to float tolerance; the tests check it), at a cost of about ``(2 + 1) * 4 * numel`` bytes
moved per fp32 parameter per step, against 16 bytes per sharded *tensor* for CAdamW.

Plain (non-DTensor) parameters take the local path, as in the reference. Arithmetic is
the same as :mod:`dist_cautious.kernels.reference` (decoupled, unmasked weight decay, or with
``cautious_weight_decay=True`` decay only where ``m * p >= 0``; bias corrections as
``torch.optim.AdamW``); the first-moment update and the factor reuse the package's kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .base import backend_name
from .kernels import UpdateHyper, cautious_factor, compute_dtype
from .layout import DTensor
from .optim import CAdamW

try:
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import distribute_tensor  # type: ignore[no-redef]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class AllGatherCAdamW(CAdamW):
    """C-AdamW with the reference repository's DTensor path: all-gather, mask, scatter.

    Same arguments as :class:`~dist_cautious.CAdamW`; ``scale`` must be ``"global"`` (the
    reference computes the full-tensor mean) and the per-parameter loop uses the
    ``reference`` or ``foreach`` kernels for the first moment. For benchmarks only.
    """

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("scale", "global") != "global":
            raise ValueError(
                f"AllGatherCAdamW computes the full-tensor mask mean; scale={kwargs['scale']!r} "
                "is not supported (use CAdamW(scale='shard') for the local variant)"
            )
        if kwargs.get("backend", "auto") == "triton" or kwargs.get("fused"):
            raise ValueError(
                "AllGatherCAdamW is a per-parameter baseline (no fused kernel); use "
                "backend='foreach' (or foreach=True)"
            )
        super().__init__(params, *args, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            beta1, beta2 = group["betas"]
            maximize = bool(group["maximize"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_for(p, group)
                state["step"] += 1
                step = int(state["step"].item())
                g, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
                pl, gl, ml, vl = _local(p), _local(g), _local(m), _local(v)
                be = kernels.get_backend(
                    "reference" if backend_name(group) == "reference" else "foreach"
                )
                local_count = be.count_pass([gl], [ml], beta1, maximize)  # m updated in place
                dt = compute_dtype(ml)
                if isinstance(p, DTensor):
                    # The reference path: two parameter-sized all-gathers ...
                    full_m = m.full_tensor().to(dt)
                    full_g = g.full_tensor().to(dt)
                    if maximize:
                        full_g = -full_g
                    mask = (full_m * full_g > 0).to(dt)
                    n = torch.tensor([mask.numel()], dtype=torch.int64, device=mask.device)
                    nnz = mask.sum(dtype=torch.int64).reshape(1)
                    mask.mul_(cautious_factor(nnz, n, group["formula"], group["clamp"]).to(dt))
                    # ... and the scaled mask sent back to the shards (scatter from rank 0).
                    mask_local = distribute_tensor(mask, p.device_mesh, p.placements).to_local()
                else:
                    n = torch.tensor([pl.numel()], dtype=torch.int64, device=local_count.device)
                    a = cautious_factor(local_count, n, group["formula"], group["clamp"])
                    gc = -gl.to(dt) if maximize else gl.to(dt)
                    mask_local = (ml.to(dt) * gc > 0).to(dt) * a.to(pl.device, dt)
                if pl.numel() == 0:
                    continue
                h = UpdateHyper(
                    lr=float(group["lr"]),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=step,
                    maximize=maximize,
                )
                gc = -gl.to(dt) if maximize else gl.to(dt)
                vl.copy_(vl.to(dt).mul(beta2).addcmul_(gc, gc, value=1 - beta2))
                pc = pl.to(dt)
                if h.weight_decay != 0:
                    if group["cautious_weight_decay"]:  # as kernels/reference.py: where m*p >= 0
                        pc = torch.where(ml.to(dt) * pc >= 0, pc.mul(1 - h.lr * h.weight_decay), pc)
                    else:
                        pc = pc.mul(1 - h.lr * h.weight_decay)
                denom = (vl.to(dt).sqrt() / h.bias_correction2_sqrt).add_(h.eps)
                pc = pc.addcdiv(ml.to(dt) * mask_local, denom, value=-h.step_size)
                pl.copy_(pc)
        return loss
