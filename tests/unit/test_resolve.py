"""The layout resolver chain (dist_cautious/resolve.py, issue 21 §2): one ordered list of
resolvers that every adapter registers into, asked by ``CautiousOptimizer.layout_for``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dist_cautious import CAdamW
from dist_cautious import resolve as rs
from dist_cautious.flat import FlatLayout, Fragment
from dist_cautious.layout import DEFAULT_LAYOUT
from tests.optimizers import ROWS
from tests.oracle import rel_err

ORDER = ("registered", "fsdp1", "dtensor", "given")
NEVER_GIVEN = "asked to step a tensor it was never given"
ROOT = Path(__file__).resolve().parents[2]


def _names() -> tuple[str, ...]:
    return tuple(n for n, _ in rs.resolvers())


def test_chain_order_is_the_documented_one():
    assert _names() == ORDER
    # the module docstring and docs/architecture.md give the same order
    doc = rs.__doc__ or ""
    pos = [doc.index(f"``{n}``") for n in ORDER]
    assert pos == sorted(pos), pos
    arch = (ROOT / "docs" / "architecture.md").read_text()
    assert " → ".join(f"`{n}`" for n in ORDER) in arch


def test_each_resolver_answers_in_chain_order():
    """A registered layout wins over FSDP1's mark; FSDP1's resolver is asked before the
    plain-tensor fallback (a tensor marked flattened without a handle is refused, not stepped
    whole); a plain given tensor gets the default layout."""
    a, b, c = (torch.nn.Parameter(torch.randn(6)) for _ in range(3))
    opt = CAdamW([a, b, c], lr=1e-2)
    assert rs.resolve(a, opt) == ("given", DEFAULT_LAYOUT)
    assert opt.layout_for(a) is DEFAULT_LAYOUT and opt.was_given(a)
    b._fsdp_flattened = True  # what FSDP1 marks its flattened tensors with
    with pytest.raises(RuntimeError, match="no live FSDP1 FlatParamHandle owns it"):
        opt.layout_for(b)
    from dist_cautious import fsdp1  # imported by now: its own resolver replaced the shim

    assert rs.resolver("fsdp1") is fsdp1._resolve and _names() == ORDER
    lay = FlatLayout([Fragment(0, 6, 0, 0, 6)], None, 6, "test")
    c._fsdp_flattened = True
    opt.register_layout(c, lay)
    assert rs.resolve(c, opt) == ("registered", lay)
    assert opt.layout_for(c) is lay and opt.registered_layout(c) is lay
    assert opt.layout_registered(c) and not opt.layout_registered(a)
    assert opt.registered_layouts() == [(c, lay)]


def test_fsdp1_shim_does_not_import_the_adapter_for_plain_tensors(monkeypatch):
    """The shim resolve.py keeps in the ``fsdp1`` slot until fsdp1.py is imported answers
    None for plain tensors without importing dist_cautious.fsdp1 (a plain run never loads it)."""
    import sys

    monkeypatch.delitem(sys.modules, "dist_cautious.fsdp1", raising=False)
    opt = CAdamW([torch.nn.Parameter(torch.randn(3))])
    for t in (torch.nn.Parameter(torch.randn(3)), torch.randn(2, 2)):
        assert rs._fsdp1_shim(t, opt) is None
    assert "dist_cautious.fsdp1" not in sys.modules


def test_an_adapters_resolver_is_used_and_unknown_tensors_still_raise():
    """A resolver registered by an adapter steps a flat tensor the optimizer was never given
    (swapped into param_groups) per original tensor, like the float64 oracle on the two
    tensors; without it the same step raises the named error."""
    row = ROWS["cadamw"]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(15, generator=gen), torch.randn(7, generator=gen)
    given = torch.nn.Parameter(torch.zeros(22))
    opt = CAdamW([given], **row.hyper)
    flat = torch.nn.Parameter(torch.cat([x, y]))
    opt.param_groups[0]["params"] = [flat]  # never given
    lay = FlatLayout([Fragment(0, 15, 0, 0, 15), Fragment(1, 7, 0, 15, 7)], None, 22, "test")
    asked = []

    def adapter(p, o):
        asked.append(p is flat and o is opt)
        return lay if p is flat else None

    ref = row.oracle([x, y], **row.hyper)
    rs.register_resolver("test_adapter", adapter)
    try:
        assert _names() == (*ORDER[:-1], "test_adapter", ORDER[-1])  # before the fallback
        for s in range(3):
            gx = torch.randn(15, generator=gen) + 0.2 * s
            gy = torch.randn(7, generator=gen) - 0.2 * s
            flat.grad = torch.cat([gx, gy])
            opt.step()
            ref.step([gx, gy])
        assert rs.resolve(flat, opt) == ("test_adapter", lay) and all(asked) and asked
    finally:
        rs.remove_resolver("test_adapter")
    assert _names() == ORDER
    assert rel_err(flat.detach()[:15], ref.p[0]) < 1e-6
    assert rel_err(flat.detach()[15:], ref.p[1]) < 1e-6
    # a flat factor would differ: the per-tensor factors are not equal here
    assert ref.kept[0] * 7 != ref.kept[1] * 15
    assert rs.resolve(flat, opt) is None
    flat.grad = torch.ones(22)
    with pytest.raises(RuntimeError, match=NEVER_GIVEN):
        opt.step()


def test_register_resolver_refuses_an_unknown_anchor_and_keeps_the_builtins():
    with pytest.raises(ValueError, match=re.escape("no resolver named 'nope'")):
        rs.register_resolver("x", lambda p, o: None, before="nope")
    with pytest.raises(ValueError, match="built-in"):
        rs.remove_resolver("given")
    assert _names() == ORDER


def test_a_dtensor_never_given_is_resolved_by_the_dtensor_resolver(tmp_path):
    """One-rank mesh: a DTensor swapped into param_groups (HF Accelerate's FSDP2 path) is
    stepped like the plain tensor it shards; a plain tensor swapped in the same way is not."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    row = ROWS["cadamw"]
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
        opt = CAdamW([torch.nn.Parameter(x.clone())], **row.hyper)
        d = torch.nn.Parameter(distribute_tensor(x.clone(), mesh, [Shard(0)]))
        opt.param_groups[0]["params"] = [d]
        assert rs.resolve(d, opt) == ("dtensor", DEFAULT_LAYOUT) and not opt.was_given(d)
        ref = row.oracle([x], **row.hyper)
        for s in range(3):
            g = torch.randn(8, 3, generator=torch.Generator().manual_seed(10 + s))
            d.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()
            ref.step([g])
        assert rel_err(d.full_tensor(), ref.p[0]) < 1e-6
        opt.param_groups[0]["params"] = [torch.nn.Parameter(x.clone())]
        opt.param_groups[0]["params"][0].grad = torch.ones(8, 3)
        with pytest.raises(RuntimeError, match=NEVER_GIVEN):
            opt.step()
    finally:
        dist.barrier()
        dist.destroy_process_group()
