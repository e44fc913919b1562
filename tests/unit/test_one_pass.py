"""The one-pass lagged step (``factor_lag=1``, ``Capabilities.one_pass_lagged``).

With ``factor_lag=1`` a step's factors are the previous step's, known before the step, so a
backend may count this step's mask and apply the update in one pass over memory
(``one_pass``: C-AdamW fp32 28 B per parameter instead of 36). References: the same
backend's two passes (``count_pass`` then ``update_pass`` with the same factors), which must
give bitwise the same counts, moments and parameters (same element operations, same order);
end to end, the optimizer forced onto the two passes, and the float64 oracle of the lag
rule (tests/oracle.py). Backends: foreach (count + update in one call), the C kernel
(``cpu_fused``: one sweep) and Triton under the interpreter (one launch; a subprocess,
tests/unit/one_pass_cases.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dist_cautious import CAdamW
from dist_cautious.kernels import UpdateHyper, cpu_fused, foreach, get_backend
from tests.interpreter import run_cases
from tests.oracle import Float64CAdamW, rel_err
from tests.unit.test_factor_lag import grads_at, params_of

CASES = Path(__file__).with_name("one_pass_cases.py")
SIZES = [0, 1, 7, 33]


def _lists(pdt, sdt, seed, sizes=SIZES):
    gen = torch.Generator().manual_seed(seed)
    p = [torch.randn(s, generator=gen).to(pdt) for s in sizes]
    g = [torch.randn(s, generator=gen).to(pdt) for s in sizes]
    m = [(torch.randn(s, generator=gen) * 0.5).to(sdt) for s in sizes]
    v = [torch.rand(s, generator=gen).to(sdt) for s in sizes]
    return [p, g, m, v]


def _hyper(maximize=False, cwd=False, beta1=0.9):
    return UpdateHyper(
        lr=1e-2, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, beta1=beta1,
        maximize=maximize, cautious_wd=cwd,
    )  # fmt: skip


def _two_vs_one(mod, pdt, sdt, h, sizes=SIZES):
    alphas = torch.linspace(0.5, 2.0, len(sizes))
    a, b = _lists(pdt, sdt, 0, sizes), _lists(pdt, sdt, 0, sizes)
    sa = {}
    c_two = mod.count_pass(a[1], a[2], h.beta1, h.maximize, scratch=sa)
    mod.update_pass(*a, alphas, h, scratch=sa)
    c_one = mod.one_pass(*b, alphas, h, scratch={})
    assert c_one.dtype == torch.int64 and c_one.shape == (len(sizes),)
    assert torch.equal(c_one, c_two), (c_one, c_two)
    for k, name in enumerate("pgmv"):
        for x, y in zip(a[k], b[k]):
            assert torch.equal(x, y), (name, x, y)
    return c_one


@pytest.mark.parametrize("pdt,sdt", [(torch.float32,) * 2, (torch.bfloat16, torch.float32),
                                     (torch.bfloat16,) * 2])  # fmt: skip
@pytest.mark.parametrize("maximize,cwd", [(False, False), (True, True)])
def test_foreach_one_pass_is_bitwise_the_two_passes(pdt, sdt, maximize, cwd):
    c = _two_vs_one(foreach, pdt, sdt, _hyper(maximize, cwd))
    assert c[0] == 0 and c[1] in (0, 1)  # empty and 1-element tensors


@pytest.mark.skipif(not cpu_fused.available(), reason="no C compiler")
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # both lerp formulas
@pytest.mark.parametrize("maximize,cwd", [(False, False), (False, True), (True, False)])
def test_cpu_kernel_one_pass_is_bitwise_the_two_passes(beta1, maximize, cwd):
    # 40000 elements: two 32768-element chunks of the C kernel, one partial
    sizes = [*SIZES, 40000]
    _two_vs_one(cpu_fused, torch.float32, torch.float32, _hyper(maximize, cwd, beta1), sizes)


@pytest.mark.skipif(not cpu_fused.available(), reason="no C compiler")
def test_cpu_kernel_one_pass_hands_other_dtypes_to_foreach():
    h = _hyper()
    alphas = torch.linspace(0.5, 2.0, len(SIZES))
    a = _lists(torch.bfloat16, torch.float32, 2)
    b = _lists(torch.bfloat16, torch.float32, 2)
    ca = cpu_fused.one_pass(*a, alphas, h)
    cb = foreach.one_pass(*b, alphas, h)
    assert torch.equal(ca, cb)
    assert all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


def test_backends_declare_the_capability():
    assert foreach and get_backend("foreach").caps.one_pass_lagged
    assert get_backend("foreach").one_pass is foreach.one_pass
    assert not get_backend("reference").caps.one_pass_lagged
    assert cpu_fused.caps.one_pass_lagged
    assert not get_backend("foreach", "sgd").caps.one_pass_lagged


# --------------------------------------------------------------------------- optimizer

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _grads_at(step, pdt):
    return [g.to(pdt) for g in grads_at(step)]  # test_factor_lag's: kept fractions swing


def _params(pdt, seed=0):
    return [p.detach().to(pdt).requires_grad_() for p in params_of(seed)]


def _run(opt, params, steps, pdt, start=0, oracle=None):
    for s in range(start, start + steps):
        gs = _grads_at(s, pdt)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        if oracle is not None:
            oracle.step(gs)


def _two_groups(params, **kw):
    """Two param groups (two buckets: per-bucket slices of the factors and counts)."""
    return [dict(params=params[:2], **kw), dict(params=params[2:], lr=3e-3, **kw)]


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.fn(*args, **kw)


def _backend_patch(monkeypatch, backend, one_pass):
    """Make ``backend`` count its one_pass calls (``one_pass=True``) or lose the capability
    (``False``: the engine then runs count pass + update pass, today's lagged step)."""
    from dist_cautious import kernels

    if backend == "foreach":
        base = kernels._ADAMW["foreach"]
        spy = _Spy(base.one_pass)
        caps = dataclasses.replace(base.caps, one_pass_lagged=one_pass)
        new = dataclasses.replace(base, caps=caps, one_pass=spy if one_pass else None)
        monkeypatch.setitem(kernels._ADAMW, "foreach", new)
    else:
        spy = _Spy(cpu_fused.one_pass)
        monkeypatch.setattr(cpu_fused, "one_pass", spy)
        monkeypatch.setattr(
            cpu_fused, "caps", dataclasses.replace(cpu_fused.caps, one_pass_lagged=one_pass)
        )
    return spy


def _backends():
    return ["foreach"] + (["cpu"] if cpu_fused.available() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16])
def test_optimizer_one_pass_equals_the_two_pass_lagged_step(monkeypatch, backend, pdt):
    """factor_lag=1 through the one-pass path equals the same steps forced onto count pass +
    update pass, bitwise (parameters, moments, stored counts), over two groups with empty and
    1-element tensors; the one pass is taken from each parameter's second step on."""
    steps = 8
    runs = []
    for one in (True, False):
        with monkeypatch.context() as mp:
            spy = _backend_patch(mp, backend, one)
            params = _params(pdt)
            opt = CAdamW(_two_groups(params, backend=backend, factor_lag=1), **HYPER)
            _run(opt, params, steps, pdt)
            runs.append((params, opt, spy.calls))
    (pa, oa, n_one), (pb, ob, n_two) = runs
    assert n_one == 2 * (steps - 1) and n_two == 0  # two buckets; the first step is exact
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        for key in ("exp_avg", "exp_avg_sq", "cautious_count"):
            assert torch.equal(oa.state[x][key], ob.state[y][key]), key
    assert oa.kept_fraction == ob.kept_fraction


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("formula", ["clamp", "paper"])
def test_one_pass_path_matches_lagged_float64_oracle(monkeypatch, backend, formula):
    spy = _backend_patch(monkeypatch, backend, True)
    params = _params(torch.float32, 1)
    opt = CAdamW(params, backend=backend, factor_lag=1, formula=formula, **HYPER)
    oracle = Float64CAdamW(params, factor_lag=1, formula=formula, **HYPER)
    exact = Float64CAdamW(params, formula=formula, **HYPER)
    for s in range(10):
        gs = _grads_at(s, torch.float32)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        oracle.step(gs)
        exact.step(gs)
        for i, p in enumerate(params):
            assert int(opt.state[p]["cautious_count"]) == oracle.prev[i], (s, i)
    assert spy.calls == 9
    err = max(rel_err(p, r) for p, r in zip(params, oracle.p) if p.numel())
    assert err < 1e-6, err
    # the lag is visible: this step's exact factor is far away
    assert max(rel_err(p, r) for p, r in zip(params, exact.p) if p.numel()) > 1e-4


def test_one_pass_only_when_every_factor_is_known_before_the_step(monkeypatch):
    """A group with factor_lag=0 next to a lagged one, and a parameter whose state was
    reset (its first step is exact), keep the two passes for that step."""
    spy = _backend_patch(monkeypatch, "foreach", True)
    params = _params(torch.float32, 2)
    groups = [dict(params=params[:2], factor_lag=0), dict(params=params[2:], factor_lag=1)]
    opt = CAdamW(groups, backend="foreach", **HYPER)
    _run(opt, params, 3, torch.float32)
    assert spy.calls == 0

    params = _params(torch.float32, 3)
    opt = CAdamW(params, backend="foreach", factor_lag=1, **HYPER)
    _run(opt, params, 3, torch.float32)
    assert spy.calls == 2
    del opt.state[params[0]]
    _run(opt, params, 1, torch.float32, start=3)  # fresh state: exact factor, two passes
    assert spy.calls == 2
    _run(opt, params, 2, torch.float32, start=4)
    assert spy.calls == 6  # two buckets now (the reset parameter's step counter differs)


# --------------------------------------------------------------------------- Triton


@pytest.fixture(scope="module")
def tr() -> dict:
    return run_cases(CASES, timeout=600)


@pytest.mark.parametrize("pdt", ["fp32", "bf16"])
@pytest.mark.parametrize("offset", [0, 1])  # aligned (128-bit full chunks) and unaligned
@pytest.mark.parametrize("opt", ["adamw", "lion"])
def test_triton_one_pass_is_bitwise_the_two_passes(tr, opt, pdt, offset):
    c = tr[f"{opt}_{pdt}_off{offset}"]
    assert c["counts_equal"] and c["tensors_equal"], c
    if opt == "adamw":
        assert c["deferred"] and c["counts"][:2] in ([0, 0], [0, 1]), c


def test_triton_one_pass_maximize_cautious_wd_other_lerp(tr):
    c = tr["adamw_fp32_maximize_cwd_lerp_hi"]
    assert c["counts_equal"] and c["tensors_equal"], c


@pytest.mark.parametrize("case", ["opt_cadamw_fp32", "opt_cadamw_bf16", "opt_clion_fp32"])
def test_triton_optimizer_one_pass_path_equals_two_passes(tr, case):
    c = tr[case]
    # the first step is exact (two passes), every later one is one launch per bucket
    assert c["one_pass_calls"] == c["steps"] - 1 and c["two_pass_run_calls"] == 0, c
    assert c["params_equal"] and c["counts_equal"], c
