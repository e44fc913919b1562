#!/usr/bin/env python
"""The prepared one-GPU check of the capturable / compiled step (issue 19), in one call.

    PYTHONPATH=. python benchmarks/gpu_check.py              # one GPU, < 8 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run    # CPU: tiny shapes, no CUDA parts

On a GPU (fp32, LLaMA shapes of benchmarks/kernel.py and launch/model.py):

1. **CUDA graph**: for CAdamW, CLion, CSGD and CAdamW ``factor_lag=1`` with
   ``capturable=True`` at the 60M shapes
   (75 tensors): warm-up steps on a side stream, ``torch.cuda.graph`` capture of
   ``opt.step()``, then 10 replays with new gradients copied into the captured ones, next
   to the eager planned step (Triton; the same ``factor_lag``) on the same gradients: max
   relative error of the
   parameters (pass: <= 1e-5);
2. **reduce-overhead**: ``torch.compile(opt.step, mode="reduce-overhead")`` of CAdamW with a
   0-d CUDA tensor ``lr``, 10 steps against the planned step (pass: <= 1e-5), compile time;
3. **step-time table** against ``torch.optim.AdamW(fused=True)``, 60M and 1B shapes:
   *isolated* (back-to-back steps on fixed gradients, CUDA events, median) for AdamW fused,
   CAdamW eager (Triton), CAdamW eager with ``factor_lag=1`` (the one-pass kernel),
   CAdamW capturable eager, CAdamW CUDA-graph replay and CAdamW
   compiled with ``mode="reduce-overhead"``; *in training* (launch/model.py model,
   forward/backward between steps, the step bracketed by synchronisations, median) for
   AdamW fused, CAdamW eager (``factor_lag`` 0 and 1) and CAdamW CUDA-graph replay (gradients kept in place:
   ``zero_grad(set_to_none=False)``).

A time budget (``--budget``, default 450 s) skips what is left once spent and says so.
Results: ``benchmarks/results/gpu_check_<device>_<date>.{md,json}`` (device name, date,
command). ``--dry-run`` runs every part that does not need CUDA on the CPU with tiny shapes
(argument parsing, shape building, the capturable step against the planned step, the
isolated and in-training timing code) and writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "launch"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from benchmarks.kernel import Timer, llama_shapes  # noqa: E402
from dist_cautious import CSGD, CAdamW, CLion  # noqa: E402

SHAPES = {
    "60m": llama_shapes(32000, 512, 1376, 8),  # 75 tensors, 58.1M
    "1b": llama_shapes(32000, 2048, 5461, 24),  # 219 tensors, 1.339B
    "tiny": llama_shapes(256, 32, 64, 2),  # --dry-run
}
PRESET = {"60m": "60m", "1b": "1b", "tiny": "tiny"}
HYPER = {
    CAdamW: dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    CLion: dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1),
    CSGD: dict(lr=1e-3, momentum=0.9),
}
TOL = 1e-5


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds
        self.skipped: list[str] = []

    def left(self, what: str) -> bool:
        ok = time.perf_counter() - self.t0 < self.seconds
        if not ok:
            self.skipped.append(what)
        return ok


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], dev: torch.device, reps: int, warmup: int = 3) -> float:
    """Median ms of ``reps`` calls after ``warmup``: benchmarks/kernel.py's timer (CUDA events
    on a GPU, the host clock elsewhere)."""
    return statistics.median(Timer(dev).time(fn, reps, warmup))


def tensors(shape_name: str, dev: torch.device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(s, generator=g).mul_(0.02).to(dev) for s in SHAPES[shape_name]]


def params_like(src: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(t.clone()) for t in src]


def set_grads(ps: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
    for p, g in zip(ps, gs):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)  # in place: a captured graph reads these addresses


def step_both(
    shape: str, dev: torch.device, k: int, a: list, b: list, step_a: Callable, step_b: Callable
) -> None:
    """Step ``k`` of a side-by-side check: the same gradients (seed ``10 + k``) into both
    parameter lists, then both steps."""
    gs = tensors(shape, dev, seed=10 + k)
    set_grads(a, gs)
    set_grads(b, gs)
    step_a()
    step_b()


def capturable(cls: type, ps: list[torch.Tensor], **kw: object) -> torch.optim.Optimizer:
    opt = cls(ps, **{**HYPER[cls], **kw})
    for group in opt.param_groups:
        group["capturable"] = True
    return opt


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    out = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        den = y.norm().item()
        out = max(out, (x - y).norm().item() / den if den else (x - y).norm().item())
    return out


def capture(opt: torch.optim.Optimizer, dev: torch.device) -> Callable[[], None]:
    """Warm up on a side stream (3 steps), capture one ``opt.step()`` and replay it once (a
    captured step is recorded, not run: the replay makes it the 4th step); return the
    replay."""
    s = torch.cuda.Stream(device=dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream(dev).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    graph.replay()
    return graph.replay


# --------------------------------------------------------------------------- checks


# (name, class, extra options): factor_lag=1 is checked against the planned lagged step
VARIANTS = [(c.__name__, c, {}) for c in (CAdamW, CLion, CSGD)] + [
    ("CAdamW factor_lag=1", CAdamW, {"factor_lag": 1})
]


def check_cuda_graph(dev: torch.device, shape: str, steps: int = 10) -> dict:
    out = {}
    for name, cls, kw in VARIANTS:
        init = tensors(shape, dev)
        a, b = params_like(init), params_like(init)
        planned = cls(a, **HYPER[cls], **kw)
        cap = capturable(cls, b, **kw)
        set_grads(a, tensors(shape, dev, seed=1))
        set_grads(b, tensors(shape, dev, seed=1))
        for _ in range(4):  # the capture's warm-up steps (3) and its first replay
            planned.step()
        replay = capture(cap, dev)
        for k in range(steps):
            step_both(shape, dev, k, a, b, planned.step, replay)
        sync(dev)
        err = max_rel(b, a)
        out[name] = {"max_rel_err_vs_planned": err, "pass": err <= TOL}
    return out


def check_reduce_overhead(dev: torch.device, shape: str, steps: int = 10) -> dict:
    init = tensors(shape, dev)
    a, b = params_like(init), params_like(init)
    planned = CAdamW(a, **HYPER[CAdamW])
    comp = CAdamW(b, **{**HYPER[CAdamW], "lr": torch.tensor(1e-3, device=dev)})
    step = torch.compile(comp.step, mode="reduce-overhead")
    t0 = time.perf_counter()
    for k in range(steps):
        step_both(shape, dev, k, a, b, planned.step, step)
        if k == 2:
            sync(dev)
            compile_s = time.perf_counter() - t0
    sync(dev)
    err = max_rel(b, a)
    return {"max_rel_err_vs_planned": err, "pass": err <= TOL, "first_3_steps_s": compile_s}


def isolated(dev: torch.device, shape: str, reps: int, use_cuda: bool) -> dict:
    """Back-to-back steps on fixed gradients, one parameter set shared by every variant."""
    ps = params_like(tensors(shape, dev))
    set_grads(ps, tensors(shape, dev, seed=1))
    rows: dict[str, float] = {}
    variants: dict[str, Callable[[], object]] = {
        "adamw_fused": torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True).step
        if use_cuda
        else torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True).step,
        "cadamw_eager": CAdamW(ps, **HYPER[CAdamW]).step,
        # factor_lag=1: the one-pass kernel after the first step (28 B/param, not 36)
        "cadamw_eager_lag1": CAdamW(ps, **HYPER[CAdamW], factor_lag=1).step,
        "cadamw_capturable_eager": capturable(CAdamW, ps).step,
    }
    if use_cuda:
        variants["cadamw_cuda_graph"] = capture(capturable(CAdamW, ps), dev)
        comp = CAdamW(ps, **{**HYPER[CAdamW], "lr": torch.tensor(1e-3, device=dev)})
        variants["cadamw_reduce_overhead"] = torch.compile(comp.step, mode="reduce-overhead")
    for name, fn in variants.items():
        rows[name] = time_ms(fn, dev, reps)
    base = rows["adamw_fused"]
    return {"median_ms": rows, "vs_adamw_fused": {k: v / base for k, v in rows.items()}}


def in_training(dev: torch.device, shape: str, steps: int, use_cuda: bool) -> dict:
    from model import build_model, lm_loss, param_groups, preset  # launch/model.py

    cfg = preset(PRESET[shape])
    batch, seq = (2, 256) if shape == "1b" else (8, 256)
    if shape == "tiny":
        batch, seq = 2, 32
    rows = {}
    for name in ("adamw_fused", "cadamw_eager", "cadamw_eager_lag1", "cadamw_cuda_graph"):
        if name == "cadamw_cuda_graph" and not use_cuda:
            continue
        model = build_model(cfg, seed=0, device=dev)
        groups = param_groups(model, 0.1)
        if name == "adamw_fused":
            opt = torch.optim.AdamW(groups, lr=1e-3, fused=use_cuda, foreach=not use_cuda)
        else:
            opt = CAdamW(
                groups,
                lr=1e-3,
                capturable=name == "cadamw_cuda_graph",
                factor_lag=int(name.endswith("_lag1")),
            )
        gen = torch.Generator(device=dev).manual_seed(0)
        step: Callable[[], object] = opt.step
        times = []
        for k in range(steps):
            tok = torch.randint(0, cfg.vocab, (batch, seq + 1), device=dev, generator=gen)
            lm_loss(model(tok[:, :-1]), tok[:, 1:]).backward()
            if name == "cadamw_cuda_graph" and k == 0:
                step = capture(opt, dev)  # the gradients stay in place from here on
                opt.zero_grad(set_to_none=False)
                continue
            sync(dev)
            t0 = time.perf_counter()
            step()
            sync(dev)
            if k >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
            opt.zero_grad(set_to_none=False)
        rows[name] = statistics.median(times) if times else float("nan")
        del model, opt, groups
        if use_cuda:
            torch.cuda.empty_cache()
    base = rows["adamw_fused"]
    return {"median_ms": rows, "vs_adamw_fused": {k: v / base for k, v in rows.items()}}


def parity_dry(dev: torch.device, shape: str) -> dict:
    """CPU stand-in for the CUDA-graph check: the capturable step against the planned one."""
    out = {}
    for name, cls, kw in VARIANTS:
        init = tensors(shape, dev)
        a, b = params_like(init), params_like(init)
        planned, cap = cls(a, **HYPER[cls], **kw), capturable(cls, b, **kw)
        for k in range(5):
            step_both(shape, dev, k, a, b, planned.step, cap.step)
        err = max_rel(b, a)
        out[name] = {"max_rel_err_vs_planned": err, "pass": err <= TOL}
    return out


# --------------------------------------------------------------------------- main


def report(res: dict, out_dir: Path | None) -> str:
    lines = [
        f"# GPU check of the capturable / compiled step ({res['device']})",
        "",
        f"- date: {res['date']}; command: `{res['command']}`",
        f"- torch {res['torch']}; {res['platform']}",
        f"- dry run (CPU, tiny shapes, no CUDA parts): {res['dry_run']}",
        "",
    ]
    for key in ("cuda_graph", "reduce_overhead", "parity_dry"):
        if key in res:
            lines.append(f"## {key}\n\n```\n{json.dumps(res[key], indent=1)}\n```\n")
    for key in ("isolated", "in_training"):
        for shape, r in res.get(key, {}).items():
            lines += [
                f"## step time, {key}, {shape} (median ms)",
                "",
                "| variant | ms | vs AdamW fused |",
                "|---|---|---|",
            ]
            for name, ms in r["median_ms"].items():
                lines.append(f"| {name} | {ms:.3f} | {r['vs_adamw_fused'][name]:.2f}x |")
            lines.append("")
    if res.get("skipped"):
        lines.append(f"Skipped (time budget): {', '.join(res['skipped'])}")
    text = "\n".join(lines) + "\n"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        dev = re.sub(r"[^a-z0-9]+", "_", res["device"].lower()).strip("_")
        base = out_dir / f"gpu_check_{dev}_{res['date'][:10]}"
        base.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        base.with_suffix(".md").write_text(text)
        print(f"wrote {base}.md/.json")
    return text


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no CUDA parts")
    ap.add_argument("--shapes", nargs="+", default=None, help="default: 60m 1b (dry run: tiny)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=15)
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; the rest is skipped")
    ap.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results; dry run: none)"
    )
    args = ap.parse_args(argv)
    use_cuda = not args.dry_run
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run on the CPU")
    dev = torch.device("cuda" if use_cuda else "cpu")
    shapes = args.shapes or (["60m", "1b"] if use_cuda else ["tiny"])
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    budget = Budget(args.budget)
    res: dict = {
        "device": torch.cuda.get_device_name(dev) if use_cuda else "cpu (dry run)",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/gpu_check.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "dry_run": args.dry_run,
        "shapes": {s: len(SHAPES[s]) for s in shapes},
    }
    first = shapes[0]
    if use_cuda:
        if budget.left("cuda_graph"):
            res["cuda_graph"] = check_cuda_graph(dev, first)
        if budget.left("reduce_overhead"):
            res["reduce_overhead"] = check_reduce_overhead(dev, first)
    else:
        res["parity_dry"] = parity_dry(dev, first)
    res["isolated"], res["in_training"] = {}, {}
    for s in shapes:
        if budget.left(f"isolated {s}"):
            res["isolated"][s] = isolated(dev, s, args.reps, use_cuda)
            torch._dynamo.reset()
            if use_cuda:
                torch.cuda.empty_cache()
    for s in shapes:
        if budget.left(f"in_training {s}"):
            res["in_training"][s] = in_training(dev, s, args.train_steps, use_cuda)
    res["skipped"] = budget.skipped
    res["seconds"] = round(time.perf_counter() - budget.t0, 1)
    out = (
        Path(args.out) if args.out else (None if args.dry_run else ROOT / "benchmarks" / "results")
    )
    print(report(res, out))
    return res


if __name__ == "__main__":
    main()
