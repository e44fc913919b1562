"""The cautious optimizers under DeepSpeed ZeRO 0/1/2/3 (gloo on CPU), against independent
references (CAdamW in every scenario; CLion and CSGD, the ``tests/optimizers.py`` rows, in
ZeRO-1 global, ZeRO-2 shard and ZeRO-3 global: spec tokens ``clion`` / ``csgd``).

Two torchrun launches (world 2 and world 4; a launch costs seconds on 2 cores, so the
scenarios share them). The worker (tests/dist/workers/ds_worker.py) trains a model whose
tensors straddle ZeRO partition cuts, with two param groups (decay / no decay), for 10
optimizer steps, and reports:

* trajectory errors of the final parameters against the same optimizer in one process on
  the full batch and against its float64 oracle (``tests/oracle.py``, float64 gradients of a
  float64 model copy); for ``scale="shard"``, against a float64 oracle over the ZeRO
  fragments, computed from the partitioning rules, not from the adapter;
* a step audit of every ``optimizer.step()`` call: all ranks' flat partitions, gradients
  and moments gathered, whole tensors rebuilt, one float64 oracle step compared with what
  the ranks computed, parameters and every state tensor of the row (exact even for bf16
  models: the master weights are fp32), padding untouched, all-reduces counted;
* the adapter's fragments against the expected rules and DeepSpeed's own ``_hp_mapping``.

This file asserts on those numbers. The FSDP2 comparison: ``z2.global.fp32.fsdp`` trains
the same model with FSDP2 + CAdamW in the same launch and compares directly (and both are
compared with the same single-process reference here and in tests/dist/test_fsdp2.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_cautious import CAdamW
from dist_cautious import deepspeed as dc_ds
from dist_cautious.deepspeed import Fragment, ZeroFlatLayout
from tests.dist.harness import torchrun
from tests.optimizers import ROWS
from tests.oracle import rel_err

WORKER = Path(__file__).parent / "workers" / "ds_worker.py"
STEPS = 10  # optimizer steps per scenario (ds_worker.STEPS)
LAG_SPEC = "z2.global.fp32.lag.ckpt"
TOL = 1e-6  # fp32: relative L2 error of the final parameters, and of each audited step
TOL_UPDATE = 1e-4  # relative error of one step's update p_new - p_old (fp32 rounding of p)
# relative error of the total update p_10 - p_0 over 10 steps (fp32) vs the float64 oracle:
# the fp32 rounding of p relative to the update. Lion steps lr=1e-3 per element, a tenth of
# AdamW's lr=1e-2 here, and its errors are 10x AdamW's (one step: 3.6e-5 vs 3.8e-6 audited;
# 10 steps: 6.6e-6 measured), while the parameters match to 2e-7 and single-process CLion
# exactly (0.0)
TOL_TRAJ_UPDATE = {"cadamw": 5e-6, "clion": 2e-5, "csgd": 5e-6}
OTHER_ROWS = ["clion", "csgd"]
# CLion / CSGD: ZeRO-1 global, ZeRO-2 shard, ZeRO-3 global (one launch with CAdamW's)
OTHER_LAYOUTS = ["z1.global.fp32", "z2.shard.fp32", "z3.global.fp32"]
OTHER_SPECS = [f"{s}.{n}" for n in OTHER_ROWS for s in OTHER_LAYOUTS]
TOL_BF16 = 3e-2  # bf16 model: final parameters vs the fp32 references (measured 9.8e-3)
DIFFERS = 1e-2  # global vs shard on straddling tensors: at least this different

W2 = [
    # ZeRO disabled: fp32 (CAdamW steps the model's tensors), bf16 (FP16_UnfusedOptimizer)
    "z0.global.fp32",
    "z0.shard.fp32",
    "z0.global.bf16.ckpt",
    # ZeRO-1: DeepSpeedZeroOptimizer; bf16 + fp32 accumulation: BF16_Optimizer
    "z1.global.fp32.gas2",
    "z1.shard.fp32",
    "z1.global.bf16acc32.ckpt",
    "z1.global.bf16.align",  # parameter_alignment: padding between tensors
    # ZeRO-2, also against FSDP2 in the same launch, round-robin gradients, bf16
    "z2.global.fp32.fsdp.ckpt",
    "z2.shard.fp32",
    "z2.global.fp32.rr",
    "z2.shard.fp32.align",
    "z2.global.bf16",
    # ZeRO-3: several sub-groups (step() per sub-group), bf16, parameter offload to CPU
    "z3.global.fp32.sub10.gas2",
    "z3.shard.fp32",
    "z3.global.bf16",
    "z3.global.fp32.offp.ckpt",
    # ZeRO-Offload (offload_optimizer to CPU): fp32 partitions, gradients and state on the
    # CPU, stepped there; ZeRO-1/2/3, accumulation, shard, bf16 model, resume
    "z1.global.fp32.offo",
    "z2.global.fp32.offo.gas2",
    "z2.shard.fp32.offo",
    "z2.global.bf16.offo",
    "z3.global.fp32.offo.ckpt",
    # per-group scale: decay group global, no-decay group shard
    "z2.mixed.fp32",
    "z3.mixed.fp32",
    # factor_lag=1 (its own test: the per-step audit does not know the previous counts)
    LAG_SPEC,
    # plain deepspeed.initialize without the adapter
    "z0.bf16.forgot",
    "z0.forgot",
    "z1.forgot",
    "z1.bf16acc32.forgot",
    "z2.forgot",
    "z3.forgot",
    *OTHER_SPECS,
]
W4 = [
    "z1.global.fp32",
    "z1.shard.fp32",
    "z2.global.fp32.gas2",
    "z2.shard.fp32.rr",
    "z3.global.fp32.sub10",
    "z3.shard.fp32",
    # MoE: experts partitioned over the expert data-parallel group (size 2 of 4)
    "z2.global.moe",
    "z1.global.bf16acc32.moe",
]


@pytest.mark.dist
def test_zero2_factor_lag_matches_single_process_and_resumes_bitwise(w2):
    """ZeRO-2, factor_lag=1: the single-process factor_lag=1 optimizer and the lagged float64
    oracle (factor_lag=0's oracle is far away: a lag using this step's factor fails); the
    last step's all-reduces (one per param group) left in flight; a DeepSpeed checkpoint at
    step 5 resumes bitwise."""
    r = w2[LAG_SPEC]
    assert r.get("error") is None, r
    for ref in ("vs_single_process", "vs_oracle"):
        e = r[ref]
        assert e["all"] <= TOL and e["max_tensor"] <= TOL, (ref, e)
        assert e["update"] <= TOL_TRAJ_UPDATE["cadamw"], (ref, e)
    assert r["vs_exact_oracle"]["update"] > 1e-3, r["vs_exact_oracle"]
    # ZeRO-2 calls step() once per param group (2 here): both all-reduces stay in flight
    assert r["in_flight"] == 2, r
    assert r["ckpt_resume"]["all"] == 0.0, r["ckpt_resume"]


def _launch(nproc: int, out: Path, specs: list[str]) -> dict:
    torchrun(WORKER, nproc, [out, *specs], timeout=420, extra_env={"DS_ACCELERATOR": "cpu"})
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def w2(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    return _launch(2, tmp_path_factory.mktemp("ds2") / "out.json", W2)


@pytest.fixture(scope="module")
def w4(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    return _launch(4, tmp_path_factory.mktemp("ds4") / "out.json", W4)


def _tokens(spec: str) -> set[str]:
    return set(spec.split("."))


def _row(spec: str) -> str:
    return next((t for t in _tokens(spec) if t in ROWS), "cadamw")


def _check(r: dict) -> None:
    """Assertions common to every trained scenario."""
    spec = r["spec"]
    assert "crash" not in r, r.get("tb", r)
    tok = _tokens(spec)
    stage = int(next(t for t in tok if t.startswith("z"))[1:])
    # the adapter's mapping equals the partitioning rules; DeepSpeed's own _hp_mapping agrees
    # (except with round-robin gradients, where DeepSpeed 0.19's _hp_mapping ignores the
    # reordering of the flat buffer: a DeepSpeed issue we do not depend on)
    assert r["layout_equal"], r.get("layout_mismatch")
    # ZeRO-Offload scenarios really run DeepSpeed's offload path (its own flag), others do not
    assert r["offload_optimizer"] == ("offo" in tok), (spec, r["offload_optimizer"])
    if stage in (1, 2) and "rr" not in tok:
        assert r["hp_mapping_checked"] > 0 and r["hp_mapping_equal"], r
    # every step call audited exactly against the float64 oracle (per tensor or fragment):
    # the parameters and every state tensor of the row
    row = ROWS[_row(spec)]
    assert r["optimizer"] == row.cls.__name__, (spec, r["optimizer"])
    assert r["audit_missing"] == 0
    assert set(r["audit"]) == {"p", "update", *row.state_keys}, (spec, r["audit"])
    for key in ("p", *row.state_keys):
        assert r["audit"][key] <= TOL, (spec, r["audit"])
    assert r["audit"]["update"] <= TOL_UPDATE, (spec, r["audit"])
    assert r["padding_ok"], spec
    # the mask and factor are computed once per optimizer step, at the accumulation boundary
    assert r["boundary_ok"], spec
    assert r["state_steps"] == [STEPS], (spec, r["state_steps"])
    wrapper = r["kind"]
    per_step = {
        "DeepSpeedZeroOptimizer": 2,  # one call per param group
        "DeepSpeedZeroOptimizer_Stage3": r["flats"],  # one call per sub-group
        "BF16_Optimizer": 1,
        "FP16_UnfusedOptimizer": 1,
        "CAdamW": 1,  # ZeRO disabled, fp32: the optimizer itself
        "CLion": 1,
        "CSGD": 1,
    }[wrapper]
    assert r["step_calls"] == STEPS * per_step, (spec, r["step_calls"])
    # one all-reduce per step call (per process group), none for shard or without ZeRO
    if stage == 0 or r["spec"].count("shard"):
        assert r["allreduces_per_call"] == [0], (spec, r["allreduces_per_call"])
    elif "mixed" in tok:  # a call per group: the global group's one all-reduce, none for shard
        assert r["allreduces_per_call"] == [0, 1], (spec, r["allreduces_per_call"])
    elif wrapper == "BF16_Optimizer" and "moe" in tok:
        assert r["allreduces_per_call"] == [2], r  # dense dp group + expert dp group
    else:
        assert r["allreduces_per_call"] == [1], (spec, r["allreduces_per_call"])
    # the one-time cross-rank agreement check: once per step-call layout and group, not per step
    n_groups = 2 if (wrapper == "BF16_Optimizer" and "moe" in tok) else 1
    assert r["agreement_checks"] <= (0 if stage == 0 or "shard" in spec else per_step * n_groups), r
    # global and shard differ on the tensors that straddle a partition cut
    if stage > 0:
        assert r["other_mode_max_diff"] >= DIFFERS, (spec, r["other_mode_max_diff"])
    if "ckpt" in tok:  # save at step 5, resume in a fresh engine: same parameters
        assert r["ckpt_resume"]["all"] <= 1e-7, r["ckpt_resume"]
        assert r["ckpt_state_steps"] == [STEPS], r


def _check_trajectory(r: dict) -> None:
    spec = r["spec"]
    tok = _tokens(spec)
    if "moe" in tok:
        return
    refs = ["vs_single_process", "vs_oracle"] if "global" in tok else ["vs_oracle"]
    for ref in refs:
        e = r[ref]
        if "fp32" in tok:
            assert e["all"] <= TOL and e["max_tensor"] <= TOL, (spec, ref, e)
            assert e["update"] <= TOL_TRAJ_UPDATE[_row(spec)], (spec, ref, e)
        else:  # bf16 model (fp32 master weights): stated tolerance
            assert e["all"] <= TOL_BF16, (spec, ref, e)
    if "shard" in tok and int(spec[1]) > 0:
        # per-fragment semantics, measurably different from whole-tensor C-AdamW
        assert r["vs_global_oracle"]["update"] >= 1e-3, r["vs_global_oracle"]


def _trained(res: dict) -> list[dict]:
    return [r for s, r in res.items() if "forgot" not in s and s != LAG_SPEC]


@pytest.mark.dist
def test_world2_matches_references(w2):
    rs = _trained(w2)
    assert len(rs) == len([s for s in W2 if "forgot" not in s and s != LAG_SPEC])
    for r in rs:
        _check(r)
        _check_trajectory(r)


@pytest.mark.dist
@pytest.mark.parametrize("row", OTHER_ROWS)
def test_other_optimizers_match_references(row, w2):
    """CLion and CSGD (tests/optimizers.py rows) under ZeRO-1/3 global and ZeRO-2 shard: the
    same step audit and trajectory checks as CAdamW's."""
    specs = [s for s in OTHER_SPECS if s.endswith(f".{row}")]
    assert len(specs) == 3
    kinds = set()
    for spec in specs:
        r = w2[spec]
        _check(r)
        _check_trajectory(r)
        kinds.add(r["kind"])
    assert kinds == {"DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"}


@pytest.mark.dist
def test_world4_matches_references(w4):
    assert len(w4) == len(W4)
    for r in w4.values():
        _check(r)
        _check_trajectory(r)


@pytest.mark.dist
def test_global_matches_fsdp2(w2):
    r = w2["z2.global.fp32.fsdp.ckpt"]
    assert r["vs_fsdp2"]["all"] <= TOL and r["vs_fsdp2"]["update"] <= TOL_TRAJ_UPDATE["cadamw"], r


@pytest.mark.dist
def test_wrappers_covered(w2, w4):
    kinds = {r["kind"] for r in _trained(w2) + list(w4.values())}
    assert kinds == {
        "CAdamW",
        "FP16_UnfusedOptimizer",
        "DeepSpeedZeroOptimizer",
        "BF16_Optimizer",
        "DeepSpeedZeroOptimizer_Stage3",
    }
    assert w2["z3.global.fp32.sub10.gas2"]["flats"] > 2  # several sub-groups per group


@pytest.mark.dist
def test_forgot_adapter_raises(w2):
    expect = {
        "z0.bf16.forgot": ("initialize", None),  # FP16_UnfusedOptimizer steps while built
        "z1.forgot": ("step", "DeepSpeedZeroOptimizer"),
        "z1.bf16acc32.forgot": ("step", "BF16_Optimizer"),
        "z2.forgot": ("step", "DeepSpeedZeroOptimizer"),
        "z3.forgot": ("step", "DeepSpeedZeroOptimizer_Stage3"),
    }
    for spec, (where, wrapper) in expect.items():
        r = w2[spec]
        assert r["where"] == where and r.get("wrapper") == wrapper, r
        assert r["error"] and "never given" in r["error"], r
        assert "dist_cautious.deepspeed.initialize" in r["error"], r
        assert "dist_cautious.deepspeed.attach" in r["error"], r
    # fp32 without ZeRO: DeepSpeed steps the model's own tensors, nothing to forget
    assert w2["z0.forgot"]["error"] is None and w2["z0.forgot"]["wrapper"] == "CAdamW"


# --------------------------------------------------------------------------- no launch


def test_config_defaults_and_merge():
    base = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2, "overlap_comm": True},
    }
    cfg = dc_ds.config(base, zero_optimization={"stage": 3}, bf16={"enabled": True})
    assert base == {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2, "overlap_comm": True},
    }
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert cfg["zero_allow_untested_optimizer"] is True
    assert cfg["gradient_clipping"] == 0.0
    assert cfg["bf16"] == {"enabled": True}
    assert dc_ds.config(gradient_clipping=1.0)["gradient_clipping"] == 1.0  # user's choice kept
    assert dc_ds.config() == {"zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}


@pytest.mark.parametrize(
    "cfg, exc, words",
    [
        ({"optimizer": {"type": "AdamW"}}, ValueError, "'optimizer' section"),
        ({"zero_optimization": {"stage": 4}}, ValueError, "stage=4"),
        (  # ZeRO-Offload with DeepSpeed's "client optimizers refused" switch left on
            {
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                "zero_force_ds_cpu_optimizer": True,
            },
            ValueError,
            '"zero_force_ds_cpu_optimizer": false',
        ),
        (  # partial offload: DeepSpeed steps the rest with its own torch AdamW
            {
                "zero_optimization": {
                    "stage": 3,
                    "offload_optimizer": {"device": "cpu", "ratio": 0.5},
                }
            },
            NotImplementedError,
            "ratio=0.5",
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
            NotImplementedError,
            "offload_optimizer.device='nvme'",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
            NotImplementedError,
            "'nvme'",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
            NotImplementedError,
            "offload_param",
        ),
        (
            {"zero_optimization": {"stage": 2, "zenflow": {"topk_ratio": 0.1}}},
            NotImplementedError,
            "zenflow",
        ),
        (
            {"zero_optimization": {"stage": 3, "super_offload": True}},
            NotImplementedError,
            "super_offload",
        ),
        (
            {"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": False},
            ValueError,
            "zero_allow_untested_optimizer",
        ),
        ({"gradient_clipping": -1.0}, ValueError, "gradient_clipping=-1.0"),
    ],
)
def test_config_rejects(cfg, exc, words):
    with pytest.raises(exc, match=None) as ei:
        dc_ds.config(cfg)
    assert words in str(ei.value)
    with pytest.raises(exc):
        dc_ds.check_config(cfg)


def test_config_allows_param_offload_to_cpu():
    cfg = dc_ds.config(zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}})
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu"}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_config_zero_offload_to_cpu_lets_the_client_optimizer_in(stage):
    """ZeRO-Offload: config() sets DeepSpeed's zero_force_ds_cpu_optimizer to False (else
    DeepSpeed refuses any optimizer but DeepSpeedCPUAdam); check_config then accepts it."""
    off = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
    cfg = dc_ds.config(zero_optimization={"stage": stage, **off})
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    dc_ds.check_config(cfg)
    without = {k: v for k, v in cfg.items() if k != "zero_force_ds_cpu_optimizer"}
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        dc_ds.check_config(without)
    assert "zero_force_ds_cpu_optimizer" not in dc_ds.config(zero_optimization={"stage": stage})


def test_attach_refuses_nvme_optimizer_offload():
    """An engine built without the config check (plain deepspeed.initialize) whose ZeRO-3
    wrapper swaps optimizer state to NVMe: attach raises, naming the setting and what works."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    wrapper = DeepSpeedZeroOptimizer_Stage3.__new__(DeepSpeedZeroOptimizer_Stage3)
    wrapper.optimizer = CAdamW([torch.nn.Parameter(torch.randn(3))])
    wrapper.offload_optimizer, wrapper.swap_optimizer = True, True
    with pytest.raises(NotImplementedError) as ei:
        dc_ds.attach(SimpleNamespace(optimizer=wrapper))
    assert "offload_optimizer.device='nvme'" in str(ei.value)
    assert "offload_optimizer='cpu'" in str(ei.value)


def test_attach_errors():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="AdamW, not dist_cautious.CAdamW"):
        dc_ds.attach(SimpleNamespace(optimizer=torch.optim.AdamW([p])))
    with pytest.raises(TypeError, match="no CAdamW found"):
        dc_ds.attach(SimpleNamespace(optimizer=None))
    opt = CAdamW([p])
    assert dc_ds.attach(SimpleNamespace(optimizer=opt)) is opt  # nothing replaced: fine
    opt.param_groups[0]["params"] = [
        torch.zeros(4, requires_grad=True)
    ]  # an unknown wrapper did this
    with pytest.raises(NotImplementedError, match="does not know how to map"):
        dc_ds.attach(SimpleNamespace(optimizer=opt))


def test_attach_refuses_an_engine_with_an_optimizer_section():
    """deepspeed.initialize(config={"optimizer": ...}, optimizer=CAdamW) then attach: DeepSpeed
    would step CAdamW with its own lr while its config reports another (issue 10, item 6)."""
    opt = CAdamW([torch.nn.Parameter(torch.randn(3))])
    engine = SimpleNamespace(optimizer=opt, _config=SimpleNamespace(optimizer_name="adamw"))
    with pytest.raises(ValueError, match="'optimizer' section \\(type 'adamw'\\)"):
        dc_ds.attach(engine)
    engine._config.optimizer_name = None  # no section: fine
    assert dc_ds.attach(engine) is opt


def test_initialize_checks_a_json_config_file(tmp_path):
    pytest.importorskip("deepspeed")
    path = tmp_path / "ds.json"
    path.write_text('{"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}')
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="'optimizer' section"):
        dc_ds.initialize(model=None, optimizer=CAdamW([p]), config=str(path))


def test_gradient_clipping_auto_is_left_for_the_hf_trainer():
    cfg = dc_ds.config({"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto"})
    assert cfg["gradient_clipping"] == "auto"
    with pytest.raises(ValueError, match="gradient_clipping='sometimes'"):
        dc_ds.config(gradient_clipping="sometimes")


def test_initialize_rejects_other_optimizers():
    pytest.importorskip("deepspeed")
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="not dist_cautious.CAdamW"):
        dc_ds.initialize(model=torch.nn.Linear(2, 2), optimizer=torch.optim.AdamW([p]), config={})
    with pytest.raises(ValueError, match="'optimizer' section"):
        dc_ds.initialize(model=None, optimizer=CAdamW([p]), config={"optimizer": {"type": "Adam"}})
    with pytest.raises(TypeError, match="needs optimizer=CAdamW"):
        dc_ds.initialize(model=None, config={})


def test_flat_layout_steps_like_separate_tensors():
    """One process: a flat buffer [a | b | pad] with a ZeroFlatLayout steps exactly like
    CAdamW on a and b separately; padding and a zero-length fragment are left alone."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 3), torch.randn(7)
    ga, gb = torch.randn(5, 3), torch.randn(7)
    flat = torch.nn.Parameter(torch.cat([a.reshape(-1), b, torch.zeros(2)]))
    frags = [Fragment(0, 15, 0, 0, 15), Fragment(1, 7, 0, 15, 7), Fragment(2, 9, 0, 0, 0)]
    opt = CAdamW([flat], lr=1e-2, weight_decay=0.1, backend="reference")
    opt.register_layout(flat, ZeroFlatLayout(frags, None, 24, "test"))
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    ref = CAdamW([pa, pb], lr=1e-2, weight_decay=0.1, backend="reference")
    for _ in range(3):
        flat.grad = torch.cat([ga.reshape(-1), gb, torch.ones(2)])
        pa.grad, pb.grad = ga.clone(), gb.clone()
        opt.step()
        ref.step()
        ga, gb = ga + 0.3 * torch.randn_like(ga), gb + 0.3 * torch.randn_like(gb)
    assert rel_err(flat.detach()[:15], pa.detach().reshape(-1)) <= 1e-7
    assert rel_err(flat.detach()[15:22], pb.detach()) <= 1e-7
    assert torch.equal(flat.detach()[22:], torch.zeros(2))
    assert torch.equal(opt.state[flat]["exp_avg"][22:], torch.zeros(2))


def test_flat_layout_checks():
    with pytest.raises(RuntimeError, match="overlapping"):
        ZeroFlatLayout([Fragment(0, 4, 0, 0, 4), Fragment(1, 4, 0, 2, 4)], None, 8, "t")
    with pytest.raises(RuntimeError, match="outside its tensor"):
        ZeroFlatLayout([Fragment(0, 4, 2, 0, 4)], None, 8, "t")
    lay = ZeroFlatLayout([Fragment(0, 4, 0, 0, 4)], None, 8, "t")
    with pytest.raises(RuntimeError, match="re-partitioned"):
        lay.reserve(torch.zeros(9), None)


@pytest.mark.dist
@pytest.mark.parametrize("stage", [2, 3])
def test_hf_trainer_recipe(tmp_path, stage):
    """docs/deepspeed.md's HF Trainer recipe (runs only where transformers is installed)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("deepspeed")
    out = tmp_path / "hf.json"
    torchrun(
        WORKER.parent / "ds_hf_trainer.py",
        2,
        [out, stage],
        timeout=300,
        extra_env={"DS_ACCELERATOR": "cpu"},
    )
    r = json.loads(out.read_text())
    zero = "DeepSpeedZeroOptimizer" + ("_Stage3" if stage == 3 else "")
    assert r["chain"] == ["DeepSpeedOptimizerWrapper", zero], r
    assert r["layouts"] == 2 and r["state_steps"] == [4], r
    # against single-process CAdamW replaying both ranks' micro-batches (measured: ZeRO-2
    # 3.2e-8 params, 1.4e-7 total update; ZeRO-3 4.2e-8, 1.9e-7)
    assert r["micro_batches"] == [8, 8], r
    assert r["param"] <= TOL and r["delta"] <= TOL_TRAJ_UPDATE["cadamw"], r


def test_op_build_is_announced_and_follows_torch_extensions_dir(tmp_path, monkeypatch):
    """DeepSpeed's silent JIT build of its CPU communication op (minutes on 2 cores) is
    announced by dist_cautious.deepspeed.initialize, with the directory it builds into, which
    follows TORCH_EXTENSIONS_DIR; a build made by another environment is called out; none
    when this environment's build is there (issue 18)."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import include_paths

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed's accelerator was already set to another device in this process")
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    monkeypatch.setattr(type(builder), "_loaded_ops", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    msg = dc_ds._announce_op_build()
    assert msg and "'deepspeed_shm_comm' is not built yet" in msg and str(tmp_path) in msg, msg
    assert "TORCH_EXTENSIONS_DIR" in msg
    d = next(tmp_path.rglob("deepspeed_shm_comm"))
    (d / "deepspeed_shm_comm.so").write_bytes(b"")
    (d / "build.ninja").write_text("cflags = -isystem /another/env/torch/include\n")
    assert "built by another Python environment" in dc_ds._announce_op_build()
    (d / "build.ninja").write_text(f"cflags = -isystem {include_paths()[0]}\n")
    assert dc_ds._announce_op_build() is None
