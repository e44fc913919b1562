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

This file is the command line (arguments, their checks, the launcher); each worker runs
``run.py`` (the training loop, one engine per mode through ``engines.py``) and rank 0
prints ``report.py``'s table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import uuid
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

from report import CHECK_FAILED  # noqa: E402
from run import LAG_MODE, MODES, worker  # noqa: E402

ENGINES = ("fsdp2", "hsdp", "ddp", "deepspeed")
SCALE_ALIASES = {"both": ("global", "shard"), "all": MODES}
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")


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
