"""Triton kernels of C-Lion, cautious SGD and AdamW's cautious weight decay, interpreted.

Run by tests/unit/test_kernels_lion_sgd.py in a subprocess with ``TRITON_INTERPRET=1``
(Triton reads it at import). Each case steps copies of the same tensors a few steps with
the Triton backend and with the ``reference`` backend (factors from the reference counts)
and prints, per case, whether the counts were equal every step and the relative errors of
parameters and state. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dist_cautious.kernels import get_backend, lion, sgd  # noqa: E402
from dist_cautious.kernels import reference as adam_ref  # noqa: E402
from dist_cautious.kernels import triton_adamw as tk  # noqa: E402
from dist_cautious.kernels.common import (  # noqa: E402
    LionHyper,
    SGDHyper,
    UpdateHyper,
    cautious_factor,
)
from tests.oracle import rel_err  # noqa: E402


def _backend(mod, name: str):  # noqa: ANN001, ANN202
    """``name``'s backend of the optimizer whose math module is ``mod`` (lion or sgd)."""
    return get_backend(name, mod.__name__.rsplit(".", 1)[-1])


assert os.environ.get("TRITON_INTERPRET") == "1" and tk.INTERPRETED, "run with TRITON_INTERPRET=1"

GEN = torch.Generator().manual_seed(0)
STEPS = 3


def _err(a, b) -> float:
    return max([rel_err(x, y) for x, y in zip(a, b) if y.numel()] or [0.0])


def _lists(sizes, pdt, sdt, start=None, strided_grads=False):
    """params, state, and STEPS gradient lists; slices of flat buffers when ``start`` is set
    (a ZeRO partition at element ``start``)."""

    def one(dt, scale=1.0):
        if start is None:
            return [(torch.randn(s, generator=GEN) * scale).to(dt) for s in sizes]
        flat = (torch.randn(start + sum(sizes) + 5, generator=GEN) * scale).to(dt)
        out, o = [], start
        for s in sizes:
            out.append(flat[o : o + s])
            o += s
        return out

    def grads():
        if strided_grads:
            return [torch.randn(2 * s, generator=GEN).to(pdt)[::2] for s in sizes]
        return one(pdt)

    return one(pdt), one(sdt, 0.1), [grads() for _ in range(STEPS)]


def _numels(ps):
    return torch.tensor([p.numel() for p in ps], dtype=torch.int64)


def compare(mod, hyper, lists, formula="clamp") -> dict:
    """``hyper(t)``: the hyperparameters of step t. Triton vs reference, STEPS steps."""
    p, s, gseq = lists
    ref_p = [x.clone() for x in p]
    ref_s = [x.clone() for x in s]
    tri, ref = _backend(mod, "triton"), _backend(mod, "reference")
    equal, counts, masked = True, [], False
    for t, g in enumerate(gseq):
        h = hyper(t)
        c_t = tri.count_pass(p, g, (s,), h, {})
        c_r = ref.count_pass(ref_p, g, (ref_s,), h)
        equal &= torch.equal(c_t.cpu(), c_r)
        counts.append(c_r.tolist())
        masked |= int(c_r.sum()) < sum(x.numel() for x in p)
        a = cautious_factor(c_r, _numels(p), formula, 1e-3)
        tri.update_pass(p, g, (s,), a, h, {})
        ref.update_pass(ref_p, g, (ref_s,), a, h)
    return dict(
        counts_equal=bool(equal), counts=counts, p=_err(p, ref_p), state=_err(s, ref_s),
        masked_some=bool(masked),
    )  # fmt: skip


def lion_h(**kw):
    base = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
    base.update(kw)
    return lambda t: LionHyper(**base)


def sgd_h(**kw):
    base = dict(lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.1)
    base.update(kw)
    return lambda t: SGDHyper(first_step=t == 0, **base)


def adamw_compare(sizes, defer=False, maximize=False) -> dict:
    p, m, gseq = _lists(sizes, torch.float32, torch.float32)
    v = [torch.rand(x.shape, generator=GEN) for x in p]
    ref = [[x.clone() for x in y] for y in (p, m, v)]
    equal, masked = True, False
    for t, g in enumerate(gseq, start=1):
        h = UpdateHyper(
            lr=1e-2, beta2=0.999, eps=1e-8, weight_decay=0.5, step=t, beta1=0.9,
            maximize=maximize, cautious_wd=True,
        )  # fmt: skip
        if defer:
            c_t, deferred = tk.count_pass(g, m, 0.9, maximize, defer_exp_avg=True)
        else:
            c_t, deferred = tk.count_pass(g, m, 0.9, maximize), False
        c_r = adam_ref.count_pass(g, ref[1], 0.9, maximize)
        equal &= torch.equal(c_t, c_r)
        masked |= int(c_r.sum()) < sum(x.numel() for x in p)
        a = cautious_factor(c_r, _numels(p), "clamp", 1e-3)
        tk.update_pass(p, g, m, v, a, h, exp_avg_pending=deferred)
        adam_ref.update_pass(ref[0], g, ref[1], ref[2], a, h)
    return dict(
        counts_equal=bool(equal), p=_err(p, ref[0]), state=max(_err(m, ref[1]), _err(v, ref[2])),
        masked_some=bool(masked),
    )  # fmt: skip


def main() -> None:
    res: dict = {}
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    tk.configure(block=64, tiles=2, num_warps=4)  # chunk = 128: boundaries are cheap to reach
    edges = [1, 0, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 3]
    small = [5, 128, 300]

    res["lion_fp32_edges"] = compare(lion, lion_h(), _lists(edges, f32, f32))
    res["lion_cwd_maximize"] = compare(
        lion, lion_h(cautious_wd=True, maximize=True, weight_decay=0.5), _lists(small, f32, f32)
    )
    res["lion_lerp_high"] = compare(lion, lion_h(beta1=0.3, beta2=0.4), _lists(small, f32, f32))
    res["lion_views_unaligned"] = compare(
        lion, lion_h(cautious_wd=True), _lists([100, 128, 3, 0, 77], f32, f32, start=3), "paper"
    )
    res["lion_bf16_params"] = compare(lion, lion_h(cautious_wd=True), _lists(small, bf16, f32))
    res["lion_bf16_state"] = compare(lion, lion_h(), _lists(small, bf16, bf16))

    res["sgd_heavy_l2"] = compare(sgd, sgd_h(), _lists(edges, f32, f32))
    res["sgd_nesterov_cwd_maximize"] = compare(
        sgd, sgd_h(nesterov=True, cautious_wd=True, maximize=True, weight_decay=0.5),
        _lists(small, f32, f32),
    )  # fmt: skip
    res["sgd_dampening"] = compare(
        sgd, sgd_h(dampening=0.1, weight_decay=0.0), _lists(small, f32, f32), "paper"
    )
    res["sgd_views_unaligned"] = compare(
        sgd, sgd_h(nesterov=True), _lists([100, 128, 3, 0, 77], f32, f32, start=3)
    )
    res["sgd_bf16_params"] = compare(sgd, sgd_h(cautious_wd=True), _lists(small, bf16, f32))
    res["sgd_fp16_state"] = compare(sgd, sgd_h(nesterov=True), _lists(small, f32, f16))

    # Lion's count kernel writes nothing.
    p, m, gseq = _lists(small, f32, f32)
    m0 = [x.clone() for x in m]
    _backend(lion, "triton").count_pass(p, gseq[0], (m,), lion_h()(0))
    res["lion_count_read_only"] = all(torch.equal(a, b) for a, b in zip(m, m0))

    # The factor computed inside the update kernels equals common.cautious_factor bitwise.
    for name, mod, hyper in (("lion", lion, lion_h(cautious_wd=True)), ("sgd", sgd, sgd_h())):
        for formula, clamp in (("clamp", 1e-3), ("clamp", 0.25), ("paper", 1e-3)):
            a = _lists([300, 65, 128, 7], f32, f32)
            b = [[t.clone() for t in x] for x in a[:2]]
            counts = torch.tensor([0, 3, 128, 2], dtype=torch.int64)
            numels = _numels(a[0])
            tri = _backend(mod, "triton")
            tri.update_pass(a[0], a[2][0], (a[1],), cautious_factor(counts, numels, formula, clamp),
                            hyper(1))  # fmt: skip
            tri.update_pass(b[0], a[2][0], (b[1],), None, hyper(1),
                            factor=(counts, numels, formula, clamp))  # fmt: skip
            res[f"fused_factor_{name}_{formula}_{clamp}"] = (
                all(torch.equal(x, y) for i in (0, 1) for x, y in zip(a[i], b[i]))
                and tri.caps.fused_factor
            )

    # Cautious weight decay at a zero direction (g = 0 with zero state: u = 0, decayed by the
    # paper's u * p >= 0 rule) and at both signs: triton equals the reference to 1e-6
    # (SGD's Nesterov add is fused in torch's CPU kernel), the u = 0 coordinate exactly.
    p0 = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, 0.0] * 3)
    g0 = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.7, -0.4, 0.0, 0.3] * 3)
    one = torch.ones(1)
    decayed6 = (p0[6:7] * (1 - 1e-2 * 0.5)).item()  # fp32, as the kernels round it
    zero_dir = {}
    for name, mod, h in (
        ("lion", lion, LionHyper(1e-2, 0.9, 0.99, 0.5, cautious_wd=True)),
        ("sgd", sgd, SGDHyper(1e-2, 0.9, 0.0, True, 0.5, first_step=True, cautious_wd=True)),
    ):
        out = []
        for be in ("triton", "reference"):
            p, st = [p0.clone()], [torch.zeros_like(p0)]
            _backend(mod, be).count_pass(p, [g0], (st,), h)
            _backend(mod, be).update_pass(p, [g0], (st,), one, h)
            out.append(p[0])
        zero_dir[name] = rel_err(*out) <= 1e-6 and out[0][6].item() == decayed6
    ha = UpdateHyper(1e-2, 0.999, 1e-8, 0.5, 1, 0.9, cautious_wd=True)
    out = []
    for be in (tk, adam_ref):
        p, m, v = [p0.clone()], [torch.zeros_like(p0)], [torch.zeros_like(p0)]
        be.count_pass([g0], m, 0.9, False)
        be.update_pass(p, [g0], m, v, one, ha)
        out.append(p[0])
    zero_dir["adamw"] = rel_err(*out) <= 1e-6 and out[0][6].item() == decayed6
    res["cwd_zero_direction"] = zero_dir

    res["adamw_cwd"] = adamw_compare(edges)
    res["adamw_cwd_deferred"] = adamw_compare(small, defer=True)
    res["adamw_cwd_maximize"] = adamw_compare(small, maximize=True)

    with warnings.catch_warnings(record=True) as wlog:
        warnings.simplefilter("always")
        res["lion_fp64_fallback"] = compare(
            lion, lion_h(cautious_wd=True), _lists([65, 9], torch.float64, torch.float64)
        )
        res["sgd_noncontig_fallback"] = compare(
            sgd, sgd_h(nesterov=True), _lists([6, 10], f32, f32, strided_grads=True)
        )
        res["lion_noncontig_fallback"] = compare(
            lion, lion_h(), _lists([6, 10], f32, f32, strided_grads=True)
        )
    res["fallback_warnings"] = sorted({str(w.message) for w in wlog})
    print(json.dumps(res))


if __name__ == "__main__":
    main()
