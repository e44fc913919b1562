"""Triton kernels under the interpreter, against the reference backend and the float64 oracle.

Run by tests/unit/test_triton.py in a subprocess with ``TRITON_INTERPRET=1`` (Triton reads
it when the kernels are defined, i.e. at import). Prints one JSON object: per case the
numbers the test asserts on (exact count equality, relative errors).
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

from dist_cautious import CAdamW  # noqa: E402
from dist_cautious.kernels import UpdateHyper, cautious_factor, reference  # noqa: E402
from dist_cautious.kernels import triton_adamw as tk  # noqa: E402
from tests.oracle import Float64CAdamW, rel_err  # noqa: E402

assert os.environ.get("TRITON_INTERPRET") == "1" and tk.INTERPRETED, "run with TRITON_INTERPRET=1"

H = UpdateHyper(lr=1e-2, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, beta1=0.9)


def _err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if y.numel():
            worst = max(worst, rel_err(x, y))
    return worst


def _state(sizes, pdt, sdt, gen):
    p = [torch.randn(s, generator=gen).to(pdt) for s in sizes]
    g = [torch.randn(s, generator=gen).to(pdt) for s in sizes]
    m = [(torch.randn(s, generator=gen) * 0.5).to(sdt) for s in sizes]
    v = [torch.rand(s, generator=gen).to(sdt) for s in sizes]
    return p, g, m, v


def _flat_views(sizes, pdt, sdt, gen, start):
    """Slices of four flat buffers (a ZeRO partition), the first at element ``start``."""
    total = start + sum(sizes) + 5
    flats = [
        torch.randn(total, generator=gen).to(pdt),
        torch.randn(total, generator=gen).to(pdt),
        (torch.randn(total, generator=gen) * 0.5).to(sdt),
        torch.rand(total, generator=gen).to(sdt),
    ]
    out: list[list[torch.Tensor]] = [[], [], [], []]
    for k in range(4):
        o = start
        for s in sizes:
            out[k].append(flats[k][o : o + s])
            o += s
    return out, flats


def compare(lists, h=H, maximize=False, defer=False) -> dict:
    """Triton passes vs reference passes on copies of the same tensors."""
    p, g, m, v = lists
    ref = [[t.clone() for t in x] for x in (p, m, v)]
    p0 = [t.clone() for t in p]
    if defer:
        m_before = [t.clone() for t in m]
        c_t, deferred = tk.count_pass(g, m, h.beta1, maximize, defer_exp_avg=True)
        m_untouched = all(torch.equal(a, b) for a, b in zip(m, m_before))
    else:
        c_t, deferred, m_untouched = tk.count_pass(g, m, h.beta1, maximize), False, None
    c_r = reference.count_pass(g, ref[1], h.beta1, maximize)
    numels = torch.tensor([t.numel() for t in p])
    alphas = cautious_factor(c_r, numels, "clamp", 1e-3)
    hm = UpdateHyper(**{**h.__dict__, "maximize": maximize})
    tk.update_pass(p, g, m, v, alphas, hm, exp_avg_pending=deferred)
    reference.update_pass(ref[0], g, ref[1], ref[2], alphas, hm)
    out = dict(
        counts_equal=torch.equal(c_t, c_r),
        counts=c_r.tolist(),
        p=_err(p, ref[0]),
        dp=_err(
            [a.double() - b.double() for a, b in zip(p, p0)],
            [a.double() - b.double() for a, b in zip(ref[0], p0)],
        ),
        m=_err(m, ref[1]),
        v=_err(v, ref[2]),
        deferred=deferred,
    )
    if m_untouched is not None:
        out["m_untouched_by_deferred_count"] = m_untouched
    return out


def optimizer_vs_oracle(pdt: torch.dtype, steps: int = 3) -> dict:
    gen = torch.Generator().manual_seed(11)
    shapes = [(7, 5), (0,), (33,), (130,), (3, 3), (257,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    ps = [torch.nn.Parameter(x.clone().to(pdt)) for x in init]
    rs = [torch.nn.Parameter(x.clone().to(pdt)) for x in init]
    opt = CAdamW(ps, lr=1e-2, weight_decay=0.1, backend="triton")
    ref = CAdamW(rs, lr=1e-2, weight_decay=0.1, backend="reference")
    oracle = Float64CAdamW([x.to(pdt).float() for x in init], lr=1e-2, weight_decay=0.1)
    kept = []
    for s in range(steps):
        grads = [torch.randn(sh, generator=gen).to(pdt) for sh in shapes]
        grads[4] = None if s == 1 else grads[4]  # a parameter without gradient one step
        for p, r, gr in zip(ps, rs, grads):
            p.grad = None if gr is None else gr.clone()
            r.grad = None if gr is None else gr.clone()
        opt.step()
        ref.step()
        oracle.step([None if gr is None else gr.double() for gr in grads])
        kept.append((int(opt.mask_stats["kept"].sum()), sum(oracle.kept)))
    return dict(
        p_vs_reference=max(rel_err(p.detach(), r.detach()) for p, r in zip(ps, rs) if r.numel()),
        p=max(rel_err(p.detach(), q) for p, q in zip(ps, oracle.p) if q.numel()),
        delta=max(
            rel_err(p.detach().double() - x.to(pdt).double(), q - x.to(pdt).double())
            for p, q, x in zip(ps, oracle.p, init)
            if q.numel()
        ),
        kept=kept,
        steps=[float(opt.state[p]["step"]) for p in ps],
        oracle_steps=oracle.t,
    )


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    res: dict = {}
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

    # Small blocks so that block and chunk boundaries are cheap to reach: chunk = 128.
    tk.configure(block=64, tiles=2, num_warps=4)
    edges = [1, 0, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 3]
    res["fp32_edges"] = compare(_state(edges, f32, f32, gen))
    res["bf16_params_fp32_state_maximize"] = compare(_state(edges, bf16, f32, gen), maximize=True)
    res["fp16_params_fp32_state"] = compare(_state([5, 128, 300], f16, f32, gen))
    res["bf16_state"] = compare(_state([5, 128, 300], bf16, bf16, gen))
    views, flats = _flat_views([100, 128, 3, 256, 0, 77], f32, f32, gen, start=4)
    res["views_aligned"] = compare(views)
    views, flats = _flat_views([100, 128, 3, 256, 0, 77], f32, f32, gen, start=3)
    res["views_unaligned"] = compare(views)
    views, flats = _flat_views([130, 256, 9], bf16, f32, gen, start=8)
    res["views_bf16"] = compare(views)
    res["deferred_fp32"] = compare(_state(edges, f32, f32, gen), defer=True)
    res["deferred_bf16_maximize"] = compare(
        _state([5, 128, 300], bf16, f32, gen), maximize=True, defer=True
    )
    lerp_hi = UpdateHyper(**{**H.__dict__, "beta1": 0.3})  # 1 - beta1 >= 0.5: other formula
    res["lerp_high_weight"] = compare(_state([65, 128], f32, f32, gen), h=lerp_hi)
    res["no_weight_decay"] = compare(
        _state([65, 200], f32, f32, gen), h=UpdateHyper(**{**H.__dict__, "weight_decay": 0.0})
    )

    # The factor computed inside the update kernel equals common.cautious_factor bit for bit:
    # clamp formula with the clamp active (tiny counts), the paper formula.
    for formula, clamp in (("clamp", 1e-3), ("clamp", 0.25), ("paper", 1e-3)):
        a = _state([300, 65, 128, 7], f32, f32, gen)
        b = [[t.clone() for t in x] for x in a]
        counts = torch.tensor([0, 3, 128, 2], dtype=torch.int64)
        numels = torch.tensor([t.numel() for t in a[0]], dtype=torch.int64)
        tk.update_pass(*a, cautious_factor(counts, numels, formula, clamp), H)
        tk.update_pass(*b, None, H, factor=(counts, numels, formula, clamp))
        res[f"fused_factor_{formula}_{clamp}"] = all(
            torch.equal(x, y) for i in (0, 3) for x, y in zip(a[i], b[i])
        )

    # The table cache: the same tensors hit; new tensors of the same sizes (fresh gradients
    # every step) refresh the offsets of the same entry in place; new sizes add an entry.
    # Every call must still count exactly what the reference counts.
    def counted(st):
        ref_m = [t.clone() for t in st[2]]
        want = reference.count_pass(st[1], ref_m, 0.9, False)
        got = cached.count_pass(st[1], st[2], 0.9, False)
        return torch.equal(got, want) and all(
            (x - y).abs().max().item() <= 1e-6 for x, y in zip(st[2], ref_m)
        )

    cached = tk.TritonAdamW()  # a backend instance owns its table cache
    lists = _state([65, 200], f32, f32, gen)
    ok = counted(lists)
    n0 = len(cached.mt.tables)
    ok &= counted(lists)
    n1 = len(cached.mt.tables)
    other = _state([65, 200], f32, f32, gen)  # same sizes, other addresses
    ok &= counted(other)
    n2 = len(cached.mt.tables)
    ok &= counted(lists)  # back to the first addresses
    unaligned, _ = _flat_views([65, 200], f32, f32, gen, start=1)  # same sizes, 4-byte offsets
    ok &= counted(unaligned)
    ok &= counted(_state([66, 200], f32, f32, gen))  # new sizes
    res["cache"] = dict(
        hit_adds_nothing=n1 == n0,
        same_sizes_reuse_entry=n2 == n1,
        new_sizes_add_one=len(cached.mt.tables) == n2 + 1,
        counts_right=bool(ok),
    )

    # Fallbacks: float64 state and non-contiguous gradients go to foreach (same math), warned.
    with warnings.catch_warnings(record=True) as wlog:
        warnings.simplefilter("always")
        res["fp64_fallback"] = compare(_state([65, 9], torch.float64, torch.float64, gen))
        p, g, m, v = _state([6, 10], f32, f32, gen)
        g = [torch.randn(s * 2, generator=gen)[::2] for s in (6, 10)]  # strided
        res["noncontig_fallback"] = compare([p, g, m, v])
        res["noncontig_deferred_fallback"] = compare([p, g, m, v], defer=True)
    res["fallback_warnings"] = sorted({str(w.message) for w in wlog})

    # Default launch configuration (chunks of 4096 and 8192): full chunks and tails.
    tk.configure(reset=True)
    res["default_config"] = compare(_state([8192 + 5, 1, 8192, 4096], f32, f32, gen), defer=True)

    # The optimizer end to end (cached plan, deferred exp_avg) against the float64 oracle.
    tk.configure(block=64, tiles=2, num_warps=4)
    res["optimizer_fp32"] = optimizer_vs_oracle(f32)
    res["optimizer_bf16"] = optimizer_vs_oracle(bf16)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
