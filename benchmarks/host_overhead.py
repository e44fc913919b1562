#!/usr/bin/env python
"""Host cost of one optimizer step: ``opt.step()`` on many tiny tensors, one CPU thread.

    nice -n 10 python benchmarks/host_overhead.py                 # single process, 75 and 219 tensors
    nice -n 10 python benchmarks/host_overhead.py --dist          # + FSDP2 / FSDP1 on 2 gloo ranks
    python benchmarks/host_overhead.py --counts 75 --rounds 5 --no-compile   # quick

Every tensor has 64 elements, so the arithmetic is negligible and what is measured is the
Python / dispatcher work per step: the LLaMA-60M and LLaMA-1B tensor counts (75 and 219,
``launch/model.py`` shapes with untied embeddings) are the numbers of tensors a rank steps.
Variants, each on its own copy of the same parameters with fixed gradients:

* ``cadamw`` / ``clion`` / ``csgd``: the planned eager step (CPU default: foreach backend);
* ``cadamw_capturable``: the eager device-scalar step (``capturable=True``);
* ``*_compiled``: ``torch.compile(opt.step, fullgraph=True)`` (the device-scalar step);
* ``adamw_foreach`` / ``adamw_fused`` / ``adamw_compiled``: ``torch.optim.AdamW``
  (``foreach=True``, ``fused=True``, and ``torch.compile`` of its foreach step).

``torch.set_num_threads(1)``; warm-up steps (compiles) first; then ``--rounds`` rounds, each
timing ``--steps`` consecutive steps of every variant, the variants' order rotating from
round to round (interleaved); the per-step time of a round is its mean; the table shows the
median over rounds, in microseconds, and ratios taken within the same run.

``--dist`` adds the sharded paths on 2 ranks (torchrun, gloo, CPU): a module of the same tiny
tensors under FSDP2 (``fully_shard``: DTensor shards of 32 elements) and FSDP1
(``FullyShardedDataParallel``, one flat parameter), gradients from one backward pass, then
timed ``opt.step()`` calls, each after a barrier; a round's time is the slower rank's.

Results: ``benchmarks/results/host_overhead_cpu_<date>.{md,json}``. CPU host time on a shared
machine: the ratios are the result; absolute times move with the load (recorded).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
NUMEL = 64
COUNTS = {75: "LLaMA-60M", 219: "LLaMA-1B"}

SINGLE = (
    "cadamw",
    "cadamw_capturable",
    "clion",
    "csgd",
    "adamw_foreach",
    "adamw_fused",
    "cadamw_compiled",
    "clion_compiled",
    "csgd_compiled",
    "adamw_compiled",
)
DIST = ("cadamw_fsdp2", "adamw_fsdp2", "cadamw_fsdp1", "adamw_fsdp1")


def make_params(n: int, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(NUMEL, generator=g)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(NUMEL, generator=g)
    return ps


def make_step(name: str, n: int) -> Callable[[], object]:
    from dist_cautious import CSGD, CAdamW, CLion

    ps = make_params(n)
    base = name.replace("_compiled", "")
    if base == "cadamw":
        opt = CAdamW(ps, lr=1e-3, weight_decay=0.1)
    elif base == "cadamw_capturable":
        opt = CAdamW(ps, lr=1e-3, weight_decay=0.1)
        for g in opt.param_groups:
            g["capturable"] = True
    elif base == "clion":
        opt = CLion(ps, lr=1e-4, weight_decay=0.1)
    elif base == "csgd":
        opt = CSGD(ps, lr=1e-3, momentum=0.9)
    elif base == "adamw_foreach":
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True)
    elif base == "adamw_fused":
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True)
    elif base == "adamw":
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True)
    else:
        raise ValueError(name)
    if name.endswith("_compiled"):
        return torch.compile(opt.step, fullgraph=base != "adamw")
    return opt.step


def time_rounds(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    per_round: int,
    sync: Callable[[], None] | None = None,
    reduce: Callable[[float], float] | None = None,
) -> dict[str, list[float]]:
    names = list(steps)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            fn = steps[k]
            total = 0.0
            for _ in range(per_round):
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                fn()
                total += time.perf_counter() - t0
            us = total / per_round * 1e6
            out[k].append(reduce(us) if reduce is not None else us)
    return out


def single(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    variants = [v for v in SINGLE if args.compile or not v.endswith("_compiled")]
    if args.only:
        variants = [v for v in variants if v in args.only.split(",")]
    table = {}
    for n in args.counts:
        steps = {}
        compile_s = {}
        for v in variants:
            fn = make_step(v, n)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                fn()
            compile_s[v] = round(time.perf_counter() - t0, 2)
            steps[v] = fn
        times = time_rounds(steps, args.rounds, args.steps)
        table[n] = {
            "median_us": {k: statistics.median(v) for k, v in times.items()},
            "rounds_us": times,
            "warmup_s": compile_s,
        }
        print(f"{n} tensors:", {k: round(statistics.median(v), 1) for k, v in times.items()})
        torch._dynamo.reset()
    return table


# --------------------------------------------------------------------------- dist


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch import nn

    from dist_cautious import CAdamW

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}

    class Tiny(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.ws = nn.ParameterList(
                [nn.Parameter(torch.randn(NUMEL, generator=g)) for _ in range(n)]
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum((w * x).sum() for w in self.ws)

    def build(kind: str, n: int) -> Callable[[], object]:
        model = Tiny(n)
        if kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            model = FSDP(model, device_id=torch.device("cpu"))
        model(torch.randn(NUMEL)).backward()
        return model

    keep: list = []
    for n in args.counts:
        steps = {}
        for v in DIST:
            opt_name, kind = v.split("_")
            model = build(kind, n)
            keep.append(model)  # FSDP1 parameters need their live module (handles)
            params = list(model.parameters())
            if opt_name == "cadamw":
                opt = CAdamW(params, lr=1e-3, weight_decay=0.1)
            else:
                opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)
            for _ in range(args.warmup):
                opt.step()
            steps[v] = opt.step

        def slowest(us: float) -> float:
            t = torch.tensor([us])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return float(t.item())

        times = time_rounds(steps, args.rounds, args.steps, sync=dist.barrier, reduce=slowest)
        result[n] = {
            "median_us": {k: statistics.median(v) for k, v in times.items()},
            "rounds_us": times,
        }
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_dist(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dist.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(Path(__file__).resolve()),
            "--worker-out",
            str(out),
            "--counts",
            *map(str, args.counts),
            "--rounds",
            str(args.rounds),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        raw = json.loads(out.read_text())
    return {int(k): v for k, v in raw.items()}


# --------------------------------------------------------------------------- report


RATIOS = [
    ("cadamw", "adamw_foreach", "CAdamW eager / AdamW foreach (goal <= 1.0)"),
    ("cadamw", "adamw_fused", "CAdamW eager / AdamW fused"),
    ("cadamw_capturable", "adamw_foreach", "CAdamW capturable eager / AdamW foreach"),
    ("clion", "adamw_foreach", "CLion eager / AdamW foreach"),
    ("csgd", "adamw_foreach", "CSGD eager / AdamW foreach"),
    ("cadamw_compiled", "adamw_compiled", "CAdamW compiled / AdamW compiled (goal <= 1.2)"),
    ("clion_compiled", "adamw_compiled", "CLion compiled / AdamW compiled"),
    ("csgd_compiled", "adamw_compiled", "CSGD compiled / AdamW compiled"),
    ("cadamw_compiled", "cadamw", "CAdamW compiled / CAdamW eager"),
    ("cadamw_fsdp2", "adamw_fsdp2", "FSDP2 x2: CAdamW / AdamW foreach"),
    ("cadamw_fsdp1", "adamw_fsdp1", "FSDP1 x2: CAdamW / AdamW foreach"),
]


def report(args: argparse.Namespace, single_t: dict, dist_t: dict, load: tuple) -> None:
    date = _dt.datetime.now(_dt.timezone.utc)
    stamp = date.strftime("%Y-%m-%d")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"torch {torch.__version__}; 1 thread per process"
    )
    command = "python benchmarks/host_overhead.py " + " ".join(sys.argv[1:])
    data = {
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "command": command.strip(),
        "load_before_after": load,
        "numel_per_tensor": NUMEL,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "single_process": single_t,
        "dist_2_ranks": dist_t,
    }
    counts = sorted(set(single_t) | set(dist_t))
    lines = [
        "# Host overhead of one optimizer step (CPU, tiny tensors, median us per step)",
        "",
        f"- date: {data['date']}; machine: {machine}",
        f"- load average (1/5/15 min) before: {load[0]}, after: {load[1]} (a shared host)",
        f"- command: `{data['command']}`",
        f"- {NUMEL} elements per tensor (pure host cost); {args.rounds} interleaved rounds of "
        f"{args.steps} steps; median of the per-round means. CPU host time, not GPU step time.",
        "",
        "| variant | " + " | ".join(f"{n} tensors ({COUNTS.get(n, '')})" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    names = [*SINGLE, *DIST]
    for v in names:
        vals = []
        for n in counts:
            t = {
                **single_t.get(n, {}).get("median_us", {}),
                **dist_t.get(n, {}).get("median_us", {}),
            }
            vals.append(f"{t[v]:.0f}" if v in t else "-")
        if any(x != "-" for x in vals):
            lines.append(f"| {v} | " + " | ".join(vals) + " |")
    lines += ["", "| ratio | " + " | ".join(f"{n} tensors" for n in counts) + " |"]
    lines.append("|---|" + "---|" * len(counts))
    ratios = {}
    for a, b, label in RATIOS:
        vals = []
        for n in counts:
            t = {
                **single_t.get(n, {}).get("median_us", {}),
                **dist_t.get(n, {}).get("median_us", {}),
            }
            if a in t and b in t:
                r = t[a] / t[b]
                ratios.setdefault(label, {})[n] = r
                vals.append(f"{r:.2f}x")
            else:
                vals.append("-")
        if any(x != "-" for x in vals):
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
    data["ratios"] = ratios
    # the least-disturbed round of each variant: on a loaded shared host a round's mean
    # can be inflated several-fold by other processes, its minimum much less
    mins = {n: {k: min(v) for k, v in single_t[n]["rounds_us"].items()} for n in single_t}
    min_lines, min_ratios = [], {}
    for a, b, label in RATIOS:
        vals = []
        for n in counts:
            t = mins.get(n, {})
            if a in t and b in t:
                min_ratios.setdefault(label, {})[n] = t[a] / t[b]
                vals.append(f"{t[a]:.0f} / {t[b]:.0f} ({t[a] / t[b]:.2f}x)")
            else:
                vals.append("-")
        if any(x != "-" for x in vals):
            min_lines.append(f"| {label} | " + " | ".join(vals) + " |")
    data["ratios_of_round_minima"] = min_ratios
    if min_lines:
        lines += [
            "",
            "Minimum over rounds (us per step; the least-disturbed round of each variant):",
            "",
            "| ratio of minima | " + " | ".join(f"{n} tensors" for n in counts) + " |",
            "|---|" + "---|" * len(counts),
            *min_lines,
        ]
    if single_t:
        lines += [
            "",
            "Warm-up time (s, includes compiles): "
            + "; ".join(
                f"{n} tensors: " + ", ".join(f"{k} {v}" for k, v in single_t[n]["warmup_s"].items())
                for n in single_t
            ),
        ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"host_overhead_cpu_{stamp}{args.suffix}"
    base.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {base.relative_to(ROOT)}.md/.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[75, 219])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="steps timed per variant per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--only", default="", help="comma-separated single-process variants")
    ap.add_argument("--dist", action="store_true", help="also FSDP2 / FSDP1 on 2 gloo ranks")
    ap.add_argument("--dist-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--suffix", default="", help="appended to the results file name")
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        worker(args)
        return
    load0 = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    single_t = {} if args.dist_only else single(args)
    dist_t = run_dist(args) if (args.dist or args.dist_only) else {}
    load1 = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    report(args, single_t, dist_t, (load0, load1))


if __name__ == "__main__":
    main()
