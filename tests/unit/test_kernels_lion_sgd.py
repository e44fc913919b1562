"""Kernels of cautious Lion, cautious SGD-momentum and AdamW's cautious weight decay.

Driven pass by pass as the optimizer drives them (count -> factor -> update), against
independent references: the float64 oracles (tests/oracle.py), ``torch.optim.SGD`` and a
plain Lion written here as lion-pytorch does it, and closed forms for single steps.
The Triton backend runs under the interpreter in a subprocess (tests/unit/
triton_lion_sgd_cases.py); this file asserts on its numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_cautious.kernels import foreach as adam_foreach
from dist_cautious.kernels import get_backend, lion, sgd
from dist_cautious.kernels import reference as adam_reference
from dist_cautious.kernels.common import LionHyper, SGDHyper, UpdateHyper, cautious_factor
from tests.interpreter import run_cases
from tests.oracle import Float64CAdamW, Float64CLion, Float64CSGD, rel_err


def _backend(mod, name: str):  # noqa: ANN001, ANN202
    """``name``'s backend of the optimizer whose math module is ``mod`` (lion or sgd)."""
    return get_backend(name, mod.__name__.rsplit(".", 1)[-1])


SHAPES = [(7, 5), (0,), (1,), (33,), (130,), (3, 3), (1, 1)]
STEPS = 10
LR = 1e-2
SGD_VARIANTS = {  # name: (nesterov, dampening)
    "heavy_ball": (False, 0.0),
    "heavy_ball_dampening": (False, 0.1),
    "nesterov": (True, 0.0),
    "nesterov_dampening": (True, 0.1),
}


def init_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def grad_stream(shapes=SHAPES, steps=STEPS, seed=1, dtype=torch.float32):
    """Gradients with a drifting mean: many sign flips against the momentum, but not all."""
    g = torch.Generator().manual_seed(seed)
    return [
        [(torch.randn(s, generator=g) + 0.3 * torch.randn(()).item()).to(dtype) for s in shapes]
        for _ in range(steps)
    ]


def _numels(ps):
    return torch.tensor([p.numel() for p in ps], dtype=torch.int64)


def run_lion(backend, params, grads, *, formula="clamp", clamp=1e-3, state_dtype=None, **hk):
    """Steps ``params`` in place with C-Lion; returns (states, counts per step)."""
    b = _backend(lion, backend)
    sdt = state_dtype or (torch.float64 if params[0].dtype == torch.float64 else torch.float32)
    m = [torch.zeros(p.shape, dtype=sdt) for p in params]
    h = LionHyper(lr=hk.pop("lr", LR), **{"beta1": 0.9, "beta2": 0.99, **hk})
    counts, scratch = [], {}
    fdt = torch.float64 if sdt == torch.float64 else torch.float32
    for gs in grads:
        c = b.count_pass(params, gs, (m,), h, scratch)
        counts.append(c.tolist())
        b.update_pass(
            params, gs, (m,), cautious_factor(c, _numels(params), formula, clamp, fdt), h, scratch
        )
    return m, counts


def run_sgd(backend, params, grads, *, formula="clamp", clamp=1e-3, state_dtype=None, **hk):
    b = _backend(sgd, backend)
    sdt = state_dtype or (torch.float64 if params[0].dtype == torch.float64 else torch.float32)
    buf = [torch.zeros(p.shape, dtype=sdt) for p in params]
    base = {"lr": LR, "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}
    base.update(hk)
    counts, scratch = [], {}
    fdt = torch.float64 if sdt == torch.float64 else torch.float32
    for t, gs in enumerate(grads):
        h = SGDHyper(first_step=t == 0, **base)
        c = b.count_pass(params, gs, (buf,), h, scratch)
        counts.append(c.tolist())
        b.update_pass(
            params, gs, (buf,), cautious_factor(c, _numels(params), formula, clamp, fdt), h, scratch
        )
    return buf, counts


def run_adamw(backend, params, grads, *, formula="clamp", clamp=1e-3, **hk):
    mod = adam_reference if backend == "reference" else adam_foreach
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    counts = []
    base = {"lr": LR, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
    base.update(hk)
    maximize = base.get("maximize", False)
    for t, gs in enumerate(grads, start=1):
        c = mod.count_pass(gs, m, base["beta1"], maximize)
        counts.append(c.tolist())
        h = UpdateHyper(step=t, **base)
        mod.update_pass(params, gs, m, v, cautious_factor(c, _numels(params), formula, clamp), h)
    return m, v, counts


def _assert_close_to_oracle(ps, ref, tol=1e-6):
    for p, q in zip(ps, ref):
        if q.numel():
            assert rel_err(p, q) < tol, (p.shape, rel_err(p, q))


# --------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("formula", ["clamp", "paper"])
@pytest.mark.parametrize("cwd", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_lion_reference_matches_float64_oracle(formula, cwd, maximize):
    init, grads = init_params(), grad_stream()
    ps = [x.clone() for x in init]
    oracle = Float64CLion(
        init, lr=LR, betas=(0.9, 0.99), weight_decay=0.5, formula=formula, maximize=maximize,
        cautious_wd=cwd,
    )  # fmt: skip
    m, counts = run_lion(
        "reference",
        ps,
        grads,
        formula=formula,
        weight_decay=0.5,
        maximize=maximize,
        cautious_wd=cwd,
    )
    kept = []
    for gs in grads:
        oracle.step(gs)
        kept.append(list(oracle.kept))
    assert counts == kept
    _assert_close_to_oracle(ps, oracle.p)
    for a, b in zip(m, oracle.m):
        if b.numel():  # O(1) sums that can cancel: absolute
            assert (a.double() - b).abs().max().item() < 1e-6
    # the cautious mask removed elements in this stream (else the test proves little)
    assert sum(map(sum, kept)) < STEPS * sum(p.numel() for p in ps)


@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
@pytest.mark.parametrize("formula", ["clamp", "paper"])
@pytest.mark.parametrize("cwd", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_reference_matches_float64_oracle(variant, formula, cwd, maximize):
    nesterov, dampening = SGD_VARIANTS[variant]
    init, grads = init_params(), grad_stream()
    ps = [x.clone() for x in init]
    kw = dict(
        momentum=0.9, dampening=dampening, nesterov=nesterov, weight_decay=0.1, maximize=maximize,
        cautious_wd=cwd,
    )  # fmt: skip
    oracle = Float64CSGD(init, lr=LR, formula=formula, **kw)
    buf, counts = run_sgd("reference", ps, grads, formula=formula, **kw)
    kept = []
    for gs in grads:
        oracle.step(gs)
        kept.append(list(oracle.kept))
    assert counts == kept
    _assert_close_to_oracle(ps, oracle.p)
    for a, b in zip(buf, oracle.buf):
        if b.numel():
            assert rel_err(a, b) < 1e-6
    assert sum(map(sum, kept)) < STEPS * sum(p.numel() for p in ps)


@pytest.mark.parametrize("formula", ["clamp", "paper"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_adamw_cautious_wd_matches_float64_oracle(formula, maximize, backend):
    init, grads = init_params(), grad_stream()
    ps = [x.clone() for x in init]
    oracle = Float64CAdamW(
        init, lr=LR, weight_decay=0.5, formula=formula, maximize=maximize, cautious_wd=True
    )
    plain = Float64CAdamW(init, lr=LR, weight_decay=0.5, formula=formula, maximize=maximize)
    _, _, counts = run_adamw(
        backend, ps, grads, formula=formula, weight_decay=0.5, maximize=maximize, cautious_wd=True
    )
    kept = []
    for gs in grads:
        oracle.step(gs)
        plain.step(gs)
        kept.append(list(oracle.kept))
    assert counts == kept
    _assert_close_to_oracle(ps, oracle.p)
    # and it is not plain decoupled decay
    assert max(rel_err(a, b) for a, b in zip(oracle.p, plain.p) if b.numel()) > 1e-4


# --------------------------------------------------------------------------- foreach


def _lists_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _max_rel(a, b):
    return max(rel_err(x, y) for x, y in zip(a, b) if y.numel())


# foreach SGD folds the step into one addcmul on CPU (fused multiply-add in torch's kernel):
# a last-bit difference from the reference's multiply-then-subtract, so not bitwise.
SGD_FOREACH_TOL = {
    torch.float64: 1e-13,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


LION_CASES = {
    "plain": dict(weight_decay=0.1),
    "cwd_maximize": dict(weight_decay=0.1, cautious_wd=True, maximize=True),
    "no_wd_beta1_low": dict(weight_decay=0.0, beta1=0.3),  # 1 - beta1 >= 0.5: other lerp
}


@pytest.mark.parametrize("case", list(LION_CASES))
def test_lion_foreach_is_bitwise_reference(case):
    init, grads = init_params(), grad_stream()
    a, b = [x.clone() for x in init], [x.clone() for x in init]
    ma, ca = run_lion("reference", a, grads, **LION_CASES[case])
    mb, cb = run_lion("foreach", b, grads, **LION_CASES[case])
    assert ca == cb and _lists_equal(a, b) and _lists_equal(ma, mb)


SGD_CASES = {
    "heavy_ball_l2": dict(weight_decay=0.1),
    "heavy_ball_dampening_maximize": dict(dampening=0.1, maximize=True),
    "nesterov_l2": dict(nesterov=True, weight_decay=0.1),
    "nesterov_cwd": dict(nesterov=True, weight_decay=0.1, cautious_wd=True),
    "heavy_ball_cwd_maximize": dict(weight_decay=0.1, cautious_wd=True, maximize=True),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_foreach_matches_reference(case):
    init, grads = init_params(), grad_stream()
    a, b = [x.clone() for x in init], [x.clone() for x in init]
    ba, ca = run_sgd("reference", a, grads, **SGD_CASES[case])
    bb, cb = run_sgd("foreach", b, grads, **SGD_CASES[case])
    assert ca == cb
    assert _max_rel(b, a) < 1e-6 and _max_rel(bb, ba) < 1e-6, (_max_rel(b, a), _max_rel(bb, ba))


@pytest.mark.parametrize("which", ["lion", "sgd"])
@pytest.mark.parametrize(
    "pdt,sdt",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float64),
    ],
)
def test_foreach_matches_reference_in_every_dtype(which, pdt, sdt):
    run = run_lion if which == "lion" else run_sgd
    kw = dict(weight_decay=0.1, cautious_wd=True)
    init = init_params(dtype=pdt)
    grads = grad_stream(dtype=pdt, steps=4)
    a, b = [x.clone() for x in init], [x.clone() for x in init]
    sa, ca = run("reference", a, grads, state_dtype=sdt, **kw)
    sb, cb = run("foreach", b, grads, state_dtype=sdt, **kw)
    assert ca == cb
    assert all(x.dtype == pdt for x in b) and all(s.dtype == sdt for s in sb)
    if which == "lion":
        assert _lists_equal(a, b) and _lists_equal(sa, sb)
    else:
        assert _max_rel(b, a) < SGD_FOREACH_TOL[pdt], _max_rel(b, a)
        assert _max_rel(sb, sa) < SGD_FOREACH_TOL[sdt], _max_rel(sb, sa)


def test_adamw_cautious_wd_foreach_matches_reference_and_plain_path_untouched():
    init, grads = init_params(), grad_stream()
    for cwd in (False, True):
        a, b = [x.clone() for x in init], [x.clone() for x in init]
        _, va, ca = run_adamw("reference", a, grads, cautious_wd=cwd)
        _, vb, cb = run_adamw("foreach", b, grads, cautious_wd=cwd)
        assert ca == cb
        assert max(rel_err(x, y) for x, y in zip(b, a) if y.numel()) < 1e-6
    # cautious_wd=False is bitwise what the backends computed before the option existed
    a = [x.clone() for x in init]
    c = [x.clone() for x in init]
    run_adamw("reference", a, grads[:3])
    run_adamw("reference", c, grads[:3], cautious_wd=False, weight_decay=0.1)
    assert _lists_equal(a, c)


@pytest.mark.parametrize("which", ["lion", "sgd"])
def test_foreach_scratch_handoff_and_stale_scratch(which):
    """The mask handed from count to update through ``scratch`` is used only for the same,
    unmodified tensors: a gradient changed in between is seen, and scratch is cleared."""
    mod = lion if which == "lion" else sgd
    if which == "lion":
        h = LionHyper(lr=LR, beta1=0.9, beta2=0.99, weight_decay=0.1, cautious_wd=True)
    else:
        h = SGDHyper(LR, 0.9, 0.0, True, 0.1, first_step=False)
    init, (g1, g2) = init_params(), grad_stream(steps=2)
    st0 = [torch.randn(p.shape) * 0.1 for p in init]
    runs = {}
    for name, be in (
        ("reference", _backend(mod, "reference")),
        ("foreach", _backend(mod, "foreach")),
    ):
        p = [x.clone() for x in init]
        st = [x.clone() for x in st0]
        g = [x.clone() for x in g1]
        scratch: dict = {}
        c = be.count_pass(p, g, (st,), h, scratch)
        if name == "foreach":
            assert scratch  # the hand-off happened
        for x, y in zip(g, g2):  # stale: the gradient changes between the passes
            x.copy_(y)
        be.update_pass(p, g, (st,), cautious_factor(c, _numels(p), "clamp", 1e-3), h, scratch)
        assert scratch == {}
        runs[name] = (p, st)
    if which == "lion":
        assert _lists_equal(runs["reference"][0], runs["foreach"][0])
        assert _lists_equal(runs["reference"][1], runs["foreach"][1])
    else:
        assert _max_rel(runs["foreach"][0], runs["reference"][0]) < 1e-6
        assert _max_rel(runs["foreach"][1], runs["reference"][1]) < 1e-6


@pytest.mark.parametrize("which", ["lion", "sgd"])
def test_foreach_device_path_matches_reference(which, monkeypatch):
    """The path foreach takes off the CPU (allocated temporaries, the step scalar kept as a
    device tensor), run here on CPU by switching the host check off."""
    mod = lion if which == "lion" else sgd
    monkeypatch.setattr(mod, "_host", lambda t: False)
    run = run_lion if which == "lion" else run_sgd
    kw = dict(weight_decay=0.1, cautious_wd=True, maximize=True)
    if which == "sgd":
        kw["nesterov"] = True
    init, grads = init_params(), grad_stream(steps=4)
    a, b = [x.clone() for x in init], [x.clone() for x in init]
    sa, ca = run("reference", a, grads, **kw)
    sb, cb = run("foreach", b, grads, **kw)
    assert ca == cb and _lists_equal(a, b) and _lists_equal(sa, sb)  # same op order: bitwise


def test_empty_lists_and_empty_tensors():
    for mod, h in (
        (lion, LionHyper(LR, 0.9, 0.99, 0.1)),
        (sgd, SGDHyper(LR, 0.9, 0.0, False, 0.1, first_step=True)),
    ):
        for name in ("reference", "foreach"):
            be = _backend(mod, name)
            assert be.count_pass([], [], ([],), h).numel() == 0
            be.update_pass([], [], ([],), torch.zeros(0), h)
            p, g, s = [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)]
            c = be.count_pass(p, g, (s,), h)
            assert c.dtype == torch.int64 and c.tolist() == [0]
            be.update_pass(p, g, (s,), torch.ones(1), h)
    # the optimizer's step plan passes its per-bucket scratch only to backends that say so
    assert (
        _backend(lion, "foreach").caps.takes_scratch and _backend(sgd, "foreach").caps.takes_scratch
    )
    with pytest.raises(ValueError, match="unknown Lion backend 'fused'"):
        _backend(lion, "fused")
    with pytest.raises(ValueError, match="unknown SGD backend 'fused'"):
        _backend(sgd, "fused")


# --------------------------------------------------------------------------- the mask acts


def plain_lion(params, grads, lr, betas, wd, maximize=False):
    """Lion as lion-pytorch's update_fn writes it (no mask, no factor)."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    for gs in grads:
        for p, g, e in zip(params, gs, m):
            g = -g if maximize else g
            p.mul_(1 - lr * wd)
            update = e.clone().mul_(b1).add(g, alpha=1 - b1).sign_()
            p.add_(update, alpha=-lr)
            e.mul_(b2).add_(g, alpha=1 - b2)
    return m


def torch_sgd(params, grads, **kw):
    ps = [torch.nn.Parameter(p) for p in params]
    opt = torch.optim.SGD(ps, **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], [opt.state[p]["momentum_buffer"] for p in ps]


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_lion_mask_acts(backend):
    """One step from a momentum that disagrees with the gradient at known coordinates:
    there the parameter is not moved; elsewhere it moves by lr * alpha * sign."""
    p0 = torch.randn(64, dtype=torch.float64)
    m0 = torch.randn(64, dtype=torch.float64)
    g = torch.randn(64, dtype=torch.float64) * 0.01  # c = 0.9 m + 0.1 g: sign(m) mostly
    p, m = [p0.clone()], [m0.clone()]
    h = LionHyper(lr=LR, beta1=0.9, beta2=0.99, weight_decay=0.0)
    be = _backend(lion, backend)
    c = be.count_pass(p, [g], (m,), h)
    u = torch.sign(0.9 * m0 + 0.1 * g)
    keep = u * g > 0
    assert c.item() == int(keep.sum()) and 0 < c.item() < 64
    a = cautious_factor(c, _numels(p), "clamp", 1e-3, torch.float64)
    be.update_pass(p, [g], (m,), a, h)
    assert torch.equal(p[0][~keep], p0[~keep])
    torch.testing.assert_close(p[0][keep], p0[keep] - LR * (64 / c.item()) * u[keep])
    plain = [p0.clone()]
    plain_lion(plain, [[g]], LR, (0.9, 0.99), 0.0)
    assert (plain[0] - p[0]).abs().max() > 1e-3  # differs from un-cautious Lion


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_mask_acts(backend, nesterov):
    p0 = torch.randn(64, dtype=torch.float64)
    b0 = torch.randn(64, dtype=torch.float64)
    g = torch.randn(64, dtype=torch.float64) * 0.5
    p, b = [p0.clone()], [b0.clone()]
    h = SGDHyper(lr=LR, momentum=0.9, dampening=0.0, nesterov=nesterov, weight_decay=0.0,
                 first_step=False)  # fmt: skip
    be = _backend(sgd, backend)
    c = be.count_pass(p, [g], (b,), h)
    buf = 0.9 * b0 + g
    torch.testing.assert_close(b[0], buf)
    d = g + 0.9 * buf if nesterov else buf
    keep = d * g > 0
    assert c.item() == int(keep.sum()) and 0 < c.item() < 64
    a = cautious_factor(c, _numels(p), "clamp", 1e-3, torch.float64)
    be.update_pass(p, [g], (b,), a, h)
    assert torch.equal(p[0][~keep], p0[~keep])
    torch.testing.assert_close(p[0][keep], p0[keep] - LR * (64 / c.item()) * d[keep])
    assert (p[0] - (p0 - LR * d)).abs().max() > 1e-3  # differs from torch SGD's step


# --------------------------------------------------------------------------- all signs agree


def agreeing_stream(shapes, steps, seed=3):
    """Gradients whose sign per coordinate never changes (|g| >= 0.5): every momentum
    direction agrees with every gradient, so the cautious mask keeps everything."""
    g = torch.Generator().manual_seed(seed)
    sign = [torch.randn(s, generator=g).sign() for s in shapes]
    for s in sign:
        s[s == 0] = 1
    return [
        [sg * (0.5 + torch.rand(sh, generator=g)) for sg, sh in zip(sign, shapes)]
        for _ in range(steps)
    ]


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("variant", ["heavy_ball", "heavy_ball_dampening", "nesterov"])
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_equals_torch_sgd_when_every_sign_agrees(backend, variant, maximize):
    nesterov, dampening = SGD_VARIANTS[variant]
    init = [0.1 * x for x in init_params()]  # |wd * p| << |g|: L2 does not flip signs
    grads = agreeing_stream(SHAPES, STEPS)
    kw = dict(momentum=0.9, dampening=dampening, nesterov=nesterov, weight_decay=0.01,
              maximize=maximize)  # fmt: skip
    ps = [x.clone() for x in init]
    buf, counts = run_sgd(backend, ps, grads, **kw)
    assert all(c == [p.numel() for p in ps] for c in counts)  # all kept: alpha = 1
    want, want_buf = torch_sgd([x.clone() for x in init], grads, lr=LR, **kw)
    for a, b in zip(ps, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(buf, want_buf):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("maximize", [False, True])
def test_lion_equals_plain_lion_when_every_sign_agrees(backend, maximize):
    init, grads = init_params(), agreeing_stream(SHAPES, STEPS)
    ps = [x.clone() for x in init]
    m, counts = run_lion(backend, ps, grads, weight_decay=0.1, maximize=maximize)
    assert all(c == [p.numel() for p in ps] for c in counts)
    want = [x.clone() for x in init]
    want_m = plain_lion(want, grads, LR, (0.9, 0.99), 0.1, maximize=maximize)
    for a, b in zip(ps, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(m, want_m):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- cautious wd


def _cwd_case():
    """Parameters of both signs against a direction of both signs (float64, one step)."""
    p0 = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, 0.0], dtype=torch.float64)
    g = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.7, -0.4, 0.0, 0.3], dtype=torch.float64)
    return p0, g


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_cautious_wd_masks_decay_lion(backend):
    p0, g = _cwd_case()
    wd = 0.5
    out = {}
    for cwd in (False, True):
        p, m = [p0.clone()], [torch.zeros_like(p0)]
        h = LionHyper(LR, 0.9, 0.99, wd, cautious_wd=cwd)
        be = _backend(lion, backend)
        c = be.count_pass(p, [g], (m,), h)
        be.update_pass(p, [g], (m,), torch.ones(1, dtype=torch.float64), h)
        out[cwd] = p[0]
        assert c.item() == 7  # g = 0 at index 6: u = 0 there, not kept
    u = torch.sign(g)  # m = 0: c = 0.1 g
    step = LR * torch.where(u * g > 0, u, 0)
    decayed = p0 * (1 - LR * wd) - step
    torch.testing.assert_close(out[False], decayed, rtol=1e-15, atol=0)
    agree = u * p0 >= 0  # the paper's I(u * p >= 0); index 6 (u = 0) decays
    assert agree.tolist() == [True, True, False, False, True, True, True, True]
    want = torch.where(agree, decayed, p0 - step)
    torch.testing.assert_close(out[True], want, rtol=1e-15, atol=0)
    assert not torch.equal(out[True], out[False])


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_cautious_wd_masks_decay_sgd(backend, nesterov):
    p0, g = _cwd_case()
    wd = 0.5
    p, b = [p0.clone()], [torch.zeros_like(p0)]
    h = SGDHyper(LR, 0.9, 0.0, nesterov, wd, first_step=True, cautious_wd=True)
    be = _backend(sgd, backend)
    be.count_pass(p, [g], (b,), h)
    torch.testing.assert_close(b[0], g, rtol=0, atol=0)  # no L2 term in the buffer
    be.update_pass(p, [g], (b,), torch.ones(1, dtype=torch.float64), h)
    d = g + 0.9 * g if nesterov else g
    step = LR * torch.where(d * g > 0, d, 0)
    agree = d * p0 >= 0
    want = torch.where(agree, p0 * (1 - LR * wd), p0) - step
    torch.testing.assert_close(p[0], want, rtol=1e-15, atol=0)
    # without cautious_wd the decay is torch's L2 term in the gradient instead
    p2, b2 = [p0.clone()], [torch.zeros_like(p0)]
    h2 = SGDHyper(LR, 0.9, 0.0, nesterov, wd, first_step=True)
    be.count_pass(p2, [g], (b2,), h2)
    torch.testing.assert_close(b2[0], g + wd * p0, rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_cautious_wd_masks_decay_adamw(backend):
    p0, g = _cwd_case()
    wd = 0.5
    mod = adam_reference if backend == "reference" else adam_foreach
    p, m, v = [p0.clone()], [torch.zeros_like(p0)], [torch.zeros_like(p0)]
    h = UpdateHyper(lr=LR, beta2=0.999, eps=1e-8, weight_decay=wd, step=1, beta1=0.9,
                    cautious_wd=True)  # fmt: skip
    mod.count_pass([g], m, 0.9, False)
    mod.update_pass(p, [g], m, v, torch.ones(1, dtype=torch.float64), h)
    u = g / (g.abs() + 1e-8)  # first step: m_hat = g, sqrt(v_hat) = |g|
    step = LR * torch.where(g * g > 0, u, 0)
    agree = g * p0 >= 0
    want = torch.where(agree, p0 * (1 - LR * wd), p0) - step
    torch.testing.assert_close(p[0], want, rtol=1e-12, atol=1e-15)
    assert agree.tolist() == [True, True, False, False, True, True, True, True]


# --------------------------------------------------------------------------- triton

CASES = Path(__file__).with_name("triton_lion_sgd_cases.py")


@pytest.fixture(scope="module")
def tr() -> dict:
    return run_cases(CASES, timeout=240)


TRITON_FP32 = [
    "lion_fp32_edges", "lion_cwd_maximize", "lion_lerp_high", "lion_views_unaligned",
    "sgd_heavy_l2", "sgd_nesterov_cwd_maximize", "sgd_dampening", "sgd_views_unaligned",
    "adamw_cwd", "adamw_cwd_deferred", "adamw_cwd_maximize",
]  # fmt: skip
TRITON_LOW = ["lion_bf16_params", "lion_bf16_state", "sgd_bf16_params", "sgd_fp16_state"]
TRITON_FALLBACK = ["lion_fp64_fallback", "sgd_noncontig_fallback", "lion_noncontig_fallback"]


@pytest.mark.parametrize("case", TRITON_FP32 + TRITON_FALLBACK)
def test_triton_matches_reference(tr, case):
    c = tr[case]
    assert c["counts_equal"], c
    assert c["p"] <= 1e-6 and c["state"] <= 1e-6, c
    assert c["masked_some"], c  # the mask acted in this case


@pytest.mark.parametrize("case", TRITON_LOW)
def test_triton_low_precision_matches_reference(tr, case):
    c = tr[case]
    assert c["counts_equal"], c
    assert c["p"] <= 1e-3 and c["state"] <= 1e-3, c  # measured: 0 (bitwise)


def test_triton_edges_and_fallback_warnings(tr):
    assert tr["lion_fp32_edges"]["counts"][0][1] == 0  # the empty tensor, in one call
    assert len(tr["lion_fp32_edges"]["counts"][0]) == 13
    assert any("float64" in w for w in tr["fallback_warnings"])
    assert any("non-contiguous" in w for w in tr["fallback_warnings"])
    assert tr["lion_count_read_only"] is True


@pytest.mark.parametrize("which", ["lion", "sgd"])
@pytest.mark.parametrize("case", ["clamp_0.001", "clamp_0.25", "paper_0.001"])
def test_triton_factor_inside_update_kernel_is_bitwise_cautious_factor(tr, which, case):
    assert tr[f"fused_factor_{which}_{case}"] is True


def test_triton_cautious_wd_at_zero_direction_and_both_signs(tr):
    """The reference on a hand-made vector (1e-6); the u = 0 coordinate is decayed."""
    assert tr["cwd_zero_direction"] == {"lion": True, "sgd": True, "adamw": True}
