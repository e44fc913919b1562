"""What the optimizer remembers about the tensors it was given (issue 17, item 1).

HF Accelerate and the HF Trainer build the optimizer on the model's original parameters,
then ``fully_shard`` the model and swap the sharded DTensors into ``param_groups`` so that
the originals can be freed. The optimizer must not keep them alive (that is the whole
unsharded model on every rank), yet it must still refuse to step a tensor it was never
given, also after ``copy.deepcopy`` / ``pickle`` and when CPython recycles the id of a
freed tensor for a new one.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
import torch.nn as nn

from dist_cautious import CSGD, CAdamW, CLion

OPTS = [
    (CAdamW, {}),
    (CLion, {}),
    (CSGD, {"momentum": 0.9}),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])  # 8 tensors


def _swap(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What Accelerate's FSDP2 path does: new tensors replace the given ones in place."""
    new = []
    for g in opt.param_groups:
        g["params"] = [nn.Parameter(p.detach().clone()) for p in g["params"]]
        new += g["params"]
    return new


@pytest.mark.parametrize("cls,kw", OPTS, ids=[c.__name__ for c, _ in OPTS])
def test_swapped_out_originals_are_freed(cls, kw):
    """Before the fix CAdamW kept 8 of 8 originals alive; torch AdamW keeps none."""
    alive = {}
    for name, make in (("torch", torch.optim.AdamW), ("ours", lambda ps: cls(ps, **kw))):
        model = _model()
        refs = [weakref.ref(p) for p in model.parameters()]
        opt = make(model.parameters())
        new = _swap(opt)
        del model
        gc.collect()
        alive[name] = sum(r() is not None for r in refs)
        assert len(new) == len(refs) == 8
    # (that the swapped-in DTensors are stepped exactly, and the originals freed, through
    # Accelerate's real prepare: tests/dist/test_integrations.py)
    assert alive == {"torch": 0, "ours": 0}, alive


@pytest.mark.parametrize("cls,kw", OPTS, ids=[c.__name__ for c, _ in OPTS])
def test_recycled_id_is_still_refused(cls, kw):
    """A freed given tensor's id, reused by a new tensor put into param_groups by hand, is
    not mistaken for the given one (a plain set of ids would accept it)."""
    p = nn.Parameter(torch.randn(5, 3))
    opt = cls([p], **kw)
    pid = id(p)
    opt.param_groups[0]["params"] = []
    del p
    gc.collect()
    keep, recycled = [], None
    for _ in range(2000):  # CPython hands the freed slot out again within a few
        for t in (torch.randn(5, 3).requires_grad_(), nn.Parameter(torch.randn(5, 3))):
            if id(t) == pid:
                recycled = t
            keep.append(t)
        if recycled is not None:
            break
    if recycled is None:
        pytest.skip("CPython did not reuse the id in 4000 allocations")
    recycled.grad = torch.ones_like(recycled)
    opt.param_groups[0]["params"] = [recycled]
    with pytest.raises(RuntimeError, match="never given"):
        opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_what_was_given_and_nothing_else(how):
    model = _model()
    params = list(model.parameters())
    opt = CAdamW(params[:4])
    opt.add_param_group({"params": params[4:6]})
    refs = [weakref.ref(p) for p in params[6:]]
    # the state a copy carries names only the given tensors still in param_groups
    opt.param_groups[1]["params"] = [params[4]]
    state = opt.__getstate__()
    assert [id(p) for p in state["_given_params"]] == [id(p) for p in params[:5]]
    del model, params, state
    gc.collect()
    assert all(r() is None for r in refs)  # never in the optimizer: gone
    opt2 = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    given = [p for g in opt2.param_groups for p in g["params"]]
    for p in given:
        p.grad = torch.ones_like(p)
    opt2.step()  # the copy steps the copies of the given tensors
    stranger = nn.Parameter(torch.randn(3))
    stranger.grad = torch.ones_like(stranger)
    opt2.param_groups[0]["params"].append(stranger)
    with pytest.raises(RuntimeError, match="never given"):
        opt2.step()
