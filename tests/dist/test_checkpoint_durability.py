"""Checkpoint durability (issue 17 section 3): rollback pruning, checksums, parameters that
never had a gradient, single-device state into FSDP2, LR schedulers that own group keys.

The single-process tests compare a resumed run with the same run uninterrupted (bitwise),
or check what a save / load leaves on disk. The FSDP2 ones (2 gloo ranks, one torchrun
bounded by a timeout) run tests/dist/workers/ckpt_durability_worker.py once and check what
it printed and saved; its single-device reference is a plain CAdamW on one process.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_cautious import CSGD, CAdamW
from dist_cautious import checkpoint as ck

from .harness import ROOT, torchrun
from .test_checkpoint import flat_tensors

WORKER = ROOT / "tests" / "dist" / "workers" / "ckpt_durability_worker.py"


def net(seed: int) -> torch.nn.Module:
    """A body that trains and a ``pool`` head that gets a gradient only when asked to."""
    torch.manual_seed(seed)
    return torch.nn.ModuleDict(
        {"a": torch.nn.Linear(4, 8), "b": torch.nn.Linear(8, 3), "pool": torch.nn.Linear(8, 2)}
    )


def loss(m: torch.nn.Module, x: torch.Tensor, use_pool: bool) -> torch.Tensor:
    h = torch.tanh(m["a"](x))
    out = m["b"](h).pow(2).mean()
    return out + m["pool"](h).pow(2).mean() if use_pool else out


def run(m: torch.nn.Module, o: Any, steps: range, sched: Any = None, pool_from: int = 0) -> None:
    for s in steps:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(100 + s))
        loss(m, x, use_pool=s >= pool_from).backward()
        o.step()
        o.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def assert_same_run(a: tuple, b: tuple) -> None:
    """Parameters and optimizer state (every key, incl. which parameters have state) equal."""
    (ma, oa), (mb, ob) = a, b
    for (n, p), q in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(p, q), n
        sa, sb = oa.state.get(p, {}), ob.state.get(q, {})
        assert sa.keys() == sb.keys(), (n, sorted(sa), sorted(sb))
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (n, k)


def names(d: Path) -> list[str]:
    return sorted(x.name for x in d.iterdir())


# ----------------------------------------------------------------------------- 1. rollback


def test_rollback_moves_the_abandoned_branch_aside(tmp_path: Path) -> None:
    """10/20/30 saved; rolled back to 20; save(25, keep=2): 25 is what a restart resumes,
    30 is kept under abandoned/, and keep never prunes the checkpoint just written."""
    m = net(0)
    o = CAdamW(m.parameters(), lr=1e-2)
    for step in (10, 20, 30):
        run(m, o, range(step - 10, step))
        ck.save(tmp_path, m, o, step)
    m2 = net(1)
    o2 = CAdamW(m2.parameters(), lr=1e-2)
    assert ck.load(tmp_path, m2, o2, path=ck.step_path(tmp_path, 20)).step == 20
    run(m2, o2, range(20, 25))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p25 = ck.save(tmp_path, m2, o2, 25, keep=2)
    # before the fix: step_00000025 and step_00000030 left, newest() == step 30
    assert names(tmp_path) == ["abandoned", "step_00000020", "step_00000025"]
    assert ck.newest(tmp_path) == p25 and ck.complete(p25)
    assert any("moved ['step_00000030'] aside" in str(w.message) for w in caught)
    assert names(tmp_path / "abandoned") == ["step_00000030"]
    assert ck.complete(tmp_path / "abandoned" / "step_00000030")  # kept whole, loadable
    m3 = net(2)
    o3 = CAdamW(m3.parameters(), lr=1e-2)
    assert ck.load(tmp_path, m3, o3).step == 25  # a restart follows the live branch
    assert_same_run((m2, o2), (m3, o3))

    # keep=1, rolled back before everything: save(5) returns a checkpoint that exists
    with pytest.warns(UserWarning, match=r"moved \['step_00000020', 'step_00000025'\] aside"):
        p5 = ck.save(tmp_path, m, o, 5, keep=1)
    assert ck.complete(p5) and ck.newest(tmp_path) == p5  # before: p5 was deleted
    assert names(tmp_path) == ["abandoned", "step_00000005"]
    assert names(tmp_path / "abandoned") == ["step_00000020", "step_00000025", "step_00000030"]
    # no rollback: keep prunes older ones and warns about nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p6 = ck.save(tmp_path, m, o, 6, keep=1)
    assert not [w for w in caught if "abandoned" in str(w.message)]
    assert names(tmp_path) == ["abandoned", "step_00000006"] and ck.newest(tmp_path) == p6
    # the same step abandoned twice: both copies are kept
    ck.save(tmp_path, m, o, 30)
    with pytest.warns(UserWarning, match="abandoned"):
        ck.save(tmp_path, m, o, 7)
    assert "step_00000030.1" in names(tmp_path / "abandoned")


# ----------------------------------------------------------------------------- 2. checksums


def flip_exponent_bit(path: Path, value: torch.Tensor) -> Path:
    """Flip the top exponent bit of ``value[0]`` (float32) in the .distcp file holding it."""
    needle = value.detach().contiguous().view(-1).numpy().tobytes()
    for f in sorted(path.glob("*.distcp")):
        data = bytearray(f.read_bytes())
        at = data.find(needle)
        if at >= 0:
            assert data.find(needle, at + 1) < 0
            data[at + 3] ^= 0x40  # little-endian: byte 3 = sign + 7 exponent bits
            f.write_bytes(bytes(data))
            return f
    raise AssertionError(f"no .distcp file under {path} holds the tensor")


def test_a_flipped_bit_is_refused_at_load(tmp_path: Path) -> None:
    m = net(0)
    o = CAdamW(m.parameters(), lr=1e-2)
    run(m, o, range(2))
    w = m["a"].weight.detach().clone()
    path = ck.save(tmp_path, m, o, 2)
    f = flip_exponent_bit(path, w)

    m2 = net(1)
    o2 = CAdamW(m2.parameters(), lr=1e-2)
    # before the fix this loaded: a["weight"][0, 0] became ~1e37, no error
    with pytest.raises(ck.CheckpointMismatch, match=rf"file {f.name} has CRC-32 \w+, the marker"):
        ck.load(tmp_path, m2, o2)
    assert torch.equal(m2["a"].weight, net(1)["a"].weight)  # nothing was loaded
    marker = json.loads((path / ck.MARKER).read_text())
    assert set(marker[ck.CHECKSUM]) == set(marker["files"])  # every file has its checksum
    for name, crc in marker[ck.CHECKSUM].items():
        assert (crc == ck.crc32_file(path / name)) == (name != f.name), name
    with pytest.raises(ck.CheckpointMismatch, match="CRC-32"):
        ck.read(path)
    # the opt-out skips the check (and so loads the damage): sizes are still checked
    ck.load(tmp_path, m2, o2, verify=False)
    bad = float(m2["a"].weight[0, 0])
    assert abs(bad) > 1e30 and float(w[0, 0]) != bad, (float(w[0, 0]), bad)
    assert torch.equal(m2["a"].weight.view(-1)[1:], w.view(-1)[1:])
    # a checkpoint written without checksums (checksum=False, or an older version) loads
    shutil.rmtree(tmp_path)
    p = ck.save(tmp_path, m, o, 3, checksum=False)
    assert ck.CHECKSUM not in json.loads((p / ck.MARKER).read_text())
    m3 = net(1)
    assert ck.load(tmp_path, m3, CAdamW(m3.parameters(), lr=1e-2)).step == 3


# ----------------------------------------------------------------------------- 3. no gradient


@pytest.mark.parametrize("pool_from", [99, 3], ids=["never", "later"])
def test_a_parameter_without_gradient_resumes_bitwise(tmp_path: Path, pool_from: int) -> None:
    """``pool`` gets no gradient before the checkpoint (never, or from step 3 on). Before the
    fix: "Is it from another model?". After: the resumed run equals the uninterrupted one,
    ``pool`` without state until its first gradient (then step 1, not 2)."""
    m = net(0)
    o = CAdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    run(m, o, range(2), pool_from=pool_from)
    ck.save(tmp_path, m, o, 2)
    run(m, o, range(2, 5), pool_from=pool_from)

    m2 = net(1)
    o2 = CAdamW(m2.parameters(), lr=1e-2, weight_decay=0.1)
    assert ck.load(tmp_path, m2, o2).step == 2
    assert not o2.state.get(m2["pool"].weight)  # as in the saved run: no state
    run(m2, o2, range(2, 5), pool_from=pool_from)
    assert_same_run((m, o), (m2, o2))
    st = o.state.get(m["pool"].weight, {})
    assert (float(st["step"]) == 2.0) if pool_from == 3 else not st


# ----------------------------------------------------------------------------- 5. schedulers


def one_cycle(o: Any) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10)


def cyclic(o: Any) -> Any:
    return torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=1e-3, max_lr=1e-2, step_size_up=3, base_momentum=0.8, max_momentum=0.9
    )


@pytest.mark.parametrize(
    "make_opt,make_sched",
    [
        (lambda ps: CAdamW(ps, lr=1e-2), one_cycle),
        (lambda ps: CSGD(ps, lr=1e-2, momentum=0.9), cyclic),
    ],
    ids=["onecycle-cadamw", "cyclic-csgd"],
)
def test_momentum_cycling_schedulers_resume_bitwise(
    tmp_path: Path, make_opt: Any, make_sched: Any
) -> None:
    """The scheduler's ``betas`` / ``momentum`` and bookkeeping keys are not options: the
    resume (scheduler built before the load, as torch recommends) equals the uninterrupted
    run. Before the fix: "other options (group 0 betas: saved [0.85, ...], now [0.95,
    ...])". Loaded without a scheduler, the scheduler's keys come from the checkpoint."""
    m = net(0)
    o = make_opt(m.parameters())
    s = make_sched(o)
    run(m, o, range(4), sched=s)
    ck.save(tmp_path, m, o, 4, extra={"sched": s.state_dict()})
    run(m, o, range(4, 7), sched=s)

    saved = json.loads((ck.step_path(tmp_path, 4) / ck.INFO).read_text())["param_groups"]
    m1 = net(1)
    o1 = make_opt(m1.parameters())  # no scheduler: its keys are loaded all the same
    ck.load(tmp_path, m1, o1)
    assert [ck.group_options(o1)[0][k] for k in ck.SCHEDULER_KEYS if k in saved[0]] == [
        saved[0][k] for k in ck.SCHEDULER_KEYS if k in saved[0]
    ]
    m2 = net(1)
    o2 = make_opt(m2.parameters())
    s2 = make_sched(o2)
    got = ck.load(tmp_path, m2, o2)
    assert got is not None
    s2.load_state_dict(got.extra["sched"])
    run(m2, o2, range(4, 7), sched=s2)
    assert_same_run((m, o), (m2, o2))
    assert o.param_groups[0]["lr"] == o2.param_groups[0]["lr"]
    key = "betas" if "betas" in o.param_groups[0] else "momentum"
    assert o.param_groups[0][key] == o2.param_groups[0][key]
    # betas[1] is still an option: a different one is refused
    if key == "betas":
        o3 = CAdamW(net(1).parameters(), lr=1e-2, betas=(0.9, 0.95))
        one_cycle(o3)
        with pytest.raises(ck.CheckpointMismatch, match=r"betas\[1:\]: saved \[0.999\]"):
            ck.load(tmp_path, net(1), o3)


# ----------------------------------------------------------------------------- FSDP2, 2 ranks


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("durability")
    out = torchrun(WORKER, 2, ["--dir", str(d)], timeout=240).stdout
    return d, out


def test_fsdp2_checksums_come_from_every_rank_and_a_flipped_bit_fails_everywhere(
    fsdp2_run: tuple[Path, str],
) -> None:
    d, out = fsdp2_run
    # the worker flipped an exponent bit in rank 1's file, in a copy: every rank refused it
    # (before the fix: "LOADED (no error), max |a.weight| 6.02e+37")
    lines = [ln for ln in out.splitlines() if ln.startswith("CORRUPT")]
    assert len(lines) == 2, out[-3000:]
    assert all("CheckpointMismatch" in ln for ln in lines), lines
    assert any("__1_0.distcp has CRC-32" in ln for ln in lines), lines
    path = ck.step_path(d / "a", 5)
    marker = json.loads((path / ck.MARKER).read_text())
    crcs = marker[ck.CHECKSUM]
    assert set(crcs) == set(marker["files"])
    assert {"__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt"} <= set(crcs)
    for name, crc in crcs.items():
        assert crc == ck.crc32_file(path / name), name


def test_fsdp2_unused_parameter_and_one_cycle_resume_bitwise(fsdp2_run: tuple[Path, str]) -> None:
    """FSDP2, 2 ranks: ``pool`` has no gradient before the step-2 checkpoint, OneCycleLR
    cycles betas[0]; resumed from step 2 (new processes' state: another init, a fresh
    scheduler) to step 5 equals the uninterrupted run, optimizer state included."""
    d, out = fsdp2_run
    assert "RESUMED at step 2" in out, out[-3000:]
    a = flat_tensors(ck.read(ck.step_path(d / "a", 5)))
    b = flat_tensors(ck.read(ck.step_path(d / "b", 5)))
    assert a.keys() == b.keys()
    assert any(k.startswith("/optim/state/pool.weight") for k in a)  # it got state later
    assert float(a["/optim/state/pool.weight/step"]) == 2.0  # steps 3 and 4 only
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]
    ia = json.loads((ck.step_path(d / "a", 5) / ck.INFO).read_text())
    ib = json.loads((ck.step_path(d / "b", 5) / ck.INFO).read_text())
    assert ia["param_groups"] == ib["param_groups"]  # lr and betas[0] where the scheduler was


def test_fsdp2_loads_a_single_device_state_dict(fsdp2_run: tuple[Path, str]) -> None:
    """A plain CAdamW's state_dict() loaded into the FSDP2 optimizer: resharded, then two
    steps equal the single-device run (before the fix: step() raised after incrementing
    ``step``). The worker checks bitwise and prints the largest difference."""
    _, out = fsdp2_run
    lines = [ln for ln in out.splitlines() if ln.startswith("SINGLE")]
    assert lines == ["SINGLE max abs diff 0.000e+00 (params and moments), placements ok"], (
        lines or out[-3000:]
    )
