"""Run a worker script under torchrun (gloo on CPU) with a hard timeout.

Every multi-process test goes through :func:`torchrun`, so a hang fails in seconds
instead of stalling CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def torchrun(
    script: str | Path,
    nproc: int,
    args: list[str] | tuple[str, ...] = (),
    timeout: float = 180,
    extra_env: dict[str, str] | None = None,
    torchrun_args: list[str] | None = None,
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo, even on a GPU machine
    if extra_env:
        env.update(extra_env)
    launch = torchrun_args if torchrun_args is not None else ["--standalone"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        f"--nproc-per-node={nproc}",
        str(script),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} (nproc={nproc}) exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
