"""CPU time of the lagged C-AdamW step (``factor_lag=1``): one pass against the two passes.

With the factors known before the step (the previous step's), ``one_pass`` counts the mask
and applies the update in one sweep: the C kernel (``cpu_fused``) reads p, g, m, v once and
writes p, m, v (28 B per fp32 element) where count pass + update pass move 12 + 24 = 36 B
in two sweeps; ``foreach`` runs its two passes' torch ops back to back (no fewer sweeps).
Times each backend's ``one_pass`` and ``count_pass`` + ``update_pass`` on the same fp32
tensors (one LLaMA-60M block's tensor sizes repeated up to ``--numel``), interleaved rep by
rep, medians. A CPU figure: nothing here ran on a GPU. (On the 2-core container this was
written on, step times came in multiples of about 4 ms, a scheduler quantum: use tens of
millions of elements.)

    nice -n 10 python benchmarks/one_pass_cpu.py --numel 50000000 --reps 7
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_cautious.kernels import UpdateHyper, cpu_fused, foreach  # noqa: E402

H = UpdateHyper(lr=1e-3, beta2=0.999, eps=1e-8, weight_decay=0.1, step=10, beta1=0.9)


def _sizes(total: int) -> list[int]:
    # the sizes of one LLaMA-60M block (attention, MLP, norm), repeated up to total
    base = [512 * 512] * 4 + [512 * 1376] * 3 + [512]
    out, n = [], 0
    while n < total:
        s = min(base[len(out) % len(base)], total - n)
        out.append(s)
        n += s
    return out


def _tensors(sizes: list[int]) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(s, generator=g) for s in sizes]
    gr = [torch.randn(s, generator=g) for s in sizes]
    m = [torch.randn(s, generator=g) * 0.1 for s in sizes]
    v = [torch.rand(s, generator=g) * 0.01 for s in sizes]
    return [p, gr, m, v]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    sizes = _sizes(a.numel)
    ts = _tensors(sizes)
    alphas = torch.ones(len(sizes))
    mods = [("foreach", foreach)] + ([("cpu", cpu_fused)] if cpu_fused.available() else [])

    def two(mod):
        sc: dict = {}
        mod.count_pass(ts[1], ts[2], H.beta1, False, scratch=sc)
        mod.update_pass(*ts, alphas, H, scratch=sc)

    def one(mod):
        mod.one_pass(*ts, alphas, H, scratch={})

    runs = [
        (f"{name} {kind}", fn, mod)
        for name, mod in mods
        for kind, fn in (("two", two), ("one", one))
    ]
    for _, fn, mod in runs:  # warm up (scratch buffers, the kernel build)
        fn(mod)
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for _ in range(a.reps):
        for label, fn, mod in runs:
            t0 = time.perf_counter()
            fn(mod)
            times[label].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    meta = {
        "date": date,
        "command": "nice -n 10 python benchmarks/one_pass_cpu.py "
        + " ".join(x for x in sys.argv[1:] if not os.path.isabs(x)),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.processor() or '?'}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numel": a.numel,
        "tensors": len(sizes),
        "reps": a.reps,
        "load_average": os.getloadavg(),
    }
    lines = [
        f"# Lagged C-AdamW step on CPU: one pass vs two passes, {date}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, {meta['threads']} torch threads, torch {meta['torch']}; "
        f"load average {', '.join(f'{x:.1f}' for x in meta['load_average'])} (shared machine: "
        "single runs move by tens of percent). A CPU figure, not a GPU one.  ",
        f"{a.numel:,} fp32 elements in {len(sizes)} tensors; interleaved, {a.reps} reps, "
        "median (fastest).",
        "",
        "| backend | two passes (count + update) | one pass | one / two | bytes per element |",
        "|---|---|---|---|---|",
    ]
    for name, _ in mods:
        t2, t1 = med[f"{name} two"], med[f"{name} one"]
        b2, b1 = best[f"{name} two"], best[f"{name} one"]
        nbytes = "36 -> 28" if name == "cpu" else "same torch ops"
        lines.append(
            f"| {name} | {t2 * 1e3:.1f} ms ({b2 * 1e3:.1f}) | {t1 * 1e3:.1f} ms ({b1 * 1e3:.1f}) "
            f"| {t1 / t2:.2f}x | {nbytes} |"
        )
    doc = {"meta": meta, "median_s": med, "fastest_s": best, "times_s": times}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"one_pass_cpu_{date}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"one_pass_cpu_{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
