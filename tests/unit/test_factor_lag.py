"""``factor_lag=1`` on one process: every optimizer row against the float64 oracle of exactly
that rule (tests/oracle.py ``lagged``: a parameter's step uses the count of its previous
step, its first step its own), both formulas, empty and 1-element tensors; the first step
after a reset and after loading a state without counts is exact; a mid-run state_dict
round trip equals the uninterrupted run bitwise; bad values raise naming the value."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from dist_cautious import CAdamW
from tests.optimizers import ROWS
from tests.oracle import rel_err

SHAPES = [(7, 5), (1,), (0,), (33,), (4, 3, 2)]
NAMES = sorted(ROWS)


def params_of(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def grads_at(step):
    g = torch.Generator().manual_seed(900 + step)
    # a drift that flips sign every few steps: kept fractions move a lot from step to step,
    # so the previous step's factor is far from this step's
    drift = (0.8 if (step // 3) % 2 == 0 else -0.8) * torch.rand((), generator=g).item()
    return [torch.randn(s, generator=g) + drift for s in SHAPES]


def run(opt, params, steps, start=0, oracle=None):
    for s in range(start, start + steps):
        gs = grads_at(s)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        if oracle is not None:
            oracle.step(gs)


def max_err(params, oracle):
    return max(rel_err(p, ref) for p, ref in zip(params, oracle.p) if p.numel())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("formula", ["clamp", "paper"])
@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_factor_lag_matches_lagged_float64_oracle(name, formula, backend):
    row = ROWS[name]
    params = params_of()
    opt = row.cls(params, formula=formula, backend=backend, factor_lag=1, **row.hyper)
    oracle = row.oracle(params, formula=formula, factor_lag=1, **row.hyper)
    exact = row.oracle(params, formula=formula, **row.hyper)
    for s in range(12):
        gs = grads_at(s)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        oracle.step(gs)
        exact.step(gs)
        # the previous counts are state: this step's count, for the next step
        for i, p in enumerate(params):
            assert int(opt.state[p]["cautious_count"]) == oracle.prev[i], (name, s, i)
    assert max_err(params, oracle) < 1e-6, (name, max_err(params, oracle))
    # the lag makes a difference far above the tolerance: using this step's factor fails
    assert max_err(params, exact) > 1e-4, (name, max_err(params, exact))
    st = opt.state[params[2]]  # the empty tensor: a 0-d count of 0
    assert st["cautious_count"].shape == () and int(st["cautious_count"]) == 0
    assert opt.state[params[0]]["cautious_count"].dtype == torch.int64


@pytest.mark.parametrize("name", NAMES)
def test_factor_lag_first_step_and_reset_are_exact(name):
    """Step 1 equals factor_lag=0's step 1; after ``del opt.state[p]`` that parameter's next
    step uses its exact factor again (fresh moments), the others keep lagging."""
    row = ROWS[name]
    params = params_of(1)
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt = row.cls(params, factor_lag=1, **row.hyper)
    run(opt, params, 1)
    run(row.cls(twin, **row.hyper), twin, 1)
    assert all(torch.equal(a, b) for a, b in zip(params, twin))

    params = params_of(2)
    opt = row.cls(params, factor_lag=1, **row.hyper)
    oracle = row.oracle(params, factor_lag=1, **row.hyper)
    run(opt, params, 4, oracle=oracle)
    del opt.state[params[0]]
    fresh = row.oracle([params[0]], factor_lag=1, **row.hyper)  # its own oracle from here
    for s in range(4, 8):
        gs = grads_at(s)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        oracle.step([None, *gs[1:]])
        fresh.step(gs[:1])
    assert rel_err(params[0], fresh.p[0]) < 1e-6
    assert max(rel_err(p, r) for p, r in zip(params[1:], oracle.p[1:]) if p.numel()) < 1e-6


def test_factor_lag_state_dict_round_trip_mid_run_is_bitwise():
    params = params_of(3)
    opt = CAdamW(params, factor_lag=1)
    run(opt, params, 5)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0]["cautious_count"].dtype == torch.int64
    assert sd["param_groups"][0]["factor_lag"] == 1
    snapshot = [p.detach().clone() for p in params]
    run(opt, params, 5, start=5)

    resumed = [p.clone().requires_grad_() for p in snapshot]
    opt2 = CAdamW(resumed)  # factor_lag=0 by default: the checkpoint's value wins
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["factor_lag"] == 1
    # the counts come back exact int64 (torch's load would cast them to the param's dtype)
    assert all(opt2.state[p]["cautious_count"].dtype == torch.int64 for p in resumed)
    assert [int(opt2.state[p]["cautious_count"]) for p in resumed] == [
        int(c) for c in (sd["state"][i]["cautious_count"] for i in range(len(resumed)))
    ]
    run(opt2, resumed, 5, start=5)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))

    # copies and pickles resume bitwise too
    for how in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        params = params_of(3)
        opt = CAdamW(params, factor_lag=1)
        run(opt, params, 5)
        other = how(opt)
        run(opt, params, 3, start=5)
        ps = [p for g in other.param_groups for p in g["params"]]
        run(other, ps, 3, start=5)
        assert all(torch.equal(a, b) for a, b in zip(params, ps))


def test_factor_lag_load_without_counts_uses_the_exact_factor():
    """A checkpoint of factor_lag=0 (no counts) loaded into factor_lag=1: the next step is
    exact (the oracle's previous counts forgotten), then it lags."""
    from tests.oracle import Float64CAdamW

    params = params_of(4)
    opt = CAdamW(params)
    oracle = Float64CAdamW(params)
    run(opt, params, 3, oracle=oracle)
    sd = opt.state_dict()
    assert "cautious_count" not in sd["state"][0]
    opt2 = CAdamW(params)
    opt2.load_state_dict({**sd, "param_groups": [{**sd["param_groups"][0], "factor_lag": 1}]})
    oracle.factor_lag, oracle.prev = 1, [None] * len(params)
    run(opt2, params, 4, start=3, oracle=oracle)
    assert max_err(params, oracle) < 1e-6


@pytest.mark.parametrize("bad", [2, -1, True, 1.0, "1", None])
def test_bad_factor_lag_raises_naming_the_value(bad):
    with pytest.raises(ValueError, match=f"factor_lag={bad!r}"):
        CAdamW(params_of(), factor_lag=bad)
    with pytest.raises(ValueError, match=f"factor_lag={bad!r}"):
        CAdamW([{"params": params_of(), "factor_lag": bad}])


def test_factor_lag_with_scale_shard_raises():
    with pytest.raises(ValueError, match="factor_lag=1 with scale='shard'"):
        CAdamW(params_of(), factor_lag=1, scale="shard")
    opt = CAdamW(params_of(), factor_lag=1)
    with pytest.raises(ValueError, match="factor_lag=1 with scale='shard'"):
        opt.scale = "shard"


def test_factor_lag_per_group_and_switching_mid_run():
    """One group lagging, one exact; turning the lag on mid-run starts from the next step's
    exact factor for parameters that have no counts yet (the plan is rebuilt)."""
    from tests.oracle import Float64CAdamW

    params = params_of(5)
    opt = CAdamW([{"params": params[:2], "factor_lag": 1}, {"params": params[2:]}])
    lagged = Float64CAdamW(params[:2], factor_lag=1)
    exact = Float64CAdamW(params[2:])
    for s in range(6):
        gs = grads_at(s)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        lagged.step(gs[:2])
        exact.step(gs[2:])
        if s == 2:
            opt.param_groups[1]["factor_lag"] = 1
            exact.factor_lag = 1  # its previous counts are unknown to the optimizer
            exact.prev = [None] * len(exact.prev)
    assert max_err(params[:2], lagged) < 1e-6
    assert max_err(params[2:], exact) < 1e-6


TRITON_LAG = """
import json, torch
from dist_cautious import CAdamW
from tests.oracle import Float64CAdamW, rel_err
torch.manual_seed(0)
shapes = [(37,), (1,), (0,), (8, 9)]
init = [torch.randn(s) for s in shapes]
ps = [x.clone().requires_grad_() for x in init]
opt = CAdamW(ps, lr=1e-2, weight_decay=0.1, backend="triton", factor_lag=1)
lag = Float64CAdamW(init, lr=1e-2, weight_decay=0.1, factor_lag=1)
exact = Float64CAdamW(init, lr=1e-2, weight_decay=0.1)
for s in range(5):
    gs = [torch.randn(x) + (0.8 if s % 2 else -0.8) for x in shapes]
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    opt.step()
    lag.step(gs)
    exact.step(gs)
err = lambda o: max(rel_err(p, q) for p, q in zip(ps, o.p) if p.numel())
print(json.dumps({"lag": err(lag), "exact": err(exact)}))
"""


def test_factor_lag_triton_interpreter_matches_lagged_oracle():
    """The Triton backend (its update kernel given the precomputed lagged factors), under the
    Triton interpreter in a subprocess: the lagged oracle, not the exact one."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", TRITON_LAG], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["lag"] < 1e-6 and r["exact"] > 1e-2, r
