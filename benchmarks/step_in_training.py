"""Optimizer-step time inside a real training loop (forward/backward between steps), one GPU.

Complements benchmarks/kernel.py (which times back-to-back steps on fixed gradients): here
gradients are fresh every step, the step is bracketed by synchronisations, and we count how
often CAdamW had to rebuild its step plan.

    PYTHONPATH=.:launch python benchmarks/step_in_training.py --preset 60m
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from model import build_model, lm_loss, param_groups, preset  # launch/model.py

import dist_cautious.plan as plan_mod
from dist_cautious import CAdamW


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="60m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument(
        "--profile", action="store_true", help="cProfile + torch.profiler of CAdamW steps"
    )
    a = ap.parse_args()
    dev = torch.device("cuda")
    cfg = preset(a.preset)
    rebuilt = [0]
    orig = plan_mod.build

    def counting(opt):  # type: ignore[no-untyped-def]
        rebuilt[0] += 1
        return orig(opt)

    plan_mod.build = counting  # the optimizer calls plan.build through the module
    for name in ("adamw-fused", "cadamw"):
        model = build_model(cfg, seed=0, device=dev)
        groups = param_groups(model, 0.1)
        opt = (
            torch.optim.AdamW(groups, lr=1e-3, fused=True)
            if name == "adamw-fused"
            else CAdamW(groups, lr=1e-3)
        )
        times = []
        host = []
        rebuilt[0] = 0
        g = torch.Generator(device=dev).manual_seed(0)
        for k in range(a.steps):
            tok = torch.randint(0, cfg.vocab, (a.batch, a.seq_len + 1), device=dev, generator=g)
            loss = lm_loss(model(tok[:, :-1]), tok[:, 1:])
            loss.backward()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if a.profile and name == "cadamw" and k == a.steps - 3:
                import cProfile
                import pstats

                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    pr = cProfile.Profile()
                    pr.enable()
                    opt.step()
                    pr.disable()
                    torch.cuda.synchronize()
                pstats.Stats(pr).sort_stats("cumtime").print_stats(18)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
            else:
                opt.step()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if k >= 5:
                times.append((time.perf_counter() - t0) * 1e3)
                host.append((t1 - t0) * 1e3)
            opt.zero_grad(set_to_none=True)
        print(
            f"{a.preset} {name:12s} step median {statistics.median(times):.3f} ms "
            f"(host-synchronised; host time in step() {statistics.median(host):.3f} ms), plan rebuilds {rebuilt[0] if name == 'cadamw' else '-'}"
        )


if __name__ == "__main__":
    main()
