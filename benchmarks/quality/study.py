#!/usr/bin/env python
"""Issue 20: the quality study redone around the embedding, a tuned baseline, the horizon and
five seeds. One resumable command (docs/quality.md)::

    nice -n 19 python benchmarks/quality/study.py --library-rev <sha>

plans every arm below with a priority, skips the runs whose CSV + JSON exist under
``--out`` (default benchmarks/results/quality/study/), and trains the rest in priority order,
``--jobs`` at a time, each a ``nice -n 19`` subprocess of train.py with a timeout. The runs
use ``dist_cautious/``, ``launch/`` *and* ``benchmarks/quality/`` of one git revision,
exported to a temporary directory (``--library-rev``; give the sha of the first invocation
again to resume: ``plan.json`` records it and a different one is refused). ``--plan`` prints
the plan with its status and an estimate of the time left; ``--max-priority P`` stops after
tier P; ``--analyze-only`` only rewrites the summary (study_analyze.py).

Tiers (seed-major within a tier, so a partial tier is balanced):

1. AdamW embedding-lr sweep at lr 3e-3, multipliers {1, 2, 5, 10}, extended by x2 (20, 40)
   while the best is the largest tried, and C-AdamW, seed 0.
2. AdamW at lr {2e-3, 4.5e-3} with the best multiplier of tier 1 (seed 0), extended by
   x1.5 (6.75e-3, ...) while the best lr is the largest tried. The best AdamW
   ("adamw*") is the lowest final loss on the **tune** split (corpus.val_parts) over tiers
   1-2; the reported split is another one.
3. adamw* and C-AdamW, seeds 1-4 (500 steps).
   Also C-AdamW's embedding multiplier {2, 5, 10} (seed 0, tune split): cadamw* is its
   best; its seeds 1-4 run in tier 6 (if the best is not 1).
4. C-AdamW ``factor_lag=1``, seeds 0-4 (single process; the lag changes the algorithm at
   any world size).
5. FSDP2 at 4 ranks, seeds 0-4: C-AdamW global@4; shard everywhere; shard on the dense
   tensors only (embedding global); shard on the embedding only.
6. The horizon: adamw* and C-AdamW with a 1500-step schedule, seeds 0-4.
7. Tied embedding/head: AdamW (multiplier 1) and C-AdamW, seeds 0-4.
8. Tier 5 at 2 and 8 ranks.
9. The horizon at 3000 steps, seeds 0-4.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality" / "study"
EXPORT_PATHS = ("dist_cautious", "launch", "benchmarks/quality", "benchmarks/portable.py")

SEEDS = (0, 1, 2, 3, 4)
SWEEP_SEEDS = (0,)
BASE_LR = 3e-3
SWEEP_MULTS = (1.0, 2.0, 5.0, 10.0)
CSWEEP_MULTS = (2.0, 5.0, 10.0)  # C-AdamW's embedding multipliers besides 1 (seed 0)
MAX_MULT = 40.0
MAX_LR = 1.6e-2  # tier 2 extends the lr by x1.5 while its best is the largest tried  # tier 1 extends by x2 while its best multiplier is its largest, up to this
SWEEP_LRS = (2e-3, 4.5e-3)  # around BASE_LR, at the best multiplier
# s per step of one run with 2 runs at a time on this 2-core machine when it is otherwise
# (nearly) idle. w1: measured in this study on 2026-12-03 at a load of ~2-3 (122-200 s per
# 500-step run, median ~0.3 s/step; ~2.3 s/step at a load of ~11). w2 / w4: the fastest
# issue-11 runs (207 s, 239-312 s per 500 steps, under more load than the w1 figure); w8 was
# never run: a guess (2x w4).
SEC_PER_STEP = {1: 0.3, 2: 0.5, 4: 0.6, 8: 1.2}


@dataclass(frozen=True)
class Run:
    opt: str  # adamw | cadamw
    seed: int
    steps: int = 500
    lr: float = BASE_LR
    embed_mult: float = 1.0
    tied: bool = False
    world: int = 1
    scale: str = "global"  # dense tensors' scope (cadamw)
    embed_scale: str = "global"
    factor_lag: int = 0
    tier: int = 0
    arm: str = ""  # the analysis's label

    @property
    def name(self) -> str:
        s = f"{self.opt}_{'t' if self.tied else 'u'}_lr{self.lr:g}_em{self.embed_mult:g}"
        if self.opt == "cadamw":
            s += f"_{self.scale}-{self.embed_scale}_lag{self.factor_lag}"
        return f"{s}_T{self.steps}_w{self.world}_s{self.seed}"

    def argv(self) -> list[str]:
        a = ["--optimizer", self.opt, "--seed", str(self.seed), "--world", str(self.world)]
        a += ["--steps", str(self.steps), "--lr", f"{self.lr:g}"]
        if self.steps != 500:  # the preset's 50-step warm-up is 10% of 500: keep 10%
            a += ["--warmup", str(self.steps // 10)]
        if self.embed_mult != 1.0:
            a += ["--embed-lr-mult", f"{self.embed_mult:g}"]
        if self.tied:
            a += ["--tied"]
        if self.opt == "cadamw":
            a += ["--scale", self.scale, "--embed-scale", self.embed_scale]
            if self.factor_lag:
                a += ["--factor-lag", str(self.factor_lag)]
        return a


def adamw(seed: int, **kw) -> Run:
    return Run("adamw", seed, **kw)


def cadamw(seed: int, **kw) -> Run:
    return Run("cadamw", seed, **kw)


# ----------------------------------------------------------------------------- results


def final_loss(out: Path, run: Run, column: str = "val_report") -> float | None:
    """The last evaluation of ``column`` of a finished run, else None."""
    p = out / "runs" / f"{run.name}.csv"
    if not (p.exists() and p.with_suffix(".json").exists()):
        return None
    vals = [r[column] for r in csv.DictReader(p.open()) if r.get(column)]
    return float(vals[-1]) if vals else None


def stage1(mults: list[float]) -> list[Run]:
    return [adamw(s, embed_mult=m, tier=1, arm="sweep") for s in SWEEP_SEEDS for m in mults]


def stage2(mult: float, lrs: tuple[float, ...] = ()) -> list[Run]:
    return [
        adamw(s, lr=lr, embed_mult=mult, tier=2, arm="sweep")
        for s in SWEEP_SEEDS
        for lr in (*SWEEP_LRS, *lrs)
    ]


def best_adamw(
    out: Path,
) -> tuple[Run | None, float | None, dict, list[float], tuple[float, ...]]:
    """(the selected AdamW config as a seed-0 Run, the best tier-1 multiplier, the table, the
    tier-1 multipliers, tier 2's lrs beyond SWEEP_LRS): lowest mean final ``val_tune`` over the sweep seeds; None while a
    stage is unfinished. Tier 1 extends by x2 (up to MAX_MULT) while its best multiplier is
    its largest; finished tier-2 runs at an earlier best multiplier take part too."""
    table: dict[str, float] = {}

    def score(runs: list[Run]) -> dict[tuple[float, float], float] | None:
        by: dict[tuple[float, float], list[float]] = {}
        for r in runs:
            v = final_loss(out, r, "val_tune")
            if v is None:
                return None
            by.setdefault((r.lr, r.embed_mult), []).append(v)
            table[f"lr{r.lr:g}_em{r.embed_mult:g}_s{r.seed}"] = v
        return {k: sum(v) / len(v) for k, v in by.items()}

    mults = list(SWEEP_MULTS)
    while True:
        s1 = score(stage1(mults))
        if s1 is None:
            return None, None, table, mults, ()
        best_mult = min(s1, key=s1.get)[1]
        if best_mult == max(mults) and 2 * best_mult <= MAX_MULT:
            mults.append(2 * best_mult)
            continue
        break
    extra: tuple[float, ...] = ()  # tier 2's lrs beyond SWEEP_LRS
    while True:
        s2 = score(stage2(best_mult, extra))
        if s2 is None:
            return None, best_mult, table, mults, extra
        for m in mults:
            if m != best_mult:
                s2 |= score(stage2(m)) or {}
        lr, mult = min({**s1, **s2}.items(), key=lambda kv: kv[1])[0]
        top = max((*SWEEP_LRS, *extra))
        if mult == best_mult and lr == top and top * 1.5 <= MAX_LR:
            extra = (*extra, float(f"{top * 1.5:.6g}"))  # the best lr is the largest: go on
            continue
        return adamw(0, lr=lr, embed_mult=mult), best_mult, table, mults, extra


def plan(out: Path, assume_best: bool = False) -> tuple[list[Run], list[str]]:
    """Every run of the study (those not yet resolvable are left out, with a note; with
    ``assume_best`` a placeholder AdamW stands in for them: for counting and estimates)."""
    notes: list[str] = []
    best, best_mult, _, mults, extra = best_adamw(out)
    if assume_best and best is None:
        best_mult = 1.0 if best_mult is None else best_mult
        best = adamw(0, embed_mult=best_mult)
    runs = stage1(mults) + (stage2(best_mult, extra) if best_mult is not None else [])
    # tier-2 runs at an earlier best multiplier (before tier 1 was extended): kept if done
    runs += [r for m in mults if m != best_mult for r in stage2(m) if done(out, r)]
    runs += [cadamw(s, tier=1, arm="cadamw") for s in SWEEP_SEEDS]
    if best_mult is None:
        notes.append("tier 2 waits for tier 1 (the best embedding multiplier)")
    if best is None:
        notes.append("tiers 3, 6, 9 wait for the sweep (the best AdamW)")

    def star(seed: int, **kw) -> Run:
        assert best is not None
        return replace(best, seed=seed, **kw)

    for s in SEEDS:
        if best is not None:
            runs.append(star(s, tier=3, arm="adamw*"))
        runs.append(cadamw(s, tier=3, arm="cadamw"))
    # C-AdamW gets the same embedding-lr chance (seed 0, tune split): cadamw* = its best
    csweep = [cadamw(0, embed_mult=m, tier=3, arm="cadamw sweep") for m in CSWEEP_MULTS]
    runs += csweep
    cscore = {r.embed_mult: final_loss(out, r, "val_tune") for r in [cadamw(0), *csweep]}
    if all(v is not None for v in cscore.values()):
        cmult = min(cscore, key=cscore.get)
        for s in SEEDS:
            runs.append(cadamw(s, embed_mult=cmult, tier=6 if cmult != 1.0 else 3, arm="cadamw*"))
    else:
        notes.append("cadamw* waits for the C-AdamW embedding-lr sweep (tier 3)")
    for s in SEEDS:
        runs.append(cadamw(s, factor_lag=1, tier=4, arm="cadamw lag1"))

    def shard_arms(world: int, tier: int) -> list[Run]:
        rs = []
        for s in SEEDS:
            for sc, es, arm in (
                ("global", "global", "global"),
                ("shard", "shard", "shard all"),
                ("shard", "global", "shard dense"),
                ("global", "shard", "shard embed"),
            ):
                rs.append(
                    cadamw(
                        s, world=world, scale=sc, embed_scale=es, tier=tier, arm=f"{arm}@{world}"
                    )
                )
        return rs

    runs += shard_arms(4, 5)
    for s in SEEDS:
        if best is not None:
            runs.append(star(s, steps=1500, tier=6, arm="adamw* T1500"))
        runs.append(cadamw(s, steps=1500, tier=6, arm="cadamw T1500"))
    for s in SEEDS:
        runs.append(adamw(s, tied=True, tier=7, arm="adamw tied"))
        runs.append(cadamw(s, tied=True, tier=7, arm="cadamw tied"))
    runs += shard_arms(2, 8) + shard_arms(8, 8)
    for s in SEEDS:
        if best is not None:
            runs.append(star(s, steps=3000, tier=9, arm="adamw* T3000"))
        runs.append(cadamw(s, steps=3000, tier=9, arm="cadamw T3000"))
    if not factor_lag_available():
        runs = [r for r in runs if r.factor_lag == 0]
        notes.append("tier 4 skipped: this library revision has no factor_lag group key")
    return runs, notes


def unique(runs: list[Run]) -> list[Run]:
    """Each run once (one shared by two arms, e.g. adamw* seed 0 = a sweep run, runs once, in
    its first tier), in tier order, seed-major within a tier."""
    seen: dict[str, Run] = {}
    for r in runs:
        seen.setdefault(r.name, r)
    return sorted(seen.values(), key=lambda r: r.tier)


_LAG: bool | None = None


def factor_lag_available() -> bool:
    return True if _LAG is None else _LAG


def done(out: Path, r: Run) -> bool:
    p = out / "runs" / f"{r.name}.csv"
    return p.exists() and p.with_suffix(".json").exists()


def estimate_s(runs: list[Run], jobs: int) -> float:
    return sum(r.steps * SEC_PER_STEP.get(r.world, 0.15 * r.world) for r in runs) / max(1, jobs)


# ----------------------------------------------------------------------------- running


def export(rev: str, dest: Path) -> str:
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    have = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", sha, "benchmarks/"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    paths = [p for p in EXPORT_PATHS if not p.startswith("benchmarks/") or p in have]
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", sha, *paths],
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, timeout=120, check=True)
    return sha


def one_run(r: Run, args: argparse.Namespace, lock: threading.Lock) -> dict:
    runs = args.out / "runs"
    csv_path = runs / f"{r.name}.csv"
    train = Path(args.lib_env["QUALITY_LIB_ROOT"]) / "benchmarks" / "quality" / "train.py"
    out_rel = os.path.relpath(csv_path, ROOT)  # cwd=ROOT: no absolute path in the argv
    cmd = [sys.executable, str(train), "--out", out_rel, "--device", "cpu", *r.argv()]
    if args.smoke:  # a few steps per run (test the machinery; use another --out)
        cmd += ["--steps", str(max(4, r.steps // 100)), "--warmup", "2", "--eval-every", "2"]
        cmd += ["--snapshot-every", "2"]
    if os.name == "posix":
        cmd = ["nice", "-n", "19", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", **args.lib_env)
    t0 = time.time()
    with (runs / f"{r.name}.log").open("w") as f:
        try:
            rc = subprocess.run(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=args.timeout * r.steps / 500,
                cwd=ROOT,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res = {"run": r.name, "tier": r.tier, "status": "ok" if rc == 0 else f"failed ({rc})"}
    res["wall_s"] = round(time.time() - t0, 1)
    with lock:
        print(f"study: {r.name}: {res['status']} in {res['wall_s']} s", flush=True)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--library-rev", default=None, help="git revision (default: plan.json's, else HEAD)"
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per 500 steps")
    p.add_argument("--max-priority", type=int, default=9, help="last tier to run (default 9)")
    p.add_argument(
        "--plan", action="store_true", help="print the plan and the time left; run nothing"
    )
    p.add_argument("--analyze-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    global _LAG
    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    plan_file = args.out / "plan.json"
    recorded = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    sys.path.insert(0, str(HERE.parent))
    from portable import portable

    if args.analyze_only:
        from study_analyze import analyze

        analyze(args.out)
        return 0
    rev = args.library_rev or recorded.get("library_rev") or "HEAD"
    tmp = tempfile.TemporaryDirectory(prefix="quality_lib_")
    sha = export(rev, Path(tmp.name))
    if recorded.get("library_rev") and recorded["library_rev"] != sha:
        raise SystemExit(
            f"--library-rev {rev} = {sha}, but {plan_file} was started with "
            f"{recorded['library_rev']}: resume with --library-rev {recorded['library_rev']} "
            "(or use another --out for another revision)"
        )
    _LAG = "factor_lag" in (Path(tmp.name) / "dist_cautious" / "base.py").read_text()
    args.lib_env = {"QUALITY_LIB_ROOT": tmp.name, "QUALITY_LIB_REV": sha}
    command = portable(" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    lock = threading.Lock()
    results: list[dict] = []

    def snapshot() -> tuple[list[Run], list[str], dict]:
        runs, notes = plan(args.out)
        runs = unique(runs)
        info = {
            "library_rev": sha,
            "command": command,
            "runs": [dict(asdict(r), name=r.name, done=done(args.out, r)) for r in runs],
            "notes": notes,
        }
        return runs, notes, info

    if args.plan:
        runs, notes, _ = snapshot()
        for r in runs:
            print(f"tier {r.tier} {'done' if done(args.out, r) else 'todo'} {r.name}")
        print("\n".join(notes))
        full = unique(plan(args.out, assume_best=True)[0])
        left = [r for r in full if not done(args.out, r)]
        for t in sorted({r.tier for r in full}):
            lt = [r for r in left if r.tier == t]
            print(f"tier {t}: {len(lt)} runs left, ~{estimate_s(lt, 2) / 3600:.2f} h")
        print(
            f"{len(left)} of {len(full)} runs left (runs waiting for the sweep counted), "
            f"~{estimate_s(left, 2) / 3600:.1f} h on 2 idle cores with 2 jobs "
            f"(s/step per run: {SEC_PER_STEP})"
        )
        tmp.cleanup()
        return 0
    # A free slot takes the highest-priority run of the current plan that is neither done nor
    # running; the plan is redone whenever a run ends (a sweep's end adds the runs it decides).
    running: dict[str, Future] = {}
    failed: set[str] = set()
    ex = ThreadPoolExecutor(max(1, args.jobs))
    try:
        while True:
            runs, notes, info = snapshot()
            plan_file.write_text(json.dumps(info, indent=1))
            todo = [
                r
                for r in runs
                if r.tier <= args.max_priority
                and not done(args.out, r)
                and r.name not in running
                and r.name not in failed
            ]
            while todo and len(running) < max(1, args.jobs) and len(failed) < 3:
                r = todo.pop(0)
                print(f"study: start {r.name} (tier {r.tier}, sha {sha[:12]})", flush=True)
                running[r.name] = ex.submit(one_run, r, args, lock)
            if not running:
                if failed:
                    print(f"study: failed runs: {sorted(failed)}; see their .log", file=sys.stderr)
                break
            ended, _ = wait(list(running.values()), return_when=FIRST_COMPLETED)
            for name in [n for n, f in running.items() if f in ended]:
                res = running.pop(name).result()
                results.append(res)
                if res["status"] != "ok":
                    failed.add(name)
    finally:
        ex.shutdown(wait=True)
        tmp.cleanup()
        status = args.out / "runs_status.json"
        old = json.loads(status.read_text()) if status.exists() else []
        status.write_text(json.dumps(old + [{"command": command, "runs": results}], indent=1))
    from study_analyze import analyze

    analyze(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
