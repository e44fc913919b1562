"""Baselines to measure :class:`~dist_cautious.CAdamW` against (benchmarks, not training).

:class:`AllGatherCAdamW` does for DTensor parameters what the reference C-AdamW repository
(kyleliang919/C-Optim) does: for every parameter, every step, it all-gathers the full
``exp_avg`` and the full gradient (``full_tensor()``: two parameter-sized all-gathers),
builds the full mask, scales it by ``1 / max(mean, clamp)`` and sends it back to the
shards with ``distribute_tensor`` (a scatter from rank 0), then updates the local shard
with it. The result is the exact per-tensor factor (it matches ``CAdamW(scale="global")``
to float tolerance; the tests check it), at a cost of about ``(2 + 1) * 4 * numel`` bytes
moved per fp32 parameter per step, against 16 bytes per sharded *tensor* for CAdamW.

Plain (non-DTensor) parameters take the local path, as in the reference. The arithmetic is
:class:`~dist_cautious.CAdamW`'s: the first moment and the update are the ``reference`` or
``foreach`` kernels' ``count_pass`` / ``update_pass`` with the same hyperparameters
(:func:`dist_cautious.optim.adamw_hyper`); only the factor's route differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .base import backend_name
from .kernels import cautious_factor, compute_dtype
from .layout import DTensor
from .optim import CAdamW, adamw_hyper

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
            self.check_group(group, gi)
            be = kernels.get_backend(
                "reference" if backend_name(group) == "reference" else "foreach"
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state_for(p, group)
                state["step"] += 1
                g, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
                pl, gl, ml, vl = _local(p), _local(g), _local(m), _local(v)
                # m updated in place; the local count
                count = be.count_pass([gl], [ml], group["betas"][0], bool(group["maximize"]))
                if isinstance(p, DTensor):
                    alpha = _allgather_factor(p, g, m, group)  # collectives: on every rank
                else:
                    n = torch.tensor([pl.numel()], dtype=torch.int64, device=count.device)
                    alpha = cautious_factor(count, n, group["formula"], group["clamp"])
                if pl.numel() == 0:
                    continue
                h = adamw_hyper(group, int(state["step"].item()))
                be.update_pass([pl], [gl], [ml], [vl], alpha, h)
        return loss


def _allgather_factor(p: DTensor, g: DTensor, m: DTensor, group: dict[str, Any]) -> Tensor:
    """The reference repository's route to the factor of DTensor ``p`` (``m`` already
    updated): two parameter-sized all-gathers (``full_tensor``), the full mask scaled by
    ``alpha``, and the scaled mask sent back to the shards (a scatter from rank 0).

    Returns ``alpha`` as this shard sees it, shape ``(1,)``: the largest value of its piece
    of the scaled mask. The update pass recomputes the mask from the same ``m`` and ``g``
    (the scattered piece's support), so that carries everything the piece says; where the
    piece keeps nothing, 0 (it then multiplies only zeros)."""
    dt = compute_dtype(m.to_local())
    full_m = m.full_tensor().to(dt)
    full_g = g.full_tensor().to(dt)
    if group["maximize"]:
        full_g = -full_g
    mask = (full_m * full_g > 0).to(dt)
    n = torch.tensor([mask.numel()], dtype=torch.int64, device=mask.device)
    nnz = mask.sum(dtype=torch.int64).reshape(1)
    mask.mul_(cautious_factor(nnz, n, group["formula"], group["clamp"]).to(dt))
    piece = distribute_tensor(mask, p.device_mesh, p.placements).to_local()
    if piece.numel() == 0:
        return torch.ones(1, dtype=dt, device=piece.device)
    return piece.amax().reshape(1)
