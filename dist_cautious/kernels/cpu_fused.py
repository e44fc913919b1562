"""Fused C-AdamW for float32 tensors on the CPU (``backend="cpu"``; what ``backend="auto"``
picks on the CPU when it can be built): two passes, or one for a ``factor_lag=1`` step.

Why: under ZeRO-Offload and FSDP2's ``CPUOffloadPolicy`` the optimizer steps fp32
partitions of tens of millions of elements on the host. The ``foreach`` backend makes about
20 passes over memory per step (one per torch op); this one makes two, as the algorithm
needs: pass 1 reads ``g, m`` and writes ``m`` (12 bytes per element), pass 2 reads
``p, g, m, v`` and writes ``p, v`` (24 bytes), against 28 bytes for one-pass AdamW
(DeepSpeed's ``DeepSpeedCPUAdam``). Each pass is one call for a whole bucket (a list of
tensors or ZeRO fragments), split into 32768-element chunks shared by
``torch.get_num_threads()`` OpenMP threads; counts are exact int64. A lagged step
(``factor_lag=1``: the factors are the previous step's, known before it) is one sweep,
:func:`one_pass`: reads ``p, g, m, v``, writes ``p, m, v`` and counts the mask for the next
step (28 bytes per element, one-pass AdamW's traffic).

The kernel is plain C (``cpu_fused.c``, no torch headers), compiled on first use with the
system C compiler (``$CC``, else ``cc``/``gcc``: ``-O3 -march=native -fopenmp
-ffp-contract=off``, about a second) into a cache directory keyed by the source, the
flags, the compiler and the CPU's flags: ``$DIST_CAUTIOUS_BUILD_DIR``, else
``$TORCH_EXTENSIONS_DIR/dist_cautious``, else ``~/.cache/dist_cautious``. It is loaded with
``ctypes``. Where no compiler is found or the build fails, ``backend="auto"`` uses the
``foreach`` backend (same results: see below) and ``backend="cpu"`` raises, naming the
reason. ``DIST_CAUTIOUS_CPU_KERNEL=0`` makes ``auto`` skip this kernel.

Same element formulas as the ``foreach`` backend, in its order, with the same float32
scalars: the first moment, the counts (so the factors) and the second moment are bitwise
``foreach``'s (tested). The parameters can differ in the last bits through the square root
alone: the kernel's ``sqrtf`` is correctly rounded (IEEE 754), torch's float32 CPU
``sqrt`` is not (up to 0.75 ulp; about 20% of random inputs differ by 1 ulp, measured).
Elements do not interact, so a tensor stepped whole or in fragments (any sharding) gives
bitwise the same result. Calls this kernel does not cover (other dtypes, non-contiguous
tensors, tensors on another device) go to ``foreach``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import foreach
from .common import Capabilities, UpdateHyper

# The backend contract the engine reads (common.py): the plan hands a per-bucket scratch
# dict (used by the foreach fallback); one_pass does a factor_lag=1 step in one sweep.
caps = Capabilities(takes_scratch=True, one_pass_lagged=True)

SOURCE = Path(__file__).with_name("cpu_fused.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
ENV_SWITCH = "DIST_CAUTIOUS_CPU_KERNEL"

_lock = threading.Lock()
_state: dict = {}  # "lib": CDLL | None, "why": str, "path": Path, "openmp": bool


def build_dir() -> Path:
    """Where the compiled kernel is cached (see module doc)."""
    explicit = os.environ.get("DIST_CAUTIOUS_BUILD_DIR")
    if explicit:
        return Path(explicit)
    ext = os.environ.get("TORCH_EXTENSIONS_DIR")
    if ext:
        return Path(ext) / "dist_cautious"
    return Path.home() / ".cache" / "dist_cautious"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _key(cc: str, flags: list[str]) -> str:
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "?"
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), version.encode()):
        h.update(part)
    h.update((platform.machine() + _cpu_flags()).encode())
    return h.hexdigest()[:16]


def _compile(cc: str, flags: list[str], out: Path) -> str | None:
    """Compile to ``out`` atomically (ranks may race); None or the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *flags, str(SOURCE), "-o", tmp, "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        return f"{' '.join(cmd)}: {e}"
    if proc.returncode != 0:
        os.unlink(tmp)
        return f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
    os.replace(tmp, out)
    return None


def _load() -> None:
    cc = _compiler()
    if cc is None:
        _state.update(lib=None, why="no C compiler found (set $CC, or install gcc)")
        return
    errors = []
    for openmp in (True, False):
        flags = FLAGS + (["-fopenmp"] if openmp else [])
        path = build_dir() / f"cpu_fused_{_key(cc, flags)}.so"
        if not path.exists():
            err = _compile(cc, flags, path)
            if err is not None:
                errors.append(err)
                continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            errors.append(f"loading {path}: {e}")
            continue
        i64, f32, ci, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
        lib.dc_count.argtypes = [i64, vp, vp, vp, f32, ci, ci, ci, vp]
        lib.dc_count.restype = ci
        lib.dc_update.argtypes = [i64, vp, vp, vp, vp, vp, vp, f32, f32, f32, ci, f32, f32, ci, ci]
        lib.dc_update.restype = ci
        lib.dc_onepass.argtypes = [i64, vp, vp, vp, vp, vp, vp, f32, ci, f32, f32, f32, ci]
        lib.dc_onepass.argtypes += [f32, f32, ci, ci, vp]
        lib.dc_onepass.restype = ci
        _state.update(lib=lib, why="", path=path, openmp=openmp)
        return
    _state.update(lib=None, why="building the CPU kernel failed: " + " | ".join(errors))


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None; :func:`why_unavailable` says why."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _load()
    return _state["lib"]


def why_unavailable() -> str:
    library()
    return _state["why"]


def available() -> bool:
    """Whether the kernel can be used (compiled and loaded)."""
    return library() is not None


def auto_enabled() -> bool:
    """Whether ``backend="auto"`` uses this kernel on the CPU (available, and not switched
    off by ``DIST_CAUTIOUS_CPU_KERNEL=0``)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return available()


def _covered(*lists: list[Tensor]) -> bool:
    for ts in lists:
        for t in ts:
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                return False
    return library() is not None


def _ptrs(ts: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def _lens(ts: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_int64 * len(ts))(*[t.numel() for t in ts])


def _or_foreach(fallback: Callable[..., Any], n_lists: int) -> Callable:
    """A C pass with ``fallback``'s signature (the foreach pass of the same name): calls
    whose first ``n_lists`` arguments (tensor lists) the kernel does not cover (empty, other
    dtypes, non-contiguous, not on the CPU, no compiled kernel) go to ``fallback`` with the
    caller's ``scratch``; otherwise ``scratch`` is cleared (the C passes hand nothing over:
    the update recomputes the mask from m and g) and the C pass runs."""

    def wrap(c_pass: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(c_pass)
        def run(*args: Any, scratch: dict | None = None) -> Any:
            lists = args[:n_lists]
            if not lists[0] or not _covered(*lists):
                return fallback(*args, scratch=scratch)
            if scratch is not None:
                scratch.clear()
            return c_pass(*args)

        return run

    return wrap


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"dist_cautious cpu kernel: out of memory in the {what}")


def _step_scalars(alphas: Tensor, h: UpdateHyper) -> ctypes.Array:
    """Per tensor ``-lr / bc1 * alpha``, as foreach computes them (doubles, rounded to
    float32 at the call)."""
    return (ctypes.c_float * alphas.numel())(*[-h.step_size * a for a in alphas.tolist()])


def _update_args(h: UpdateHyper) -> tuple:
    """The C update's scalar arguments after the step scalars, in its order: beta2,
    1 - beta2, the decay, cautious_wd, sqrt(bc2), eps, maximize, threads."""
    return (
        h.beta2,
        1 - h.beta2,
        1 - h.lr * h.weight_decay,
        int(h.cautious_wd and h.weight_decay != 0),
        h.bias_correction2_sqrt,
        h.eps,
        int(h.maximize),
        torch.get_num_threads(),
    )


@_or_foreach(foreach.count_pass, 2)
def count_pass(grads: list[Tensor], exp_avgs: list[Tensor], beta1: float, maximize: bool) -> Tensor:
    """``m <- lerp(m, g, 1 - beta1)`` in place; int64 counts of ``m * g > 0`` per tensor."""
    n = len(exp_avgs)
    counts = torch.empty(n, dtype=torch.int64)
    w = 1 - beta1  # the double torch.lerp receives; rounded to float32 like its scalar
    args = (w, int(w < 0.5), int(maximize), torch.get_num_threads(), counts.data_ptr())
    lib = _state["lib"]
    _check(lib.dc_count(n, _ptrs(grads), _ptrs(exp_avgs), _lens(exp_avgs), *args), "count pass")
    return counts


@_or_foreach(foreach.update_pass, 4)
def update_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h) -> None:  # noqa: ANN001
    """Second moment, decoupled (or cautious) weight decay, masked rescaled step, in place
    (``foreach.update_pass``'s arguments)."""
    ptrs = [_ptrs(x) for x in (params, grads, exp_avgs, exp_avg_sqs)]
    scal = _step_scalars(alphas, h)
    rc = _state["lib"].dc_update(len(params), *ptrs, _lens(params), scal, *_update_args(h))
    _check(rc, "update pass")


@_or_foreach(foreach.one_pass, 4)
def one_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h) -> Tensor:  # noqa: ANN001
    """A ``factor_lag=1`` step in one sweep (``foreach.one_pass``'s arguments): the update
    with the given per-tensor ``alphas`` and the int64 counts of this step's mask. Reads p,
    g, m, v once and writes p, m, v (28 B per element; the two passes: 36); bitwise
    :func:`count_pass` then :func:`update_pass` with the same ``alphas``."""
    n = len(params)
    counts = torch.empty(n, dtype=torch.int64)
    ptrs = [_ptrs(x) for x in (params, grads, exp_avgs, exp_avg_sqs)]
    w = 1 - h.beta1
    scal = _step_scalars(alphas, h)
    rc = _state["lib"].dc_onepass(
        n, *ptrs, _lens(params), scal, w, int(w < 0.5), *_update_args(h), counts.data_ptr()
    )
    _check(rc, "one-pass step")
    return counts


def describe() -> str:
    """One line for logs: where the kernel is and whether it runs threaded."""
    if not available():
        return f"cpu kernel unavailable: {why_unavailable()}"
    threads = "OpenMP" if _state["openmp"] else "single-threaded (no OpenMP)"
    return f"cpu kernel {_state['path']} ({threads}, python {sys.version_info[:2]})"
