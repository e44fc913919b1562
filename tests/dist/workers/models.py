"""The small models the distributed test workers train, in one place.

Each class is the shape one set of tests needs (uneven or empty shards, tensors that
straddle ZeRO partition cuts, same-shape tensors to swap, ...); the docstrings say what.
Parameter names, shapes and the order of creation (which fixes the seeded initial values)
are part of what the tests assert: FSDP1 FlatParameter windows, ZeRO fragments, the names
a guard reports. Add a new class rather than change one. (The FSDP2 workers' ``Net`` and
``TPNet`` live in fsdp_common.py / fsdp_worker.py.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------- DeepSpeed (ds_worker.py)


class StraddleNet(nn.Module):
    """518 parameters in 8 tensors; under ZeRO several tensors straddle partition cuts.
    Input 13 features, output 5."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(13, 17)
        self.l2 = nn.Linear(17, 11)
        self.ln = nn.LayerNorm(11)
        self.l3 = nn.Linear(11, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(self.ln(self.l2(torch.tanh(self.l1(x)))))


def straddle_net() -> StraddleNet:
    """Seed 0, the norm moved away from its (1, 0) init (its update then differs too)."""
    torch.manual_seed(0)
    net = StraddleNet()
    with torch.no_grad():
        net.ln.weight.copy_(1 + 0.1 * torch.randn(11))
        net.ln.bias.copy_(0.1 * torch.randn(11))
    return net


class MoENet(nn.Module):
    """Dense layers around a DeepSpeed MoE layer (2 experts, expert parallel size 2)."""

    def __init__(self) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.l1 = nn.Linear(13, 16)
        self.moe = MoE(16, nn.Linear(16, 16), num_experts=2, ep_size=2, k=1, min_capacity=0)
        self.l3 = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        h, _, _ = self.moe(torch.tanh(self.l1(x)))
        return self.l3(h)


class HFNet(nn.Module):
    """Two Linears (13 -> 17 -> 5) with a Hugging Face forward: ``{"loss", "logits"}`` from
    ``(x, labels)``; records its training micro-batches in ``seen`` (ds_hf_trainer.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(13, 17)
        self.l2 = nn.Linear(17, 5)
        self.seen: list[tuple[Tensor, Tensor]] = []  # training micro-batches

    def forward(self, x, labels=None):
        if self.training:
            self.seen.append((x.detach().clone(), labels.detach().clone()))
        out = self.l2(torch.tanh(self.l1(x)))
        return {"loss": F.mse_loss(out, labels), "logits": out}


# ----------------------------------------------------------------- FSDP1 (fsdp1_worker.py)


class FNet(nn.Module):
    """Tensors (3, 5), (1, 7), fc1 (40, 5) + (40,), fc2 (6, 47) + (6,), all in the forward.

    Wrapped with a Linear policy: three FlatParameters (root: w35 + w17; fc1; fc2). On 4
    ranks the root's 22 (or 24 aligned) elements give windows of 6: w35 has nothing on rank
    3, w17 nothing on ranks 0 and 1; fc1.bias lies on rank 3 only."""

    def __init__(self) -> None:
        super().__init__()
        self.w35 = nn.Parameter(torch.randn(3, 5) * 0.5)
        self.w17 = nn.Parameter(torch.randn(1, 7) * 0.5 + 1.0)
        self.fc1 = nn.Linear(5, 40)
        self.fc2 = nn.Linear(47, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x @ self.w35))
        return self.fc2(torch.cat([h, h[:, :7] * self.w17], dim=1))


FNET_NAMES = ["w35", "w17", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


# ----------------------------------------------------------------- frameworks (integrations_worker.py)

D_IN, D, D_OUT = 5, 7, 3  # 7 rows: uneven shards (4/3) on 2 ranks; gain (1, 7): one empty


class Block(nn.Module):
    """A residual block; Accelerate, the HF Trainer and Lightning wrap it by this class name."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, h: Tensor) -> Tensor:
        return h + torch.tanh(self.fc(self.norm(h)))


class TinyNet(nn.Module):
    """``inp`` (7, 5), two Blocks, ``gain`` (1, 7), ``out`` (3, 7): FSDP2 shards dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.gain = nn.Parameter(1.0 + 0.1 * torch.randn(1, D))
        self.out = nn.Linear(D, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h * self.gain)


# ----------------------------------------------------------------- order guards (guard_worker.py)


class Twins(nn.Module):
    """Two (6, 5) tensors (the swap) and a (5, 6) one; no forward (gradients are set)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(6, 5))
        self.b = nn.Parameter(torch.randn(6, 5))
        self.c = nn.Parameter(torch.randn(5, 6))


class LinNormBlock(nn.Module):
    """``lin`` (7, 7) + (7,), ``norm`` (7,) + (7,): as an FSDP1 unit, its FlatParameter's
    ``_fqns`` are the same in every such block."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(7, 7)
        self.norm = nn.LayerNorm(7)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(torch.tanh(self.lin(x)))


class DNet(nn.Module):
    """Three bias-free Linears, ``a`` and ``c`` both (6, 5): same-shape tensors under ZeRO."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6, bias=False)  # (6, 5)
        self.b = nn.Linear(6, 6, bias=False)
        self.c = nn.Linear(5, 6, bias=False)  # (6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x))) + torch.sin(self.c(x))


# ----------------------------------------------------------------- checkpoints (ckpt_durability_worker.py)


class PoolNet(nn.Module):
    """``a`` (8, 4), ``b`` (3, 8) and ``pool`` (2, 8), seeded by ``seed``; the forward is a
    loss, and ``pool`` takes part only with ``use_pool`` (an unused parameter before)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)
        self.pool = nn.Linear(8, 2)

    def forward(self, x: Tensor, use_pool: bool) -> Tensor:
        h = torch.tanh(self.a(x))
        out = self.b(h).pow(2).mean()
        return out + self.pool(h).pow(2).mean() if use_pool else out
