#!/usr/bin/env python
"""Kill-and-restart tally for launch/bench.py under torchrun (gloo, CPU), and the exit-code
tally of ``--check-against ddp``.

Restart scenario (issue 14 item 4), ``--runs`` times::

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 launch/bench.py --steps 40 \\
        --scale global --log-every 1 --ckpt-dir D --ckpt-every 8 --save-params P --pg-timeout T

and, once the first checkpoint (step 8) is complete, ``kill -9`` of the rank-1 worker
(found among torchrun's children by its ``RANK`` environment variable), after a random
delay of 0 to ``--max-delay`` s. Each run is bounded by ``--timeout``. It counts as
``resumed_equal`` when torchrun exits 0, the log shows a resume, and the final parameters
equal those of one uninterrupted run bit for bit; ``hung`` when the timeout killed it;
``failed`` otherwise. torchrun is started *without* ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``
(``--env-fix`` sets it): what bench.py does by itself must suffice.

Exit tally: ``--check-runs`` times ``python launch/bench.py --check-against ddp --steps S``,
counting exit codes.

Writes ``benchmarks/results/restart_tally_<date>.json`` and ``.md`` with the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "launch" / "bench.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from portable import portable  # noqa: E402  (results files: no absolute paths)


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]),
    )
    e.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    e.update(extra or {})
    return e


def bench_args(steps: int, pg_timeout: float) -> list[str]:
    return [
        "--steps",
        str(steps),
        "--scale",
        "global",
        "--log-every",
        "1",
        "--no-progress",
        "--pg-timeout",
        str(pg_timeout),
    ]


def torchrun_cmd(nproc: int, args: list[str], max_restarts: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        str(BENCH),
        *args,
    ]


def reference(work: Path, steps: int, timeout: float, pg_timeout: float) -> Path:
    """One uninterrupted run: its final parameters."""
    out = work / "reference.pt"
    cmd = torchrun_cmd(2, [*bench_args(steps, pg_timeout), "--save-params", str(out)], 0)
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"uninterrupted run failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return out


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def rank_of(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def params_equal(a: Path, b: Path) -> tuple[bool, str]:
    import torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if x.keys() != y.keys():
        return False, f"modes differ: {sorted(x)} vs {sorted(y)}"
    for mode in x:
        for name in x[mode]:
            if not torch.equal(x[mode][name], y[mode][name]):
                d = float((x[mode][name] - y[mode][name]).abs().max())
                return False, f"{mode} {name} differs (max abs {d:.3e})"
    return True, ""


def kill_and_restart(
    work: Path,
    ref: Path,
    *,
    steps: int = 40,
    every: int = 8,
    delay: float = 0.0,
    timeout: float = 240.0,
    pg_timeout: float = 60.0,
    env_fix: bool = False,
    kill_rank: int = 1,
    self_launch: bool = False,
) -> dict[str, Any]:
    """One kill-and-restart run; returns its outcome (see the module doc)."""
    ckpt, out = work / "ckpt", work / "final.pt"
    args = [
        *bench_args(steps, pg_timeout),
        "--ckpt-dir",
        str(ckpt),
        "--ckpt-every",
        str(every),
        "--save-params",
        str(out),
    ]
    cmd = torchrun_cmd(2, args, 1)
    if self_launch:  # bench.py's own elastic launch: python launch/bench.py --nproc 2 ...
        cmd = [sys.executable, str(BENCH), "--nproc", "2", "--max-restarts", "1", *args]
    extra = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if env_fix else None
    log = work / "torchrun.log"
    t0 = time.monotonic()
    marker = ckpt / "fsdp2-global" / f"step_{every:08d}" / "COMPLETE"
    killed: int | None = None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env(extra), stdout=f, stderr=subprocess.STDOUT)
        try:
            while not marker.exists() and proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    break
                time.sleep(0.05)
            if proc.poll() is None and marker.exists():
                time.sleep(delay)
                for pid in children(proc.pid):
                    if rank_of(pid) == kill_rank:
                        os.kill(pid, signal.SIGKILL)
                        killed = pid
                        break
            rest = max(1.0, timeout - (time.monotonic() - t0))
            rc: int | None = proc.wait(timeout=rest)
        except subprocess.TimeoutExpired:
            rc = None
            workers = children(proc.pid)
            proc.kill()
            for pid in workers:  # the workers of this torchrun only
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)
    text = log.read_text()
    resumed = [ln for ln in text.splitlines() if "resumed from" in ln]
    res: dict[str, Any] = {
        "returncode": rc,
        "killed_pid": killed,
        "seconds": round(time.monotonic() - t0, 1),
        "resumed": resumed[-1].split("bench: ")[-1] if resumed else None,
    }
    if rc is None:
        res["outcome"] = "hung"
    elif rc != 0 or killed is None or not resumed or not out.exists():
        res["outcome"] = "failed"
        res["log_tail"] = text[-3000:]
    else:
        same, why = params_equal(out, ref)
        res["outcome"] = "resumed_equal" if same else "failed"
        if not same:
            res["why"] = why
    return res


def check_against_ddp(steps: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH), "--check-against", "ddp", "--steps", str(steps)]
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            [*cmd, "--no-progress"], env=env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"returncode": None, "seconds": round(time.monotonic() - t0, 1)}
    out: dict[str, Any] = {"returncode": p.returncode, "seconds": round(time.monotonic() - t0, 1)}
    if p.returncode != 0:
        out["stderr_tail"] = p.stderr[-2000:]
    out["aborted"] = "terminate called" in p.stderr
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-delay", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--pg-timeout", type=float, default=60.0)
    ap.add_argument("--env-fix", action="store_true")
    ap.add_argument(
        "--self-launch",
        action="store_true",
        help="start python launch/bench.py --nproc 2 --max-restarts 1 instead of torchrun",
    )
    ap.add_argument("--check-runs", type=int, default=20)
    ap.add_argument("--check-steps", type=int, default=300)
    ap.add_argument("--check-timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="restart_tally", help="output file stem (date appended)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    doc: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": portable(" ".join([sys.executable, *sys.argv])),
        "scenario": portable(
            " ".join(
                torchrun_cmd(
                    2,
                    [
                        *bench_args(a.steps, a.pg_timeout),
                        "--ckpt-dir",
                        "D",
                        "--ckpt-every",
                        "8",
                        "--save-params",
                        "P",
                    ],
                    1,
                )
            )
            + f"; kill -9 of rank 1 0-{a.max_delay} s after D/fsdp2-global/step_00000008/COMPLETE"
        ),
        "env_fix": a.env_fix,
        "self_launch": a.self_launch,
        "runs": [],
        "check_runs": [],
    }
    import torch

    doc["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.runs:
            ref = reference(work, a.steps, a.timeout, a.pg_timeout)
            for i in range(a.runs):
                d = work / f"run{i}"
                d.mkdir()
                r = kill_and_restart(
                    d,
                    ref,
                    steps=a.steps,
                    delay=rng.uniform(0, a.max_delay),
                    timeout=a.timeout,
                    pg_timeout=a.pg_timeout,
                    env_fix=a.env_fix,
                    self_launch=a.self_launch,
                )
                doc["runs"].append(r)
                write(doc, a)
                print(
                    f"restart run {i + 1}/{a.runs}: {r['outcome']} ({r['seconds']} s) {r.get('resumed')}",
                    flush=True,
                )
    for i in range(a.check_runs):
        r = check_against_ddp(a.check_steps, a.check_timeout)
        doc["check_runs"].append(r)
        write(doc, a)
        print(
            f"check run {i + 1}/{a.check_runs}: exit {r['returncode']} ({r['seconds']} s)",
            flush=True,
        )
    write(doc, a)
    return 0


def write(doc: dict[str, Any], a: argparse.Namespace) -> None:
    """The JSON and the Markdown summary, rewritten after every run (a partial tally
    survives an interrupted session)."""
    tally = {
        k: sum(r["outcome"] == k for r in doc["runs"]) for k in ("resumed_equal", "failed", "hung")
    }
    codes: dict[str, int] = {}
    for r in doc["check_runs"]:
        codes[str(r["returncode"])] = codes.get(str(r["returncode"]), 0) + 1
    doc["tally"], doc["check_exit_codes"] = tally, codes
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{a.name}_{doc['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    md = [f"# {a.name} ({doc['date']}, torch {doc['torch']}, CPU gloo, shared 2-core machine)"]
    md += ["", f"Command: `{doc['command']}`", ""]
    if a.runs:
        env_note = (
            " (with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)"
            if a.env_fix
            else " (torchrun's environment as is: no TORCH_DISABLE_SHARE_RDZV_TCP_STORE)"
        )
        if a.self_launch:
            env_note = (
                ", started instead as `python launch/bench.py --nproc 2 --max-restarts 1` "
                "(bench.py's own elastic launch) with the same flags"
            )
        steps = sorted(
            {(r.get("resumed") or "- ").split(" at step ")[-1].split(" ")[0] for r in doc["runs"]}
        )
        md += [
            f"Kill-and-restart scenario, {len(doc['runs'])} of {a.runs} runs done, each bounded "
            f"by {a.timeout:g} s: `{doc['scenario']}`{env_note}",
            "",
            "| resumed and bitwise equal | failed | hung |",
            "|---|---|---|",
            f"| {tally['resumed_equal']} | {tally['failed']} | {tally['hung']} |",
            "",
            f"Steps resumed from: {', '.join(steps)}",
            "",
        ]
    if a.check_runs:
        aborted = sum(bool(r.get("aborted")) for r in doc["check_runs"])
        md += [
            f"`python launch/bench.py --check-against ddp --steps {a.check_steps} --no-progress`, "
            f"{len(doc['check_runs'])} of {a.check_runs} runs done: exit codes {codes}; "
            f"'terminate called' in stderr: {aborted}",
        ]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    sys.exit(main())
