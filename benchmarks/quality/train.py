#!/usr/bin/env python
"""Pretrain a small LLaMA-style decoder on the stdlib byte corpus with one optimizer and
log what the quality comparison needs (issue 11; docs/quality.md).

    python benchmarks/quality/train.py --optimizer adamw --seed 0 --out run.csv
    python benchmarks/quality/train.py --optimizer cadamw --scale global --seed 0 --out run.csv
    python benchmarks/quality/train.py --optimizer cadamw --scale shard --world 4 --out run.csv

``--world N`` (N > 1) trains under real FSDP2 (``fully_shard`` per block, then the root, as
launch/bench.py does) on N local processes started through torch's elastic launcher (what
``torchrun --standalone --nproc-per-node N`` does), gloo on CPU / NCCL with one GPU per rank;
under ``torchrun`` it takes the launcher's ranks. The *global* batch of step ``s`` is a pure
function of ``(seed, s)`` and is split by rows over the ranks, so every world size sees the
same tokens; the model's initial weights come from ``seed`` too.

Per step (one CSV row): learning rate, train loss (global batch mean), validation loss every
``--eval-every`` steps (fixed held-out windows), the kept-mask fraction ``mask = (m * g > 0)``
over all parameters (computed from the optimizer state after the step, for AdamW too: the
fraction a cautious step *would* keep), ``opt.kept_fraction`` as the optimizer reports it, the
kept fraction of each rank's local shards, and how far the per-shard factor of this run's
sharding is from the per-tensor (global) one. Every ``--snapshot-every`` steps, per-row kept
counts of every tensor (gathered to rank 0) go to ``<out>.rows.npz`` for the shard-size
analysis in run_all.py. ``<out>.json`` holds the arguments, command line, corpus description
(Python version, SHA-256 of the train/val arrays), parameter count and wall time.

Issue 20 (benchmarks/quality/study.py): the embedding is its own param group, with
``--embed-lr-mult`` (its lr = multiplier x the schedule's) and ``--embed-scale`` (its CAdamW
scope; the other tensors take ``--scale``); ``--tied`` ties the head to the embedding;
``--factor-lag``. Two more validation columns, ``val_report`` and ``val_tune``
(corpus.val_parts: the held-out files without the ``encodings/`` tables, split in two). Per
tensor kind (embed, head, attn, mlp, norm): ``kept_<kind>`` (whole tensors) and
``factor_<kind>``, the kept-weighted mean factor ``N / max(kept, 1e-3 N)`` of this step's
mask under the run's scope (per local shard for ``shard`` groups; with ``factor_lag=1`` the
step applies the previous step's). ``<out>.counts.npz`` holds every step's per-rank,
per-tensor ``[kept, numel]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Where dist_cautious/ and launch/model.py come from: this checkout, or a frozen export of a
# commit (run_all.py sets QUALITY_LIB_ROOT so that a table is one library version even while
# the checkout changes under it).
LIB_ROOT = Path(os.environ.get("QUALITY_LIB_ROOT", str(ROOT))).resolve()
for p in (str(LIB_ROOT), str(LIB_ROOT / "launch"), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)
sys.path.insert(0, str(HERE.parent))
from portable import portable  # noqa: E402  (results files: no absolute paths)

LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")
MAX_RANK_COLUMNS = 4  # kept_rank0..3 in the CSV (world sizes above 4 log the first 4)
CLAMP = 1e-3  # CAdamW's default clamp; used to compute the factors we compare


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    seq_len: int
    batch: int  # global batch (rows per step), split over the ranks
    steps: int
    warmup: int
    lr: float
    eval_every: int
    eval_windows: int
    snapshot_every: int


PRESETS: dict[str, Preset] = {
    # The 2-core CPU table: 0.87M parameters (39 tensors), 2048 bytes per step.
    "cpu-small": Preset(
        hidden=128,
        intermediate=352,
        layers=4,
        heads=4,
        seq_len=128,
        batch=16,
        steps=500,
        warmup=50,
        lr=3e-3,
        eval_every=25,
        eval_windows=64,
        snapshot_every=50,
    ),
    # For a GPU: the paper's LLaMA-60M body (hidden 512, 8 layers) with a byte vocabulary
    # (25.5M parameters), 64 x 256 bytes per step. Not run here (no GPU was lent).
    "gpu-60m-body": Preset(
        hidden=512,
        intermediate=1376,
        layers=8,
        heads=8,
        seq_len=256,
        batch=64,
        steps=5000,
        warmup=500,
        lr=1e-3,
        eval_every=250,
        eval_windows=1024,
        snapshot_every=500,
    ),
}

KINDS = ("embed", "head", "attn", "mlp", "norm")  # tensor kinds (tied: embed is the head too)


def kind_of(name: str) -> str:
    """The kind of a parameter of launch/model.py's Llama, from its name."""
    if name.startswith("embed."):
        return "embed"
    if name.startswith("lm_head."):
        return "head"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norm"
    raise ValueError(f"kind_of({name!r}): not a launch/model.py Llama parameter name")


FIELDS = (
    "seed",
    "optimizer",
    "scale",
    "world",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "kept_fraction",
    "opt_kept_fraction",
    *(f"kept_rank{r}" for r in range(MAX_RANK_COLUMNS)),
    "shard_frac_dev",
    "shard_logfactor_dev",
    "shard_logfactor_max",
    "elapsed_s",
    # issue 20: the held-out splits without the encodings/ codec tables (corpus.val_parts)
    "val_report",
    "val_tune",
    # per tensor kind: kept fraction of the whole tensors and the kept-weighted mean factor
    # the kept elements get under this run's scope (per shard for `shard` groups)
    *(f"kept_{k}" for k in KINDS),
    *(f"factor_{k}" for k in KINDS),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument("--optimizer", required=True, choices=("adamw", "cadamw"))
    p.add_argument(
        "--scale", default="global", choices=("global", "shard"), help="CAdamW factor scope"
    )
    p.add_argument(
        "--embed-scale",
        default=None,
        choices=("global", "shard"),
        help="CAdamW factor scope of the embedding's group (default: --scale)",
    )
    p.add_argument(
        "--embed-lr-mult",
        type=float,
        default=1.0,
        help="the embedding group's lr = this x the schedule's lr (default 1)",
    )
    p.add_argument(
        "--tied", action="store_true", help="tie the output head to the embedding (one tensor)"
    )
    p.add_argument(
        "--factor-lag", type=int, default=0, choices=(0, 1), help="CAdamW factor_lag (default 0)"
    )
    p.add_argument(
        "--val-windows-extra",
        type=int,
        default=64,
        help="windows of each of the report / tune splits (corpus.val_parts; default 64)",
    )
    p.add_argument("--world", type=int, default=1, help="FSDP2 ranks (1 = single process, no FSDP)")
    p.add_argument("--seed", type=int, default=0, help="model init and data order")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--warmup", type=int, default=None, help="override the preset's warm-up")
    p.add_argument("--lr", type=float, default=None, help="override the preset's peak lr")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor / peak lr")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--clip", type=float, default=1.0, help="grad-norm clip (0: none)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--snapshot-every", type=int, default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", required=True, help="CSV path (also writes .json and .rows.npz)")
    p.add_argument("--log-every", type=int, default=50, help="progress lines on stderr")
    return p


def resolved(args: argparse.Namespace) -> dict[str, Any]:
    pre = asdict(PRESETS[args.preset])
    for k in ("steps", "warmup", "lr", "eval_every", "eval_windows", "snapshot_every"):
        v = getattr(args, k)
        if v is not None:
            pre[k] = v
    return pre


# ----------------------------------------------------------------------------- launcher


def under_launcher() -> bool:
    return any(k in os.environ for k in LAUNCHER_ENV)


def launch(world: int, argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world,
        run_id=str(uuid.uuid4()),
        role="quality",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        elastic_launch(config, entrypoint=sys.executable)(str(Path(__file__).resolve()), *argv)
    except ChildFailedError as e:
        print(f"train.py: a worker failed:\n{e.format_msg()}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- pieces


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``floor * peak``.
    ``step`` counts from 1 (the lr used by optimizer step ``step``)."""
    if step <= warmup:
        return peak * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_rows(train: Any, seed: int, step: int, rows: int, seq_len: int) -> Any:
    """The global batch of ``step``: ``rows`` windows of ``seq_len + 1`` bytes at offsets drawn
    from a generator seeded by ``(seed, step)``."""
    import numpy as np
    import torch

    rng = np.random.default_rng([seed, step, 0x5EED])
    off = rng.integers(0, train.size - seq_len - 1, size=rows)
    idx = off[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(train[idx].astype(np.int64))


def val_windows(val: Any, n: int, seq_len: int) -> Any:
    """``n`` fixed windows at evenly spaced offsets of the validation array."""
    import numpy as np
    import torch

    off = np.linspace(0, val.size - seq_len - 1, n).astype(np.int64)
    idx = off[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(val[idx].astype(np.int64))


def local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def factor(kept: Any, n: Any) -> Any:
    """CAdamW's default factor ``N / max(nnz, clamp N)`` (float64, elementwise)."""
    import torch

    return n / torch.maximum(kept, CLAMP * n)


def library_info() -> dict[str, Any]:
    import model

    info: dict[str, Any] = {"lib_root": str(LIB_ROOT), "model_py": model.__file__}
    info["rev"] = os.environ.get("QUALITY_LIB_REV")
    try:
        import dist_cautious

        info["dist_cautious"] = dist_cautious.__file__
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from corpus import build, val_parts
    from model import ModelConfig, build_model, lm_loss

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hp = resolved(args)
    distributed = args.world > 1
    rank, world = 0, 1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if distributed:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != args.world:
            raise SystemExit(f"--world {args.world} but the launcher started {world} ranks")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:
        device = torch.device("cuda" if use_cuda else "cpu")
    if hp["batch"] % world:
        raise SystemExit(f"global batch {hp['batch']} is not divisible by world {world}")
    rows_per_rank = hp["batch"] // world
    for nwin in (hp["eval_windows"], args.val_windows_extra):
        if nwin % world:
            raise SystemExit(f"{nwin} validation windows not divisible by world {world}")

    train, val, corpus_desc = build()
    cfg = ModelConfig(
        vocab=256,
        hidden=hp["hidden"],
        intermediate=hp["intermediate"],
        layers=hp["layers"],
        heads=hp["heads"],
        seq_len=hp["seq_len"],
        batch=rows_per_rank,
    )
    model = build_model(cfg, args.seed, "cpu")
    if args.tied:
        model.lm_head.weight = model.embed.weight  # one tensor (the embedding's init)
    names = [n for n, _ in model.named_parameters()]
    kinds = [kind_of(n) for n in names]
    shapes = [tuple(p.shape) for p in model.parameters()]
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to(device)
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # Three groups: the embedding (weight decay, its own lr multiplier and CAdamW scope), the
    # other matrices (weight decay), the norm gains (none). With multiplier 1 and one scope
    # this is the same optimizer as the two LLaMA groups of launch/model.py's param_groups.
    params = list(model.parameters())  # named_parameters order == `names`
    embed_scale = args.embed_scale or args.scale
    groups = [
        {
            "params": [p for p, k in zip(params, kinds) if k == "embed"],
            "weight_decay": args.weight_decay,
        },
        {
            "params": [p for p, k in zip(params, kinds) if k != "embed" and p.dim() >= 2],
            "weight_decay": args.weight_decay,
        },
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    lr_mults = [args.embed_lr_mult, 1.0, 1.0]
    scopes = [embed_scale, args.scale, args.scale]
    kw = dict(lr=hp["lr"], betas=tuple(args.betas), eps=args.eps)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, **kw)
    else:
        from dist_cautious import CAdamW

        for g, sc in zip(groups, scopes):
            g["scale"] = sc
        opt = CAdamW(groups, scale=args.scale, factor_lag=args.factor_lag, **kw)
    group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
    # per tensor: does its factor come from this rank's piece (`shard`) or the whole tensor
    shard_t = torch.tensor(
        [args.optimizer == "cadamw" and scopes[group_of[id(p)]] == "shard" for p in params]
    )

    vwin = val_windows(val, hp["eval_windows"], hp["seq_len"])
    vmine = vwin[rank::world].to(device)  # this rank's share (all ranks: the same count)
    parts, parts_desc = val_parts()
    vextra = {
        k: val_windows(parts[k], args.val_windows_extra, hp["seq_len"])[rank::world].to(device)
        for k in ("report", "tune")
    }

    def all_sum(x: torch.Tensor) -> torch.Tensor:
        if distributed:
            dist.all_reduce(x)
        return x

    @torch.no_grad()
    def evaluate(windows: torch.Tensor | None = None) -> float:
        model.eval()
        windows = vmine if windows is None else windows
        tot = torch.zeros(2, dtype=torch.float64, device=device)
        for i in range(0, windows.shape[0], rows_per_rank):
            b = windows[i : i + rows_per_rank]
            loss = lm_loss(model(b[:, :-1]), b[:, 1:])
            tot[0] += loss.double() * b.shape[0]
            tot[1] += b.shape[0]
        all_sum(tot)
        model.train()
        return float(tot[0] / tot[1])

    @torch.no_grad()
    def mask_counts() -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per tensor ``[kept, numel]`` of this rank's local piece, and per-row kept counts
        (per element for 1-D tensors) of the local piece."""
        counts = torch.zeros(len(params), 2, dtype=torch.float64)
        rows = []
        for i, p in enumerate(params):
            st = opt.state.get(p, {})
            g = p.grad
            if g is None or "exp_avg" not in st:
                rows.append(torch.zeros(0, dtype=torch.int32))
                continue
            m = local(st["exp_avg"]) * local(g) > 0
            counts[i, 0] = float(m.sum())
            counts[i, 1] = float(m.numel())
            rows.append(
                (m.reshape(m.shape[0], -1).sum(1) if m.dim() > 1 else m).to(torch.int32).cpu()
            )
        return counts, rows

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    snapshots: list[np.ndarray] = []
    snap_steps: list[int] = []
    step_counts: list[np.ndarray] = []  # per step: (world, tensors, 2) local [kept, numel]
    t0 = time.time()
    val_loss = evaluate()
    val_extra = {k: evaluate(w) for k, w in vextra.items()}
    records.append(
        dict(
            seed=args.seed,
            optimizer=args.optimizer,
            scale=args.scale if args.optimizer == "cadamw" else "",
            world=world,
            step=0,
            lr=0.0,
            val_loss=val_loss,
            val_report=val_extra["report"],
            val_tune=val_extra["tune"],
            elapsed_s=0.0,
        )
    )
    for step in range(1, hp["steps"] + 1):
        lr = lr_at(step, hp["lr"], hp["warmup"], hp["steps"], args.min_lr_ratio)
        for g, mult in zip(opt.param_groups, lr_mults):
            g["lr"] = lr * mult
        full = batch_rows(train, args.seed, step, hp["batch"], hp["seq_len"])
        b = full[rank * rows_per_rank : (rank + 1) * rows_per_rank].to(device)
        loss = lm_loss(model(b[:, :-1]), b[:, 1:])
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()

        counts, rows = mask_counts()
        lossv = all_sum(loss.detach().double().reshape(1).cpu())[0].item() / world
        okf = getattr(opt, "kept_fraction", None)
        okf_t = torch.tensor([okf if okf is not None else float("nan")], dtype=torch.float64)
        if distributed:
            gathered = [torch.zeros_like(counts) for _ in range(world)]
            dist.all_gather(gathered, counts)
            okfs = [torch.zeros_like(okf_t) for _ in range(world)]
            dist.all_gather(okfs, okf_t)
            per_rank = torch.stack(gathered)  # (world, tensors, 2)
        else:
            per_rank = counts[None]
            okfs = [okf_t]
        snap = step % hp["snapshot_every"] == 0 or step == hp["steps"]
        if snap:
            if distributed:
                allrows: list[Any] = [None] * world
                dist.all_gather_object(allrows, rows)
            else:
                allrows = [rows]
            if rank == 0:
                # Shard(0) pieces are contiguous row blocks in rank order: concatenating the
                # ranks' per-row counts gives the full tensor's per-row counts.
                full_rows = [torch.cat([r[i] for r in allrows]) for i in range(len(params))]
                snapshots.append(torch.cat(full_rows).numpy())
                snap_steps.append(step)
        opt.zero_grad(set_to_none=True)
        do_eval = step % hp["eval_every"] == 0 or step == hp["steps"]
        if do_eval:
            val_loss = evaluate()
            val_extra = {k: evaluate(w) for k, w in vextra.items()}
        if rank != 0:
            continue
        step_counts.append(per_rank.numpy().astype(np.int32))
        tot = per_rank.sum(0)  # (tensors, 2): whole-tensor counts
        kf = float(tot[:, 0].sum() / tot[:, 1].sum())
        rk = (per_rank[:, :, 0].sum(1) / per_rank[:, :, 1].sum(1).clamp_min(1)).tolist()
        # This run's sharding: per-shard fraction / factor vs the whole tensor's.
        f_t = tot[:, 0] / tot[:, 1]
        n = per_rank[:, :, 1]
        have = n > 0
        f_rt = per_rank[:, :, 0] / n.clamp_min(1)
        fdev = float(((f_rt - f_t[None]).abs() * n)[have].sum() / n[have].sum())
        logr = torch.log(factor(per_rank[:, :, 0], n.clamp_min(1)) / factor(tot[:, 0], tot[:, 1]))
        w = per_rank[:, :, 0]  # weight by kept elements: those the factor acts on
        ldev = float((logr.abs() * w)[have].sum() / w[have].sum().clamp_min(1))
        lmax = float(logr.abs()[have & (w > 0)].max()) if bool((have & (w > 0)).any()) else 0.0
        # the factor each (rank, tensor) piece got: its own counts for `shard` groups, the
        # whole tensor's otherwise (AdamW: what a global cautious step would have used)
        alpha = torch.where(
            shard_t[None],
            factor(per_rank[:, :, 0], n.clamp_min(1)),
            factor(tot[:, 0], tot[:, 1])[None],
        )
        per_kind: dict[str, Any] = {}
        for k in KINDS:
            sel = torch.tensor([kk == k for kk in kinds])
            if not bool(sel.any()):
                continue
            per_kind[f"kept_{k}"] = float(tot[sel, 0].sum() / tot[sel, 1].sum())
            wk = per_rank[:, sel, 0]
            per_kind[f"factor_{k}"] = float((alpha[:, sel] * wk).sum() / wk.sum().clamp_min(1))
        rec = dict(
            seed=args.seed,
            optimizer=args.optimizer,
            scale=args.scale if args.optimizer == "cadamw" else "",
            world=world,
            step=step,
            lr=lr,
            train_loss=lossv,
            val_loss=val_loss if do_eval else "",
            val_report=val_extra["report"] if do_eval else "",
            val_tune=val_extra["tune"] if do_eval else "",
            **per_kind,
            kept_fraction=kf,
            opt_kept_fraction="" if okf is None else okf,
            shard_frac_dev=fdev,
            shard_logfactor_dev=ldev,
            shard_logfactor_max=lmax,
            elapsed_s=round(time.time() - t0, 2),
        )
        for r in range(min(world, MAX_RANK_COLUMNS)):
            rec[f"kept_rank{r}"] = rk[r]
        if args.optimizer == "cadamw":
            # what opt.kept_fraction covers on each rank: its own pieces of `shard` groups,
            # the whole tensors of `global` groups
            seen = torch.where(shard_t[None, :, None], per_rank, tot[None])
            want = (seen[:, :, 0].sum(1) / seen[:, :, 1].sum(1)).tolist()
            ok = [float(x[0]) for x in okfs]
            if any(abs(a - b) > 1e-12 for a, b in zip(ok, want)):
                raise RuntimeError(f"opt.kept_fraction per rank {ok} != mask counts {want}")
        records.append(rec)
        if step % args.log_every == 0 or do_eval and step == hp["steps"]:
            print(
                f"[{args.optimizer}/{rec['scale'] or '-'}/w{world}/s{args.seed}] step {step} "
                f"loss {lossv:.4f} val {val_loss:.4f} kept {kf:.3f} "
                f"{time.time() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    if rank == 0:
        with out.open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=FIELDS)
            wr.writeheader()
            for r in records:
                wr.writerow({k: r.get(k, "") for k in FIELDS})
        np.savez_compressed(
            out.with_suffix(".rows.npz"),
            steps=np.array(snap_steps),
            rows=np.stack(snapshots),
            names=np.array(names),
            shapes=np.array([list(s) + [1] * (2 - len(s)) for s in shapes]),
        )
        # every step's per-rank, per-tensor [kept, numel] (issue 20: per-tensor accounting)
        np.savez_compressed(
            out.with_suffix(".counts.npz"),
            counts=np.stack(step_counts),
            names=np.array(names),
            kinds=np.array(kinds),
            shard=shard_t.numpy(),
        )
        meta = dict(
            argv=portable([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]),
            args=vars(args),
            hyper=hp,
            model=asdict(cfg),
            parameters=n_params,
            tensors=len(names),
            torch=torch.__version__,
            device=str(device) if not use_cuda else torch.cuda.get_device_name(device),
            corpus=portable(corpus_desc),
            val_parts=parts_desc,
            library=portable(library_info()),
            wall_s=round(time.time() - t0, 1),
            final_val_loss=val_loss,
        )
        out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.world < 1:
        raise SystemExit(f"--world {args.world}: need at least 1")
    if args.world > 1 and not under_launcher():
        return launch(args.world, argv)
    worker(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
