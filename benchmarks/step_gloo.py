#!/usr/bin/env python
"""CPU gloo optimizer-step time under FSDP2: CAdamW global vs shard vs the all-gather baseline.

    python benchmarks/step_gloo.py                     # worlds 2, 4, 8; a couple of minutes
    python benchmarks/step_gloo.py --worlds 2 --reps 5 # quicker

For each world size it launches itself under torchrun (gloo, CPU, one thread per rank),
shards a LLaMA-like set of parameters with ``fully_shard`` (one FSDP unit per layer), sets
fixed gradients, and times ``optimizer.step()`` for every mode on the same parameters,
interleaved rep by rep (modes rotate their order each rep), with a barrier before each step.
A step's time is the slowest rank's; the table shows the median over reps. Modes:

* ``global``: ``CAdamW(scale="global")``, exact per-tensor factor, one count all-reduce;
* ``shard``: ``CAdamW(scale="shard")``, local factor, no collective;
* ``allgather``: :class:`dist_cautious.baselines.AllGatherCAdamW`, the reference
  repository's DTensor path (two full-tensor all-gathers and a scatter per parameter);
* ``adamw``: ``torch.optim.AdamW(foreach=True)``, no mask at all (context);
* ``allreduce``: a bare ``dist.all_reduce`` of the count vector's size, alone (context:
  what the one collective of ``global`` costs on this host).

Results go to ``benchmarks/results/step_gloo_cpu.{json,md}``. These are CPU figures on an
oversubscribed host (up to 8 ranks on however many cores there are): they show how the
communication scales, not GPU step times.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("global", "shard", "allgather", "adamw", "allreduce")


def llama_shapes(dim: int, layers: int, ffn: int, vocab: int) -> list[list[tuple[int, ...]]]:
    """Parameter shapes per FSDP unit: [embedding], layers..., [final norm, lm_head]."""
    layer = [(dim, dim)] * 4 + [(ffn, dim), (ffn, dim), (dim, ffn), (dim,), (dim,)]
    return [[(vocab, dim)]] + [list(layer) for _ in range(layers)] + [[(dim,), (vocab, dim)]]


# ----------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from dist_cautious import CAdamW
    from dist_cautious.baselines import AllGatherCAdamW
    from dist_cautious.layout import SlotTable, TensorLayout

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    units = llama_shapes(args.dim, args.layers, args.ffn, args.vocab)
    gen = torch.Generator().manual_seed(0)
    root = nn.Module()
    root.units = nn.ModuleList()
    for shapes in units:
        u = nn.Module()
        u.ps = nn.ParameterList(
            [nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        )
        root.units.append(u)
    for u in root.units:
        fully_shard(u, mesh=mesh)
    fully_shard(root, mesh=mesh)
    params = list(root.parameters())
    numel = sum(p.numel() for p in params)
    for p in params:  # fixed gradients (a local chunk of a seeded full tensor, no comm)
        g = torch.randn(p.shape, generator=gen)
        p.grad = distribute_tensor(g, mesh, p.placements, src_data_rank=None)

    hyper = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    opts = {
        "global": CAdamW(params, scale="global", **hyper),
        "shard": CAdamW(params, scale="shard", **hyper),
        "allgather": AllGatherCAdamW(params, **hyper),
        "adamw": torch.optim.AdamW(params, foreach=True, **hyper),
    }
    # bytes each rank sends into the count all-reduce of one global step
    table = SlotTable()
    for p in params:
        TensorLayout().reserve(p, table)
    count_bytes = sum(2 * n * 8 for n in table.sizes.values())
    count_vec = torch.zeros(count_bytes // 8, dtype=torch.int64)

    class _BareAllReduce:
        def step(self) -> None:
            dist.all_reduce(count_vec)

    opts["allreduce"] = _BareAllReduce()  # type: ignore[assignment]
    modes = [m for m in MODES if m in args.modes]

    def timed(m: str) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        opts[m].step()
        dt = time.perf_counter() - t0
        t = torch.tensor([dt], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    for m in modes:  # warm-up: state allocation, first-step index caches
        for _ in range(args.warmup):
            timed(m)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.reps):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for m in order:
            times[m].append(timed(m))

    if rank == 0:
        out = {
            "world": world,
            "tensors": len(params),
            "numel": numel,
            "count_allreduce_bytes": count_bytes,
            # per step: full exp_avg and grad all-gathered (fp32), full mask scattered
            "allgather_bytes_per_step_full_tensors": 3 * 4 * numel,
            "median_ms": {m: 1e3 * statistics.median(v) for m, v in times.items()},
            "min_ms": {m: 1e3 * min(v) for m, v in times.items()},
            "reps": args.reps,
        }
        Path(args.out).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver


def launch(world: int, args: argparse.Namespace, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={world}", __file__, "--worker", "--out", str(out),
        "--dim", str(args.dim), "--layers", str(args.layers), "--ffn", str(args.ffn),
        "--vocab", str(args.vocab), "--reps", str(args.reps), "--warmup", str(args.warmup),
        "--modes", *args.modes,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"world {world} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    res = json.loads(out.read_text())
    res["launch_seconds"] = round(time.perf_counter() - t0, 1)
    return res


HEAD = {"adamw": "torch AdamW", "allreduce": "bare count all-reduce"}


def _fmt_load(x) -> str:
    return "/".join(f"{v:.1f}" for v in x)


def markdown(results: list[dict], meta: dict) -> str:
    modes = [m for m in MODES if m in results[0]["median_ms"]]
    r0 = results[0]
    lines = [
        "# Optimizer step under FSDP2, CPU gloo (median ms, slowest rank)",
        "",
        f"- date: {meta['date']}; host: {meta['host']}; torch {meta['torch']}",
        f"- load average (1/5/15 min) before: {_fmt_load(meta['loadavg_before'])}, after: "
        f"{_fmt_load(meta['loadavg_after'])} (other jobs on the host distort absolute times)",
        f"- command: `{meta['command']}`",
        f"- shapes: LLaMA-like dim={meta['dim']} layers={meta['layers']} ffn={meta['ffn']} "
        f"vocab={meta['vocab']}: {r0['tensors']} tensors, {r0['numel'] / 1e6:.2f} M params; "
        f"{r0['reps']} reps per mode, interleaved",
        f"- count all-reduce of `global`: {r0['count_allreduce_bytes']} bytes per rank per step "
        f"(2 int64 per sharded tensor); all-gather baseline: ~{r0['allgather_bytes_per_step_full_tensors'] / 1e6:.1f} MB "
        "of full fp32 tensors per step (exp_avg + grad gathered, mask scattered)",
        "- CPU figures on an oversubscribed host (ranks share the cores): they compare modes "
        "side by side; they are not GPU step times.",
        "",
        "| world | "
        + " | ".join(HEAD.get(m, m) for m in modes)
        + " | global / shard | allgather / global |",
        "|---|" + "---|" * (len(modes) + 2),
    ]
    for r in results:
        t = r["median_ms"]
        row = [f"{t[m]:.1f}" for m in modes]
        gs = t["global"] / t["shard"] if "global" in t and "shard" in t else float("nan")
        ag = t["allgather"] / t["global"] if "allgather" in t and "global" in t else float("nan")
        lines.append(f"| {r['world']} | " + " | ".join(row) + f" | {gs:.2f}x | {ag:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--tag", default="step_gloo_cpu", help="results file name (no extension)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__,
        "command": " ".join(["python benchmarks/step_gloo.py", *sys.argv[1:]]),
        "loadavg_before": os.getloadavg(),
        **{k: getattr(args, k) for k in ("dim", "layers", "ffn", "vocab", "reps", "worlds")},
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.worlds:
            results.append(launch(w, args, Path(tmp) / f"w{w}.json"))
            print(f"world {w}: " + ", ".join(f"{m} {t:.1f} ms" for m, t in results[-1]["median_ms"].items()),
                  f"({results[-1]['launch_seconds']} s)", flush=True)  # fmt: skip
    meta["loadavg_after"] = os.getloadavg()
    md = markdown(results, meta)
    print()
    print(md)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.tag}.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=1)
        )
        (RESULTS / f"{args.tag}.md").write_text(md)
        print(f"wrote {RESULTS / args.tag}.json and .md")


if __name__ == "__main__":
    main()
