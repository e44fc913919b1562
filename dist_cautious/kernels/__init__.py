"""Backends for the two passes of a cautious step, behind one dispatch.

``reference``: readable per-tensor loop (the oracle for tests).
``foreach``: multi-tensor torch ops (default on CPU, fallback on GPU).
``cpu``: C-AdamW's fused two-pass C kernel for float32 on the CPU (:mod:`.cpu_fused`; what
``CAdamW``'s ``auto`` picks on the CPU when it can be built: the ZeRO-Offload / CPU-offload step).
``triton``: fused multi-tensor Triton kernels (default on CUDA when Triton is importable):
one machinery (:mod:`.triton_mt`) and a math function per optimizer (:mod:`.triton_adamw`,
:mod:`.triton_lion`, :mod:`.triton_sgd`).

:func:`get_backend` returns a :class:`~.common.Backend`: ``count_pass``, ``update_pass`` and
its declared :class:`~.common.Capabilities` (``caps``), which the engine reads once per
bucket. C-AdamW's passes are ``count_pass(grads, exp_avgs, beta1, maximize) -> int64[n]`` and
``update_pass(params, grads, exp_avgs, exp_avg_sqs, alphas, hyper)``; C-Lion's and cautious
SGD's take ``(params, grads, states, h)`` (:mod:`.lion`, :mod:`.sgd`). All tensors in one call
share device and dtypes (the optimizer buckets them).
"""

from __future__ import annotations

import torch

from . import foreach, lion, reference, sgd
from .common import Backend, Capabilities, Functions, UpdateHyper, cautious_factor, compute_dtype

BACKENDS = ("auto", "reference", "foreach", "triton", "cpu")
OPTIMIZERS = ("adamw", "lion", "sgd")

__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "UpdateHyper",
    "cautious_factor",
    "compute_dtype",
    "get_backend",
    "resolve",
]

_ADAMW = {
    "reference": Functions(reference.count_pass, reference.update_pass),
    "foreach": Functions(
        foreach.count_pass,
        foreach.update_pass,
        Capabilities(takes_scratch=True, one_pass_lagged=True),
        foreach.one_pass,
    ),
}


def triton_available() -> bool:
    try:
        from . import triton_mt  # noqa: F401
    except Exception:  # ImportError, or a broken Triton install
        return False
    return True


def resolve(name: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend for ``device``; check explicit choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "foreach"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(
                f"backend='cpu' is the fused CPU kernel, but the tensors are on {device}; "
                "use backend='auto'"
            )
        from . import cpu_fused

        if not cpu_fused.available():
            raise RuntimeError(
                f"backend='cpu' was requested but the CPU kernel is unavailable: "
                f"{cpu_fused.why_unavailable()}; use backend='foreach' (same math, slower)"
            )
    if name == "triton" and not triton_available():
        raise RuntimeError(
            "backend='triton' was requested but dist_cautious.kernels.triton_mt cannot be "
            "imported (is Triton installed? `pip install dist-cautious[triton]`)"
        )
    return name


def get_backend(name: str, optimizer: str = "adamw") -> Backend:
    """The backend ``name`` (``"reference"``, ``"foreach"`` or ``"triton"``) of ``optimizer``
    (``"adamw"``, ``"lion"``, ``"sgd"``). A Triton backend is a new instance each call (it owns
    its chunk-table cache); ``"triton"`` imports Triton and raises ImportError where it is
    unavailable."""
    if optimizer == "adamw":
        if name in _ADAMW:
            return _ADAMW[name]
        if name == "triton":
            from .triton_adamw import TritonAdamW

            return TritonAdamW()
        if name == "cpu":  # C-AdamW only
            from . import cpu_fused

            return cpu_fused
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    mod = lion if optimizer == "lion" else sgd
    if name == "reference":
        return mod.reference
    if name == "foreach":
        return mod.foreach
    if name == "triton":
        if optimizer == "lion":
            from .triton_lion import TritonLion

            return TritonLion()
        from .triton_sgd import TritonSGD

        return TritonSGD()
    label = "Lion" if optimizer == "lion" else "SGD"
    raise ValueError(f"unknown {label} backend {name!r}; choose 'reference', 'foreach' or 'triton'")
