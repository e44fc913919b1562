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
    args = p.parse_args()

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
