"""Named parameters (torch >= 2.6 style) and the slot identity of the cross-rank guard.

Single process: the distributed cases are tests/dist/test_guard.py.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from dist_cautious.layout import Reduction, SlotTable
from dist_cautious.reduce import _BITS, MAX_WORLD, _agree, _fingerprint, _lane
from tests.optimizers import ROWS


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


@pytest.mark.parametrize("row", list(ROWS))
def test_named_parameters_step_like_plain_ones_and_keep_names(row):
    r = ROWS[row]
    m1, m2 = _model(), _model()
    named = r.cls(m1.named_parameters(), **r.hyper)
    plain = r.cls(m2.parameters(), **r.hyper)
    assert named.param_groups[0]["param_names"] == [n for n, _ in m1.named_parameters()]
    for _ in range(3):
        for m, opt in ((m1, named), (m2, plain)):
            opt.zero_grad()
            m(torch.linspace(-1, 1, 8).view(2, 4)).square().sum().backward()
            opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    sd = named.state_dict()  # torch keeps param_names in the saved groups
    assert sd["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    again = r.cls(_model().named_parameters(), **r.hyper)
    again.load_state_dict(copy.deepcopy(sd))
    assert again.param_groups[0]["param_names"] == sd["param_groups"][0]["param_names"]


def test_named_groups_and_errors():
    m = _model()
    named = dict(m.named_parameters())
    opt = ROWS["cadamw"].cls(
        [
            {"params": [(n, p) for n, p in named.items() if p.ndim == 2], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named.items() if p.ndim == 1], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    assert [g["param_names"] for g in opt.param_groups] == [
        ["0.weight", "1.weight"],
        ["0.bias", "1.bias"],
    ]
    w = named["0.weight"]
    with pytest.raises(ValueError, match="lists the same parameter"):
        ROWS["cadamw"].cls([("a", w), ("b", w)])
    with pytest.raises(ValueError, match="names two parameters 'a'"):
        ROWS["cadamw"].cls([("a", w), ("a", named["1.weight"])])
    with pytest.raises(ValueError, match="one name per parameter"):
        ROWS["cadamw"].cls([{"params": [w, named["1.weight"]], "param_names": ["a"]}])


def _red(name: str) -> Reduction:
    return Reduction((SimpleNamespace(group_name=name),))


def test_named_slots_are_ordered_by_name_unnamed_by_walk():
    red = _red("g")
    rank0, rank1 = SlotTable(), SlotTable()
    for table, order in ((rank0, ["a", "b", None, "c"]), (rank1, ["b", "c", None, "a"])):
        for n in order:
            table.reserve(red, 30, ((6, 5), "float32"), n)
    # slot (reservation index) -> vector position: named sorted, unnamed after them
    assert rank0.positions(red) == [0, 1, 3, 2]
    assert rank1.positions(red) == [1, 2, 3, 0]
    assert rank0.signature(red) == rank1.signature(red)  # the ranks agree, whatever the order
    # a tensor in another param group is another slot identity
    other = SlotTable()
    for gi, n in ((0, "a"), (1, "b"), (0, None), (0, "c")):
        other.current_group = gi
        other.reserve(red, 30, ((6, 5), "float32"), n)
    assert other.signature(red) != rank0.signature(red)
    # no names: the walk's order, no permutation
    plain = SlotTable()
    plain.reserve(red, 4)
    assert plain.positions(red) is None


def test_fingerprint_lane_is_exact_at_the_largest_world():
    """Sums of lanes over MAX_WORLD - 1 ranks fit an int64 (torch sums them so), and the test
    tells one differing rank apart even when every value is the largest 40-bit one."""
    top = (1 << _BITS) - 1
    assert _fingerprint(("x",)) != _fingerprint(("y",)) and 0 < _fingerprint(("x",)) <= top
    w = MAX_WORLD - 1
    lane = torch.tensor(_lane(top), dtype=torch.int64)
    summed = (lane * w).tolist()  # what an all-reduce SUM of w equal lanes gives
    assert all(0 <= v < 2**63 for v in summed)
    assert _agree(summed, w)
    one_off = (lane * (w - 1) + torch.tensor(_lane(top - 1), dtype=torch.int64)).tolist()
    assert not _agree(one_off, w)
    # two ranks, values differing in the lowest bit only
    assert not _agree([a + b for a, b in zip(_lane(5), _lane(4))], 2)
    assert _agree([a + b for a, b in zip(_lane(5), _lane(5))], 2)
