"""The fused CPU kernel (``backend="cpu"``, dist_cautious/kernels/cpu_fused.py): against the
float64 oracle, the foreach backend (bitwise where the math is the same), torch's fused CPU
AdamW (bitwise where nothing is masked), split invariance, fallbacks and errors."""

from __future__ import annotations

import pytest
import torch

from dist_cautious import CAdamW
from dist_cautious.flat import FlatLayout, Fragment
from dist_cautious.kernels import cpu_fused, foreach
from dist_cautious.kernels.common import UpdateHyper, cautious_factor
from tests.oracle import Float64CAdamW, rel_err

# sizes around the vector width and the 32768-element chunk (tails, several chunks, empty)
SIZES = [0, 1, 7, 37, 1000, 32769]

needs_kernel = pytest.mark.skipif(
    not cpu_fused.available(), reason=f"CPU kernel unavailable: {cpu_fused.why_unavailable()}"
)


def _lists(seed: int, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(n, generator=g) for n in sizes],  # p
        [torch.randn(n, generator=g) for n in sizes],  # g
        [0.1 * torch.randn(n, generator=g) for n in sizes],  # m
        [0.01 * torch.rand(n, generator=g) for n in sizes],  # v
    ]


@needs_kernel
@pytest.mark.parametrize(  # beta1: torch's two lerp formulas (weight < / >= 0.5)
    "beta1, maximize, cautious_wd", [(0.9, False, False), (0.3, True, False), (0.9, True, True)]
)
def test_passes_against_foreach(beta1, maximize, cautious_wd):
    """Three steps on tensors of every awkward size: first moment, counts and second moment
    bitwise foreach's; parameters within 2 ulp (the kernel's sqrt is correctly rounded,
    torch's CPU sqrt is not)."""
    a, b = _lists(0), _lists(0)
    numels = torch.tensor(SIZES)
    for step in (1, 2, 3):
        sa, sb = {}, {}
        ca = cpu_fused.count_pass(a[1], a[2], beta1, maximize, scratch=sa)
        cb = foreach.count_pass(b[1], b[2], beta1, maximize, scratch=sb)
        assert torch.equal(ca, cb)
        assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
        alphas = cautious_factor(ca, numels, "clamp", 1e-3)
        h = UpdateHyper(
            lr=1e-2,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            step=step,
            beta1=beta1,
            maximize=maximize,
            cautious_wd=cautious_wd,
        )
        before = [t.clone() for t in b[0]]
        for x, y in zip(a[0], b[0]):  # one step's difference at a time (they would add up)
            x.copy_(y)
        cpu_fused.update_pass(*a, alphas, h, scratch=sa)
        foreach.update_pass(*b, alphas, h, scratch=sb)
        assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
        for x, y, y0 in zip(a[0], b[0], before):
            # 1 ulp of sqrt moves the update by <= 1 ulp of it; the update is at most
            # |p_new| + |p_old| (measured: at most 1 ulp of p, where |p_new| ~ |p_old|)
            ulp = torch.finfo(torch.float32).eps * (y.abs() + y0.abs())
            assert ((x - y).abs() <= 2 * ulp).all()
        for lst in (a, b):
            for t in lst[1]:
                t.mul_(0.7).add_(0.3)


@needs_kernel
@pytest.mark.parametrize("wd, formula", [(0.1, "clamp"), (0.0, "paper")])
def test_optimizer_matches_float64_oracle(wd, formula):
    shapes = [(7, 5), (1,), (0,), (33,), (129, 3), (33000,)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    oracle = Float64CAdamW(params, lr=1e-2, weight_decay=wd, formula=formula)
    opt = CAdamW(params, lr=1e-2, weight_decay=wd, formula=formula, backend="cpu")
    for _ in range(12):
        gs = [torch.randn(s, generator=gen) + 0.3 * torch.randn((), generator=gen) for s in shapes]
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()
        oracle.step(gs)
    for p, ref in zip(params, oracle.p):
        assert rel_err(p, ref) < 1e-6, (p.shape, rel_err(p, ref))
    for p, m, v in zip(params, oracle.m, oracle.v):
        if p.numel():
            assert (opt.state[p]["exp_avg"].double() - m).abs().max() < 1e-6
            assert (opt.state[p]["exp_avg_sq"].double() - v).abs().max() < 1e-6
    assert 0.2 < opt.kept_fraction < 0.95


@needs_kernel
@pytest.mark.parametrize("seed", range(4))
def test_nothing_masked_is_bitwise_torch_fused_cpu_adamw(seed):
    """Bitwise torch's fused CPU AdamW on its vector body; its last ``numel % width``
    elements (torch computes them with scalar code, whose lerp rounds differently for some
    inputs: measured, 1 ulp, a few seeds in ten) within 1 ulp. Seeded: the global RNG's
    state depended on the tests run before, and so did the tail's rounding."""
    n = 100_003
    tail = 16  # ATen's widest float vector (AVX-512); AVX2 has 8
    gen = torch.Generator().manual_seed(seed)
    p = torch.zeros(n, requires_grad=True)
    q = torch.zeros(n, requires_grad=True)
    ca = CAdamW([p], lr=1e-3, weight_decay=0.1, backend="cpu")
    aw = torch.optim.AdamW([q], lr=1e-3, weight_decay=0.1, fused=True)
    for _ in range(3):
        g = torch.rand(n, generator=gen) + 0.5  # same sign as the momentum: alpha = 1
        p.grad, q.grad = g, g.clone()
        ca.step()
        aw.step()
    body = n - n % tail
    assert torch.equal(p.detach()[:body], q.detach()[:body])
    a, b = p.detach()[body:], q.detach()[body:]
    assert ((a - b).abs() <= torch.finfo(torch.float32).eps * b.abs()).all(), (a - b)


@needs_kernel
def test_fragments_of_a_flat_buffer_step_bitwise_like_whole_tensors():
    """A ZeRO-style flat buffer [a | b | pad] cut into fragments steps bitwise like a and b
    stepped whole: the kernel's elements do not interact (chunking, vector tails)."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(300, 117, generator=gen), torch.randn(33_001, generator=gen)
    flat = torch.nn.Parameter(torch.cat([a.reshape(-1), b, torch.zeros(5)]))
    na = a.numel()
    frags = [Fragment(0, na, 0, 0, na), Fragment(1, b.numel(), 0, na, b.numel())]
    opt = CAdamW([flat], lr=1e-2, weight_decay=0.1, backend="cpu")
    opt.register_layout(flat, FlatLayout(frags, None, flat.numel(), "test"))
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    ref = CAdamW([pa, pb], lr=1e-2, weight_decay=0.1, backend="cpu")
    for _ in range(3):
        ga, gb = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
        flat.grad = torch.cat([ga.reshape(-1), gb, torch.ones(5)])
        pa.grad, pb.grad = ga, gb
        opt.step()
        ref.step()
    assert torch.equal(flat.detach()[:na], pa.detach().reshape(-1))
    assert torch.equal(flat.detach()[na : na + b.numel()], pb.detach())
    assert torch.equal(flat.detach()[na + b.numel() :], torch.zeros(5))


@needs_kernel
def test_auto_picks_the_kernel_on_cpu_and_the_switch_turns_it_off(monkeypatch):
    p = torch.nn.Parameter(torch.randn(10))
    opt = CAdamW([p])
    assert opt._resolve("auto", torch.device("cpu")) is cpu_fused
    monkeypatch.setenv(cpu_fused.ENV_SWITCH, "0")
    assert opt._resolve("auto", torch.device("cpu")).count_pass is foreach.count_pass
    assert opt._resolve("cpu", torch.device("cpu")) is cpu_fused  # explicit choice kept


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_go_to_foreach(dtype):
    """Not float32: the same call is foreach's, bitwise."""
    gen = torch.Generator().manual_seed(1)
    ps = [torch.randn(50, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
    qs = [t.detach().clone().requires_grad_() for t in ps]
    oa = CAdamW(ps, lr=1e-2, backend="cpu")
    ob = CAdamW(qs, lr=1e-2, backend="foreach")
    for _ in range(3):
        gs = [torch.randn(50, generator=gen).to(dtype) for _ in ps]
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g, g.clone()
        oa.step()
        ob.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


def test_unavailable_kernel_errors_and_auto_falls_back(monkeypatch):
    from dist_cautious import kernels

    monkeypatch.setattr(cpu_fused, "_state", {"lib": None, "why": "no C compiler found (test)"})
    with pytest.raises(RuntimeError, match=r"no C compiler found \(test\).*backend='foreach'"):
        kernels.resolve("cpu", torch.device("cpu"))
    opt = CAdamW([torch.nn.Parameter(torch.randn(3))])
    assert opt._resolve("auto", torch.device("cpu")).count_pass is foreach.count_pass
    with pytest.raises(ValueError, match="backend='cpu' is the fused CPU kernel"):
        kernels.resolve("cpu", torch.device("meta"))


def test_build_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DIST_CAUTIOUS_BUILD_DIR", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert cpu_fused.build_dir() == tmp_path / "ext" / "dist_cautious"
    monkeypatch.setenv("DIST_CAUTIOUS_BUILD_DIR", str(tmp_path / "mine"))
    assert cpu_fused.build_dir() == tmp_path / "mine"
