"""Backends for the two passes of a C-AdamW step, behind one dispatch.

``reference``: readable per-tensor loop (the oracle for tests).
``foreach``: multi-tensor torch ops (default on CPU, fallback on GPU).
``triton``: fused multi-tensor Triton kernels (default on CUDA when Triton is importable).

Each backend exposes ``count_pass(grads, exp_avgs, beta1, maximize) -> int64[n]`` and
``update_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, hyper)``; all tensors in one
call share device and dtypes (the optimizer buckets them).
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import foreach, reference
from .common import UpdateHyper, cautious_factor, compute_dtype

BACKENDS = ("auto", "reference", "foreach", "triton")

__all__ = ["BACKENDS", "UpdateHyper", "cautious_factor", "compute_dtype", "get_backend", "resolve"]


def triton_available() -> bool:
    try:
        from . import triton_kernels  # noqa: F401
    except Exception:  # ImportError, or a broken Triton install
        return False
    return True


def resolve(name: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend for ``device``; check explicit choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "foreach"
    if name == "triton" and not triton_available():
        raise RuntimeError(
            "backend='triton' was requested but dist_cautious.kernels.triton_kernels cannot be "
            "imported (is Triton installed? `pip install dist-cautious[triton]`)"
        )
    return name


def get_backend(name: str) -> ModuleType:
    if name == "reference":
        return reference
    if name == "foreach":
        return foreach
    if name == "triton":
        from . import triton_kernels

        return triton_kernels
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
