#!/usr/bin/env python
"""One command for the whole quality table (issue 11, docs/quality.md)::

    nice -n 19 python benchmarks/quality/run_all.py

trains, for every seed (default 0,1,2), torch AdamW, CAdamW ``scale="global"`` (single
process), CAdamW ``scale="shard"`` under FSDP2 at 2 and 4 gloo ranks and, as a control,
CAdamW ``scale="global"`` under FSDP2 at 4 ranks, all with the same
hyperparameters (benchmarks/quality/train.py, ``--preset``, default cpu-small), then writes
under ``--out`` (default benchmarks/results/quality/):

- ``runs/<optimizer>_<scale>_w<world>_s<seed>.csv`` (+ ``.json``: command, corpus SHA-256,
  wall time; ``.rows.npz``: per-row kept counts) for every run,
- ``runs_lr/..._lr<lr>.csv``: AdamW and CAdamW global at other peak learning rates
  (``--sweep-lrs``, first seed): is the shared lr a fair one for both?
- ``command.txt`` (this command line), ``summary.json`` / ``summary.md`` and the PNGs
  (benchmarks/quality/analyze.py; ``--analyze-only`` redoes just that from the CSVs).

Every run is a subprocess with ``OMP_NUM_THREADS=1`` (per rank), ``nice -n 19`` and a
timeout; ``--jobs`` runs that many at a time. Existing complete runs are kept unless
``--force`` (so an interrupted table resumes where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRAIN = HERE / "train.py"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality"
sys.path.insert(0, str(HERE.parent))
from portable import portable  # noqa: E402  (results files: no absolute paths)

# (optimizer, scale, world): the table's columns
CONFIGS = (
    ("adamw", "", 1),
    ("cadamw", "global", 1),
    ("cadamw", "shard", 2),
    ("cadamw", "shard", 4),
    # control: the exact factor under the same FSDP2 sharding, so that a shard-vs-global
    # difference is not just FSDP2's different reduction order
    ("cadamw", "global", 4),
)
SWEEP_CONFIGS = CONFIGS[:2]  # AdamW and CAdamW global at other peak lrs


def run_name(opt: str, scale: str, world: int, seed: int) -> str:
    return f"{opt}_{scale or 'na'}_w{world}_s{seed}"


def job_name(cfg: tuple[str, str, int], seed: int, lr: float | None) -> str:
    name = run_name(*cfg, seed)
    return name if lr is None else f"{name}_lr{lr:g}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--seeds", default="0,1,2", help="comma list (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--sweep-lrs",
        default="0.0015,0.006",
        help="peak lrs (besides the preset's) for the AdamW / CAdamW global sensitivity runs on "
        "the first seed; '' for none (default 0.0015,0.006)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma list of run prefixes to train, e.g. cadamw_global_w4 (default: all)",
    )
    p.add_argument("--force", action="store_true", help="rerun runs that already exist")
    p.add_argument("--analyze-only", action="store_true", help="only (re)write the summary")
    p.add_argument(
        "--library-rev",
        default="HEAD",
        help="git revision whose dist_cautious/ and launch/model.py the runs use, exported to a "
        "temporary directory (default HEAD); 'worktree' uses the checkout as it is",
    )
    return p


def export_library(rev: str, dest: Path) -> str:
    """Export ``dist_cautious/`` and ``launch/`` of ``rev`` into ``dest``; returns the sha."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", sha, "dist_cautious", "launch"],
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, timeout=120, check=True)
    return sha


def one_run(
    cfg: tuple[str, str, int], seed: int, args: argparse.Namespace, lr: float | None = None
) -> dict:
    opt, scale, world = cfg
    name = job_name(cfg, seed, lr)
    folder = "runs" if lr is None else "runs_lr"  # lr sensitivity runs live apart
    (args.out / folder).mkdir(parents=True, exist_ok=True)
    csv_path = args.out / folder / f"{name}.csv"
    if not args.force and csv_path.exists() and csv_path.with_suffix(".json").exists():
        return {"run": name, "status": "kept"}
    cmd = [sys.executable, str(TRAIN), "--preset", args.preset, "--optimizer", opt]
    cmd += ["--world", str(world), "--seed", str(seed), "--out", str(csv_path)]
    cmd += ["--device", args.device]
    if scale:
        cmd += ["--scale", scale]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if lr is not None:
        cmd += ["--lr", f"{lr:g}"]
    if os.name == "posix":
        cmd = ["nice", "-n", "19", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", **args.lib_env)
    log = args.out / folder / f"{name}.log"
    t0 = time.time()
    with log.open("w") as f:
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.timeout, cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res = {"run": name, "status": "ok" if rc == 0 else f"failed ({rc})"}
    res["wall_s"] = round(time.time() - t0, 1)
    print(f"run_all: {name}: {res['status']} in {res['wall_s']} s", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    sweep = [float(x) for x in args.sweep_lrs.split(",") if x.strip()]
    sweep_seed = seeds[0] if seeds else 0
    if len(seeds) < 1:
        raise SystemExit("--seeds: give at least one seed")
    command = portable(" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    args.lib_env = {}
    tmp = None
    if not args.analyze_only and args.library_rev != "worktree":
        tmp = tempfile.TemporaryDirectory(prefix="quality_lib_")
        sha = export_library(args.library_rev, Path(tmp.name))
        args.lib_env = {"QUALITY_LIB_ROOT": tmp.name, "QUALITY_LIB_REV": sha}
        print(f"run_all: dist_cautious and launch/ from {args.library_rev} = {sha}", flush=True)
    if not args.analyze_only:
        (args.out / "command.txt").write_text(
            command + f"\n# library: {args.lib_env.get('QUALITY_LIB_REV', 'worktree')}\n"
        )
        # seed-major: a partial table is balanced; the lr sensitivity runs come last
        jobs = [(cfg, s, None) for s in seeds for cfg in CONFIGS]
        jobs += [(cfg, sweep_seed, lr) for lr in sweep for cfg in SWEEP_CONFIGS]
        if args.only:
            keep = [x.strip() for x in args.only.split(",") if x.strip()]
            jobs = [j for j in jobs if any(job_name(*j).startswith(k) for k in keep)]
        t0 = time.time()
        with ThreadPoolExecutor(max(1, args.jobs)) as ex:
            results = list(ex.map(lambda j: one_run(j[0], j[1], args, j[2]), jobs))
        status = {"command": command, "wall_s": round(time.time() - t0, 1), "runs": results}
        status["library_rev"] = args.lib_env.get("QUALITY_LIB_REV", "worktree")
        (args.out / "runs_status.json").write_text(json.dumps(status, indent=1))
        failed = [r for r in results if r["status"] not in ("ok", "kept")]
        if failed:
            print(f"run_all: {len(failed)} run(s) failed: {failed}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    sys.path.insert(0, str(HERE))
    from analyze import analyze

    analyze(args.out, configs=CONFIGS, seeds=seeds, command=command, sweep_configs=SWEEP_CONFIGS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
