"""dist_cautious.integrations: timm registration, the HF Trainer one-liner, named decay
groups, torchtitan's factory (issue 18, item 4). The HF helper also runs inside the real
Trainer under FSDP2 (tests/dist/test_integrations.py, ``trainer_fsdp2_cls``)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn as nn

from dist_cautious import CSGD, CAdamW, CLion
from dist_cautious import integrations as dci


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.norm(self.fc(x)))


def _step(opt, model) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    for _ in range(3):
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """timm imports torchvision (for its data transforms only); the torchvision wheels that
    pair with the CPU torch here are CUDA builds that fail to import (and break
    transformers), so CI installs timm without it and the test stubs the module."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = mock.MagicMock(name=spec.name)
        m.__path__, m.__spec__, m.__name__ = [], spec, spec.name
        return m

    def exec_module(self, module):
        pass


@pytest.fixture(scope="module")
def timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm not installed (pip install --no-deps timm==1.0.31)")
    finder = None
    try:
        import torchvision  # noqa: F401
    except Exception:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        finder = _StubTorchvision()
        sys.meta_path.insert(0, finder)
    try:
        import timm.optim

        yield timm
    finally:
        if finder is not None:  # leave no stub behind for later imports in this process
            sys.meta_path.remove(finder)
            for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
                del sys.modules[k]


def test_timm_create_optimizer_v2_builds_ours(timm):
    names = dci.register_timm()
    assert names == ["dc-cadamw", "dc-clion", "dc-csgd"]
    assert dci.register_timm() == names  # idempotent
    assert set(names) <= set(timm.optim.list_optimizers())

    model = _Net()
    opt = timm.optim.create_optimizer_v2(
        model, "dc-cadamw", lr=3e-3, weight_decay=0.05, betas=(0.8, 0.95), foreach=True
    )
    assert type(opt) is CAdamW
    # timm's grouping: 1-D tensors (biases, norm) undecayed, matrices decayed
    wd = {
        n: g["weight_decay"]
        for g in opt.param_groups
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert wd == {
        "fc.weight": 0.05,
        "out.weight": 0.05,
        "fc.bias": 0.0,
        "norm.weight": 0.0,
        "norm.bias": 0.0,
        "out.bias": 0.0,
    }
    assert all(g["lr"] == 3e-3 and g["betas"] == (0.8, 0.95) for g in opt.param_groups)
    got = _step(opt, model)

    ref_model = _Net()  # the same groups by hand: the same numbers, bitwise
    named = list(ref_model.named_parameters())
    ref = CAdamW(
        [
            {"params": [p for n, p in named if p.ndim <= 1], "weight_decay": 0.0},
            {"params": [p for n, p in named if p.ndim > 1], "weight_decay": 0.05},
        ],
        lr=3e-3,
        betas=(0.8, 0.95),
        foreach=True,  # what timm passed on
    )
    want = _step(ref, ref_model)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert any(not torch.equal(want[n], p) for n, p in _Net().named_parameters())

    lion = timm.optim.create_optimizer_v2(_Net(), "dc-clion", lr=1e-4, weight_decay=0.1)
    sgd = timm.optim.create_optimizer_v2(_Net(), "dc-csgd", lr=1e-2)
    assert type(lion) is CLion and type(sgd) is CSGD
    assert sgd.param_groups[0]["momentum"] == 0.9  # timm's default momentum
    # the trap the dash avoids: timm parses "dc_cadamw" as "cadamw", its own optimizer
    assert type(timm.optim.create_optimizer_v2(_Net(), "dc_cadamw", lr=1e-3)) is not CAdamW


def test_hf_optimizer_cls_and_kwargs():
    args = types.SimpleNamespace(
        learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.1
    )
    assert dci.hf_optimizer_cls_and_kwargs(args) == (
        CAdamW,
        {"lr": 3e-4, "betas": (0.8, 0.95), "eps": 1e-7},
    )
    assert dci.hf_optimizer_cls_and_kwargs(args, "CLion", scale="shard") == (
        CLion,
        {"lr": 3e-4, "betas": (0.8, 0.95), "scale": "shard"},
    )
    assert dci.hf_optimizer_cls_and_kwargs(args, "csgd", momentum=0.5) == (
        CSGD,
        {"lr": 3e-4, "momentum": 0.5},
    )
    with pytest.raises(ValueError, match="unknown optimizer='adamw'.*cadamw"):
        dci.hf_optimizer_cls_and_kwargs(args, "adamw")


def test_decay_groups_named_in_model_order():
    model = _Net()
    model.out.bias.requires_grad_(False)
    groups = dci.decay_groups(model, 0.1)
    assert [g["param_names"] for g in groups] == [
        ["fc.weight", "out.weight"],
        ["fc.bias", "norm.weight", "norm.bias"],
    ]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(
        p is dict(model.named_parameters())[n]
        for g in groups
        for n, p in zip(g["param_names"], g["params"])
    )
    opt = CAdamW(groups, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert dci.decay_groups(nn.Linear(3, 3, bias=False), 0.1)[0]["param_names"] == ["weight"]


def test_torchtitan_container_resolves_ours(monkeypatch):
    """torchtitan is not on PyPI: a stand-in for its OptimizersContainer (the two members
    the helper uses) checks the subclass's logic."""

    class OptimizersContainer:
        @dataclass(kw_only=True, slots=True)
        class Config:
            implementation: str = "fused"
            name: str = "AdamW"

        @staticmethod
        def _resolve_optimizer_factory(name):
            if name == "AdamW":
                return torch.optim.AdamW
            raise NotImplementedError(f"Optimizer {name} not added.")

    mod = types.ModuleType("torchtitan.components.optimizer")
    mod.OptimizersContainer = OptimizersContainer
    for name in ("torchtitan", "torchtitan.components"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "torchtitan.components.optimizer", mod)

    cls = dci.torchtitan_container()
    assert issubclass(cls, OptimizersContainer)
    assert cls._resolve_optimizer_factory("CAdamW") is CAdamW
    assert cls._resolve_optimizer_factory("clion") is CLion
    assert cls._resolve_optimizer_factory("CSGD") is CSGD
    assert cls._resolve_optimizer_factory("AdamW") is torch.optim.AdamW
    with pytest.raises(NotImplementedError, match="Muon"):
        cls._resolve_optimizer_factory("Muon")
    assert cls.Config().implementation == "foreach" and cls.Config().name == "AdamW"
