"""Fused two-pass C-AdamW for float32 tensors on the CPU (``backend="cpu"``; what
``backend="auto"`` picks on the CPU when it can be built).

Why: under ZeRO-Offload and FSDP2's ``CPUOffloadPolicy`` the optimizer steps fp32
partitions of tens of millions of elements on the host. The ``foreach`` backend makes about
20 passes over memory per step (one per torch op); this one makes two, as the algorithm
needs: pass 1 reads ``g, m`` and writes ``m`` (12 bytes per element), pass 2 reads
``p, g, m, v`` and writes ``p, v`` (24 bytes), against 28 bytes for one-pass AdamW
(DeepSpeed's ``DeepSpeedCPUAdam``). Each pass is one call for a whole bucket (a list of
tensors or ZeRO fragments), split into 32768-element chunks shared by
``torch.get_num_threads()`` OpenMP threads; counts are exact int64.

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
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from . import foreach
from .common import Capabilities, UpdateHyper

# The plan hands a per-bucket scratch dict (used by the foreach fallback): declared both
# ways the engine has read it (``caps``, a kernels.common.Capabilities; ``TAKES_SCRATCH``).
TAKES_SCRATCH = True
try:
    from .common import Capabilities

    caps = Capabilities(takes_scratch=True)
except ImportError:  # pragma: no cover - before the backend contract had Capabilities
    caps = None
caps = Capabilities(takes_scratch=True)  # the backend contract the engine reads (common.py)

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


def count_pass(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    beta1: float,
    maximize: bool,
    scratch: dict | None = None,
) -> Tensor:
    """``m <- lerp(m, g, 1 - beta1)`` in place; int64 counts of ``m * g > 0`` per tensor."""
    if not exp_avgs or not _covered(grads, exp_avgs):
        return foreach.count_pass(grads, exp_avgs, beta1, maximize, scratch=scratch)
    if scratch is not None:
        scratch.clear()  # nothing handed to pass 2: it recomputes the mask from m and g
    n = len(exp_avgs)
    counts = torch.empty(n, dtype=torch.int64)
    w = 1 - beta1  # the double torch.lerp receives; rounded to float32 like its scalar
    rc = _state["lib"].dc_count(
        n,
        _ptrs(grads),
        _ptrs(exp_avgs),
        _lens(exp_avgs),
        w,
        int(w < 0.5),
        int(maximize),
        torch.get_num_threads(),
        counts.data_ptr(),
    )
    if rc != 0:
        raise MemoryError("dist_cautious cpu kernel: out of memory in the count pass")
    return counts


def update_pass(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    alphas: Tensor,
    h: UpdateHyper,
    scratch: dict | None = None,
) -> None:
    """Second moment, decoupled (or cautious) weight decay, masked rescaled step, in place."""
    if not params or not _covered(params, grads, exp_avgs, exp_avg_sqs):
        foreach.update_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, h, scratch=scratch)
        return
    if scratch is not None:
        scratch.clear()
    n = len(params)
    # scalars as foreach computes them (doubles, rounded to float32 at the call)
    scal = (ctypes.c_float * n)(*[-h.step_size * a for a in alphas.tolist()])
    decay = 1 - h.lr * h.weight_decay
    rc = _state["lib"].dc_update(
        n,
        _ptrs(params),
        _ptrs(grads),
        _ptrs(exp_avgs),
        _ptrs(exp_avg_sqs),
        _lens(params),
        scal,
        h.beta2,
        1 - h.beta2,
        decay,
        int(h.cautious_wd and h.weight_decay != 0),
        h.bias_correction2_sqrt,
        h.eps,
        int(h.maximize),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("dist_cautious cpu kernel: out of memory in the update pass")


def describe() -> str:
    """One line for logs: where the kernel is and whether it runs threaded."""
    if not available():
        return f"cpu kernel unavailable: {why_unavailable()}"
    threads = "OpenMP" if _state["openmp"] else "single-threaded (no OpenMP)"
    return f"cpu kernel {_state['path']} ({threads}, python {sys.version_info[:2]})"
