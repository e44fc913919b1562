#!/usr/bin/env python
"""The optimizer step under ZeRO-Offload / FSDP2 CPU offload: one fp32 partition on the CPU.

    nice -n 10 python benchmarks/offload_cpu_step.py                   # 10M and 50M elements
    nice -n 10 python benchmarks/offload_cpu_step.py --sizes 100 --reps 5

Under ``offload_optimizer.device="cpu"`` DeepSpeed hands the optimizer one flat fp32
partition per param group on the host (with its flat fp32 gradient) and steps it there;
FSDP2's ``CPUOffloadPolicy`` does the same with the local shards. This times that step, side
by side in one run, interleaved rep by rep (medians), on the same partition size:

* ``CAdamW cpu``: ``dist_cautious.CAdamW`` (``backend="auto"`` = the fused CPU kernel,
  ``dist_cautious.kernels.cpu_fused``), the whole optimizer step (plan, count pass, factors,
  update pass) on the flat buffer registered as a ZeRO-style ``FlatLayout`` whose
  fragments are the tensors of LLaMA-60M (cut in sequence, the last one straddling the
  partition's end): one factor per fragment, as under ZeRO;
* ``CAdamW foreach``: the same with ``backend="foreach"`` (the CPU default before);
* ``DeepSpeedCPUAdam``: DeepSpeed's AVX C++ Adam (``adamw_mode=True``), what ZeRO-Offload
  users run (JIT-builds ``cpu_adam`` on first use: a minute or more);
* ``torch AdamW fused``: ``torch.optim.AdamW(fused=True)`` on the CPU.

Each reports the median step time, elements per second and its ratio to DeepSpeedCPUAdam.
All use ``torch.get_num_threads()`` threads (OpenMP for the C kernels; ``--threads``).
Writes ``benchmarks/results/offload_cpu_step_<date>.{json,md}`` (``--out`` to change). A CPU
figure: it says nothing about GPU steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _shapes_60m() -> list[int]:
    """Element counts of the LLaMA-60M tensors (launch/model.py's paper shape), in order."""
    h, i, v, layers = 512, 1376, 32000, 8
    out = [v * h]
    for _ in range(layers):
        out += [h * h] * 4 + [h * i] * 3 + [h, h]
    return out + [h, v * h]


def fragments(n: int):
    """ZeRO-style fragments of a partition of ``n`` elements: the 60M tensors in sequence,
    repeated as needed, the last one cut at the partition's end."""
    from dist_cautious.flat import Fragment

    frags, off, k = [], 0, 0
    shapes = _shapes_60m()
    while off < n:
        numel = shapes[k % len(shapes)]
        ln = min(numel, n - off)
        frags.append(Fragment(k, numel, 0, off, ln))
        off += ln
        k += 1
    return frags


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        info["logical_cpus"] = len(names) or os.cpu_count()
    except OSError:
        info["cpu"], info["logical_cpus"] = platform.processor(), os.cpu_count()
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 50], help="millions")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument(
        "--foreach-max",
        type=float,
        default=10,
        help="millions: time CAdamW foreach only up to this size (it is slow)",
    )
    ap.add_argument("--out", default=None, help="results path stem (default: dated)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch

    torch.set_num_threads(args.threads)
    from dist_cautious import CAdamW
    from dist_cautious.flat import FlatLayout
    from dist_cautious.kernels import cpu_fused

    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    info = machine()
    info["threads"] = args.threads
    info["torch"] = torch.__version__
    from portable import portable

    info["cpu_kernel"] = portable(cpu_fused.describe())
    ds_adam = None
    if not args.no_deepspeed:
        import deepspeed
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        info["deepspeed"] = deepspeed.__version__
        t0 = time.perf_counter()
        ds_adam = DeepSpeedCPUAdam
        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(8))])  # builds / loads cpu_adam
        info["deepspeed_cpu_adam_load_s"] = round(time.perf_counter() - t0, 1)

    results = []
    for size in args.sizes:
        n = int(size * 1e6)
        gen = torch.Generator().manual_seed(0)
        p0 = torch.randn(n, generator=gen)
        grads = [torch.randn(n, generator=gen) for _ in range(2)]  # two alternating grads
        opts = {}

        backends = [("CAdamW cpu", "auto")]
        if size <= args.foreach_max:
            backends.append(("CAdamW foreach", "foreach"))
        for name, backend in backends:
            flat = torch.nn.Parameter(p0.clone())
            opt = CAdamW([flat], backend=backend, **hyper)
            opt.register_layout(flat, FlatLayout(fragments(n), None, n, f"{size:g}M partition"))
            opts[name] = (flat, opt)
        if ds_adam is not None:
            p = torch.nn.Parameter(p0.clone())
            opts["DeepSpeedCPUAdam"] = (p, ds_adam([p], adamw_mode=True, **hyper))
        p = torch.nn.Parameter(p0.clone())
        opts["torch AdamW fused"] = (p, torch.optim.AdamW([p], fused=True, **hyper))
        times: dict[str, list[float]] = {k: [] for k in opts}
        for rep in range(args.warmup + args.reps):
            for name, (param, opt) in opts.items():  # interleaved: same load for all
                param.grad = grads[rep % 2]
                t0 = time.perf_counter()
                opt.step()
                dt = time.perf_counter() - t0
                if rep >= args.warmup:
                    times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        anchor = med.get("DeepSpeedCPUAdam")
        for name in opts:
            results.append(
                {
                    "elements": n,
                    "fragments": len(fragments(n)) if name.startswith("CAdamW") else 1,
                    "optimizer": name,
                    "median_ms": round(med[name] * 1e3, 2),
                    "min_vs_DeepSpeedCPUAdam": round(
                        min(times[name]) / min(times["DeepSpeedCPUAdam"]), 3
                    )
                    if anchor
                    else None,
                    "min_ms": round(min(times[name]) * 1e3, 2),
                    "max_ms": round(max(times[name]) * 1e3, 2),
                    "elements_per_s": round(n / med[name]),
                    "vs_DeepSpeedCPUAdam": round(med[name] / anchor, 3) if anchor else None,
                }
            )
            print(
                f"{n / 1e6:6.1f}M  {name:18s} {med[name] * 1e3:9.1f} ms  "
                f"{n / med[name] / 1e6:8.1f} M elem/s"
                + (f"  {med[name] / anchor:5.2f}x DeepSpeedCPUAdam" if anchor else ""),
                flush=True,
            )
        del opts, grads, p0
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    date = datetime.date.today().isoformat()
    stem = (
        Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"offload_cpu_step_{date}"
    )
    command = portable("python benchmarks/offload_cpu_step.py " + " ".join(sys.argv[1:]))
    doc = {"date": date, "command": command.strip(), "machine": info, "results": results}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        f"# Optimizer step on one fp32 CPU partition (ZeRO-Offload / CPU offload), {date}",
        "",
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {args.threads} threads "
        f"(shared machine: load average {info.get('loadavg_start')} at start, "
        f"{info.get('loadavg_end')} at end). CPU only: says nothing about GPU steps.",
        f"torch {info['torch']}, DeepSpeed {info.get('deepspeed', '-')}; "
        f"{args.reps} interleaved reps after {args.warmup} warm-up, medians. "
        "C-AdamW steps the partition as ZeRO does: one factor per fragment (LLaMA-60M tensors).",
        "",
        f"Command: `{command.strip()}`",
        "",
        "| elements | optimizer | median step | elements/s (median) | vs DeepSpeedCPUAdam "
        "(medians) | fastest step | vs DeepSpeedCPUAdam (fastest steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['vs_DeepSpeedCPUAdam']:.2f}x" if r["vs_DeepSpeedCPUAdam"] else "-"
        rmin = f"{r['min_vs_DeepSpeedCPUAdam']:.2f}x" if r["min_vs_DeepSpeedCPUAdam"] else "-"
        lines.append(
            f"| {r['elements'] / 1e6:g}M | {r['optimizer']} | {r['median_ms']:.1f} ms | "
            f"{r['elements_per_s'] / 1e6:.0f}M | {ratio} | {r['min_ms']:.1f} ms | {rmin} |"
        )
    lines += [
        "",
        "The fastest of the interleaved steps is the one least disturbed by the other "
        "processes of a shared machine; the medians include their load.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(
        f"wrote {stem.with_suffix('.md').relative_to(ROOT) if stem.is_relative_to(ROOT) else stem}"
    )


if __name__ == "__main__":
    main()
