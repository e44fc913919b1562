"""State integrity and fidelity: options per group and in the state dict, copies, resets,
state dtypes, load validation. Each test fails if its property breaks (issues 10 and 14)."""

from __future__ import annotations

import copy
import io
import pickle
from collections import defaultdict

import numpy as np
import pytest
import torch

from dist_cautious import CAdamW
from dist_cautious.kernels import foreach
from tests.oracle import Float64CAdamW, rel_err

SHAPES = [(7, 5), (33,), (4, 3, 2)]


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def grads_for(step, shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    drift = 0.3 * torch.randn((), generator=g).item()
    return [(torch.randn(s, generator=g) + drift).to(dtype) for s in shapes]


def step_with(opt, params, step):
    for p, gr in zip(params, grads_for(step, [tuple(p.shape) for p in params], params[0].dtype)):
        p.grad = gr.clone()
    opt.step()


def assert_same(opt_a, params_a, opt_b, params_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb), rel_err(pa, pb)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, k
            assert torch.equal(sa[k], sb[k]), k


OPTIONS = [
    dict(scale="shard"),
    dict(formula="paper"),
    dict(clamp=0.5),
    dict(backend="reference"),
    dict(state_dtype=torch.float64),
    dict(state_dtype=torch.bfloat16),
    dict(state_dtype=torch.float16),
    dict(maximize=True, lr=3e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3),
]


def _copy_state_dict(opt, params):
    clones = [p.detach().clone().requires_grad_() for p in params]
    fresh = CAdamW(clones)  # default-constructed: the state dict must carry the options
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    return fresh, clones


def _copy_deepcopy(opt, params):
    params2, opt2 = copy.deepcopy((params, opt))
    return opt2, params2


def _copy_pickle(opt, params):
    params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    return opt2, params2


def _copy_torch_save(opt, params):
    buf = io.BytesIO()
    torch.save((params, opt), buf)
    buf.seek(0)
    params2, opt2 = torch.load(buf, weights_only=False)
    return opt2, params2


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
@pytest.mark.parametrize(
    "how",
    [_copy_state_dict, _copy_deepcopy, _copy_pickle, _copy_torch_save],
    ids=lambda f: f.__name__[6:],
)
def test_round_trip_keeps_options_and_steps_bitwise(options, how):
    params = make_params()
    opt = CAdamW(params, **options)
    for s in range(3):
        step_with(opt, params, s)
    opt2, params2 = how(opt, params)
    for key, value in options.items():
        want = tuple(value) if key == "betas" else value
        assert opt2.param_groups[0][key] == want, key
        if key in ("scale", "formula", "clamp", "backend", "state_dtype"):
            assert getattr(opt2, key) == value or how is _copy_state_dict, key
    for s in range(3, 6):
        step_with(opt, params, s)
        step_with(opt2, params2, s)
    assert_same(opt, params, opt2, params2)


def test_options_mean_something_per_group():
    """formula and clamp set in a group dict are used for that group (compared to the oracle)."""
    p1, p2, p3 = make_params()
    opt = CAdamW(
        [{"params": [p1], "formula": "paper"}, {"params": [p2], "clamp": 0.9}, {"params": [p3]}],
        lr=1e-2,
    )
    oracles = [
        Float64CAdamW([p1], lr=1e-2, formula="paper"),
        Float64CAdamW([p2], lr=1e-2, clamp=0.9),
        Float64CAdamW([p3], lr=1e-2),
    ]
    default = CAdamW([q := p1.detach().clone().requires_grad_()], lr=1e-2)
    for s in range(8):
        gs = grads_for(s)
        for p, g in zip((p1, p2, p3), gs):
            p.grad = g.clone()
        q.grad = gs[0].clone()
        opt.step()
        default.step()
        for o, g in zip(oracles, gs):
            o.step([g])
    for p, o in zip((p1, p2, p3), oracles):
        assert rel_err(p, o.p[0]) < 1e-6
    assert rel_err(p1, q) > 1e-4  # the paper formula really differs from the default here
    # and a group option can be changed later, like lr
    opt.param_groups[2]["formula"] = "nonsense"
    with pytest.raises(ValueError, match="param group 2: unknown formula='nonsense'"):
        opt.step()


def test_attribute_sets_every_group_and_validates():
    params = make_params()
    opt = CAdamW([{"params": params[:1]}, {"params": params[1:], "clamp": 0.2}])
    opt.formula = "paper"
    assert [g["formula"] for g in opt.param_groups] == ["paper", "paper"]
    assert opt.defaults["formula"] == "paper"
    with pytest.raises(ValueError, match="unknown scale='local'"):
        opt.scale = "local"
    with pytest.raises(ValueError, match="param group 1: invalid clamp=2"):
        CAdamW([{"params": params[:1]}, {"params": params[1:], "clamp": 2}])


def test_checkpoint_options_win_over_constructor():
    params = make_params()
    opt = CAdamW(params, formula="paper", scale="shard", clamp=0.5, state_dtype=torch.float64)
    step_with(opt, params, 0)
    other = CAdamW([p.detach().clone().requires_grad_() for p in params])
    other.load_state_dict(opt.state_dict())
    g = other.param_groups[0]
    assert (g["formula"], g["scale"], g["clamp"], g["state_dtype"]) == (
        "paper",
        "shard",
        0.5,
        torch.float64,
    )
    # a torch AdamW state dict has no opinion: the constructor's options stay
    ad_params = [p.detach().clone().requires_grad_() for p in params]
    ad = torch.optim.AdamW(ad_params)
    step_with(ad, ad_params, 0)
    c = CAdamW([p.detach().clone().requires_grad_() for p in params], formula="paper")
    c.load_state_dict(ad.state_dict())
    assert c.param_groups[0]["formula"] == "paper" and c.param_groups[0]["scale"] == "global"


@pytest.mark.parametrize(
    "state_dtype", [None, torch.float32, torch.float64, torch.bfloat16, torch.float16]
)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_every_state_dtype_survives_save_load_bitwise(state_dtype, param_dtype):
    params = make_params(param_dtype)
    opt = CAdamW(params, state_dtype=state_dtype)
    for s in range(2):
        step_with(opt, params, s)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clones = [p.detach().clone().requires_grad_() for p in params]
    opt2 = CAdamW(clones, state_dtype=state_dtype)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert_same(opt, params, opt2, clones)
    for s in range(2, 4):
        step_with(opt, params, s)
        step_with(opt2, clones, s)
    assert_same(opt, params, opt2, clones)


@pytest.mark.parametrize("how", ["del", "empty", "clear", "reassign"])
@pytest.mark.parametrize("backend", ["foreach", "reference"])
def test_state_reset_restarts_from_fresh_moments(how, backend):
    params = make_params()
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt = CAdamW(params, lr=1e-2, backend=backend)
    opt_twin = CAdamW(twin, lr=1e-2, backend=backend)  # never reset
    for s in range(3):
        step_with(opt, params, s)
        step_with(opt_twin, twin, s)
    a = params[0]
    reset = [0] if how in ("del", "empty") else [0, 1, 2]
    # torch AdamW semantics: a reset parameter continues like one in a new optimizer
    fresh_params = {i: params[i].detach().clone().requires_grad_() for i in reset}
    fresh = {i: CAdamW([fresh_params[i]], lr=1e-2, backend=backend) for i in reset}
    if how == "del":
        del opt.state[a]
    elif how == "empty":
        opt.state[a] = {}
    elif how == "clear":
        opt.state.clear()
    else:
        opt.state = defaultdict(dict)
    for s in range(3, 5):
        gs = grads_for(s)
        step_with(opt, params, s)
        step_with(opt_twin, twin, s)
        for i in reset:
            fresh_params[i].grad = gs[i].clone()
            fresh[i].step()
    for i, p in enumerate(params):
        if i in reset:
            assert torch.equal(p, fresh_params[i]), (how, i)
            assert int(opt.state[p]["step"]) == 2
        else:
            assert torch.equal(p, twin[i]), (how, i)
            assert int(opt.state[p]["step"]) == 5
    sd = opt.state_dict()["state"]
    assert sorted(sd) == [0, 1, 2]  # the reset parameters are in the checkpoint again
    assert int(sd[0]["step"]) == 2


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
def test_16bit_state_dtype_foreach_matches_reference(state_dtype):
    pa, pb = make_params(), make_params()
    oa = CAdamW(pa, lr=1e-2, state_dtype=state_dtype, backend="foreach")
    ob = CAdamW(pb, lr=1e-2, state_dtype=state_dtype, backend="reference")
    oracle = Float64CAdamW(pa, lr=1e-2)
    for s in range(6):
        step_with(oa, pa, s)
        step_with(ob, pb, s)
        oracle.step(grads_for(s))
    for p, q, ref in zip(pa, pb, oracle.p):
        assert oa.state[p]["exp_avg"].dtype == state_dtype
        assert rel_err(p, q) < 1e-6
        assert rel_err(p, ref) < 2e-2  # 16-bit moments: bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("backend", ["foreach", "reference"])
def test_float64_params_get_a_float64_factor(backend):
    params = make_params(torch.float64)
    opt = CAdamW(params, lr=1e-2, backend=backend)
    oracle = Float64CAdamW(params, lr=1e-2)
    for s in range(10):
        step_with(opt, params, s)
        oracle.step(grads_for(s, dtype=torch.float64))
    for p, ref in zip(params, oracle.p):
        assert rel_err(p, ref) < 1e-13, rel_err(p, ref)  # was ~3e-8 with a float32 factor


def test_numpy_scalars_accepted():
    params = make_params()
    opt = CAdamW(params, lr=np.float32(1e-3), betas=(np.float64(0.9), 0.99), eps=np.float32(1e-8))
    step_with(opt, params, 0)
    ref = [p.detach().clone().requires_grad_() for p in make_params()]
    o2 = CAdamW(ref, lr=float(np.float32(1e-3)), betas=(0.9, 0.99), eps=float(np.float32(1e-8)))
    step_with(o2, ref, 0)
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="lr='0.1' of type str"):
        CAdamW(params, lr="0.1")


def test_duplicate_parameter_in_a_group_raises():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"lists the same parameter \(shape \(3,\)\) twice"):
        CAdamW([p, p])


def test_sgd_state_dict_raises_at_load_naming_the_key():
    params = make_params()
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    step_with(sgd, params, 0)
    opt = CAdamW(params)
    with pytest.raises(ValueError, match=r"parameter 0 .*keys \['momentum_buffer'\]"):
        opt.load_state_dict(sgd.state_dict())
    assert len(opt.state) == 0  # nothing was loaded


def test_truncated_state_dict_raises_at_load_naming_what_is_missing():
    params = make_params()
    opt = CAdamW(params)
    step_with(opt, params, 0)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][1]["exp_avg_sq"]
    fresh = CAdamW(params)
    with pytest.raises(ValueError, match=r"parameter 1 .* lacks \['exp_avg_sq'\]"):
        fresh.load_state_dict(sd)
    sd2 = copy.deepcopy(opt.state_dict())
    sd2["state"][2]["exp_avg"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"parameter 2 .*'exp_avg' has shape \(5,\)"):
        fresh.load_state_dict(sd2)
    with pytest.raises(ValueError, match="needs a dict with 'state' and 'param_groups'"):
        fresh.load_state_dict({"state": {}})


def test_two_group_foreach_step_computes_the_mask_once_per_bucket(monkeypatch):
    """The count pass hands its mask to the update pass per bucket: 2 groups -> 2 masks."""
    params = make_params()
    opt = CAdamW(
        [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
        backend="foreach",
    )
    calls = []
    orig = foreach._mask_products

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(foreach, "_mask_products", counting)
    for s in range(3):
        calls.clear()
        step_with(opt, params, s)
        assert len(calls) == 2, (s, len(calls))


def test_copies_of_an_optimizer_with_a_registered_flat_layout():
    """deepcopy keeps an adapter's layout (the copy steps per original tensor, like the
    original); pickle cannot carry it (process groups), so the unpickled copy refuses to step
    the flat tensor instead of computing a per-partition factor."""
    from dist_cautious.flat import FlatLayout, Fragment

    torch.manual_seed(0)
    flat = torch.nn.Parameter(torch.randn(22))
    opt = CAdamW([flat], lr=1e-2)
    opt.register_layout(
        flat, FlatLayout([Fragment(0, 15, 0, 0, 15), Fragment(1, 7, 0, 15, 7)], None, 22, "test")
    )
    flat2, opt2 = copy.deepcopy((flat, opt))
    flat3, opt3 = pickle.loads(pickle.dumps((flat, opt)))
    for s in range(3):
        g = torch.randn(22) + 0.3 * s
        for f in (flat, flat2, flat3):
            f.grad = g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(flat, flat2)
    assert opt2.registered_layout(flat2) is opt.registered_layout(flat) is not None
    with pytest.raises(RuntimeError, match="asked to step a tensor it was never given"):
        opt3.step()


# ---------------------------------------------------------------- foreign and older state dicts
# (issue 17 section 4): every row of tests/optimizers.py, against an uninterrupted run and
# the row's float64 oracle.

from tests.optimizers import ROWS  # noqa: E402

ROW_NAMES = sorted(ROWS)


def _row_run(row, params, oracle, steps):
    for s in steps:
        gs = grads_for(s, [tuple(p.shape) for p in params])
        for p, g in zip(params, gs):
            p.grad = g.clone()
        if row is not None:
            row.step()
        if oracle is not None:
            oracle.step(gs)


def _interrupted(name, edit, hook=None):
    """Run a row 3 steps, pass its state dict through ``edit``, load it into a fresh
    optimizer (with ``hook`` registered as a load_state_dict pre-hook), run 3 more steps.
    Returns (params of the uninterrupted run, params of the resumed one, oracle, resumed opt)."""
    row = ROWS[name]
    a = make_params()
    b = [p.detach().clone().requires_grad_() for p in a]
    oracle = row.oracle(a, **row.hyper)
    opt_a = row.cls(a, **row.hyper)
    opt_b = row.cls(b, **row.hyper)
    _row_run(opt_a, a, oracle, range(3))
    _row_run(opt_b, b, None, range(3))
    sd = edit(copy.deepcopy(opt_b.state_dict()))
    fresh_params = [p.detach().clone().requires_grad_() for p in b]
    fresh = row.cls(fresh_params, **row.hyper)
    if hook is not None:
        fresh.register_load_state_dict_pre_hook(hook)
    fresh.load_state_dict(sd)
    _row_run(opt_a, a, oracle, range(3, 6))
    _row_run(fresh, fresh_params, None, range(3, 6))
    return a, fresh_params, oracle, fresh


def _assert_resumed_exactly(a, resumed, oracle):
    for pa, pr, ref in zip(a, resumed, oracle.p):
        assert torch.equal(pa, pr), rel_err(pa, pr)
        assert rel_err(pr, ref) < 1e-6, rel_err(pr, ref)


def _lion_pytorch_format(sd):
    """What lion-pytorch / timm Lion save: ``exp_avg`` only (no ``step``), their group keys."""
    for st in sd["state"].values():
        del st["step"]
    sd["param_groups"] = [
        {k: g[k] for k in ("params", "lr", "betas", "weight_decay")} for g in sd["param_groups"]
    ]
    return sd


@pytest.mark.parametrize("name", ROW_NAMES)
def test_state_without_step_loads_where_the_counterpart_keeps_none(name):
    """lion-pytorch and timm Lion keep no ``step`` (nor does torch SGD): CLion and CSGD heal
    it and resume exactly; CAdamW needs it (bias correction) and says so."""

    def strip_step(sd):
        if name == "clion":
            return _lion_pytorch_format(sd)
        for st in sd["state"].values():
            del st["step"]
        return sd

    if name == "cadamw":
        with pytest.raises(ValueError, match=r"parameter 0 .* lacks \['step'\]"):
            _interrupted(name, strip_step)
        return
    a, resumed, oracle, fresh = _interrupted(name, strip_step)
    _assert_resumed_exactly(a, resumed, oracle)
    assert all(int(fresh.state[p]["step"]) == 4 for p in resumed)  # healed to 1, then 3 steps


@pytest.mark.parametrize("name", ROW_NAMES)
def test_load_state_dict_pre_hooks_run_before_validation(name):
    """A pre-hook that translates a foreign format (here: renamed state keys) is honoured,
    as torch.optim's own optimizers honour it."""
    row = ROWS[name]

    def rename(sd):
        for st in sd["state"].values():
            for key in row.state_keys:
                st["old_" + key] = st.pop(key)
        return sd

    def translate(opt, sd):
        for st in sd["state"].values():
            for key in row.state_keys:
                st[key] = st.pop("old_" + key)
        return sd

    a, resumed, oracle, _ = _interrupted(name, rename, hook=translate)
    _assert_resumed_exactly(a, resumed, oracle)
    if name == "cadamw":  # what torch AdamW does with the same hook
        ps = make_params()
        adamw = torch.optim.AdamW(ps)
        step_with(adamw, ps, 0)
        sd = rename(copy.deepcopy(adamw.state_dict()))
        fresh = torch.optim.AdamW(ps)
        fresh.register_load_state_dict_pre_hook(translate)
        fresh.load_state_dict(sd)


# torch's test_can_load_older_state_dict: flags that older torch versions did not save
OLDER_TORCH_FLAGS = ("foreach", "differentiable", "fused", "maximize", "capturable")


@pytest.mark.parametrize("name", ROW_NAMES)
def test_older_state_dict_without_torch_flags_loads_and_steps(name):
    def drop_flags(sd):
        for g in sd["param_groups"]:
            for flag in OLDER_TORCH_FLAGS:
                g.pop(flag, None)
        return sd

    a, resumed, oracle, fresh = _interrupted(name, drop_flags)
    _assert_resumed_exactly(a, resumed, oracle)
    assert fresh.param_groups[0]["maximize"] is False


@pytest.mark.parametrize("name", ROW_NAMES)
def test_state_dict_group_lacking_a_hyperparameter_is_refused_at_load(name):
    key = "momentum" if name == "csgd" else "betas"
    row = ROWS[name]
    ps = make_params()
    opt = row.cls(ps, **row.hyper)
    step_with(opt, ps, 0)
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0][key]
    fresh = row.cls([p.detach().clone().requires_grad_() for p in ps], **row.hyper)
    with pytest.raises(ValueError, match=rf"loaded param group 0 lacks \['{key}'\]"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0  # nothing was loaded
