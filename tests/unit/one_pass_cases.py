"""The one-pass lagged step (``factor_lag=1``) of the Triton backends, under the interpreter.

Run by tests/unit/test_one_pass.py in a subprocess with ``TRITON_INTERPRET=1`` (Triton
reads it at import). Prints one JSON object: per case whether the one-pass launch gave
bitwise the counts and tensors of the two passes it replaces (count pass, then update pass
with the same per-tensor factors), and the optimizer end to end (``factor_lag=1``, the
one-pass path) against the same optimizer forced onto the two passes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dist_cautious import CAdamW, CLion  # noqa: E402
from dist_cautious.kernels import UpdateHyper  # noqa: E402
from dist_cautious.kernels import triton_adamw as tk  # noqa: E402
from dist_cautious.kernels.common import LionHyper  # noqa: E402
from dist_cautious.kernels.triton_lion import TritonLion  # noqa: E402

assert os.environ.get("TRITON_INTERPRET") == "1" and tk.INTERPRETED, "run with TRITON_INTERPRET=1"

# empty and 1-element tensors, a full 128-element chunk (block 64 x 2 tiles) and partial ones
SIZES = [0, 1, 7, 128, 300]


def _lists(n_ops: int, pdt: torch.dtype, seed: int, offset: int = 0) -> list[list[torch.Tensor]]:
    """Operand lists (p, g, states...): whole tensors, or slices of flat buffers starting at
    element ``offset`` (an odd one: unaligned, the masked path)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_ops):
        flat = torch.randn(offset + sum(SIZES) + 3, generator=gen)
        if k == n_ops - 1 and n_ops == 4:
            flat = flat.abs()  # AdamW's exp_avg_sq
        if k < 2:
            flat = flat.to(pdt)
        ts, o = [], offset
        for s in SIZES:
            ts.append(flat[o : o + s])
            o += s
        out.append(ts)
    return out


def _same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


def adamw_case(pdt: torch.dtype, offset: int, maximize: bool, cwd: bool, beta1: float) -> dict:
    h = UpdateHyper(
        lr=1e-2, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, beta1=beta1,
        maximize=maximize, cautious_wd=cwd,
    )  # fmt: skip
    alphas = torch.linspace(0.5, 2.0, len(SIZES))
    a, b = _lists(4, pdt, 0, offset), _lists(4, pdt, 0, offset)
    two = tk.TritonAdamW()
    c1, deferred = two.count_pass(a[1], a[2], h.beta1, h.maximize, defer_exp_avg=True)
    two.update_pass(*a, alphas, h, exp_avg_pending=deferred)
    c2 = tk.TritonAdamW().one_pass(*b, alphas, h)
    return {
        "counts_equal": torch.equal(c1, c2),
        "tensors_equal": _same(a, b),
        "counts": c2.tolist(),
        "deferred": deferred,
    }


def lion_case(pdt: torch.dtype, offset: int) -> dict:
    h = LionHyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, cautious_wd=True)
    alphas = torch.linspace(0.5, 2.0, len(SIZES))
    a, b = _lists(3, pdt, 1, offset), _lists(3, pdt, 1, offset)
    two = TritonLion()
    c1 = two.count_pass(a[0], a[1], (a[2],), h)
    two.update_pass(a[0], a[1], (a[2],), alphas, h)
    c2 = TritonLion().one_pass(b[0], b[1], (b[2],), alphas, h)
    return {"counts_equal": torch.equal(c1, c2), "tensors_equal": _same(a, b)}


def optimizer_case(cls: type, pdt: torch.dtype, steps: int = 4) -> dict:
    """``factor_lag=1`` with backend="triton": the one-pass path (taken from step 2 on,
    counted) against the same run with the capability switched off (count + update)."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen).to(pdt) for s in SIZES]
    grads = [[torch.randn(s, generator=gen).to(pdt) + 0.3 for s in SIZES] for _ in range(steps)]
    runs = []
    for one in (True, False):
        ps = [t.clone().requires_grad_() for t in init]
        opt = cls(ps, lr=1e-2, weight_decay=0.1, backend="triton", factor_lag=1)
        be = opt.backend_for(opt.param_groups[0], torch.device("cpu"))  # the step's backend
        calls = [0]
        if one:
            real = be.one_pass

            def spy(*args, _real=real, _calls=calls, **kw):
                _calls[0] += 1
                return _real(*args, **kw)

            be.one_pass = spy
        else:  # the same backend without the capability: count pass + update pass
            be.caps = dataclasses.replace(be.caps, one_pass_lagged=False)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        counts = [int(opt.state[p]["cautious_count"]) for p in ps]
        runs.append((ps, counts, calls[0]))
    (pa, ca, n_one), (pb, cb, n_two) = runs
    return {
        "params_equal": all(torch.equal(x, y) for x, y in zip(pa, pb)),
        "counts_equal": ca == cb,
        "one_pass_calls": n_one,
        "two_pass_run_calls": n_two,
        "steps": steps,
    }


def main() -> None:
    tk.configure(block=64, tiles=2, num_warps=4)
    out: dict = {}
    for pname, pdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for offset in (0, 1):
            out[f"adamw_{pname}_off{offset}"] = adamw_case(pdt, offset, False, False, 0.9)
            out[f"lion_{pname}_off{offset}"] = lion_case(pdt, offset)
    out["adamw_fp32_maximize_cwd_lerp_hi"] = adamw_case(torch.float32, 0, True, True, 0.3)
    out["opt_cadamw_fp32"] = optimizer_case(CAdamW, torch.float32)
    out["opt_cadamw_bf16"] = optimizer_case(CAdamW, torch.bfloat16)
    out["opt_clion_fp32"] = optimizer_case(CLion, torch.float32)
    tk.configure(reset=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
