"""FSDP2 on 2 gloo ranks: the checkpoint durability checks of issue 17 that need sharding.

A  train 2 steps (``pool`` unused, OneCycleLR cycling betas[0]), save ``DIR/a`` step 2;
   train to 5, save step 5. New model (other init), optimizer and scheduler: load step 2,
   train to 5, save ``DIR/b`` step 5 (the test compares a and b bitwise).
C  a copy of step 5 with one byte of rank 1's data file flipped: every rank must raise
   CheckpointMismatch (printed ``CORRUPT rank R ...``).
S  a single-device CAdamW trained 2 steps; its state_dict() loaded into the FSDP2
   optimizer of the same weights; 2 more steps on both (every rank the same batch, so
   the averaged gradient is the single-device one): printed ``SINGLE max abs diff``.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from models import PoolNet as Net  # noqa: E402

from dist_cautious import CAdamW  # noqa: E402
from dist_cautious import checkpoint as ck  # noqa: E402
from launch import engines  # noqa: E402

HYPER = dict(lr=1e-2, weight_decay=0.1)


def say(line: str) -> None:
    """One write per line: under ``python -u`` print() writes the text and the newline
    separately, so two ranks' lines can interleave on the shared pipe ("...loadedCORRUPT
    rank 0 ..."); a single write below PIPE_BUF is atomic."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train(m, o, steps, sched=None, pool_from: int = 3, seed: int | None = None) -> None:
    for s in steps:
        g = torch.Generator().manual_seed(
            (seed if seed is not None else 100 + dist.get_rank()) + 7 * s
        )
        m(torch.randn(16, 4, generator=g), use_pool=s >= pool_from).backward()
        o.step()
        o.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    d = Path(ap.parse_args().dir)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def sharded(net: torch.nn.Module):
        """``net`` under FSDP2 (the root alone) and its CAdamW."""
        return engines.build("fsdp2", net, lambda m: CAdamW(m.parameters(), **HYPER), mesh=mesh)

    def build(seed: int):
        fsdp = sharded(Net(seed))
        o = fsdp.opt
        return fsdp.model, o, torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10)

    # A: unused parameter + momentum-cycling scheduler, resumed in fresh objects
    m, o, s = build(0)
    train(m, o, range(2), s)
    ck.save(d / "a", m, o, 2, extra={"sched": s.state_dict()})
    train(m, o, range(2, 5), s)
    ck.save(d / "a", m, o, 5)
    shard = m.a.weight.to_local().detach().clone()  # this rank's rows, as saved
    m, o, s = build(1)
    try:  # every rank raises the same CheckpointMismatch or none does
        got = ck.load(d / "a", m, o, path=ck.step_path(d / "a", 2))
        s.load_state_dict(got.extra["sched"])
        if rank == 0:
            say(f"RESUMED at step {got.step}")
        train(m, o, range(2, 5), s)
        ck.save(d / "b", m, o, 5)
    except ck.CheckpointMismatch as e:
        say(f"RESUME rank {rank} FAILED: {e}")

    # C: in a copy of step 5 (every parameter has state), rank 1 flips the top exponent bit
    # of its first a.weight element in its own data file; loaded with check_groups=False, so
    # that only the data can be refused
    dst = ck.step_path(d / "c", 5)
    if rank == 0:
        shutil.copytree(ck.step_path(d / "a", 5), dst)
    dist.barrier()
    if rank == 1:
        f = dst / "__1_0.distcp"
        data = bytearray(f.read_bytes())
        at = data.find(shard.numpy().tobytes())
        assert at >= 0, "rank 1's a.weight rows are not in its data file"
        data[at + 3] ^= 0x40  # little-endian float32: byte 3 = sign + 7 exponent bits
        f.write_bytes(bytes(data))
    dist.barrier()
    m, o, _ = build(2)
    try:
        ck.load(d / "c", m, o, check_groups=False)
        big = float(m.a.weight.full_tensor().abs().max())
        say(f"CORRUPT rank {rank} LOADED (no error), max |a.weight| {big:.3g}")
    except Exception as e:  # noqa: BLE001 - the test wants CheckpointMismatch on every rank
        say(f"CORRUPT rank {rank} {type(e).__name__}: {e}")
    dist.barrier()

    # S: a single-device state dict into the FSDP2 optimizer
    ref = Net(0)
    ro = CAdamW(ref.parameters(), **HYPER)
    train(ref, ro, range(2), pool_from=0, seed=500)
    m = Net(5)
    m.load_state_dict(ref.state_dict())
    o = sharded(m).opt
    try:
        o.load_state_dict(copy.deepcopy(ro.state_dict()))
        placed = all(
            isinstance(o.state[p][k], DTensor) and o.state[p][k].placements == p.placements
            for p in m.parameters()
            for k in ("exp_avg", "exp_avg_sq")
        )
        train(ref, ro, range(2, 4), pool_from=0, seed=500)
        train(m, o, range(2, 4), pool_from=0, seed=500)
        diff = 0.0
        for p, q in zip(m.parameters(), ref.parameters()):
            diff = max(diff, float((p.full_tensor() - q).abs().max()))
            for k in ("exp_avg", "exp_avg_sq"):
                diff = max(diff, float((o.state[p][k].full_tensor() - ro.state[q][k]).abs().max()))
            assert float(o.state[p]["step"]) == float(ro.state[q]["step"]) == 4.0
        if rank == 0:
            ok = "placements ok" if placed else "placements WRONG"
            say(f"SINGLE max abs diff {diff:.3e} (params and moments), {ok}")
    except Exception as e:  # noqa: BLE001 - print it for the test (today: inside step())
        say(f"SINGLE rank {rank} FAILED {type(e).__name__}: {str(e)[:300]}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
