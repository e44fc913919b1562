"""Optimizer-step benchmark: CAdamW (triton / foreach) against torch AdamW and timm cadamw.

Every optimizer steps the same parameter and gradient tensors (LLaMA shapes, see
``SHAPES``), side by side in one run. Per optimizer: a few warm-up steps (Triton compiles,
state is allocated), then ``--reps`` timed steps, each between two CUDA events (host
timer on CPU); the median is reported. Transient memory is
``max_memory_allocated() - memory_allocated()`` over one step after warm-up (CUDA only).
Achieved GB/s counts the minimum bytes the algorithm must move (AdamW: p, g, m, v read and
p, m, v written; exact two-pass C-AdamW: 36 B per fp32 parameter, see docs/kernels.md)
and is compared with the bandwidth of a large device-to-device copy measured in the same
run.

    PYTHONPATH=. python benchmarks/kernel.py --out results.json            # GPU, full table
    PYTHONPATH=. python benchmarks/kernel.py --sweep --parity --out r.json # + config sweep, parity
    PYTHONPATH=. python benchmarks/kernel.py --device cpu --shapes cpu     # CPU, small shapes

``--parity`` also runs the full-size check: Triton kernels against the per-tensor
reference (``dist_cautious.kernels.reference``) on every LLaMA-1B tensor (exact counts,
max relative error of p, m, v) and CAdamW(triton) against CAdamW(foreach) over 3 steps on
LLaMA-60M shapes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dist_cautious import CAdamW  # noqa: E402
from dist_cautious.kernels import UpdateHyper, cautious_factor, reference  # noqa: E402

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


# --------------------------------------------------------------------------- shapes


def llama_shapes(vocab: int, hidden: int, inter: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a LLaMA decoder with untied embeddings (norm weights included)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4  # q, k, v, o
        shapes += [(inter, hidden), (inter, hidden), (hidden, inter)]  # gate, up, down
        shapes += [(hidden,), (hidden,)]  # input / post-attention RMSNorm
    shapes += [(hidden,), (vocab, hidden)]  # final norm, lm_head
    return shapes


SHAPES = {
    "llama-1b": llama_shapes(32000, 2048, 5461, 24),  # 219 tensors, 1.339B
    "llama-60m": llama_shapes(32000, 512, 1376, 8),  # 67 tensors, 58M
    # CPU: the 60M layout scaled down (same tensor count, 67 tensors, ~3.6M params)
    "cpu-small": llama_shapes(4000, 128, 344, 8),
}


def numel(shapes: list[tuple[int, ...]]) -> int:
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= d
        n += k
    return n


# --------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, reps: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(reps):
            if self.cuda:
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
        return out


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """GB/s of a large copy, counting bytes read + written."""
    n = (1 << 29) if device.type == "cuda" else (1 << 24)  # 2 GiB / 64 MiB of fp32
    buf = {"src": torch.randn(n, device=device)}
    buf["dst"] = torch.empty_like(buf["src"])
    ts = timer.time(lambda: buf["dst"].copy_(buf["src"]), reps=30, warmup=5)
    buf.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * 4 / (statistics.median(ts) * 1e-3) / 1e9


# --------------------------------------------------------------------------- optimizers


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if name == "cadamw-triton":
        return CAdamW(params, **HYPER, backend="triton")
    if name == "cadamw-foreach":
        return CAdamW(params, **HYPER, backend="foreach")
    if name == "adamw-fused":
        return torch.optim.AdamW(params, **HYPER, fused=True)
    if name == "adamw-foreach":
        return torch.optim.AdamW(params, **HYPER, foreach=True)
    if name == "timm-cadamw":
        import timm.optim

        return timm.optim.create_optimizer_v2(params, opt="cadamw", **HYPER)
    raise ValueError(name)


def bytes_per_param(name: str, pdt: torch.dtype) -> int:
    """Minimum bytes per parameter the algorithm moves (state fp32 for CAdamW and timm with
    fp32 params; torch AdamW keeps its state in the parameter dtype)."""
    pb = torch.empty((), dtype=pdt).element_size()
    if name.startswith("adamw"):
        return 7 * pb  # read p g m v, write p m v
    # exact two-pass C-AdamW: pass 1 reads g, m, writes m; pass 2 reads p, g, m, v, writes
    # p, v. CAdamW keeps fp32 state; timm keeps state in the parameter dtype.
    sb = pb if name == "timm-cadamw" else 4
    return 4 * pb + 5 * sb


def timm_available() -> bool:
    try:
        import timm.optim  # noqa: F401
    except Exception:
        return False
    return True


def bench_case(
    shape_name: str,
    pdt: torch.dtype,
    names: list[str],
    device: torch.device,
    timer: Timer,
    reps: int,
    warmup: int,
    copy_gbs: float,
) -> list[dict]:
    shapes = SHAPES[shape_name]
    n = numel(shapes)
    gen = torch.Generator(device=device).manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, device=device, dtype=pdt, generator=gen) * 0.02)
        for s in shapes
    ]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, dtype=pdt, generator=gen)
    rows = []
    for name in names:
        opt = make_optimizer(name, params)
        try:
            ts = timer.time(opt.step, reps=reps, warmup=warmup)
            transient = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                opt.step()
                torch.cuda.synchronize()
                transient = torch.cuda.max_memory_allocated() - base
            med = statistics.median(ts)
            bpp = bytes_per_param(name, pdt)
            gbs = bpp * n / (med * 1e-3) / 1e9
            row = dict(
                shapes=shape_name,
                dtype=str(pdt).replace("torch.", ""),
                tensors=len(shapes),
                params=n,
                optimizer=name,
                opt_class=f"{type(opt).__module__}.{type(opt).__name__}",
                caution=opt.defaults.get("caution"),
                median_ms=med,
                min_ms=min(ts),
                max_ms=max(ts),
                reps=len(ts),
                transient_bytes=transient,
                bytes_per_param=bpp,
                achieved_gbs=gbs,
                frac_of_copy_bw=gbs / copy_gbs,
            )
        except Exception as e:  # a missing fused kernel for a dtype, OOM, ...
            row = dict(
                shapes=shape_name,
                dtype=str(pdt).replace("torch.", ""),
                optimizer=name,
                error=f"{type(e).__name__}: {e}"[:300],
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
        del opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- sweep / parity


SWEEP_CONFIGS = [
    (512, 8, 4),
    (1024, 2, 4),
    (1024, 4, 4),
    (1024, 8, 4),
    (2048, 2, 4),
    (2048, 4, 8),
    (4096, 2, 8),
    (4096, 1, 8),
]


def sweep(device: torch.device, timer: Timer) -> dict:
    """Time each Triton pass alone over LLaMA-1B fp32 tensors, per launch config, in both
    exp_avg modes (written by pass 1, or deferred to pass 2), then cache hints on the best
    configs; returns the rows and the best choice (mode, config per pass)."""
    from dist_cautious.kernels import triton_adamw as tk

    shapes = SHAPES["llama-1b"]
    n = numel(shapes)
    gen = torch.Generator(device=device).manual_seed(1)
    t = dict(
        p=[torch.randn(s, device=device, generator=gen) for s in shapes],
        g=[torch.randn(s, device=device, generator=gen) for s in shapes],
        m=[torch.randn(s, device=device, generator=gen) for s in shapes],
        v=[torch.rand(s, device=device, generator=gen) for s in shapes],
    )
    alphas = torch.ones(len(shapes), device=device)
    h = UpdateHyper(lr=1e-3, beta2=0.999, eps=1e-8, weight_decay=0.1, step=10, beta1=0.9)
    # bytes per param: (count, update) for mode written / deferred
    nbytes = {False: (12, 24), True: (8, 28)}

    be = tk.TritonAdamW()  # one backend instance: its chunk tables are cached between calls

    def run(which: str, defer: bool) -> float:
        if which == "count":
            fn = lambda: be.count_pass(t["g"], t["m"], 0.9, False, defer_exp_avg=defer)  # noqa: E731
        else:
            fn = lambda: be.update_pass(  # noqa: E731
                t["p"], t["g"], t["m"], t["v"], alphas, h, exp_avg_pending=defer
            )
        return statistics.median(timer.time(fn, 10, 2))

    rows = []

    def record(which, defer, cfg, ms):
        row = dict(
            pass_=which,
            deferred=defer,
            **cfg,
            ms=ms,
            gbs=nbytes[defer][0 if which == "count" else 1] * n / (ms * 1e-3) / 1e9,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)

    best: dict = {}
    for which in ("count", "update"):
        for defer in (False, True):
            for block, tiles, warps in SWEEP_CONFIGS:
                tk.configure(block=block, tiles=tiles, num_warps=warps, which=which, reset=True)
                record(which, defer, tk.config()[which], run(which, defer))
            top = min(
                (r for r in rows if r["pass_"] == which and r["deferred"] == defer),
                key=lambda r: r["ms"],
            )
            cfg = {k: top[k] for k in ("block", "tiles", "num_warps")}
            hints = (
                [dict(load_ev=""), dict(load_ev="evict_last")]
                if which == "count"
                else [dict(store_cm=".cs"), dict(store_cm=".cg"), dict(load_ev="")]
            )
            for hint in hints:
                tk.configure(**cfg, which=which, reset=True, **hint)
                record(which, defer, tk.config()[which], run(which, defer))
            top = min(
                (r for r in rows if r["pass_"] == which and r["deferred"] == defer),
                key=lambda r: r["ms"],
            )
            best[(which, defer)] = top
    total = {d: best[("count", d)]["ms"] + best[("update", d)]["ms"] for d in (False, True)}
    defer = total[True] < total[False]
    choice = dict(
        deferred=defer,
        total_ms={str(k): v for k, v in total.items()},
        count=best[("count", defer)],
        update=best[("update", defer)],
    )
    print("best", json.dumps(choice), flush=True)
    t.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return dict(rows=rows, choice=choice)


def apply_choice(choice: dict) -> None:
    from dist_cautious.kernels import triton_adamw as tk

    tk.DEFER_EXP_AVG = bool(choice["deferred"])
    for which in ("count", "update"):
        c = choice[which]
        tk.configure(
            block=c["block"],
            tiles=c["tiles"],
            num_warps=c["num_warps"],
            load_ev=c["load_ev"],
            store_cm=c["store_cm"],
            which=which,
            reset=True,
        )


def profile_step(device: torch.device, shape_name: str, pdt: torch.dtype) -> dict:
    """torch.profiler over a few CAdamW(triton) steps: GPU time per kernel, host time per step."""
    from torch.profiler import ProfilerActivity, profile

    shapes = SHAPES[shape_name]
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=pdt)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = CAdamW(params, **HYPER, backend="triton")
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    host = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            opt.step()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14)
    print(text, flush=True)
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        opt.step()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
    text += "\n" + buf.getvalue()
    print(buf.getvalue(), flush=True)
    out = dict(
        shapes=shape_name,
        dtype=str(pdt).replace("torch.", ""),
        host_ms_per_step_median=statistics.median(host),
        profile_table=text,
    )
    print(json.dumps({k: v for k, v in out.items() if k != "profile_table"}), flush=True)
    del opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.abs().max().item()
    return (a - b).abs().max().item() / den if den > 0 else (a - b).abs().max().item()


def parity_kernels(device: torch.device, pdt: torch.dtype, shape_name: str) -> dict:
    """Triton passes on all tensors at once vs the per-tensor reference, tensor by tensor."""
    from dist_cautious.kernels import triton_adamw as tk

    shapes = SHAPES[shape_name]
    gen = torch.Generator(device=device).manual_seed(2)
    p0 = [torch.randn(s, device=device, generator=gen).to(pdt) for s in shapes]
    g = [torch.randn(s, device=device, generator=gen).to(pdt) for s in shapes]
    m0 = [torch.randn(s, device=device, generator=gen) * 0.5 for s in shapes]
    v0 = [torch.rand(s, device=device, generator=gen) for s in shapes]
    p, m, v = [x.clone() for x in p0], [x.clone() for x in m0], [x.clone() for x in v0]
    h = UpdateHyper(lr=1e-2, beta2=0.999, eps=1e-8, weight_decay=0.1, step=7, beta1=0.9)
    counts = tk.count_pass(g, m, h.beta1, False)
    numels = torch.tensor([x.numel() for x in p], device=device)
    alphas = cautious_factor(counts, numels, "clamp", 1e-3)
    tk.update_pass(p, g, m, v, alphas, h)
    torch.cuda.synchronize()
    worst = dict(count_mismatches=0, counted=0, p=0.0, m=0.0, v=0.0)
    for i in range(len(shapes)):
        pr, mr, vr = p0[i].clone(), m0[i].clone(), v0[i].clone()
        c = reference.count_pass([g[i]], [mr], h.beta1, False)
        worst["count_mismatches"] += int((c[0] != counts[i]).item())
        worst["counted"] += int(c[0].item())
        a = cautious_factor(c, numels[i : i + 1], "clamp", 1e-3)
        reference.update_pass([pr], [g[i]], [mr], [vr], a, h)
        worst["p"] = max(worst["p"], _relerr(p[i], pr))
        worst["m"] = max(worst["m"], _relerr(m[i], mr))
        worst["v"] = max(worst["v"], _relerr(v[i], vr))
        del pr, mr, vr
    out = dict(
        check="triton kernels vs reference, per tensor",
        shapes=shape_name,
        dtype=str(pdt).replace("torch.", ""),
        tensors=len(shapes),
        params=numel(shapes),
        **worst,
    )
    print(json.dumps(out), flush=True)
    del p0, g, m0, v0, p, m, v
    gc.collect()
    torch.cuda.empty_cache()
    return out


def parity_optimizer(
    device: torch.device, pdt: torch.dtype, shape_name: str, steps: int = 3
) -> dict:
    """CAdamW(triton) vs CAdamW(foreach) over a few steps, fresh gradients each step."""
    shapes = SHAPES[shape_name]
    gen = torch.Generator(device=device).manual_seed(3)
    init = [torch.randn(s, device=device, generator=gen).to(pdt) * 0.02 for s in shapes]
    pa = [torch.nn.Parameter(x.clone()) for x in init]
    pb = [torch.nn.Parameter(x.clone()) for x in init]
    oa = CAdamW(pa, **HYPER, backend="triton")
    ob = CAdamW(pb, **HYPER, backend="foreach")
    for _ in range(steps):
        for a, b in zip(pa, pb):
            gr = torch.randn(a.shape, device=device, generator=gen).to(pdt)
            a.grad, b.grad = gr, gr.clone()
        oa.step()
        ob.step()
    kept_a = oa.mask_stats["kept"].tolist()
    kept_b = ob.mask_stats["kept"].tolist()
    err = max(_relerr(a.detach() - x, b.detach() - x) for a, b, x in zip(pa, pb, init))
    differ = sum(int((a != b).sum().item()) for a, b in zip(pa, pb)) / numel(shapes)
    out = dict(
        check="CAdamW(triton) vs CAdamW(foreach) after a few steps",
        shapes=shape_name,
        dtype=str(pdt).replace("torch.", ""),
        steps=steps,
        kept_equal=kept_a == kept_b,
        max_rel_err_update=err,
        frac_params_differ=differ,
    )
    print(json.dumps(out), flush=True)
    del pa, pb, oa, ob
    gc.collect()
    torch.cuda.empty_cache()
    return out


def interleaved(shape_name: str, pdt: torch.dtype, names: list[str], reps: int) -> dict:
    """CPU: the optimizers step their own copies of the same tensors in turn, step after
    step, so that a change in machine load hits all of them alike; medians per optimizer."""
    shapes = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(pdt) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen).to(pdt) for s in shapes]
    opts = {}
    for name in names:
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opts[name] = make_optimizer(name, ps)
        opts[name].step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append((time.perf_counter() - t) * 1e3)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    out = dict(
        shapes=shape_name,
        dtype=str(pdt).replace("torch.", ""),
        tensors=len(shapes),
        params=numel(shapes),
        reps=reps,
        median_ms=med,
        min_ms={n: min(ts) for n, ts in times.items()},
    )
    if "cadamw-foreach" in med and "adamw-foreach" in med:
        out["cadamw_foreach_over_adamw_foreach"] = med["cadamw-foreach"] / med["adamw-foreach"]
    print(json.dumps(out), flush=True)
    return out


# --------------------------------------------------------------------------- report


def table(rows: list[dict], copy_gbs: float, device_name: str) -> str:
    lines = [
        f"device: {device_name}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)",
        "",
        "| shapes | dtype | optimizer | median ms | x fused AdamW | GB/s | of copy BW | transient MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {
        (r["shapes"], r["dtype"]): r["median_ms"]
        for r in rows
        if r.get("optimizer") == "adamw-fused" and "median_ms" in r
    }
    for r in rows:
        if "median_ms" not in r:
            lines.append(
                f"| {r['shapes']} | {r['dtype']} | {r['optimizer']} | error: {r['error']} |"
            )
            continue
        b = base.get((r["shapes"], r["dtype"]))
        ratio = f"{r['median_ms'] / b:.2f}" if b else "-"
        tr = r["transient_bytes"]
        tr_s = f"{tr / 2**20:.1f}" if tr is not None else "-"
        lines.append(
            f"| {r['shapes']} | {r['dtype']} | {r['optimizer']} | {r['median_ms']:.3f} | {ratio} "
            f"| {r['achieved_gbs']:.0f} | {r['frac_of_copy_bw']:.2f} | {tr_s} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--optimizers", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--config", default=None, help="triton block,tiles,num_warps (both passes)")
    ap.add_argument("--no-defer", action="store_true", help="triton: write exp_avg in pass 1")
    ap.add_argument("--profile", action="store_true", help="profile CAdamW(triton) steps")
    ap.add_argument("--sweep", action="store_true", help="sweep triton configs, use the best")
    ap.add_argument("--parity", action="store_true", help="full-size parity checks (CUDA)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    timer = Timer(device)
    device_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    shapes = (args.shapes or ("llama-1b,llama-60m" if cuda else "cpu-small")).split(",")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.optimizers:
        names = args.optimizers.split(",")
    else:
        names = (["cadamw-triton"] if cuda else []) + [
            "cadamw-foreach",
            "adamw-fused",
            "adamw-foreach",
        ]
        if timm_available():
            names.append("timm-cadamw")
    result: dict = dict(
        command=" ".join(["python", *sys.argv]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        hyper={k: list(v) if isinstance(v, tuple) else v for k, v in HYPER.items()},
    )
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    if timm_available():
        import timm

        result["timm"] = timm.__version__

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    if cuda:
        from dist_cautious.kernels import triton_adamw as tk

        if args.config:
            b, t, w = (int(x) for x in args.config.split(","))
            tk.configure(block=b, tiles=t, num_warps=w)
        if args.no_defer:
            tk.DEFER_EXP_AVG = False
        if args.sweep:
            result["sweep"] = sweep(device, timer)
            save()
            apply_choice(result["sweep"]["choice"])
        result["triton_config"] = tk.config()
        result["triton_defer_exp_avg"] = tk.DEFER_EXP_AVG
        print("triton config", tk.config(), flush=True)

    if args.profile and cuda:
        result["profile"] = [
            profile_step(device, "llama-60m", torch.float32),
            profile_step(device, "llama-1b", torch.float32),
        ]
        save()

    copy_gbs = copy_bandwidth(device, timer)
    result["copy_gbs"] = copy_gbs
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for sn in shapes:
        for dt in dtypes:
            reps = args.reps or (20 if sn == "llama-1b" else 50)
            rows += bench_case(sn, dt, names, device, timer, reps, args.warmup, copy_gbs)
            result["rows"] = rows
            save()
    if not cuda:
        result["interleaved"] = [
            interleaved(sn, dt, names, args.reps or 30) for sn in shapes for dt in dtypes
        ]
        save()
    # The copy is measured again after the table; the larger median is the reference.
    copy_after = copy_bandwidth(device, timer)
    result["copy_gbs_before_after"] = [copy_gbs, copy_after]
    if copy_after > copy_gbs:
        copy_gbs = result["copy_gbs"] = copy_after
        for r in rows:
            if "achieved_gbs" in r:
                r["frac_of_copy_bw"] = r["achieved_gbs"] / copy_gbs
    text = table(rows, copy_gbs, device_name)
    result["table"] = text
    save()
    if args.parity and cuda:
        result["parity"] = []
        for fn, dt, sn in (
            (parity_kernels, torch.float32, "llama-1b"),
            (parity_kernels, torch.bfloat16, "llama-60m"),
            (parity_optimizer, torch.float32, "llama-60m"),
            (parity_optimizer, torch.bfloat16, "llama-60m"),
        ):
            result["parity"].append(fn(device, dt, sn))
            save()
    print()
    print(text)
    for r in result.get("interleaved", []):
        ratio = r.get("cadamw_foreach_over_adamw_foreach")
        if ratio is not None:
            print(
                f"CPU interleaved {r['shapes']} {r['dtype']}: CAdamW foreach / AdamW foreach "
                f"= {ratio:.2f} (medians of {r['reps']})"
            )


if __name__ == "__main__":
    main()
