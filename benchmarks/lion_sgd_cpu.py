#!/usr/bin/env python
"""CPU step time of the C-SGD and C-Lion kernels (foreach backend) against plain optimizers.

    python benchmarks/lion_sgd_cpu.py            # ~5M parameters, 15 interleaved reps
    python benchmarks/lion_sgd_cpu.py --reps 5

Times one step (count pass, factor, update pass, as the optimizer calls them) of the
``foreach`` kernels of :mod:`dist_cautious.kernels.sgd` and :mod:`dist_cautious.kernels.lion`
on fixed fp32 tensors of LLaMA-60M-like shapes (hidden 512, intermediate 1376), next to
``torch.optim.SGD(momentum=0.9, foreach=True)`` and a plain foreach Lion written as timm's
multi-tensor Lion (it allocates its temporaries). Interleaved rep by rep; medians. A CPU
figure: it says nothing about GPU times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dist_cautious.kernels import lion, sgd
from dist_cautious.kernels.common import LionHyper, SGDHyper, cautious_factor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = [(512, 512)] * 8 + [(512, 1376)] * 4 + [(512,)] * 8
    ps = [torch.randn(s) for s in shapes]
    gs = [torch.randn(s) for s in shapes]
    numels = torch.tensor([p.numel() for p in ps])
    bufs = [torch.randn(s) * 0.1 for s in shapes]
    ms = [torch.randn(s) * 0.1 for s in shapes]
    tp = [torch.nn.Parameter(p.clone()) for p in ps]
    for p, g in zip(tp, gs):
        p.grad = g
    torch_sgd = torch.optim.SGD(tp, lr=1e-3, momentum=0.9, foreach=True)
    hs = SGDHyper(1e-3, 0.9, 0.0, False, 0.0, first_step=False)
    hl = LionHyper(1e-4, 0.9, 0.99, 0.0)

    def csgd() -> None:
        sc: dict = {}
        c = sgd.foreach.count_pass(ps, gs, (bufs,), hs, sc)
        a = cautious_factor(c, numels, "clamp", 1e-3)
        sgd.foreach.update_pass(ps, gs, (bufs,), a, hs, sc)

    def clion() -> None:
        sc: dict = {}
        c = lion.foreach.count_pass(ps, gs, (ms,), hl, sc)
        lion.foreach.update_pass(ps, gs, (ms,), cautious_factor(c, numels, "clamp", 1e-3), hl, sc)

    def plain_lion() -> None:
        u = torch._foreach_mul(ms, 0.9)
        torch._foreach_add_(u, gs, alpha=0.1)
        torch._foreach_sign_(u)
        torch._foreach_add_(ps, u, alpha=-1e-4)
        torch._foreach_mul_(ms, 0.99)
        torch._foreach_add_(ms, gs, alpha=0.01)

    fns = {
        "torch SGD foreach (momentum)": torch_sgd.step,
        "C-SGD foreach": csgd,
        "plain Lion foreach (timm-style)": plain_lion,
        "C-Lion foreach": clion,
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(args.reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{int(numels.sum())} fp32 parameters, {len(shapes)} tensors, "
          f"{torch.get_num_threads()} threads, medians of {args.reps}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:34s} {v:8.2f} ms")
    print(f"  C-SGD / torch SGD: {med['C-SGD foreach'] / med['torch SGD foreach (momentum)']:.2f}x")
    print(
        f"  C-Lion / plain Lion: {med['C-Lion foreach'] / med['plain Lion foreach (timm-style)']:.2f}x"
    )


if __name__ == "__main__":
    main()
