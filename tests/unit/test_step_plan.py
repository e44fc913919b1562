"""CAdamW.step's cached plan: reused only while valid, against the float64 oracle.

The plan (layouts, slots, state, buckets) is cached after the first step and revalidated
every step; these tests change, between steps, everything the plan depends on and check
the result against the independent float64 oracle (tests/oracle.py), which has no cache.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from dist_cautious import CAdamW
from tests.oracle import Float64CAdamW, rel_err

TOL = 1e-6
SHAPES = [(6, 5), (17,), (3, 3, 2), (40,)]


def _setup(backend: str = "foreach", **kw):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = CAdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    oracle = Float64CAdamW(init, lr=1e-2, weight_decay=0.1, **kw)
    return params, opt, oracle


def _grads(step: int, none: tuple[int, ...] = ()) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + step)
    return [None if i in none else torch.randn(s, generator=g) for i, s in enumerate(SHAPES)]


def _step(params, opt, oracle, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()  # new gradient tensors every step
    opt.step()
    oracle.step(grads)


def _check(params, oracle) -> None:
    for p, q in zip(params, oracle.p):
        assert rel_err(p.detach(), q) <= TOL


@pytest.mark.parametrize("backend", ["foreach", "reference"])
def test_cached_plan_matches_oracle_with_lr_schedule(backend):
    params, opt, oracle = _setup(backend)
    for s in range(6):
        lr = 1e-2 * (1 - s / 10)
        opt.param_groups[0]["lr"] = lr
        oracle.lr = lr
        _step(params, opt, oracle, _grads(s))
    assert opt._plan is not None  # the plan was cached and reused
    _check(params, oracle)
    assert [float(opt.state[p]["step"]) for p in params] == [6.0] * 4


def test_gradient_presence_change_replans():
    params, opt, oracle = _setup()
    _step(params, opt, oracle, _grads(0))
    _step(params, opt, oracle, _grads(1, none=(1,)))  # param 1 without gradient
    _step(params, opt, oracle, _grads(2, none=(1,)))
    _step(params, opt, oracle, _grads(3))
    _check(params, oracle)
    assert [float(opt.state[p]["step"]) for p in params] == [4.0, 2.0, 4.0, 4.0]
    assert oracle.t == [4, 2, 4, 4]


def test_step_counter_changed_in_place_is_seen():
    params, opt, oracle = _setup()
    _step(params, opt, oracle, _grads(0))
    _step(params, opt, oracle, _grads(1))
    opt.state[params[2]]["step"].fill_(10.0)  # e.g. a hand-made resume
    oracle.t[2] = 10
    _step(params, opt, oracle, _grads(2))
    _check(params, oracle)
    assert float(opt.state[params[2]]["step"]) == 11.0


def test_replaced_moment_is_used():
    params, opt, oracle = _setup()
    _step(params, opt, oracle, _grads(0))
    _step(params, opt, oracle, _grads(1))
    opt.state[params[0]]["exp_avg"] = torch.zeros_like(params[0])  # reset one moment
    oracle.m[0] = torch.zeros_like(oracle.m[0])
    _step(params, opt, oracle, _grads(2))
    _check(params, oracle)


def test_load_state_dict_drops_the_plan():
    params, opt, oracle = _setup()
    for s in range(2):
        _step(params, opt, oracle, _grads(s))
    saved = copy.deepcopy(opt.state_dict())  # state_dict() returns live tensors
    saved_params = [p.detach().clone() for p in params]
    _step(params, opt, oracle, _grads(2))  # a step that the load below undoes
    with torch.no_grad():
        for p, x in zip(params, saved_params):
            p.copy_(x)
    opt.load_state_dict(saved)
    assert opt._plan is None
    # the oracle, replayed from scratch with the same two steps, then step 2 again
    _, _, fresh = _setup()
    for s in range(2):
        fresh.step(_grads(s))
    _step(params, opt, fresh, _grads(2))
    _check(params, fresh)


def test_add_param_group_is_stepped():
    params, opt, oracle = _setup()
    _step(params, opt, oracle, _grads(0))
    extra = torch.nn.Parameter(torch.randn(9))
    ref = Float64CAdamW([extra.detach().clone()], lr=1e-2, weight_decay=0.1)
    opt.add_param_group({"params": [extra]})
    g = torch.randn(9)
    extra.grad = g.clone()
    _step(params, opt, oracle, _grads(1))
    ref.step([g])
    _check(params, oracle)
    assert rel_err(extra.detach(), ref.p[0]) <= TOL


def test_step_counters_stay_plain_state():
    """state["step"] keeps its value and meaning: AdamW loads the state dict and agrees."""
    params, opt, oracle = _setup()
    for s in range(3):
        _step(params, opt, oracle, _grads(s))
    sd = opt.state_dict()
    assert [float(v["step"]) for v in sd["state"].values()] == [3.0] * 4
    q = [torch.nn.Parameter(p.detach().clone()) for p in params]
    aw = torch.optim.AdamW(q, lr=1e-2, weight_decay=0.1)
    aw.load_state_dict(sd)
    assert [float(aw.state[p]["step"]) for p in q] == [3.0] * 4


def test_plan_does_not_keep_gradients_alive():
    params, opt, oracle = _setup()
    for s in range(3):
        _step(params, opt, oracle, _grads(s))
    refs = [weakref.ref(p.grad) for p in params]
    for p in params:
        p.grad = None
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_foreach_low_precision_maximize_matches_reference(dtype):
    """The foreach backend's scratch buffers and kept mask, against the reference backend."""
    torch.manual_seed(1)
    init = [torch.randn(s).to(dtype) for s in SHAPES]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    b = [torch.nn.Parameter(x.clone()) for x in init]
    oa = CAdamW(a, lr=1e-2, maximize=True, backend="foreach")
    ob = CAdamW(b, lr=1e-2, maximize=True, backend="reference")
    for s in range(4):
        for pa, pb, g in zip(a, b, _grads(s)):
            pa.grad, pb.grad = g.to(dtype), g.to(dtype)
        oa.step()
        ob.step()
        assert torch.equal(oa.mask_stats["kept"], ob.mask_stats["kept"])
    for pa, pb in zip(a, b):
        assert rel_err(pa.detach(), pb.detach()) <= 4e-3  # one 16-bit rounding step
        assert rel_err(oa.state[pa]["exp_avg"], ob.state[pb]["exp_avg"]) <= TOL
