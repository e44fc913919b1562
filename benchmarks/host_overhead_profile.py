"""Where the compiled step's host time goes: ``torch.compile(opt.step)`` on many tiny tensors.

    nice -n 5 python benchmarks/host_overhead_profile.py                    # 219 tensors
    python benchmarks/host_overhead_profile.py --count 75 --only cadamw_compiled,adamw_compiled

The same steps as ``benchmarks/host_overhead.py`` (its ``make_step``: 64 elements per tensor,
one thread), split into what a compiled call does on the host:

* dynamo's guards: every cache entry on the code object that ``torch.compile(opt.step)``
  compiles (torch's ``Optimizer.profile_hook_step`` wrapper, one code object for every
  optimizer class), each entry's ``guard_manager.check`` timed on each optimizer's frame
  locals (the entry that matches, and how fast the others fail);
* inductor's generated wrapper (``call``): timed by wrapping the compiled graph's callable,
  interleaved with the whole step; and its shape, read from the generated source: kernel
  calls, kernel arguments, per-call buffer allocations (``empty_strided_cpu``), ``del``s;
* the cost of the allocations alone: ``count`` calls of ``empty_strided_cpu((), (), int64)``.

Results: ``benchmarks/results/host_overhead_profile_cpu_<date>.{md,json}``. CPU host time on a
shared machine: minimum and median over rounds are both given (the minimum is the least
disturbed by other processes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import host_overhead as ho  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def wrapper_shape(src: str) -> dict:
    """Kernel calls, their arguments, allocations and ``del``s of the generated ``call``."""
    i = src.rfind("def call(")
    body = src[i:].split("\n")[1:]
    shape = dict(kernels=0, kernel_args=0, empty_strided=0, reinterpret=0, dels=0)
    for line in body:
        s = line.strip()
        if s.startswith("return"):
            break
        if s.startswith("cpp_fused") or re.match(r"\w+\.run\(", s):
            shape["kernels"] += 1
            shape["kernel_args"] += s.count(",") + 1
        shape["empty_strided"] += s.count("empty_strided")
        shape["reinterpret"] += s.count("reinterpret_tensor(")
        shape["dels"] += s.startswith("del ")
    return shape


def guard_checks(fn) -> list[dict]:
    """Each dynamo cache entry on ``fn``'s code object, checked against ``fn``'s frame."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    opt = fn.__wrapped__.__self__
    w = type(opt).step
    frame = {"args": (opt,), "kwargs": {}}
    for name, cell in zip(w.__code__.co_freevars, w.__closure__ or ()):
        frame[name] = cell.cell_contents
    out = []
    for e in _debug_get_cache_entry_list(w.__code__):
        ts = []
        for _ in range(200):
            t0 = time.perf_counter_ns()
            ok = e.guard_manager.check(frame)
            ts.append(time.perf_counter_ns() - t0)
        out.append(
            dict(matches=bool(ok), min_us=min(ts) / 1e3, median_us=statistics.median(ts) / 1e3)
        )
    if isinstance(opt, torch.optim.Adam):  # its graph breaks in the wrapper: adam.step's frame
        import inspect

        with torch.no_grad():  # as torch's _use_grad enters that frame
            for e in _debug_get_cache_entry_list(inspect.unwrap(torch.optim.Adam.step).__code__):
                ts = []
                for _ in range(200):
                    t0 = time.perf_counter_ns()
                    ok = e.guard_manager.check({"self": opt, "closure": None})
                    ts.append(time.perf_counter_ns() - t0)
                out.append(
                    dict(
                        matches=bool(ok),
                        min_us=min(ts) / 1e3,
                        median_us=statistics.median(ts) / 1e3,
                        frame="adam.step",
                    )
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=219)
    ap.add_argument("--only", default="cadamw_compiled,clion_compiled,csgd_compiled,adamw_compiled")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--suffix", default="")
    args = ap.parse_args()
    from torch._C._dynamo.guards import _empty_strided_cpu

    torch.set_num_threads(1)
    load0 = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    n = args.count
    names = args.only.split(",")
    steps, shapes, calls = {}, {}, {}
    for v in names:
        fn = ho.make_step(v, n)
        before = {id(o) for o in gc.get_objects() if type(o).__name__ == "CompiledFxGraph"}
        fn()  # the first call compiles
        fn()
        graphs = [
            o
            for o in gc.get_objects()
            if type(o).__name__ == "CompiledFxGraph" and id(o) not in before
        ]
        codes = [getattr(g, "source_code", None) or "" for g in graphs]
        shapes[v] = [wrapper_shape(c) for c in codes if "def call(" in c]
        calls[v] = []
        for g in graphs:  # time inductor's call() inside every step

            def timed(inputs, inner=g.current_callable, acc=calls[v]):
                t0 = time.perf_counter_ns()
                r = inner(inputs)
                acc.append(time.perf_counter_ns() - t0)
                return r

            g.current_callable = timed
        steps[v] = fn
        print(v, "wrapper:", shapes[v], flush=True)
    for v in names:
        calls[v].clear()
    t = ho.time_rounds(steps, args.rounds, args.steps)
    per = args.rounds * args.steps
    timing = {}
    for v in names:
        c = calls[v]
        k = len(c) // per or 1  # graphs per step
        sums = [sum(c[i : i + k]) / 1e3 for i in range(0, len(c) - k + 1, k)]
        # per round: mean of its steps (as the step time), then min / median over rounds
        rounds = [
            statistics.fmean(sums[r * args.steps : (r + 1) * args.steps])
            for r in range(args.rounds)
        ]
        timing[v] = dict(
            step_min_us=min(t[v]),
            step_median_us=statistics.median(t[v]),
            call_min_us=min(rounds) if sums else None,
            call_median_us=statistics.median(rounds) if sums else None,
        )
    alloc = []
    for _ in range(50):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            _empty_strided_cpu((), (), torch.int64)
        alloc.append(time.perf_counter_ns() - t0)
    guards = {v: guard_checks(steps[v]) for v in names}
    shared = len({id(type(steps[v].__wrapped__.__self__).step.__code__) for v in names})
    load1 = " / ".join(f"{x:.1f}" for x in os.getloadavg())

    date = _dt.datetime.now(_dt.timezone.utc)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"torch {torch.__version__}; 1 thread"
    )
    command = "python benchmarks/host_overhead_profile.py " + " ".join(sys.argv[1:])
    data = dict(
        date=date.strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine,
        command=command.strip(),
        load_before_after=(load0, load1),
        tensors=n,
        numel_per_tensor=ho.NUMEL,
        timing_us=timing,
        wrapper=shapes,
        guards=guards,
        step_code_objects=shared,
        empty_strided_cpu_x_count_us=dict(
            min=min(alloc) / 1e3, median=statistics.median(alloc) / 1e3
        ),
    )
    ref = timing.get("adamw_compiled")
    lines = [
        f"# Host time of the compiled step, split ({n} tensors of {ho.NUMEL} elements, CPU)",
        "",
        f"- date: {data['date']}; machine: {machine}",
        f"- load average (1/5/15 min) before: {load0}, after: {load1} (a shared host)",
        f"- command: `{data['command']}`",
        f"- {args.rounds} interleaved rounds of {args.steps} steps; per round the mean per step; "
        "min and median over rounds. CPU host time, not GPU step time.",
        "",
        "| variant | step min | step median | inductor call() min | call() median | step / AdamW (min) |",
        "|---|---|---|---|---|---|",
    ]
    for v in names:
        x = timing[v]
        r = f"{x['step_min_us'] / ref['step_min_us']:.2f}x" if ref else "-"
        lines.append(
            f"| {v} | {x['step_min_us']:.0f} | {x['step_median_us']:.0f} | "
            f"{x['call_min_us'] or 0:.0f} | {x['call_median_us'] or 0:.0f} | {r} |"
        )
    lines += [
        "",
        "| variant | kernels | kernel args | empty_strided | reinterpret_tensor | del |",
        "|---|---|---|---|---|---|",
    ]
    for v in names:
        for s in shapes[v]:
            lines.append(
                f"| {v} | {s['kernels']} | {s['kernel_args']} | {s['empty_strided']} | "
                f"{s['reinterpret']} | {s['dels']} |"
            )
    lines += [
        "",
        f"`{n} x empty_strided_cpu((), (), torch.int64)` alone: min "
        f"{min(alloc) / 1e3:.1f} us, median {statistics.median(alloc) / 1e3:.1f} us.",
        "",
        f"Dynamo cache entries on the compiled code object ({shared} code object(s) for "
        f"{len(names)} optimizers): per optimizer, each entry's guard check on its frame "
        "(matches, min us):",
        "",
    ]
    for v in names:
        es = ", ".join(
            f"{e.get('frame', 'step')}: {'match' if e['matches'] else 'fail'} {e['min_us']:.1f}"
            for e in guards[v]
        )
        lines.append(f"- {v}: {es}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"host_overhead_profile_cpu_{date.strftime('%Y-%m-%d')}{args.suffix}"
    base.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {base.relative_to(ROOT)}.md/.json")


if __name__ == "__main__":
    main()
