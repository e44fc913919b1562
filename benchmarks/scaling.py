#!/usr/bin/env python
"""Optimizer-step cost of CAdamW ``global`` vs ``shard`` vs the full-tensor all-gather
baseline, across world sizes, on CPU gloo (FSDP2).

For every world size it runs ``launch/bench.py --nproc W --engine fsdp2 --scale all
--device cpu`` once: the three modes run one after the other in the same process group,
so each row's ratios are measured side by side in one run. Times are medians over the
timed steps of the slowest rank per step (see launch/bench.py).

Writes ``<out>.csv``, ``<out>.json`` (the raw bench.py results) and ``<out>.png``.

    python benchmarks/scaling.py --worlds 1,2,4,8 --out benchmarks/results/scaling_cpu2
    python benchmarks/scaling.py --plot-only benchmarks/results/scaling_cpu16.csv

On a machine with fewer cores than ranks the ranks share cores (oversubscription): the
times then include waiting for a core, and the comm column includes waiting for the
slowest rank. Say so when quoting such numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "launch" / "bench.py"
MODES = ("global", "shard", "allgather")
FIELDS = (
    "world",
    "mode",
    "opt_step_ms",
    "opt_compute_ms",
    "opt_comm_ms",
    "opt_comm_min_ms",
    "step_ms",
    "collectives_per_step",
    "bytes_per_step",
    "tokens_per_s",
    "final_loss",
    "kept_fraction",
    "global_over_shard",
    "allgather_over_global",
    "sharded_tensors",
    "timed_steps",
)


def run_world(world: int, args: argparse.Namespace) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            str(BENCH),
            "--nproc",
            str(world),
            "--engine",
            "fsdp2",
            "--scale",
            "all",
            "--device",
            "cpu",
            "--preset",
            args.preset,
            "--steps",
            str(args.steps),
            "--warmup-steps",
            str(args.warmup_steps),
            "--batch",
            str(args.batch),
            "--seq-len",
            str(args.seq_len),
            "--no-progress",
            "--json",
            str(out),
        ]
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU gloo even on a GPU machine
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        t0 = time.time()
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            print(f"world {world}: timed out after {args.timeout:.0f} s; skipped", flush=True)
            return None
        if proc.returncode != 0:
            raise SystemExit(
                f"world {world}: bench.py exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        doc = json.loads(out.read_text())
        doc["wall_s"] = time.time() - t0
        doc["command"] = " ".join(cmd[1:]).replace(str(ROOT) + "/", "")
        print(
            f"world {world:2d}: "
            + "  ".join(
                f"{r['mode']} {r['opt_step_ms']:.2f} ms (comm {r['opt_comm_ms']:.2f})"
                for r in doc["results"]
            )
            + f"  [{doc['wall_s']:.0f} s]",
            flush=True,
        )
        return doc


def rows_from(docs: list[dict]) -> list[dict]:
    rows = []
    for doc in docs:
        by = {r["mode"]: r for r in doc["results"]}
        g, s, a = by.get("global"), by.get("shard"), by.get("allgather")
        for mode in MODES:
            r = by.get(mode)
            if r is None:
                continue
            rows.append(
                {
                    "world": doc["world"],
                    "mode": mode,
                    "opt_step_ms": r["opt_step_ms"],
                    "opt_compute_ms": r["opt_compute_ms"],
                    "opt_comm_ms": r["opt_comm_ms"],
                    "opt_comm_min_ms": r.get("opt_comm_min_ms", ""),
                    "step_ms": r["step_ms"],
                    "collectives_per_step": r["collectives_per_step"],
                    "bytes_per_step": r["bytes_per_step"],
                    "tokens_per_s": r["tokens_per_s"],
                    "final_loss": r["final_loss"],
                    "kept_fraction": r["kept_fraction"],
                    "global_over_shard": (g["opt_step_ms"] / s["opt_step_ms"]) if g and s else "",
                    "allgather_over_global": (a["opt_step_ms"] / g["opt_step_ms"])
                    if a and g
                    else "",
                    "sharded_tensors": r["sharded_tensors"],
                    "timed_steps": r["timed_steps"],
                }
            )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        out = []
        for r in csv.DictReader(f):
            out.append(
                {k: (float(v) if v not in ("", None) and k != "mode" else v) for k, v in r.items()}
            )
        return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"global": ("C0", "o"), "shard": ("C1", "s"), "allgather": ("C3", "^")}
    for mode in MODES:
        pts = sorted(
            (int(r["world"]), float(r["opt_step_ms"]), float(r["opt_comm_ms"]))
            for r in rows
            if r["mode"] == mode
        )
        if not pts:
            continue
        c, m = styles[mode]
        label = {"allgather": "all-gather baseline"}.get(mode, mode)
        ax1.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker=m, color=c, label=f"{label}: step"
        )
        if mode != "shard":
            pts = [p for p in pts if p[2] > 0]  # one rank: the all-reduce is a no-op
            ax1.plot(
                [p[0] for p in pts],
                [p[2] for p in pts],
                marker=m,
                color=c,
                ls=":",
                alpha=0.7,
                label=f"{label}: in collectives",
            )
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("ranks (CPU gloo, FSDP2)")
    ax1.set_ylabel("optimizer step, ms (median, slowest rank)")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)

    ratio = sorted(
        (int(r["world"]), float(r["global_over_shard"]))
        for r in rows
        if r["mode"] == "global" and r["global_over_shard"] not in ("", None)
    )
    ax2.plot(
        [p[0] for p in ratio], [p[1] for p in ratio], marker="o", color="C0", label="global / shard"
    )
    ag = sorted(
        (int(r["world"]), float(r["allgather_over_global"]))
        for r in rows
        if r["mode"] == "allgather" and r["allgather_over_global"] not in ("", None)
    )
    if ag:
        ax2.plot(
            [p[0] for p in ag],
            [p[1] for p in ag],
            marker="^",
            color="C3",
            label="all-gather / global",
        )
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("ranks")
    ax2.set_ylabel("ratio of optimizer-step times (same run)")
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    worlds = sorted({int(r["world"]) for r in rows})
    for ax in (ax1, ax2):
        ax.set_xticks(worlds)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- all-reduce probe


def probe_worker(sizes: list[int], iters: int) -> None:
    """Under torchrun: median latency of back-to-back gloo all-reduces of each size."""
    import statistics

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = {}
    for nbytes in sizes:
        t = torch.zeros(max(1, nbytes // 8), dtype=torch.int64)
        for _ in range(20):
            dist.all_reduce(t)
        dist.barrier()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        v = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        out[nbytes] = v.item() * 1e6
    if dist.get_rank() == 0:
        print("PROBE " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def probe(worlds: list[int], sizes: list[int], iters: int, out: Path) -> list[dict]:
    rows = []
    for w in worlds:
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={w}",
            str(Path(__file__).resolve()),
            "--probe-worker",
            "--sizes",
            ",".join(map(str, sizes)),
            "--iters",
            str(iters),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(
                f"probe world {w} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        lat = json.loads(line[6:])
        for nbytes, us in lat.items():
            rows.append({"world": w, "bytes": int(nbytes), "allreduce_us": us})
        print(
            f"world {w:2d}: " + "  ".join(f"{b} B {us:.1f} us" for b, us in lat.items()), flush=True
        )
    with out.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=("world", "bytes", "allreduce_us"))
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, "allreduce_us": f"{r['allreduce_us']:.2f}"})
    return rows


def fit_hops(rows: list[dict], nbytes: int) -> tuple[float, float, float]:
    """Least-squares fit of T(W) = a + h * 2(W-1) (a ring all-reduce's step count) for W >= 2;
    returns (a, h, max relative residual)."""
    pts = [
        (2 * (r["world"] - 1), r["allreduce_us"])
        for r in rows
        if r["bytes"] == nbytes and r["world"] >= 2
    ]
    n = len(pts)
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    h = sum((x - mx) * (y - my) for x, y in pts) / max(1e-12, sum((x - mx) ** 2 for x, _ in pts))
    a = my - h * mx
    res = max(abs(a + h * x - y) / y for x, y in pts)
    return a, h, res


# ----------------------------------------------------------------------------- projection (a model)

# NCCL's own cost model for the LL protocol (what NCCL selects for messages of a few KB):
# NVIDIA/nccl, src/graph/tuning.cc (commit b6475625, NCCL 2.18-2.21 era): baseLat (Tree LL
# 6.8 us, Ring LL 6.6 us), hwLat NVLink (Tree LL 0.6, Ring LL 0.6 us), hwLat NET (Tree LL
# 5.0, Ring LL 2.7 us), getNetOverhead (1.0 us for Intel and Arm hosts, 2.0 us for AMD).
NCCL_LL = {
    "base_tree": 6.8,
    "base_ring": 6.6,
    "nvl_tree": 0.6,
    "nvl_ring": 0.6,
    "net_tree": 5.0,
    "net_ring": 2.7,
}

CLUSTERS = {
    # DGX A100: 8 A100-SXM4-80GB, NVSwitch, NVLink 3 (600 GB/s per GPU, both directions),
    # 8x 200 Gb/s HDR InfiniBand, AMD EPYC hosts; HBM2e 2,039 GB/s (NVIDIA A100 datasheet).
    "A100": {
        "gpus_per_node": 8,
        "nvlink_GBs": 600,
        "nic_Gbps": 200,
        "hbm_TBs": 2.039,
        "net_overhead_us": 2.0,
    },
    # GH200 nodes of 4 superchips (the quad-GH200 node design of e.g. JUPITER / Alps; an
    # assumption, sites differ), NVLink 4 (900 GB/s per GPU), one 400 Gb/s NDR NIC per GPU
    # (assumption), Arm (Grace) hosts; HBM3 4.0 TB/s (GH200 96 GB datasheet).
    "GH200": {
        "gpus_per_node": 4,
        "nvlink_GBs": 900,
        "nic_Gbps": 400,
        "hbm_TBs": 4.0,
        "net_overhead_us": 1.0,
    },
}
HBM_EFFICIENCY = 3.0 / 3.35  # H100: 3.0 TB/s measured copy (DEVELOPERS.md) / 3.35 TB/s datasheet
STEP_FLOOR_US = 20.0  # assumption: fixed cost of a fused multi-tensor step (a few launches)
BYTES_PER_PARAM = 36  # exact two-pass C-AdamW, fp32 (DEVELOPERS.md)
MODELS = {"LLaMA-60M": (58_073_600, 75), "LLaMA-1B": (1_339_082_752, 219)}


def allreduce_us(world: int, c: dict, nbytes: int, group: int | None = None) -> tuple[float, str]:
    """alpha-beta model of one all-reduce of ``nbytes`` over ``group`` ranks (default all):
    NCCL's LL latency model (alpha) plus bytes over half the bottleneck link (beta: LL sends
    a 4-byte flag with every 4 bytes of data)."""
    w = group or world
    if w <= 1:
        return 0.0, "-"
    g = c["gpus_per_node"]
    nodes = max(1, -(-w // g))
    ppn = min(w, g)
    nv, net = c["nvlink_GBs"] / 2, c["nic_Gbps"] / 8  # GB/s per direction
    link = nv if nodes == 1 else min(nv, net)
    to_us = 1e-3  # bytes / (GB/s) -> ns; * 1e-3 -> us
    if nodes == 1:
        tree = NCCL_LL["base_tree"] + 2 * (ppn - 1) * NCCL_LL["nvl_tree"]
        ring = NCCL_LL["base_ring"] + 2 * (w - 1) * NCCL_LL["nvl_ring"]
    else:
        intra = max(NCCL_LL["nvl_ring"], c["net_overhead_us"])
        n_inter = 2 * nodes
        ring = (
            NCCL_LL["base_ring"] + (2 * (w - 1) - n_inter) * intra + n_inter * NCCL_LL["net_ring"]
        )
        tree = NCCL_LL["base_tree"] + 2 * (
            (ppn - 1) * NCCL_LL["nvl_tree"] + (nodes.bit_length() - 1) * NCCL_LL["net_tree"]
        )
    ring += 2 * (w - 1) / w * nbytes / (0.5 * link) * to_us
    tree += 2 * nbytes / (0.5 * link) * to_us
    return (tree, "tree") if tree <= ring else (ring, "ring")


def projection(worlds: list[int]) -> list[dict]:
    rows = []
    for cname, c in CLUSTERS.items():
        for mname, (params, tensors) in MODELS.items():
            nbytes = 16 * tensors
            for w in worlds:
                shard_us = (
                    BYTES_PER_PARAM * params / w / (HBM_EFFICIENCY * c["hbm_TBs"] * 1e12) * 1e6
                    + STEP_FLOOR_US
                )
                for layout, group in (
                    ("FSDP2/ZeRO (all ranks)", w),
                    ("HSDP (shard = node)", c["gpus_per_node"]),
                ):
                    ar, algo = allreduce_us(w, c, nbytes, group)
                    rows.append(
                        {
                            "cluster": cname,
                            "model": mname,
                            "world": w,
                            "layout": layout,
                            "bytes": nbytes,
                            "allreduce_us": ar,
                            "algorithm": algo,
                            "shard_step_us": shard_us,
                            "global_over_shard": (shard_us + ar) / shard_us,
                        }
                    )
    return rows


def print_projection(rows: list[dict]) -> None:
    print(
        "| cluster | model (bytes) | layout | "
        + " | ".join(f"{w} GPUs" for w in sorted({r["world"] for r in rows}))
        + " |"
    )
    keys = []
    for r in rows:
        k = (r["cluster"], r["model"], r["layout"])
        if k not in keys:
            keys.append(k)
    ws = sorted({r["world"] for r in rows})
    print("|---|---|---|" + "---|" * len(ws))
    for k in keys:
        cells = []
        for w in ws:
            r = next(
                x for x in rows if (x["cluster"], x["model"], x["layout"]) == k and x["world"] == w
            )
            cells.append(
                f"+{r['allreduce_us']:.0f} us / {r['shard_step_us']:.0f} us = {r['global_over_shard']:.3f}x"
            )
        nbytes = next(x["bytes"] for x in rows if (x["cluster"], x["model"]) == k[:2])
        print(f"| {k[0]} | {k[1]} ({nbytes} B) | {k[2]} | " + " | ".join(cells) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="1,2,4,8,16", help="comma list of world sizes")
    p.add_argument("--preset", default="60m")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="micro-batch per rank (small: the optimizer is measured)",
    )
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "scaling_cpu"),
        help="output path without extension (.csv, .json, .png are written)",
    )
    p.add_argument("--title", default=None)
    p.add_argument("--plot-only", default=None, help="re-plot an existing CSV")
    p.add_argument(
        "--probe",
        action="store_true",
        help="measure gloo all-reduce latency vs world size and message size (no model training)",
    )
    p.add_argument("--probe-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="8,1200,3504,262144", help="probe: message sizes in bytes")
    p.add_argument("--iters", type=int, default=300, help="probe: all-reduces per size")
    p.add_argument(
        "--project",
        action="store_true",
        help="print the A100/GH200 alpha-beta projection (a model) and write <out>_projection.csv",
    )
    p.add_argument("--project-worlds", default="8,16,32,64,128,256")
    args = p.parse_args()

    if args.probe_worker:
        probe_worker([int(x) for x in args.sizes.split(",")], args.iters)
        return 0
    if args.probe:
        out = Path(args.out + "_probe.csv")
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = probe(
            [int(w) for w in args.worlds.split(",")],
            [int(x) for x in args.sizes.split(",")],
            args.iters,
            out,
        )
        for nbytes in sorted({r["bytes"] for r in rows}):
            a, h, res = fit_hops(rows, nbytes)
            print(
                f"{nbytes:7d} B: T(W) = {a:.1f} us + {h:.2f} us x 2(W-1)   (max relative residual {res:.0%})"
            )
        print(f"wrote {out}")
        return 0
    if args.project:
        rows = projection([int(w) for w in args.project_worlds.split(",")])
        print_projection(rows)
        out = Path(args.out + "_projection.csv")
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            for r in rows:
                wr.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
        print(f"wrote {out}")
        return 0

    if args.plot_only:
        src = Path(args.plot_only)
        plot(read_csv(src), src.with_suffix(".png"), args.title or src.stem)
        print(f"wrote {src.with_suffix('.png')}")
        return 0

    worlds = [int(w) for w in args.worlds.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "runs": [],
    }
    title = args.title or (
        f"CAdamW optimizer step, {args.preset} shapes, FSDP2 on CPU gloo, "
        f"{os.cpu_count()} cores, {meta['date'][:10]}"
    )
    rows: list[dict] = []
    for w in worlds:  # files are rewritten after every world size: a cut-off sweep keeps its rows
        doc = run_world(w, args)
        if doc is None:
            continue
        for r in doc["results"]:  # keep the file small: drop per-step loss curves
            r.pop("loss_curve", None)
        meta["runs"].append(doc)
        rows = rows_from(meta["runs"])
        write_csv(rows, out.with_suffix(".csv"))
        out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        plot(rows, out.with_suffix(".png"), title)
    print(f"wrote {out.with_suffix('.csv')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    for r in rows:
        if r["mode"] == "global":
            print(
                f"world {r['world']:2d}: global/shard = {r['global_over_shard']:.3f}x  "
                f"(global {r['opt_step_ms']:.2f} ms, of which {r['opt_comm_ms']:.2f} ms in 1 all-reduce "
                f"on the rank that waited most, {r['opt_comm_min_ms']:.2f} ms on the last to arrive)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
