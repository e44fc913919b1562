"""bench.py's run loop: the worker set-up (process group, device), one engine + optimizer
per mode on a fresh model (``Run``, built through ``engines.py``), the timed training loop
with its checkpoints (``run_mode``) and what every mode of one invocation runs (``worker``).

Started by ``launch/bench.py`` in each worker process (it parses and checks the arguments);
the table and the files are written by ``report.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

MODES = ("global", "shard", "allgather")
LAG_MODE = "global+lag1"  # scale="global" with factor_lag=1 (--factor-lag)

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
    fp32), and for the one-pass step (reads p, g, m, v, writes p, m, v: 28 B) that
    factor_lag=1 runs where the backend can (:func:`one_pass_step`). None for other
    optimizers."""
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


def one_pass_step(opt: Any) -> bool:
    """Whether this optimizer's lagged steps (factor_lag=1, from each parameter's second step
    on) run one pass: every group's kernel backend declares ``one_pass_lagged``."""
    from dist_cautious import CAdamW

    if not isinstance(opt, CAdamW):
        return False
    for g in opt.param_groups:
        for p in g["params"][:1]:
            if not opt.backend_for(g, p.device).caps.one_pass_lagged:
                return False
    return True


class Run:
    """One engine + optimizer on a fresh model (``engines.Setup``); the training step and
    parameter access."""

    def __init__(self, ctx: Ctx, engine: str, mode: str, cfg: Any, lr: float) -> None:
        import torch
        from model import build_model, param_groups

        self.ctx, self.engine, self.mode = ctx, engine, mode
        a = ctx.args
        model = build_model(cfg, a.seed, "cpu")
        kw: dict[str, Any] = {}
        if engine in ("fsdp2", "hsdp", "ddp") and a.grad_reduce_dtype == "fp64":
            kw["reduce_dtype"] = torch.float64
        if engine in ("fsdp2", "hsdp"):
            kw["units"] = model.layers
        if engine == "hsdp":
            kw["hsdp_shape"] = hsdp_shape(ctx)
        if engine == "deepspeed":
            if mode == "allgather":
                raise SystemExit(
                    "--scale allgather is the all-gather baseline for DTensor (FSDP2/HSDP) parameters; "
                    "for DeepSpeed use --scale global or shard"
                )
            try:
                import deepspeed  # noqa: F401

                from dist_cautious import deepspeed as dc_ds  # noqa: F401
            except ImportError as e:
                raise SystemExit(
                    f"--engine deepspeed needs dist_cautious.deepspeed and deepspeed ({e})"
                ) from None
            # ZeRO-3 wraps the inputs and outputs of *every* submodule in identity autograd
            # Functions (parameter_offload.py: PostBackwardFunctionModule /
            # PreBackwardFunctionForModule). A tensor read by three or more ops (the residual
            # stream x feeds the residual add and, inside RMSNorm, x * rsqrt(.) and x.pow(2))
            # then gets its gradient summed in another grouping ((n1 + n2) + g instead of
            # autograd's plain order), so fp32 gradients differ from DDP's in the last bits
            # and Adam amplifies them. Marking each Block a ZeRO-3 leaf keeps hooks at block
            # boundaries only (what FSDP2's per-layer fully_shard does): gradients then equal
            # DDP's bit for bit (docs/benchmarks.md). Parameters are gathered per block.
            from model import Block

            kw["zero_stage"] = a.zero_stage
            kw["z3_leaf_modules"] = [Block]
            kw["ds_config"] = {
                "train_micro_batch_size_per_gpu": self.micro_batch(cfg),
                "gradient_accumulation_steps": 1,
                "train_batch_size": self.micro_batch(cfg) * ctx.world,
            }
        elif engine not in ("ddp", "fsdp2", "hsdp"):  # argparse keeps this out
            raise SystemExit(f"unknown engine {engine!r}")
        import engines

        self.setup = engines.build(
            engine,
            model,
            lambda m: make_optimizer(ctx, param_groups(m, a.weight_decay), mode, lr),
            device=ctx.device,
            **kw,
        )
        self.opt = self.setup.opt
        self.module = self.setup.model
        self.wrapped = self.setup.wrapped
        self.ds_engine = self.setup.ds_engine
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
        self.setup.step(loss)
        return loss.detach()

    def sharded_tensors(self) -> int:
        """Parameters whose count must be summed over ranks (what ``global`` reduces)."""
        import engines

        return engines.count_sharded(self.setup)

    def state_bytes(self) -> int:
        import engines

        return engines.state_bytes(self.setup)

    def full_params(self) -> dict[str, Any] | None:
        """Every parameter, whole, fp32 on CPU, on rank 0 (None elsewhere). Collective."""
        import engines

        return engines.full_params(self.setup, rank0_only=True)

    def close(self) -> None:
        self.ds_engine = self.wrapped = self.module = self.opt = None  # type: ignore[assignment]
        self.setup.close()  # DeepSpeed's destroy, then gc.collect()


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
    one_pass = mode == LAG_MODE and one_pass_step(run.opt)
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
        "one_pass": one_pass,
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

    ms = getattr(opt, "settled_mask_stats", None)  # (a torch optimizer has none)
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
    """One worker process: every mode (and the --check-against runs), then rank 0's report;
    returns the exit status, the same on every rank."""
    import torch
    import torch.distributed as dist
    from model import MarkovLanguage, count_params, preset
    from report import report

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
        status = report(args, ctx, cfg, lang, results, check, params)
    st = torch.tensor([status], dtype=torch.int64, device=ctx.device)
    dist.broadcast(st, 0)
    dist.barrier()
    dist.destroy_process_group()
    return int(st.item())
