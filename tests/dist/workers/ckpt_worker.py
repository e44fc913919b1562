"""dist_cautious.checkpoint under FSDP2 (torchrun, gloo): train, save, resume on another world.

Every rank trains on the whole global batch and FSDP2 reduces gradients in float64, so the
averaged gradient is the same bits on every world size (the mean of identical values is
exact in float64): the only thing a world-size change can alter is the checkpoint
resharding itself. That isolates what the reshard test checks.

    --phase ref     train --steps, save the final checkpoint
    --phase save    train --stop steps, save, exit (the job stops)
    --phase resume  load the newest checkpoint, train to --steps, save the final one
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

from model import MarkovLanguage, build_model, lm_loss, param_groups, preset  # noqa: E402

from dist_cautious import CAdamW  # noqa: E402
from dist_cautious import checkpoint as ck  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=("ref", "save", "resume"), required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stop", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = preset("tiny")
    model = build_model(cfg, 0)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float64)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = CAdamW(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95))
    lang = MarkovLanguage(cfg.vocab, cfg.seq_len, 0)
    meta = {"preset": "tiny", "steps": a.steps}
    start = 0
    if a.phase == "resume":
        got = ck.load(a.dir, model, opt, meta=meta)
        assert got is not None, f"nothing to resume in {a.dir}"
        start = got.step
        if dist.get_rank() == 0:
            print(f"resumed at step {got.step}, saved on {got.world_size} ranks", flush=True)
    end = a.stop if a.phase == "save" else a.steps
    for step in range(start, end):
        tokens = lang.batch(step, 16)  # the whole global batch, on every rank
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ck.save(a.dir, model, opt, end, meta=meta)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
