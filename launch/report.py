"""bench.py's report: the table, the lines under it, the --check-against verdicts and the
files (--json, --save-params), written by rank 0 from the results of ``run.py``.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path
from typing import Any

from run import LAG_MODE

CHECK_FAILED = 3  # exit status of every rank when --check-against finds a difference


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
    if not r.get("factor_lag"):
        return str(two)
    return f"{one}** ({two})" if r.get("one_pass") else f"{two} ({one}**)"


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
                "** factor_lag=1: the one-pass step (counting inside the update, reads p, g, m, v, "
                "writes p, m, v), first where the backend runs it from each parameter's second "
                "step on (triton, cpu, foreach), in brackets where it does not (reference)"
            )
    return lines


def report(
    args: argparse.Namespace,
    ctx: Any,
    cfg: Any,
    lang: Any,
    results: list[dict],
    check: dict | None,
    params: dict[tuple[str, str], Any],
) -> int:
    """Rank 0: print the table, the footnotes and the check verdicts, write the --json and
    --save-params files; return the exit status (``CHECK_FAILED`` when a check failed)."""
    import torch

    status = 0
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
    return status
