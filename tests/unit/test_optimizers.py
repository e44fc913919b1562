"""Every cautious optimizer through the same tests, one row each (tests/optimizers.py):
the float64 oracle (both formulas, with and without cautious weight decay), the mask acts,
the torch counterpart when every sign agrees, state-dict interchange, copies, bad input."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from dist_cautious import CSGD, CAdamW, CautiousOptimizer, CLion
from tests.optimizers import ROWS
from tests.oracle import rel_err

SHAPES = [(7, 5), (1,), (0,), (33,), (4, 3, 2)]
NAMES = sorted(ROWS)


def params_of(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def grads_at(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(500 + step)
    drift = 0.3 * torch.randn((), generator=g).item()
    return [(torch.randn(s, generator=g) + drift).to(dtype) for s in SHAPES]


def run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(params, grads_at(s, params[0].dtype)):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("formula", ["clamp", "paper"])
@pytest.mark.parametrize("cwd", [False, True])
@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_matches_float64_oracle(name, formula, cwd, backend):
    row = ROWS[name]
    params = params_of()
    opt = row.cls(params, formula=formula, cautious_weight_decay=cwd, backend=backend, **row.hyper)
    oracle = row.oracle(params, formula=formula, cautious_wd=cwd, **row.hyper)
    for s in range(15):
        gs = grads_at(s)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        oracle.step(gs)
    for p, ref in zip(params, oracle.p):
        assert rel_err(p, ref) < 1e-6, (name, p.shape, rel_err(p, ref))
    for key, refs in zip(row.state_keys, row.oracle_states(oracle)):
        for p, ref in zip(params, refs):
            if p.numel():
                assert rel_err(opt.state[p][key], ref) < 1e-6, (name, key)
    assert 0.2 < opt.kept_fraction < 0.99, (name, opt.kept_fraction)


@pytest.mark.parametrize("name", NAMES)
def test_float64_parameters_match_the_oracle_closely(name):
    row = ROWS[name]
    params = params_of(dtype=torch.float64)
    opt = row.cls(params, **row.hyper)
    oracle = row.oracle(params, **row.hyper)
    for s in range(10):
        gs = grads_at(s, torch.float64)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        oracle.step(gs)
    for p, ref in zip(params, oracle.p):
        assert rel_err(p, ref) < 1e-12, (name, rel_err(p, ref))


@pytest.mark.parametrize("name", NAMES)
def test_cautious_weight_decay_changes_the_result(name):
    row = ROWS[name]
    a, b = params_of(), params_of()
    run(row.cls(a, **row.hyper), a, 5)
    run(row.cls(b, cautious_weight_decay=True, **row.hyper), b, 5)
    assert max(rel_err(x - y, torch.zeros_like(x)) for x, y in zip(a, b) if x.numel()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_the_mask_acts(name):
    """A gradient that flips sign against the state: the cautious step keeps nothing of the
    update in the flipped tensor (only decay remains), unlike the plain optimizer."""
    row = ROWS[name]
    hyper = {**row.hyper, "weight_decay": 0.0}
    p = torch.ones(6, requires_grad=True)
    opt = row.cls([p], **hyper)
    p.grad = torch.ones(6)
    for _ in range(3):
        opt.step()
    before = p.detach().clone()
    p.grad = -0.01 * torch.ones(6)  # small and opposite: the direction still follows the state
    opt.step()
    assert opt.kept_fraction == 0.0
    assert torch.equal(p, before)  # masked everywhere, alpha irrelevant, no decay


def _plain_lion_step(p, m, g, lr, b1, b2, wd):
    """lion-pytorch's update, written out."""
    u = (m * b1 + g * (1 - b1)).sign()
    p.mul_(1 - lr * wd).add_(u, alpha=-lr)
    m.mul_(b2).add_(g, alpha=1 - b2)


def test_csgd_equals_torch_sgd_when_every_sign_agrees():
    for nesterov, dampening in ((False, 0.0), (False, 0.3), (True, 0.0)):
        p1 = torch.randn(4, 5, requires_grad=True)
        p2 = p1.detach().clone().requires_grad_()
        kw = dict(lr=0.05, momentum=0.8, nesterov=nesterov, dampening=dampening)
        a = CSGD([p1], **kw)
        b = torch.optim.SGD([p2], **kw)
        for s in range(5):
            g = torch.rand(4, 5) + 0.1 * s + 0.01  # positive: every sign agrees
            p1.grad, p2.grad = g.clone(), g.clone()
            a.step()
            b.step()
            assert a.kept_fraction == 1.0
        assert torch.allclose(p1, p2, rtol=0, atol=1e-6), (nesterov, dampening)
        # state interchange with torch SGD, both ways
        b2 = torch.optim.SGD([p2], **kw)
        b2.load_state_dict(a.state_dict())
        assert torch.equal(b2.state[p2]["momentum_buffer"], a.state[p1]["momentum_buffer"])
        a2 = CSGD([p1], **kw)
        a2.load_state_dict(b.state_dict())
        assert int(a2.state[p1]["step"]) == 1  # torch SGD keeps no counter: healed
        p1.grad = torch.ones(4, 5)
        a2.step()  # continues from the buffer (not a first step)


def test_clion_equals_plain_lion_when_every_sign_agrees():
    p1 = torch.randn(3, 7, requires_grad=True)
    p2 = p1.detach().clone()
    m = torch.zeros_like(p2)
    opt = CLion([p1], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(5):
        g = torch.rand(3, 7) + 0.05
        p1.grad = g.clone()
        opt.step()
        _plain_lion_step(p2, m, g, 1e-2, 0.9, 0.99, 0.1)
        assert opt.kept_fraction == 1.0
    assert torch.allclose(p1, p2, rtol=0, atol=1e-7)
    assert torch.allclose(opt.state[p1]["exp_avg"], m, rtol=0, atol=1e-7)  # lion-pytorch key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "state_dict"])
def test_copies_step_bitwise(name, how):
    row = ROWS[name]
    params = params_of()
    opt = row.cls(params, formula="paper", clamp=0.5, **row.hyper)
    run(opt, params, 3)
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    elif how == "pickle":
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    else:
        params2 = [p.detach().clone().requires_grad_() for p in params]
        opt2 = row.cls(params2)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["formula"] == "paper"
    run(opt, params, 3, start=3)
    run(opt2, params2, 3, start=3)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
        for key in row.state_keys:
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises(name):
    row = ROWS[name]
    p = torch.zeros(3, requires_grad=True)
    for kwargs, match in row.bad:
        with pytest.raises((ValueError, TypeError), match=match):
            row.cls([p], **{**row.hyper, **kwargs})
    with pytest.raises(ValueError, match="unknown scale='local'"):
        row.cls([p], scale="local")
    with pytest.raises(ValueError, match="cautious_weight_decay='yes' must be True or False"):
        row.cls([p], cautious_weight_decay="yes")
    with pytest.raises(RuntimeError, match=f"{row.cls.__name__} is asked to step a tensor"):
        o = row.cls([p])
        o.param_groups[0]["params"] = [q := torch.zeros(2, requires_grad=True)]
        q.grad = torch.ones(2)
        o.step()


def test_one_base_for_all():
    assert all(issubclass(c, CautiousOptimizer) for c in (CAdamW, CLion, CSGD))
    # the step machinery lives only in the base (and plan.py): a subclass gives its math
    # through the hooks, not through the step or the plan's surface
    # (not "step": torch's Optimizer patches a profiling wrapper into each subclass)
    surface = {"count", "update", "backend_for", "state_for", "check_group"}
    for c in (CAdamW, CLion, CSGD):
        assert not {*surface, "load_state_dict"} & set(c.__dict__)
        assert {"_count", "_update", "_check_hyper", "_resolve"} <= set(c.__dict__)


# ---------------------------------------------------------------- group keys (issue 17 s.4)

TYPOS = {  # per row: a misspelt key of its own and the key it means
    "cadamw": ("weight_decy", "weight_decay"),
    "clion": ("betsa", "betas"),
    "csgd": ("momentom", "momentum"),
}


@pytest.mark.parametrize("name", NAMES)
def test_misspelt_group_key_raises_naming_the_closest_key(name):
    row = ROWS[name]
    ps = params_of()
    for typo, meant in (("formla", "formula"), ("sclae", "scale"), TYPOS[name]):
        with pytest.raises(ValueError, match=rf"param group 0 has unknown key '{typo}'.*'{meant}'"):
            row.cls([{"params": ps, typo: 1}], **row.hyper)
    opt = row.cls(ps[:1], **row.hyper)
    with pytest.raises(ValueError, match=r"param group 1 has unknown key 'formla'.*'formula'"):
        opt.add_param_group({"params": ps[1:], "formla": "paper"})
    assert len(opt.param_groups) == 1  # nothing was added


# Keys that torch.optim, its LR schedulers and common recipes put into param groups: they
# are not ours, and must keep working (kept in the group, the numbers unchanged).
FOREIGN_KEYS = dict(
    initial_lr=1e-2, max_lr=1e-2, min_lr=1e-5, base_momentum=0.85, max_momentum=0.95,
    momentum=0.9, betas=(0.9, 0.99), foreach=None, fused=None, capturable=False,
    differentiable=False, decoupled_weight_decay=True, nesterov=False, amsgrad=False,
    lr_scale=1.0, name="decay", layer_id=3, caution=False,
)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_foreign_group_keys_and_scheduler_keys_keep_working(name):
    row = ROWS[name]
    a, b = params_of(), params_of()
    extra = {k: v for k, v in FOREIGN_KEYS.items() if k not in row.hyper}
    opt_a = row.cls(a, **row.hyper)
    opt_b = row.cls([{"params": b, **extra}], **row.hyper)
    assert opt_b.param_groups[0]["name"] == "decay"
    run(opt_a, a, 3)
    run(opt_b, b, 3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # schedulers that cycle momentum add their own keys after construction
    for opt, ps in ((opt_a, a), (opt_b, b)):
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=10)
        for s in range(3, 6):
            run(opt, ps, 1, start=s)
            sched.step()
        assert "max_momentum" in opt.param_groups[0]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- torch's keywords (issue 18 s.3)


def create_optimizer_like_timm(cls, params, lr, weight_decay=0.0, foreach=None, **kwargs):
    """What timm.optim.create_optimizer_v2 does with its arguments (timm 1.x)."""
    opt_args = dict(weight_decay=weight_decay, **kwargs)
    if lr is not None:
        opt_args["lr"] = lr
    if foreach is not None:
        opt_args["foreach"] = foreach
    return cls(params, **opt_args)


def _backends_used(opt, params, steps=3):
    seen = []
    resolve = opt._resolve
    opt._resolve = lambda n, d: (seen.append(n), resolve(n, d))[1]
    run(opt, params, steps)
    del opt._resolve
    return set(seen)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("foreach, backend", [(True, "foreach"), (False, "reference")])
def test_torch_foreach_keyword_picks_the_backend(name, foreach, backend):
    row = ROWS[name]
    a, b = params_of(), params_of()
    hyper = {k: v for k, v in row.hyper.items() if k not in ("lr", "weight_decay")}
    opt = create_optimizer_like_timm(
        row.cls, a, row.hyper["lr"], row.hyper["weight_decay"], foreach=foreach, **hyper
    )
    assert opt.param_groups[0]["foreach"] is foreach
    ref = row.cls(b, backend=backend, **row.hyper)
    assert _backends_used(opt, a) == {backend}
    run(ref, b, 3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)  # the same backend: bitwise
    # per group, as torch: one group single-tensor, the other foreach
    c = params_of()
    opt2 = row.cls([{"params": c[:2], "foreach": False}, {"params": c[2:]}], **row.hyper)
    assert _backends_used(opt2, c) == {"reference", "auto"}
    # torch's defaults are accepted as keywords and kept as group keys
    opt3 = row.cls(
        params_of(), foreach=None, fused=None, capturable=False, differentiable=False,
        amsgrad=False, **row.hyper,
    )  # fmt: skip
    g = opt3.param_groups[0]
    assert (g["foreach"], g["fused"], g["capturable"], g["differentiable"]) == (
        None, None, False, False,
    )  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_torch_keyword_contradictions_raise_naming_the_alternative(name):
    row = ROWS[name]
    ps = params_of()
    cases = [
        (dict(fused=True), r"fused=True .*cpu.*foreach=True"),
        (dict(fused=True, foreach=True), r"fused=True and foreach=True"),
        (dict(foreach=True, backend="reference"), r"foreach=True contradicts backend='reference'"),
        (dict(foreach=False, backend="foreach"), r"foreach=False contradicts backend='foreach'"),
        (dict(fused=True, backend="foreach"), r"fused=True contradicts backend='foreach'"),
        (dict(fused=False, backend="triton"), r"fused=False contradicts backend='triton'"),
        (dict(foreach="yes"), r"foreach='yes' must be True, False or None"),
        (dict(amsgrad=True), r"amsgrad=True is not supported.*amsgrad=False"),
        (dict(differentiable=True), r"differentiable=True is not supported.*torch.optim"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            row.cls(ps, **{**row.hyper, **kwargs})
    # the same in a param group, and at load from a state dict that says so
    with pytest.raises(ValueError, match=r"param group 0: fused=True .*cpu"):
        row.cls([{"params": ps, "fused": True}], **row.hyper)
    opt = row.cls(ps, **row.hyper)
    run(opt, ps, 1)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["fused"] = True  # e.g. from a CUDA run with fused=True
    with pytest.raises(ValueError, match=r"loaded param group 0: fused=True .*cpu"):
        row.cls(params_of(), **row.hyper).load_state_dict(sd)


def test_fused_keyword_maps_to_triton_where_the_device_has_it(monkeypatch):
    from dist_cautious import base, kernels

    group = dict(backend="auto", foreach=None, fused=True)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    base.check_fused(group, [torch.device("cuda", 0)], "g")  # no error
    assert base.backend_name(group) == "triton"
    assert base.backend_name({**group, "fused": False}) == "foreach"
    assert base.backend_name({**group, "fused": None, "foreach": False}) == "reference"
    assert base.backend_name({**group, "fused": None}) == "auto"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"fused=True .*Triton.*foreach=True"):
        base.check_fused(group, [torch.device("cuda", 0)], "g")


# ---------------------------------------------------------------- the all-gather baseline


def test_allgather_baseline_applies_cautious_weight_decay():
    from dist_cautious.baselines import AllGatherCAdamW
    from tests.oracle import Float64CAdamW

    hyper = ROWS["cadamw"].hyper
    out = {}
    for cwd in (False, True):
        a, b = params_of(), params_of()
        ag = AllGatherCAdamW(a, cautious_weight_decay=cwd, **hyper)
        ref = CAdamW(b, cautious_weight_decay=cwd, backend="reference", **hyper)
        oracle = Float64CAdamW(a, cautious_wd=cwd, **hyper)
        for s in range(6):
            gs = grads_at(s)
            for p, q, g in zip(a, b, gs):
                p.grad, q.grad = g.clone(), g.clone()
            ag.step()
            ref.step()
            oracle.step(gs)
        for p, q, o in zip(a, b, oracle.p):
            assert rel_err(p, q) < 1e-6 and rel_err(p, o) < 1e-6, (cwd, rel_err(p, o))
        out[cwd] = a
    assert any(not torch.equal(x, y) for x, y in zip(out[False], out[True]))


def test_allgather_baseline_cautious_weight_decay_on_dtensors(tmp_path):
    """The DTensor path (all-gather, mask, scatter) of the baseline on a one-rank mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dist_cautious.baselines import AllGatherCAdamW

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        hyper = ROWS["cadamw"].hyper
        out = {}
        for cwd in (False, True):
            init = params_of()
            d = [
                torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
                for p in init
            ]
            ag = AllGatherCAdamW(d, cautious_weight_decay=cwd, **hyper)
            ref = CAdamW(init, cautious_weight_decay=cwd, backend="reference", **hyper)
            for s in range(4):
                for p, q, g in zip(d, init, grads_at(s)):
                    p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                    q.grad = g.clone()
                ag.step()
                ref.step()
            for p, q in zip(d, init):
                assert rel_err(p.full_tensor(), q) < 1e-6, (cwd, rel_err(p.full_tensor(), q))
            out[cwd] = [p.full_tensor() for p in d]
        assert any(not torch.equal(x, y) for x, y in zip(out[False], out[True]))
    finally:
        dist.barrier()
        dist.destroy_process_group()
