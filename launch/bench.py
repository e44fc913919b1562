#!/usr/bin/env python
"""Train a LLaMA-style decoder with CAdamW under FSDP2 / HSDP / DDP / DeepSpeed ZeRO and
report what the optimizer costs.

Start it directly, and it launches its own workers through torch's elastic launcher::

    python launch/bench.py                       # the README's main job (tiny, fsdp2, 2 ranks)
    python launch/bench.py --nproc 4 --engine deepspeed --zero-stage 3 --scale both

or under torchrun (one node or many; it takes the launcher's ranks)::

    torchrun --nproc-per-node 8 launch/bench.py --preset 1b --engine fsdp2 --scale both

Each mode of ``--scale`` (``global``, ``shard``, ``allgather`` baseline; ``both`` = global
and shard, ``all`` = all three) trains a fresh model from the same seed on the same data,
in the same process group, so the table at the end compares them side by side.
``--check-against ddp`` then repeats the modes under DDP and checks that the parameters
match (``global`` must match to 1e-6 relative in fp32).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import socket
import statistics
import sys
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:  # an installed dist_cautious wins; a checkout works without installing
    import dist_cautious  # noqa: F401
except ImportError:
    sys.path.insert(1, str(ROOT))

ENGINES = ("fsdp2", "hsdp", "ddp", "deepspeed")
MODES = ("global", "shard", "allgather")
LAG_MODE = "global+lag1"  # scale="global" with factor_lag=1 (--factor-lag)
SCALE_ALIASES = {"both": ("global", "shard"), "all": MODES}
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")
CHECK_FAILED = 3  # exit status of every rank when --check-against finds a difference


# ----------------------------------------------------------------------------- arguments


def parse_scales(text: str) -> list[str]:
    modes: list[str] = []
    for part in text.split(","):
        part = part.strip()
        for m in SCALE_ALIASES.get(part, (part,)):
            if m not in MODES:
                raise argparse.ArgumentTypeError(
                    f"unknown --scale {part!r}; use global, shard, allgather, both "
                    "(= global,shard), all, or a comma list such as global,allgather"
                )
            if m not in modes:
                modes.append(m)
    return modes


def parse_lags(text: str) -> list[int]:
    lags = {"0": [0], "1": [1], "0,1": [0, 1], "1,0": [0, 1], "both": [0, 1]}.get(text.strip())
    if lags is None:
        raise argparse.ArgumentTypeError(
            f"--factor-lag {text!r}: use 0 (the exact factor), 1 (the previous step's factor: "
            "the count all-reduce overlaps the next forward/backward) or 0,1 (both)"
        )
    return lags


def positive_float(flag: str) -> Any:
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number") from None
        if not (math.isfinite(x) and x > 0):
            raise argparse.ArgumentTypeError(f"{flag} {text}: must be a finite number > 0")
        return x

    return parse


def nonnegative_float(flag: str) -> Any:
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number") from None
        if not (math.isfinite(x) and x >= 0):
            raise argparse.ArgumentTypeError(f"{flag} {text}: must be a finite number >= 0")
        return x

    return parse


def beta_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--betas {text!r} is not a number") from None
    if not (0.0 <= x < 1.0):
        raise argparse.ArgumentTypeError(
            f"--betas {text}: each beta must be in [0, 1) (e.g. --betas 0.9 0.95)"
        )
    return x


def build_parser() -> argparse.ArgumentParser:
    from model import PRESETS

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="model size (default tiny)"
    )
    p.add_argument(
        "--engine", default="fsdp2", choices=ENGINES, help="data-parallel engine (default fsdp2)"
    )
    p.add_argument(
        "--zero-stage",
        type=int,
        default=None,
        choices=(0, 1, 2, 3),
        help="DeepSpeed ZeRO stage, with --engine deepspeed (default 2)",
    )
    p.add_argument(
        "--scale",
        type=parse_scales,
        default=None,
        help="modes to run, one after the other: global | shard | allgather | both | all | a comma list "
        "(default both)",
    )
    p.add_argument(
        "--factor-lag",
        type=parse_lags,
        default=None,
        help="factor_lag of the global mode: 0 (exact factor: count, all-reduce, update), 1 "
        "(the previous step's factor; the all-reduce is waited for at the next step, so it "
        f"overlaps the forward/backward: mode {LAG_MODE}) or 0,1 (both side by side). Default: "
        "0,1 for the main job (no --scale given), else 0",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: one GPU per rank when there are enough, else CPU (default auto)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="started directly: launch this many local workers (default 2); not used under torchrun",
    )
    p.add_argument("--steps", type=int, default=300, help="training steps per mode (default 300)")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="steps left out of the timing statistics (default: 10%% of --steps, at least 2)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch", type=int, default=None, help="micro-batch per rank (default: the preset's)"
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="sequence length (default: the preset's)"
    )
    p.add_argument(
        "--lr",
        type=positive_float("--lr"),
        default=None,
        help="peak learning rate (default 3e-3 tiny, 1e-3 else)",
    )
    p.add_argument("--weight-decay", type=nonnegative_float("--weight-decay"), default=0.1)
    p.add_argument(
        "--betas",
        type=beta_float,
        nargs=2,
        default=(0.9, 0.95),
        metavar=("BETA1", "BETA2"),
        help="Adam betas, each in [0, 1) (default 0.9 0.95)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "foreach", "triton", "reference"),
        help="CAdamW kernel backend (default auto: triton on CUDA when available, else foreach)",
    )
    p.add_argument(
        "--amp",
        default="none",
        choices=("none", "bf16"),
        help="autocast the forward pass (parameters and optimizer stay fp32)",
    )
    p.add_argument(
        "--no-align",
        dest="align_steps",
        action="store_false",
        help="do not put an (untimed) barrier before each optimizer.step(); by default ranks "
        "start the step together, so the collective time measures the step, not the skew "
        "left over from forward/backward",
    )
    p.add_argument(
        "--grad-reduce-dtype",
        default="fp32",
        choices=("fp32", "fp64"),
        help="fsdp2/hsdp/ddp: reduce gradients in this dtype. fp64 makes the averaged gradient the "
        "correctly rounded fp32 mean whatever the summation order, so engines with different "
        "reduction orders (world > 2) produce bitwise-comparable runs (default fp32)",
    )
    p.add_argument(
        "--hsdp-shard",
        type=int,
        default=None,
        help="HSDP: ranks per shard group (default: ranks per node, else world/2)",
    )
    p.add_argument(
        "--check-against",
        default=None,
        choices=ENGINES,
        help="after the run, repeat the same modes under this engine and compare parameters",
    )
    p.add_argument(
        "--check-tol",
        type=float,
        default=1e-6,
        help="relative tolerance of --check-against for the global mode (default 1e-6)",
    )
    p.add_argument(
        "--json", dest="json_out", default=None, help="write results (rank 0) to this JSON file"
    )
    p.add_argument(
        "--save-params",
        default=None,
        help="save the final full parameters of every mode (rank 0, torch.save) to this file",
    )
    p.add_argument(
        "--ckpt-dir",
        default=None,
        help="checkpoint directory: save every --ckpt-every steps and at the end (one "
        "subdirectory per engine/mode), and resume from the newest complete checkpoint "
        "there (docs/checkpointing.md)",
    )
    p.add_argument(
        "--ckpt-every",
        type=int,
        default=None,
        help="steps between checkpoints (default: only at the end); needs --ckpt-dir",
    )
    p.add_argument(
        "--ckpt-keep",
        type=int,
        default=2,
        help="complete checkpoints kept per engine/mode (default 2)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop each mode after this many steps (counted from step 0) as if the job were "
        "stopped there; with --ckpt-dir a checkpoint is saved at that step first. The "
        "schedule still follows --steps, so a later run with the same flags resumes it",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="started directly: restart the workers this many times after a failure (torchrun "
        "--max-restarts; with --ckpt-dir they resume from the newest checkpoint; default 0)",
    )
    p.add_argument(
        "--pg-timeout",
        type=float,
        default=300.0,
        help="seconds init_process_group and each collective may wait before failing with a "
        "message (default 300)",
    )
    p.add_argument(
        "--rdzv-timeout",
        type=float,
        default=120.0,
        help="started directly: seconds the workers' rendezvous may take (default 120)",
    )
    p.add_argument(
        "--log-every", type=int, default=None, help="progress lines when not on a terminal"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------- launcher


def under_launcher() -> bool:
    return any(k in os.environ for k in LAUNCHER_ENV)


LAUNCH_ONLY_FLAGS = ("--nproc", "--max-restarts", "--rdzv-timeout")


def strip_nproc(argv: list[str], flags: tuple[str, ...] = LAUNCH_ONLY_FLAGS) -> list[str]:
    """``argv`` without the flags only the launching process uses (each takes one value)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if a.startswith(tuple(f + "=" for f in flags)):
            continue
        out.append(a)
    return out


def launch(nproc: int, argv: list[str], max_restarts: int = 0, rdzv_timeout: float = 120) -> int:
    """Start ``nproc`` workers of this script on this node through torch's elastic launcher
    (what ``torchrun --standalone --nproc-per-node N`` does)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise SystemExit(f"--nproc {nproc}: need at least 1 worker")
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # The elastic agent (this process) reads this: with the agent's TCP store shared with
    # the workers (torch's default), restarted gloo workers find the dead workers' keys in
    # it and fail in init_process_group ("Connection refused") or hang. One fresh store per
    # worker group instead (the workers also namespace the shared store: Ctx).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        role="bench",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port on this host
        rdzv_configs={"join_timeout": int(math.ceil(rdzv_timeout))},
        max_restarts=max_restarts,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)(str(Path(__file__).resolve()), *argv)
    except KeyboardInterrupt:
        print("bench.py: interrupted (Ctrl-C); workers stopped", file=sys.stderr)
        return 130
    except SignalException as e:  # the elastic agent turns SIGINT / SIGTERM into this
        print(f"bench.py: stopped by {e.sigval.name}; workers stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes <= {130, -2, -15}:  # workers interrupted (Ctrl-C) or terminated
            print("bench.py: interrupted; workers stopped", file=sys.stderr)
            return 130
        if codes == {CHECK_FAILED}:
            print("bench.py: --check-against found a difference (see above)", file=sys.stderr)
            return CHECK_FAILED
        print(f"bench.py: a worker failed:\n{e.format_msg()}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- worker set-up


class Ctx:
    """What every mode of one invocation shares."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import torch.distributed as dist

        self.args = args
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if args.device == "cuda" and ngpu < self.local_world:
            fix = (
                "--device cpu: no GPU is visible"
                if ngpu == 0
                else f"--nproc {ngpu} (or torchrun --nproc-per-node {ngpu}) or --device cpu"
            )
            raise SystemExit(
                f"--device cuda needs one GPU per rank: {self.local_world} ranks on this node but "
                f"{ngpu} GPUs visible; use {fix}"
            )
        use_cuda = args.device == "cuda" or (args.device == "auto" and ngpu >= self.local_world > 0)
        if args.device == "auto" and 0 < ngpu < self.local_world and self.local_rank == 0:
            print(
                f"bench: {self.local_world} ranks on this node but {ngpu} GPU(s): running on CPU "
                f"with gloo (use --nproc {ngpu} / --nproc-per-node {ngpu} to run on the GPUs)",
                file=sys.stderr,
                flush=True,
            )
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: don't pick a GPU
        kwargs: dict[str, Any] = {"timeout": timedelta(seconds=args.pg_timeout)}
        if use_cuda:
            kwargs["device_id"] = self.device
        kwargs.update(restart_safe_store(self.rank, self.world, kwargs["timeout"]))
        try:
            dist.init_process_group(backend, **kwargs)
        except Exception as e:  # store / gloo connect timeouts, refused connections
            raise SystemExit(
                f"bench: rank {self.rank}: init_process_group({backend!r}) failed within "
                f"--pg-timeout {args.pg_timeout:g} s: {type(e).__name__}: {str(e)[:400]}\n"
                "If this is a torchrun restart under gloo, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                "in the environment of torchrun itself (docs/checkpointing.md)"
            ) from None
        self.backend = backend
        self.cuda = use_cuda


def restart_safe_store(rank: int, world: int, timeout: timedelta) -> dict[str, Any]:
    """``init_process_group`` arguments that survive a torchrun restart.

    By default (torch >= 2.4) the elastic agent shares its rendezvous TCP store with the
    workers (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps that store across restarts.
    The restarted workers then read the dead workers' keys: gloo connects to addresses
    that no longer listen ("Connection refused") or waits for them. Namespacing the shared
    store by the restart count gives every attempt fresh keys. One node only: agents on
    several nodes may count restarts differently, so there the agent must not share its
    store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun, as docs/checkpointing.md
    says); this returns nothing when the agent does not share it.
    """
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if restart > 0 and nodes > 1:
        raise SystemExit(
            f"bench: restart {restart} on {nodes} nodes with torchrun's shared TCP store: the "
            "restarted workers would read the failed attempt's keys. Start every torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (docs/checkpointing.md)"
        )
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timeout,
    )
    store = dist.PrefixStore(f"dist_cautious.bench/attempt{restart}", base)
    return {"store": store, "rank": rank, "world_size": world}


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


def hsdp_shape(ctx: Ctx) -> tuple[int, int]:
    shard = ctx.args.hsdp_shard
    if shard is None:
        if 1 < ctx.local_world < ctx.world and ctx.world % ctx.local_world == 0:
            shard = ctx.local_world
        elif ctx.world >= 4 and ctx.world % 2 == 0:
            shard = ctx.world // 2
        else:
            raise SystemExit(
                f"--engine hsdp needs a 2-D mesh (replicate x shard); world size {ctx.world} has "
                "none by default: run on >= 4 ranks or several nodes, or pass --hsdp-shard"
            )
    if shard < 1 or ctx.world % shard:
        raise SystemExit(f"--hsdp-shard {shard} must divide the world size {ctx.world}")
    return ctx.world // shard, shard


def baseline_class() -> Any:
    """The full-tensor all-gather baseline (what the reference repository does for DTensors)."""
    from dist_cautious.baselines import AllGatherCAdamW

    return AllGatherCAdamW


def make_optimizer(ctx: Ctx, groups: list[dict], mode: str, lr: float) -> Any:
    from dist_cautious import CAdamW

    a = ctx.args
    kw = dict(lr=lr, betas=tuple(a.betas), eps=1e-8)
    if mode == "allgather":
        return baseline_class()(groups, **kw)
    if mode == LAG_MODE:
        return CAdamW(groups, scale="global", factor_lag=1, backend=a.backend, **kw)
    return CAdamW(groups, scale=mode, backend=a.backend, **kw)


def hbm_bytes_per_param(opt: Any) -> tuple[int, int] | None:
    """Computed, not measured: bytes per parameter one optimizer step moves through memory
    (CAdamW: state and parameters as this run holds them), for the two-pass step these
    kernels run (pass 1 reads g, m; pass 2 reads p, g, m, v and writes p, m, v: 36 B in
    fp32), and for a one-pass step (reads p, g, m, v, writes p, m, v: 28 B), which
    factor_lag=1 allows but no kernel here implements yet. None for other optimizers."""
    from dist_cautious import CAdamW

    if not isinstance(opt, CAdamW):
        return None
    p = next((q for g in opt.param_groups for q in g["params"]), None)
    if p is None:  # DeepSpeed ZeRO-3 between steps: the groups' params are swapped out
        return None
    sp = p.element_size()
    dt = opt.param_groups[0]["state_dtype"]
    ss = dt.itemsize if dt is not None else (4 if sp < 4 else sp)
    sg = sp
    return (sg + ss) + (sp + sg + 2 * ss) + (sp + 2 * ss), (sp + sg + 2 * ss) + (sp + 2 * ss)


def fp64_allreduce_hook(state, bucket):  # no annotations: DDP inspects them
    """DDP comm hook: average the bucket in float64 (sum order then cannot change the result)."""
    import torch
    import torch.distributed as dist

    buf = bucket.buffer()
    wide = buf.to(torch.float64)
    fut = dist.all_reduce(wide, async_op=True).get_future()

    def done(f: Any) -> Any:
        out = f.value()[0].div_(dist.get_world_size())
        buf.copy_(out)
        return buf

    return fut.then(done)


class Run:
    """One engine + optimizer on a fresh model; the training step and parameter access."""

    def __init__(self, ctx: Ctx, engine: str, mode: str, cfg: Any, lr: float) -> None:
        import torch
        from model import build_model, param_groups

        self.ctx, self.engine, self.mode = ctx, engine, mode
        a = ctx.args
        model = build_model(cfg, a.seed, "cpu")
        self.ds_engine = None
        if engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = model.to(ctx.device)
            self.opt = make_optimizer(ctx, param_groups(model, a.weight_decay), mode, lr)
            self.module = model
            self.wrapped = DDP(model, device_ids=[ctx.device.index] if ctx.cuda else None)
            if a.grad_reduce_dtype == "fp64":
                self.wrapped.register_comm_hook(None, fp64_allreduce_hook)
        elif engine in ("fsdp2", "hsdp"):
            from torch.distributed.device_mesh import init_device_mesh

            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # torch < 2.6
                from torch.distributed._composable.fsdp import fully_shard  # type: ignore
            if engine == "fsdp2":
                mesh = init_device_mesh(ctx.device.type, (ctx.world,), mesh_dim_names=("shard",))
            else:
                mesh = init_device_mesh(
                    ctx.device.type, hsdp_shape(ctx), mesh_dim_names=("replicate", "shard")
                )
            model = model.to(ctx.device)
            kw: dict[str, Any] = {}
            if a.grad_reduce_dtype == "fp64":
                from torch.distributed.fsdp import MixedPrecisionPolicy

                kw["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=torch.float64)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh, **kw)
            fully_shard(model, mesh=mesh, **kw)
            self.opt = make_optimizer(ctx, param_groups(model, a.weight_decay), mode, lr)
            self.module = self.wrapped = model
        elif engine == "deepspeed":
            if mode == "allgather":
                raise SystemExit(
                    "--scale allgather is the all-gather baseline for DTensor (FSDP2/HSDP) parameters; "
                    "for DeepSpeed use --scale global or shard"
                )
            try:
                from dist_cautious import deepspeed as dc_ds
            except ImportError as e:
                raise SystemExit(
                    f"--engine deepspeed needs dist_cautious.deepspeed and deepspeed ({e})"
                ) from None
            import logging

            import deepspeed

            deepspeed.utils.logger.setLevel(logging.WARNING)
            model = model.to(ctx.device)
            if a.zero_stage == 3:
                # ZeRO-3 wraps the inputs and outputs of *every* submodule in identity autograd
                # Functions (parameter_offload.py: PostBackwardFunctionModule /
                # PreBackwardFunctionForModule). A tensor read by three or more ops (the residual
                # stream x feeds the residual add and, inside RMSNorm, x * rsqrt(.) and x.pow(2))
                # then gets its gradient summed in another grouping ((n1 + n2) + g instead of
                # autograd's plain order), so fp32 gradients differ from DDP's in the last bits
                # and Adam amplifies them. Marking each Block a ZeRO-3 leaf keeps hooks at block
                # boundaries only (what FSDP2's per-layer fully_shard does): gradients then equal
                # DDP's bit for bit (docs/benchmarks.md). Parameters are gathered per block.
                from deepspeed.utils import set_z3_leaf_modules
                from model import Block

                set_z3_leaf_modules(model, [Block])
            client = make_optimizer(ctx, param_groups(model, a.weight_decay), mode, lr)
            conf = dc_ds.config(
                {
                    "train_micro_batch_size_per_gpu": self.micro_batch(cfg),
                    "gradient_accumulation_steps": 1,
                    "train_batch_size": self.micro_batch(cfg) * ctx.world,
                    "zero_optimization": {"stage": a.zero_stage},
                    "steps_per_print": 10**9,
                    "wall_clock_breakdown": False,
                }
            )
            engine_obj, *_ = dc_ds.initialize(model=model, optimizer=client, config=conf)
            self.ds_engine = engine_obj
            self.opt = client
            self.module = engine_obj.module
            self.wrapped = engine_obj
        else:  # argparse keeps this out
            raise SystemExit(f"unknown engine {engine!r}")
        self.autocast = (
            torch.autocast(ctx.device.type, dtype=torch.bfloat16)
            if a.amp == "bf16"
            else nullcontext()
        )

    def micro_batch(self, cfg: Any) -> int:
        return self.ctx.args.batch or cfg.batch

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def train_step(self, tokens: Any) -> Any:
        from model import lm_loss

        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with self.autocast:
            logits = self.wrapped(inputs)
        loss = lm_loss(logits, targets)
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)
            self.ds_engine.step()
        else:
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sharded_tensors(self) -> int:
        """Parameters whose count must be summed over ranks (what ``global`` reduces)."""
        from dist_cautious.layout import is_dtensor

        if self.engine in ("fsdp2", "hsdp"):
            n = 0
            for p in self.module.parameters():
                if is_dtensor(p) and any(pl.is_shard() for pl in p.placements):
                    n += 1
            return n
        if self.engine == "deepspeed" and self.ctx.args.zero_stage >= 1:
            return sum(1 for _ in self.module.parameters())  # every tensor lives in a partition
        return 0

    def state_bytes(self) -> int:
        from dist_cautious.layout import is_dtensor

        total = 0
        for st in self.opt.state.values():
            for v in st.values():
                if hasattr(v, "numel") and v.numel() > 1:
                    t = v.to_local() if is_dtensor(v) else v
                    total += t.numel() * t.element_size()
        return total

    def full_params(self) -> dict[str, Any] | None:
        """Every parameter, whole, fp32 on CPU, on rank 0 (None elsewhere). Collective."""
        import torch

        from dist_cautious.layout import is_dtensor

        out: dict[str, Any] = {}
        keep = self.ctx.rank == 0
        if self.engine == "deepspeed" and self.ctx.args.zero_stage == 3:
            import deepspeed

            params = list(self.module.named_parameters())
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                for name, p in params:
                    if keep:
                        out[name] = p.detach().float().cpu().clone()
            return out if keep else None
        for name, p in self.module.named_parameters():
            t = p.full_tensor() if is_dtensor(p) else p
            if keep:
                out[name] = t.detach().to(torch.float32).cpu().clone()
        return out if keep else None

    def close(self) -> None:
        if self.ds_engine is not None and hasattr(self.ds_engine, "destroy"):
            try:
                self.ds_engine.destroy()
            except Exception:  # best effort: older DeepSpeed versions
                pass
        self.ds_engine = self.wrapped = self.module = self.opt = None  # type: ignore[assignment]
        gc.collect()


# ----------------------------------------------------------------------------- progress


class Progress:
    """rich (or tqdm) bar on rank 0 when on a terminal; a few plain lines otherwise."""

    def __init__(self, ctx: Ctx, total: int, label: str, start: int = 0) -> None:
        self.on = ctx.rank == 0 and not ctx.args.no_progress
        self.total, self.label = total, label
        self.every = ctx.args.log_every or max(1, total // 5)
        self.bar: Any = None
        self.kind = "lines"
        if not self.on or not sys.stdout.isatty():
            return
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss(rank 0) {task.fields[loss]}  kept {task.fields[kept]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=start, loss="-", kept="-")
            self.kind = "rich"
        except ImportError:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, initial=start)
                self.kind = "tqdm"
            except ImportError:
                pass

    def wants_values(self, step: int) -> bool:
        return self.on and (self.kind != "lines" or (step + 1) % self.every == 0 or step == 0)

    def update(self, step: int, loss: float | None, kept: float | None) -> None:
        if not self.on:
            return
        ls = f"{loss:.4f}" if loss is not None else "-"
        ks = f"{kept:.3f}" if kept is not None else "-"
        if self.kind == "rich":
            kw = {}
            if loss is not None:
                kw = {"loss": ls, "kept": ks}
            self.bar.update(self.task, advance=1, **kw)
        elif self.kind == "tqdm":
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=ls, kept=ks)
        elif loss is not None:
            print(
                f"[{self.label}] step {step + 1}/{self.total}  loss(rank 0) {ls}  kept {ks}",
                flush=True,
            )

    def close(self) -> None:
        if self.kind == "rich":
            self.bar.stop()
        elif self.kind == "tqdm":
            self.bar.close()


# ----------------------------------------------------------------------------- one mode


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 10% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def peak_memory(ctx: Ctx) -> tuple[int, str]:
    import torch

    if ctx.cuda:
        return int(torch.cuda.max_memory_allocated(ctx.device)), "cuda max allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


class Checkpoints:
    """--ckpt-dir for one engine/mode: ``DIR/<engine>[-z<stage>]-<mode>/step_NNNNNNNN``,
    written and resumed through ``dist_cautious.checkpoint`` (DCP for fsdp2 / hsdp / ddp,
    DeepSpeed's own format for deepspeed), with the settings a bitwise resume needs."""

    def __init__(self, ctx: Ctx, run: Run, cfg: Any, peak_lr: float) -> None:
        a = ctx.args
        self.ctx, self.run = ctx, run
        stage = f"-z{a.zero_stage}" if run.engine == "deepspeed" else ""
        self.root = Path(a.ckpt_dir) / f"{run.engine}{stage}-{run.mode}"
        self.every = a.ckpt_every
        # What must be equal for the resumed run to continue the saved one (the world size
        # may change for DCP engines: the global batch may not).
        cfg_d = {k: v for k, v in vars(cfg).items() if k != "batch"}
        self.meta = {
            "preset": a.preset,
            "model": cfg_d,
            "global_batch": run.micro_batch(cfg) * ctx.world,
            "engine": run.engine,
            "zero_stage": a.zero_stage if run.engine == "deepspeed" else None,
            "mode": run.mode,
            "seed": a.seed,
            "steps": a.steps,  # the LR schedule depends on it
            "peak_lr": peak_lr,
            "betas": list(a.betas),
            "weight_decay": a.weight_decay,
            "amp": a.amp,
            "grad_reduce_dtype": a.grad_reduce_dtype,
        }
        if run.engine == "hsdp":
            self.meta["hsdp_mesh"] = list(hsdp_shape(ctx))

    def due(self, done: int) -> bool:
        a = self.ctx.args
        return done in (a.steps, a.stop_after) or (
            self.every is not None and done % self.every == 0
        )

    def resume(self) -> tuple[int, list[float]]:
        from dist_cautious import checkpoint as ck

        try:
            if self.run.ds_engine is not None:
                got = ck.load_deepspeed(self.root, self.run.ds_engine, meta=self.meta)
            else:
                got = ck.load(self.root, self.run.module, self.run.opt, meta=self.meta)
        except ck.CheckpointMismatch as e:
            raise SystemExit(f"bench: rank {self.ctx.rank}: cannot resume: {e}") from None
        if got is None:
            if self.ctx.rank == 0:
                print(
                    f"bench: {self.run.engine}/{self.run.mode}: no complete checkpoint in "
                    f"{self.root}: starting at step 0",
                    flush=True,
                )
            return 0, []
        if self.ctx.rank == 0:
            print(
                f"bench: {self.run.engine}/{self.run.mode}: resumed from {got.path} at step "
                f"{got.step} (saved on {got.world_size} ranks, now {self.ctx.world}; "
                f"restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')})",
                flush=True,
            )
        return got.step, list(got.extra.get("losses", []))

    def save(self, done: int, prior: list[float], losses: list[Any]) -> None:
        import torch
        import torch.distributed as dist

        from dist_cautious import checkpoint as ck

        hist = list(prior)
        if losses:  # the mean over ranks, as the final report shows it
            v = torch.stack([x.float() for x in losses]).to(self.ctx.device)
            dist.all_reduce(v)
            hist += (v / self.ctx.world).tolist()
        extra = {"losses": hist}
        a = self.ctx.args
        if self.run.ds_engine is not None:
            path = ck.save_deepspeed(
                self.root, self.run.ds_engine, done, extra=extra, meta=self.meta, keep=a.ckpt_keep
            )
        else:
            path = ck.save(
                self.root,
                self.run.module,
                self.run.opt,
                done,
                extra=extra,
                meta=self.meta,
                keep=a.ckpt_keep,
            )
        if self.ctx.rank == 0 and (a.log_every or not sys.stdout.isatty()):
            print(f"bench: checkpoint {path} (step {done})", flush=True)


def run_mode(ctx: Ctx, engine: str, mode: str, cfg: Any, lang: Any) -> tuple[dict, dict | None]:
    import torch
    import torch.distributed as dist
    from meter import CommMeter

    a = ctx.args
    peak_lr = a.lr if a.lr is not None else (3e-3 if a.preset == "tiny" else 1e-3)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    run = Run(ctx, engine, mode, cfg, peak_lr)
    b = run.micro_batch(cfg)
    rows = b * ctx.world
    ckpt = Checkpoints(ctx, run, cfg, peak_lr) if a.ckpt_dir else None
    start, prior_losses = ckpt.resume() if ckpt is not None else (0, [])
    warm = a.warmup_steps if a.warmup_steps is not None else max(2, a.steps // 10)
    if start:  # the first step after a resume runs the one-time cross-rank layout check
        warm = max(warm, start + 1)  # (an all-reduce per group): not a per-step collective
    warm = min(max(warm, start), max(0, a.steps - 1))

    meter = CommMeter(ctx.cuda)
    opt_time = [0.0]
    # Mask counts of the current training step, summed over optimizer.step() calls
    # (DeepSpeed ZeRO calls step() once per param group / sub-group).
    mask_acc: list[Any] = [None]
    orig_step = run.opt.step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        if a.align_steps:
            dist.barrier()  # untimed: every rank starts the step together
        sync(ctx)
        t0 = time.perf_counter()
        meter.active = True
        try:
            return orig_step(*args, **kwargs)
        finally:
            meter.active = False
            sync(ctx)
            opt_time[0] += time.perf_counter() - t0
            ms = step_mask_stats(run.opt)
            if ms is not None:
                mask_acc[0] = ms if mask_acc[0] is None else mask_acc[0] + ms

    run.opt.step = timed_step  # DeepSpeed's ZeRO wrapper calls this instance attribute too

    per_step: dict[str, list[float]] = {
        k: [] for k in ("opt", "comm", "compute", "step", "calls", "bytes")
    }
    losses = []
    ops_total: Counter[str] = Counter()
    label = f"{engine}/{mode}"
    bar = Progress(ctx, a.steps, label, start)
    ckpt_seconds = 0.0  # checkpoint time after t_start, left out of tokens/s
    dist.barrier()
    t_start = None
    with meter:
        for step in range(start, min(a.steps, a.stop_after or a.steps)):
            if step == warm:
                sync(ctx)
                dist.barrier()
                t_start = time.perf_counter()
            tokens = lang.batch(step, rows)[ctx.rank * b : (ctx.rank + 1) * b].to(ctx.device)
            run.set_lr(lr_at(step, a.steps, peak_lr))
            meter.reset()
            opt_time[0] = 0.0
            mask_acc[0] = None
            t0 = time.perf_counter()
            loss = run.train_step(tokens)
            sync(ctx)
            dt = time.perf_counter() - t0
            losses.append(loss)
            if step >= warm:
                per_step["opt"].append(opt_time[0])
                per_step["comm"].append(meter.seconds)
                per_step["compute"].append(opt_time[0] - meter.seconds)
                per_step["step"].append(dt)
                per_step["calls"].append(meter.calls)
                per_step["bytes"].append(meter.bytes)
                ops_total.update(meter.by_op)
            if bar.wants_values(step):
                acc = mask_acc[0]
                kf = float(acc[0] / acc[1]) if acc is not None and acc[1] > 0 else None
                bar.update(step, float(loss), kf)
            else:
                bar.update(step, None, None)
            if ckpt is not None and ckpt.due(step + 1):
                t_ck = time.perf_counter()
                ckpt.save(step + 1, prior_losses, losses)
                if t_start is not None:
                    ckpt_seconds += time.perf_counter() - t_ck
        sync(ctx)
        t_end = time.perf_counter() - ckpt_seconds
    bar.close()
    run.opt.step = orig_step

    # --- reduce statistics over ranks (outside the timed region)
    dev = ctx.device
    n = len(per_step["opt"])
    loss_vec = torch.stack([x.float() for x in losses]).to(dev) if losses else None
    if loss_vec is not None:
        dist.all_reduce(loss_vec)
        loss_vec /= ctx.world
    timing = torch.tensor(
        [per_step[k] for k in ("opt", "comm", "compute", "step")], dtype=torch.float64, device=dev
    ).reshape(4, n)
    dist.all_reduce(timing, op=dist.ReduceOp.MAX)  # the slowest rank, step by step
    # Time in collectives on the rank that waited least: the last rank to arrive, which
    # waits for the collective itself and not for other ranks (latency without skew).
    comm_min = torch.tensor(per_step["comm"], dtype=torch.float64, device=dev)
    dist.all_reduce(comm_min, op=dist.ReduceOp.MIN)
    stats = mask_acc[0].to(dev) if mask_acc[0] is not None else None
    if stats is not None:
        dist.all_reduce(stats)  # ratio: replicas scale both counts alike
    mem, mem_kind = peak_memory(ctx)
    sb = run.state_bytes()
    ints = torch.tensor([mem, sb], dtype=torch.float64, device=dev)
    dist.all_reduce(ints, op=dist.ReduceOp.MAX)
    wall = torch.tensor([t_end - (t_start or t_end)], dtype=torch.float64, device=dev)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    params = run.full_params()
    sharded = run.sharded_tensors()
    hbm = hbm_bytes_per_param(run.opt)
    run.close()
    dist.barrier()

    def med(row: int) -> float:
        return statistics.median(timing[row].tolist()) * 1e3 if n else float("nan")

    tokens_per_step = rows * cfg.seq_len
    losses_l = list(prior_losses) + (loss_vec.tolist() if loss_vec is not None else [])
    tail = losses_l[-max(1, len(losses_l) // 10) :]
    calls = per_step["calls"]
    result = {
        "engine": engine,
        "zero_stage": a.zero_stage if engine == "deepspeed" else None,
        "mode": mode,
        "factor_lag": 1 if mode == LAG_MODE else 0,
        "hbm_bytes_per_param": hbm,
        "world": ctx.world,
        "steps": a.steps,
        "resumed_from_step": start,
        "timed_steps": n,
        "final_loss": losses_l[-1],
        "final_loss_avg_last_10pct": sum(tail) / len(tail),
        "first_loss": losses_l[0],
        "loss_curve": losses_l,
        "tokens_per_s": tokens_per_step * n / float(wall.item())
        if n and wall.item() > 0
        else float("nan"),
        "step_ms": med(3),
        "opt_step_ms": med(0),
        "opt_comm_ms": med(1),
        "opt_comm_min_ms": statistics.median(comm_min.tolist()) * 1e3 if n else float("nan"),
        "opt_compute_ms": med(2),
        "collectives_per_step": (sum(calls) / n) if n else float("nan"),
        "bytes_per_step": (sum(per_step["bytes"]) / n) if n else float("nan"),
        "collectives_by_op": {k: v / n for k, v in sorted(ops_total.items())} if n else {},
        "sharded_tensors": sharded,
        "peak_memory_bytes": int(ints[0].item()),
        "peak_memory_kind": mem_kind,
        "optimizer_state_bytes_per_rank": int(ints[1].item()),
        "kept_fraction": (
            float(stats[0] / stats[1]) if stats is not None and stats[1] > 0 else None
        ),
        "param_checksum": checksum(params) if params is not None else None,
    }
    return result, params


def step_mask_stats(opt: Any) -> Any:
    """(kept, elements) of the optimizer's last ``step()`` call, float64, on its device.

    With factor_lag=1 that step's counts are still being summed over the ranks (the
    all-reduce is waited for at the next step); reading ``mask_stats`` would wait for them
    here, between the step and the next forward, and hide nothing. So the statistics of the
    step before are taken: the kept fraction is one step behind."""
    import torch

    if getattr(opt, "_pending", None):
        st = opt._stats  # the previous step's, complete
        if st is None:
            return None
        ms = {"kept": st.kept_per_group, "elements": st.elements_per_group}
    else:
        ms = getattr(opt, "mask_stats", None)
    if ms is None:
        return None
    return torch.stack([ms["kept"].sum(), ms["elements"].sum()]).to(torch.float64)


def checksum(params: dict[str, Any]) -> dict[str, float]:
    s = sum(float(t.double().sum()) for t in params.values())
    s2 = sum(float(t.double().pow(2).sum()) for t in params.values())
    return {"sum": s, "sum_sq": s2, "tensors": len(params)}


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, str]:
    """max over tensors of ||a - b||_inf / ||b||_inf."""
    if a.keys() != b.keys():
        raise RuntimeError(f"parameter names differ: {sorted(set(a) ^ set(b))}")
    worst, where = 0.0, ""
    for k in a:
        ref = b[k].double()
        d = float((a[k].double() - ref).abs().max()) if ref.numel() else 0.0
        scale = float(ref.abs().max()) if ref.numel() else 1.0
        r = d / max(scale, 1e-30)
        if r > worst:
            worst, where = r, k
    return worst, where


# ----------------------------------------------------------------------------- report


def fmt_bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(x)


def print_table(results: list[dict], header: str) -> None:
    cols = [
        (
            "engine/mode",
            lambda r: (
                f"{r['engine']}{'-z' + str(r['zero_stage']) if r['zero_stage'] is not None else ''}/{r['mode']}"
            ),
        ),
        ("final loss", lambda r: f"{r['final_loss']:.4f}"),
        ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
        ("step ms", lambda r: f"{r['step_ms']:.2f}"),
        ("opt step ms", lambda r: f"{r['opt_step_ms']:.3f}"),
        ("compute ms", lambda r: f"{r['opt_compute_ms']:.3f}"),
        ("exposed comm ms", lambda r: f"{r['opt_comm_ms']:.3f}"),
        ("coll/step", lambda r: f"{r['collectives_per_step']:g}"),
        ("bytes/step", lambda r: fmt_bytes(r["bytes_per_step"])),
        ("peak mem", lambda r: fmt_bytes(r["peak_memory_bytes"])),
        ("opt state/rank", lambda r: fmt_bytes(r["optimizer_state_bytes_per_rank"])),
        ("kept", lambda r: "-" if r["kept_fraction"] is None else f"{r['kept_fraction']:.3f}"),
        ("HBM B/param*", hbm_cell),
    ]
    rows = [[f(r) for _, f in cols] for r in results]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=header)
        for name, _ in cols:
            t.add_column(name, justify="left" if name == "engine/mode" else "right")
        for row in rows:
            t.add_row(*row)
        Console(width=max(200, len(header))).print(t)
    except ImportError:
        widths = [max(len(c[0]), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print(header)
        print("  ".join(c[0].rjust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(x.rjust(w) for x, w in zip(r, widths)))


def hbm_cell(r: dict) -> str:
    hb = r.get("hbm_bytes_per_param")
    if hb is None:
        return "-"
    two, one = hb
    return f"{two} ({one}**)" if r.get("factor_lag") else str(two)


def steps_label(args: argparse.Namespace) -> str:
    """The table title's step count: the steps this run trained to (``--stop-after``)."""
    stop = min(args.steps, args.stop_after or args.steps)
    if stop == args.steps:
        return f"{stop} steps"
    return f"stopped after {stop} of {args.steps} steps"


def footnotes(results: list[dict], cuda: bool = True) -> list[str]:
    """The lines under the table. Ratios only where something is communicated (not DDP,
    whose optimizer sees whole tensors), and on CPU / gloo no time ratio that would present
    process scheduling and loopback latency as the cost of a 16-byte-per-tensor all-reduce."""
    lines = []
    by = {(r["engine"], r["mode"]): r for r in results}
    for (eng, mode), r in by.items():
        if mode != "global":
            continue
        s = by.get((eng, "shard"))
        if not r.get("sharded_tensors"):
            lines.append(
                f"{eng}: no tensor is sharded, so no mode communicates in the optimizer step "
                "(global and shard compute the same factors); no ratios to show"
            )
            continue
        if s and not cuda:
            lines.append(
                f"{eng}: optimizer step compute global {r['opt_compute_ms']:.3f} ms vs shard "
                f"{s['opt_compute_ms']:.3f} ms; global also waits {r['opt_comm_ms']:.3f} ms "
                f"({r['opt_comm_min_ms']:.3f} ms on the last rank to arrive) in "
                f"{r['collectives_per_step']:g} all-reduce(s) of {fmt_bytes(r['bytes_per_step'])} "
                f"per step, for {r['sharded_tensors']} sharded tensors: on CPU / gloo that wait "
                "is process scheduling and loopback latency of a shared machine, not the cost "
                "of those bytes (GPU figures: docs/benchmarks.md)"
            )
        elif s:
            lines.append(
                f"{eng}: optimizer step global/shard = {r['opt_step_ms'] / s['opt_step_ms']:.3f}x "
                f"({r['opt_step_ms']:.3f} vs {s['opt_step_ms']:.3f} ms; global spends "
                f"{r['opt_comm_ms']:.3f} ms ({r['opt_comm_min_ms']:.3f} ms on the last rank to arrive) "
                f"in {r['collectives_per_step']:g} collective(s) of "
                f"{fmt_bytes(r['bytes_per_step'])} per step, for {r['sharded_tensors']} sharded tensors)"
            )
        g = by.get((eng, "allgather"))
        if g:
            lines.append(
                f"{eng}: all-gather baseline / global = {g['opt_step_ms'] / r['opt_step_ms']:.2f}x "
                f"({g['opt_step_ms']:.3f} vs {r['opt_step_ms']:.3f} ms; baseline moves "
                f"{fmt_bytes(g['bytes_per_step'])} per step)"
            )
        lag = by.get((eng, LAG_MODE))
        if lag:
            lines.append(
                f"{eng}: factor_lag=1 exposes {lag['opt_comm_ms']:.3f} ms of collective time per "
                f"optimizer step against {r['opt_comm_ms']:.3f} ms with factor_lag=0 (the same "
                f"{lag['collectives_per_step']:g} all-reduce(s) of {fmt_bytes(lag['bytes_per_step'])}, "
                f"waited for at the next step); optimizer step {lag['opt_step_ms']:.3f} vs "
                f"{r['opt_step_ms']:.3f} ms"
            )
    if results:
        r0 = results[0]
        lines.append(
            f"times: medians over {r0['timed_steps']} timed steps (after warm-up), slowest rank per step; "
            f"exposed comm = time optimizer.step() spends blocked on collectives on the rank that "
            f"waited most: blocking calls in full, async ones from the call to the return of their "
            f"wait(), wherever in a step that wait is (factor_lag=1: at the next step, after the "
            f"forward/backward it overlapped); includes waiting for other ranks (the rank that "
            f"waited least: comm-min in --json); peak mem = {r0['peak_memory_kind']}, max over ranks"
        )
        if any(r.get("hbm_bytes_per_param") for r in results):
            lines.append(
                "* HBM B/param: computed from the element sizes, not measured: the two-pass step "
                "these kernels run (pass 1 reads g, m; pass 2 reads p, g, m, v, writes p, m, v); "
                "** factor_lag=1 allows a one-pass step (counting inside the update), which no "
                "kernel here implements yet: it runs the same two passes"
            )
    return lines


# ----------------------------------------------------------------------------- main


def quiet_deprecations() -> None:
    """DeepSpeed 0.19 calls torch's deprecated c10d names (``all_gather_into_tensor``;
    ZeRO-3 also ``reduce_scatter_tensor``, hundreds of times per run): silence exactly those
    FutureWarnings, nothing else."""
    import warnings

    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "_reduce_scatter_base"):
        warnings.filterwarnings(
            "ignore", category=FutureWarning, message=rf".*torch\.distributed\.{name}`.*"
        )


def worker(args: argparse.Namespace) -> int:

    import torch
    import torch.distributed as dist
    from model import MarkovLanguage, count_params, preset

    quiet_deprecations()
    ctx = Ctx(args)
    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    if args.seq_len:
        cfg = replace(cfg, seq_len=args.seq_len)
    if args.batch:
        cfg = replace(cfg, batch=args.batch)
    lang = MarkovLanguage(cfg.vocab, cfg.seq_len, args.seed)
    if ctx.rank == 0:
        nparams, ntensors = count_params(cfg)
        print(
            f"bench: preset {args.preset} (hidden {cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab}, "
            f"{nparams / 1e6:.2f}M params in {ntensors} tensors), engine {args.engine}"
            + (f" ZeRO-{args.zero_stage}" if args.engine == "deepspeed" else "")
            + f", modes {','.join(args.scale)}, world {ctx.world} ({ctx.backend} on "
            f"{'cuda' if ctx.cuda else 'cpu'}), {args.steps} steps x {cfg.batch * ctx.world} seqs x "
            f"{cfg.seq_len} tokens; data: Markov chain, entropy floor {lang.entropy:.3f} nats",
            flush=True,
        )

    results, params = [], {}
    for mode in args.scale:
        r, p = run_mode(ctx, args.engine, mode, cfg, lang)
        results.append(r)
        params[(args.engine, mode)] = p
    check = None
    if args.check_against:
        ref_results = []
        check = {"against": args.check_against, "tolerance_global": args.check_tol, "modes": {}}
        for mode in args.scale:
            if mode == "allgather" and args.check_against == "deepspeed":
                continue
            r, p = run_mode(ctx, args.check_against, mode, cfg, lang)
            ref_results.append(r)
            params[(args.check_against, mode)] = p
            if ctx.rank == 0:
                rel, where = compare(params[(args.engine, mode)], p)
                check["modes"][mode] = {"max_rel_diff": rel, "worst_tensor": where}
        results += ref_results

    status = 0
    if ctx.rank == 0:
        hdr = f"{args.preset} | {args.engine}" + (
            f" ZeRO-{args.zero_stage}" if args.engine == "deepspeed" else ""
        )
        hdr += f" | world {ctx.world} | {'cuda' if ctx.cuda else 'cpu'}/{ctx.backend}"
        hdr += f" | {steps_label(args)}"
        print_table(results, hdr)
        for line in footnotes(results, cuda=ctx.cuda):
            print(line)
        if check is not None:
            for mode, c in check["modes"].items():
                ok = c["max_rel_diff"] <= args.check_tol
                tag = (
                    "PASS"
                    if ok
                    else ("FAIL" if mode != "shard" else "differs, as expected: shard factors")
                )
                if mode == "shard" and not ok:
                    tag += " depend on how tensors are split"
                print(
                    f"check {args.engine}/{mode} vs {args.check_against}/{mode}: max relative "
                    f"parameter difference {c['max_rel_diff']:.3e} (tensor {c['worst_tensor'] or '-'}) "
                    f"[{tag}{f', tolerance {args.check_tol:.0e}' if mode != 'shard' else ''}]"
                )
                c["pass"] = ok
                if mode != "shard" and not ok:
                    status = CHECK_FAILED
        if args.json_out:
            out = {
                "preset": args.preset,
                "config": {k: v for k, v in vars(cfg).items()},
                "args": {k: v for k, v in vars(args).items()},
                "world": ctx.world,
                "device": "cuda" if ctx.cuda else "cpu",
                "device_name": torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu",
                "backend": ctx.backend,
                "torch": torch.__version__,
                "host": socket.gethostname(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "data_entropy_floor": lang.entropy,
                "results": results,
                "check": check,
            }
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(out, indent=1))
        if args.save_params:
            torch.save({f"{e}/{m}": p for (e, m), p in params.items()}, args.save_params)
    st = torch.tensor([status], dtype=torch.int64, device=ctx.device)
    dist.broadcast(st, 0)
    dist.barrier()
    dist.destroy_process_group()
    return int(st.item())


def exit_past_lingering_gloo_threads(rc: int) -> None:
    """Leave the worker with ``os._exit`` when gloo threads outlived destroy_process_group.

    The exit abort after ``--check-against ddp`` (``terminate called without an active
    exception``, SIGABRT after PASS, issue 10): functional collectives (DTensor's
    ``full_tensor``, FSDP2) keep a C++ reference to the gloo ProcessGroup, so
    ``destroy_process_group()`` unregisters it but cannot free it, and its threads
    (``pt_gloo_runloop``, ``gloo_tcp_loop``) keep running (tests/dist/test_checkpoint.py
    shows them alive after destroy + gc). They are then torn down during interpreter
    finalization, racing with it; now and then that aborts the process. Everything is
    done at this point (barrier, destroy, files written), so flush and exit without
    finalization, keeping the exit status.
    """
    if not lingering_gloo_threads():
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def lingering_gloo_threads() -> list[str]:
    """Names of this process's native gloo threads (Linux /proc; empty elsewhere)."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if "gloo" in name:
            names.append(name)
    return names


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject combinations that would silently measure something else (before any launch)."""
    if args.steps < 1:
        p.error(f"--steps {args.steps}: need at least 1 step")
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch {args.batch}: need at least 1 sequence per rank")
    if args.seq_len is not None and args.seq_len < 2:
        p.error(f"--seq-len {args.seq_len}: need at least 2 tokens")
    engines = {args.engine} | ({args.check_against} if args.check_against else set())
    if args.check_against == args.engine:
        p.error(
            f"--engine {args.engine} --check-against {args.engine} would compare a run with "
            "itself: check against another engine (ddp is the usual reference; for --engine "
            "ddp use --check-against fsdp2)"
        )
    if args.zero_stage is not None and "deepspeed" not in engines:
        p.error(
            f"--zero-stage {args.zero_stage} applies to DeepSpeed only: add --engine deepspeed "
            "(or --check-against deepspeed), or drop --zero-stage"
        )
    if args.zero_stage is None and "deepspeed" in engines:
        args.zero_stage = 2
    main_job = args.scale is None  # the README's main job: global with both lags, and shard
    if main_job:
        args.scale = ["global", "shard"]
    if args.factor_lag is None:
        args.factor_lag = [0, 1] if main_job else [0]
    if "global" in args.scale:  # --factor-lag: global with factor_lag 0, 1 or both
        i = args.scale.index("global")
        args.scale[i : i + 1] = [LAG_MODE if lag else "global" for lag in args.factor_lag]
    if args.device == "cuda":
        import torch

        ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if ngpu == 0:
            p.error(
                "--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is "
                "False); use --device cpu (gloo) or --device auto"
            )
        n = args.nproc if args.nproc is not None else 2
        if not under_launcher() and n > ngpu:
            p.error(
                f"--device cuda needs one GPU per process: --nproc {n} but {ngpu} GPU(s) "
                f"visible; use --nproc {ngpu} or --device cpu"
            )
    if args.stop_after is not None and not (1 <= args.stop_after <= args.steps):
        p.error(f"--stop-after {args.stop_after}: must be between 1 and --steps {args.steps}")
    if args.ckpt_every is not None and args.ckpt_dir is None:
        p.error(f"--ckpt-every {args.ckpt_every} needs --ckpt-dir DIR (where to save)")
    if args.ckpt_every is not None and args.ckpt_every < 1:
        p.error(f"--ckpt-every {args.ckpt_every}: need at least 1 step between checkpoints")
    if args.ckpt_keep < 1:
        p.error(f"--ckpt-keep {args.ckpt_keep}: keep at least 1 checkpoint")
    if args.max_restarts < 0:
        p.error(f"--max-restarts {args.max_restarts}: must be >= 0")
    if args.max_restarts and under_launcher():
        p.error(
            "--max-restarts is for starting bench.py directly; under torchrun pass "
            "torchrun --max-restarts (and see docs/checkpointing.md)"
        )
    for flag, v in (("--pg-timeout", args.pg_timeout), ("--rdzv-timeout", args.rdzv_timeout)):
        if not (math.isfinite(v) and v > 0):
            p.error(f"{flag} {v}: must be a number of seconds > 0")
    if args.grad_reduce_dtype == "fp64" and "deepspeed" in engines:
        p.error(
            "--grad-reduce-dtype fp64 is implemented for fsdp2, hsdp and ddp only; DeepSpeed "
            "reduces in its own communication dtype: drop the flag for --engine deepspeed"
        )
    if (
        "hsdp" in engines
        and args.hsdp_shard is None
        and not under_launcher()
        and (args.nproc if args.nproc is not None else 2) < 4
    ):
        p.error(
            f"--engine hsdp needs a 2-D mesh (replicate x shard): with {args.nproc or 2} "
            "processes there is none by default; use --nproc 4 (or more) or pass --hsdp-shard"
        )
    if args.hsdp_shard is not None and not under_launcher():
        n = args.nproc if args.nproc is not None else 2
        if args.hsdp_shard < 1 or n % args.hsdp_shard:
            p.error(f"--hsdp-shard {args.hsdp_shard} must divide the number of processes ({n})")
    if "allgather" in args.scale and args.engine == "deepspeed":
        p.error(
            "--scale allgather is the all-gather baseline for DTensor (FSDP2/HSDP) parameters; "
            "for --engine deepspeed use --scale global, shard or both"
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if under_launcher():
        if args.nproc is not None and args.nproc != int(
            os.environ.get("LOCAL_WORLD_SIZE", args.nproc)
        ):
            raise SystemExit(
                f"--nproc {args.nproc} is for starting bench.py directly; under torchrun the "
                f"launcher sets the workers (here {os.environ.get('LOCAL_WORLD_SIZE')} per node)"
            )
        from torch.distributed.elastic.multiprocessing.errors import record

        try:
            rc = record(worker)(args)  # a failing rank's traceback reaches the launcher's summary
        except KeyboardInterrupt:  # Ctrl-C reaches every worker: exit without a traceback each
            rc = 130
        exit_past_lingering_gloo_threads(rc)
        return rc
    return launch(
        args.nproc if args.nproc is not None else 2,
        strip_nproc(argv),
        max_restarts=args.max_restarts,
        rdzv_timeout=args.rdzv_timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
