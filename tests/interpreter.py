"""Run a Triton case script under the interpreter in a subprocess (TRITON_INTERPRET=1 must be
set before triton is imported, so the cases cannot run in the pytest process) and return the
JSON dict its last line prints. Used by the Triton tests' module fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cases(script: Path, timeout: float) -> dict:
    """The results of ``script`` run with TRITON_INTERPRET=1 (one thread, the repository on
    the path); fails the test with the script's stderr if it exits non-zero, and skips where
    triton is not installed."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
