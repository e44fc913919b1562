"""HF Trainer + DeepSpeed + CAdamW (torchrun, gloo on CPU): the recipe of docs/deepspeed.md.

usage: ds_hf_trainer.py OUT.json STAGE

Trains a tiny model for a few steps with ``transformers.Trainer`` and a DeepSpeed config,
CAdamW built by a ``Trainer.create_optimizer`` override and registered by a
``TrainerCallback`` that calls ``dist_cautious.deepspeed.attach``. Rank 0 writes what it saw.
Needs ``transformers`` and ``accelerate`` (the test skips without them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hf_recipe import AttachCAdamW, CAdamWTrainer  # noqa: E402
from models import HFNet as Net  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dist_cautious import CAdamW  # noqa: E402
from dist_cautious import deepspeed as dc_ds  # noqa: E402
from launch import engines  # noqa: E402
from tests.oracle import rel_err  # noqa: E402

MAX_STEPS = 4


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 13, generator=g), torch.randn(64, 5, generator=g)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def reference(init: dict, decay: set[str], micro: list[list[tuple]], gas: int) -> dict:
    """Single-process CAdamW replaying every rank's micro-batches: per optimizer step the
    loss is the mean over ranks and accumulation steps (what DeepSpeed averages)."""
    net = Net()
    net.load_state_dict(init)
    named = list(net.named_parameters())
    opt = CAdamW(
        [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
        backend="foreach",
    )
    for s in range(len(micro[0]) // gas):
        batches = [b for per_rank in micro for b in per_rank[s * gas : (s + 1) * gas]]
        (sum(net(x, y)["loss"] for x, y in batches) / len(batches)).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in named}


def main() -> None:
    out, stage = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    ds_config = dc_ds.config(
        {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": stage},
        }
    )
    args = TrainingArguments(
        output_dir=str(Path(out).parent / "hf_out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=MAX_STEPS,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # must match the config's gradient_clipping (0.0)
        deepspeed=ds_config,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    model = Net()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = CAdamWTrainer(
        model=model, args=args, train_dataset=Data(), callbacks=[AttachCAdamW()]
    )
    decay = set(trainer.get_decay_parameter_names(model))
    trainer.train()
    engine = trainer.model_wrapped
    ds = engines.Setup("deepspeed", engine.module, engine, None, zero_stage=stage, ds_engine=engine)
    got = engines.full_params(ds)  # ZeRO-3: gathered
    micro: list = [None] * dist.get_world_size()
    dist.all_gather_object(micro, [(x.tolist(), y.tolist()) for x, y in model.seen])
    micro = [[(torch.tensor(x), torch.tensor(y)) for x, y in r] for r in micro]
    chain, o = [], trainer.optimizer
    while not isinstance(o, CAdamW):
        chain.append(type(o).__name__)
        o = o.optimizer
    res = {
        "chain": chain,
        "layouts": len(o.registered_layouts()),
        "state_steps": sorted({int(s["step"]) for s in o.state.values()}),
        "kept_fraction": o.kept_fraction,
        "micro_batches": [len(r) for r in micro],
    }
    if dist.get_rank() == 0:
        ref = reference(init, decay, micro, args.gradient_accumulation_steps)
        res["param"] = max(rel_err(got[n], ref[n]) for n in ref)
        res["delta"] = max(rel_err(got[n] - init[n], ref[n] - init[n]) for n in ref)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()  # gloo: every rank here before the group goes (else SIGABRT at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
