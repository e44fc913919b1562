"""Compile every Triton kernel of ``dist_cautious.kernels`` for GPU targets, on any machine.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
lowers each kernel variant to PTX and a cubin, then ``ptxas -v`` (the binary Triton itself
uses for the target: ``ptxas`` below sm_90, ``ptxas-blackwell`` from sm_90 up) is run once
more on the PTX, its exit status checked, and its report parsed: registers, spill stores and
loads, stack frame. Shared memory comes from Triton's metadata. Occupancy is what the
registers allow: 64K 32-bit registers per SM, allocated per warp in units of 256, whole
programs (``num_warps`` warps) per SM, at most 64 warps and 32 programs per SM (sm_80 and
sm_90 alike).

Variants: the dispatchers' choice space, from ``dist_cautious.kernels.triton_mt.aot_space``:
each optimizer's math module declares the axes of its choices (maximize, decay, deferred
exp_avg, lerp formula, factor mode, ...) and every row goes through the same ``*_variant``
functions and ``triton_mt.constexprs`` as a launch, so a new flag or constexpr is compiled
here without editing this file. Operand dtypes: fp32 / bf16 / fp16 for parameters,
gradients and state independently (float64 is stepped by foreach, never by Triton); launch
configurations: the defaults and the tests' small one. ``--set ci`` (the default, and what
tests/unit/test_aot_compile.py compiles) takes a pairwise covering set of each kernel's axes
(every value of every axis meets every value of every other axis in at least one variant),
plus the all-first and all-last rows: 96 variants per target. The full product is 4,782
variants per target (about 1.5 s each on a loaded 2-core machine: hours); ``--set full``
compiles it. Variants that differ only in a flag or dtype the kernel does not use are
compiled once.

    python benchmarks/aot_kernels.py --jobs 2 --label before
    python benchmarks/aot_kernels.py --jobs 2 --label after --compare <before.json>

writes ``benchmarks/results/aot_kernels_<date>[_<label>].{md,json}``. Exit status 1 on a
compile error, a ptxas failure or a spill in an update kernel (beyond ``KNOWN_SPILLS``: one
4-byte spill outside the per-element work, there before and after the refactor).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import importlib
import itertools
import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)

# --------------------------------------------------------------------------- variants


def _pairwise(axes: list[tuple[str, tuple]]) -> list[dict]:
    """A deterministic pairwise covering set of ``axes`` (greedy), plus the first-value and
    last-value rows."""
    names = [a for a, _ in axes]
    vals = [v for _, v in axes]
    rows = [{a: v[0] for a, v in axes}, {a: v[-1] for a, v in axes}]
    todo = {
        (i, x, j, y)
        for i, j in itertools.combinations(range(len(axes)), 2)
        for x in range(len(vals[i]))
        for y in range(len(vals[j]))
    }

    def cover(row_idx: list[int]) -> None:
        for i, j in itertools.combinations(range(len(axes)), 2):
            todo.discard((i, row_idx[i], j, row_idx[j]))

    for r in rows:
        cover([vals[k].index(r[names[k]]) for k in range(len(axes))])

    def pair(i: int, x: int, j: int, y: int) -> tuple:
        return (i, x, j, y) if i < j else (j, y, i, x)

    while todo:
        i, x, j, y = min(todo)
        idx: list = [None] * len(axes)
        idx[i], idx[j] = x, y
        for k in range(len(axes)):
            if idx[k] is not None:
                continue
            gains = [
                sum(pair(q, idx[q], k, c) in todo for q in range(len(axes)) if idx[q] is not None)
                for c in range(len(vals[k]))
            ]
            idx[k] = gains.index(max(gains))
        cover(idx)
        rows.append({names[k]: vals[k][idx[k]] for k in range(len(axes))})
    return rows


def _full(axes: list[tuple[str, tuple]]) -> list[dict]:
    names = [a for a, _ in axes]
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in axes))]


def _specs(which: str) -> list[dict]:
    """Every variant to compile: ``{key, kernel, signature, constexprs, num_warps, bytes}``.

    The choice space and the mapping to constexprs come from the dispatcher itself
    (``dist_cautious.kernels.triton_mt.aot_space``), so a new constexpr or a new kernel is
    compiled without editing this file."""
    from dist_cautious.kernels.triton_mt import aot_space

    out = []
    seen = set()
    for space in aot_space():
        axes = list(space["axes"].items())
        rows = _full(axes) if which == "full" else _pairwise(axes)
        for cfg_name in space["configs"]:
            for row in rows if cfg_name == "default" else rows[:2]:
                spec = space["spec"](dict(row), cfg_name)
                if spec["key"] in seen:  # a canonicalised duplicate (an unused flag)
                    continue
                seen.add(spec["key"])
                out.append(spec)
    return out


# --------------------------------------------------------------------------- compiling

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def _resolve(obj):
    if isinstance(obj, str) and obj.startswith("jit:"):
        mod, name = obj[4:].rsplit(".", 1)
        return getattr(importlib.import_module(mod), name)
    return obj


def compile_one(spec: dict, arch: int) -> dict:
    """Compile ``spec`` for ``sm_<arch>``; registers, spills, shared memory, or the error."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    res = {"key": spec["key"], "arch": arch, "kernel": spec["kernel"]}
    t0 = time.perf_counter()
    try:
        fn = _resolve("jit:" + spec["kernel"])
        const = {k: _resolve(v) for k, v in spec["constexprs"].items()}
        attrs = {
            (fn.arg_names.index(a),): [["tt.divisibility", 16]]
            for a, t in spec["signature"].items()
            if t.startswith("*")
        }
        src = ASTSource(fn=fn, signature=spec["signature"], constexprs=const, attrs=attrs)
        k = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec["num_warps"]}
        )
    except Exception as e:  # noqa: BLE001 - reported, and the run fails
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        return res
    res["shared"] = int(k.metadata.shared)
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src_ptx = os.path.join(d, "k.ptx")
        with open(src_ptx, "w") as f:
            f.write(k.asm["ptx"])
        cmd = [
            ptxas,
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
            src_ptx,
            "-o",
            src_ptx + ".o",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    res["ptxas"] = os.path.basename(ptxas)
    res["ptxas_rc"] = r.returncode
    if r.returncode != 0:
        res["error"] = f"{res['ptxas']} exit {r.returncode}: {r.stderr[-1500:]}"
        return res
    for name, rx in _PTXAS_RE.items():
        m = rx.search(r.stderr)
        res[name] = int(m.group(1)) if m else None
    if res["regs"] is None:
        res["error"] = f"no register count in the ptxas report: {r.stderr[-500:]}"
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def occupancy(regs: int, num_warps: int) -> dict:
    """Warps per SM that ``regs`` registers per thread allow (sm_80 / sm_90)."""
    per_warp = -(-regs * 32 // 256) * 256
    progs = min(65536 // (per_warp * num_warps), 32, 64 // num_warps)
    return {"warps_per_sm": progs * num_warps, "occupancy": round(progs * num_warps / 64, 3)}


def run(specs: list[dict], jobs: int) -> list[dict]:
    tasks = [(s, a) for s in specs for a in TARGETS]
    if jobs <= 1:
        results = [compile_one(s, a) for s, a in tasks]
    else:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as ex:
            results = list(ex.map(compile_one, *zip(*tasks), chunksize=4))
    by_key = {s["key"]: s for s in specs}
    for r in results:
        s = by_key[r["key"]]
        r["num_warps"] = s["num_warps"]
        r["bytes"] = s["bytes"]
        r["update"] = s["update"]
        if r.get("regs") is not None:
            r.update(occupancy(r["regs"], s["num_warps"]))
    return results


# The one spill in an update kernel, there before the kernel refactor (issue 21) and after it
# alike, in the 16-bit mixed-dtype variant below on sm_90 only: one 4-byte register (an
# address) stored once before the masked path's tile loop and reloaded at the head of each
# of its TILES iterations (cuobjdump -sass: one STL, one LDL; not per element; the masked
# path runs only for a tensor's last chunk and unaligned tensors). Allowed at exactly this
# size; any other spill in an update kernel, or a larger one here, fails.
KNOWN_SPILLS = {
    (
        "adamw.update[maximize=False,decay=none,defer=False,lerp_hi=False,factor=paper;"
        "p:fp16/g:fp16/s:bf16;default]",
        90,
    ): 4,
}


def failures(results: list[dict]) -> list[str]:
    bad = []
    for r in results:
        where = f"{r['key']} sm_{r['arch']}"
        if "error" in r:
            bad.append(f"{where}: {r['error']}")
        elif r["update"] and (r["spill_st"] or r["spill_ld"]):
            allowed = KNOWN_SPILLS.get((r["key"], r["arch"]), 0)
            if max(r["spill_st"], r["spill_ld"]) > allowed:
                bad.append(f"{where}: spills {r['spill_st']} B stores / {r['spill_ld']} B loads")
    return bad


# --------------------------------------------------------------------------- report


def _summary(results: list[dict]) -> dict:
    """Per kernel and target: variants, register range, spills, shared memory."""
    out: dict[str, dict] = {}
    for r in results:
        if r.get("regs") is None:
            continue
        name = r["key"].split("[")[0]
        s = out.setdefault(f"{name} sm_{r['arch']}", {"n": 0, "regs": [], "spill": 0, "smem": 0})
        s["n"] += 1
        s["regs"].append(r["regs"])
        s["spill"] += (r["spill_st"] or 0) + (r["spill_ld"] or 0)
        s["smem"] = max(s["smem"], r["shared"])
        s.setdefault("min_warps", 64)
        s["min_warps"] = min(s["min_warps"], r["warps_per_sm"])
    return {
        k: {
            "variants": v["n"],
            "regs_min": min(v["regs"]),
            "regs_max": max(v["regs"]),
            "spill_bytes": v["spill"],
            "shared_max": v["smem"],
            "min_warps_per_sm": v["min_warps"],
        }
        for k, v in sorted(out.items())
    }


def _md(meta: dict, results: list[dict], before: dict | None) -> str:
    lines = [
        f"# AOT kernel compile ({meta['label'] or 'current'}), {meta['date']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']} (CPU only: nothing here ran on a GPU; the figures are "
        "ptxas's, not measurements)  ",
        f"Triton {meta['triton']}, targets sm_80 (`ptxas`) and sm_90a (`ptxas-blackwell`); "
        f"{meta['variants']} variants per target ({meta['set']} set), "
        f"{meta['compiles']} compiles in {meta['seconds']:.0f} s with {meta['jobs']} jobs.",
        "",
        "Occupancy: warps per SM the registers allow (64K registers per SM, 256-register "
        "allocation unit per warp, whole programs of `num_warps` warps, at most 64 warps per "
        "SM). Bytes: moved per parameter by that kernel (loads + stores at the operands' "
        "dtypes).",
        "",
        "## Per kernel",
        "",
    ]
    summ = _summary(results)
    bsum = before.get("summary", {}) if before else {}
    head = "| kernel | target | variants | registers | spill bytes | shared mem | min warps/SM |"
    if before:
        head += " registers before | spill bytes before |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for k, v in summ.items():
        name, arch = k.rsplit(" ", 1)
        row = (
            f"| {name} | {arch} | {v['variants']} | {v['regs_min']}-{v['regs_max']} | "
            f"{v['spill_bytes']} | {v['shared_max']} | {v['min_warps_per_sm']} |"
        )
        if before:
            b = bsum.get(k)
            row += f" {b['regs_min']}-{b['regs_max']} | {b['spill_bytes']} |" if b else " - | - |"
        lines.append(row)
    lines += ["", "## Per variant", ""]
    bmap = {(r["key"], r["arch"]): r for r in before.get("results", [])} if before else {}
    head = (
        "| variant | target | regs | spills st/ld | stack | smem | warps | warps/SM | bytes/param |"
    )
    if before:
        head += " regs before | bytes before |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(results, key=lambda r: (r["key"], r["arch"])):
        if "error" in r:
            lines.append(f"| {r['key']} | sm_{r['arch']} | ERROR: {r['error'][:120]} |")
            continue
        row = (
            f"| {r['key']} | sm_{r['arch']} | {r['regs']} | {r['spill_st']}/{r['spill_ld']} | "
            f"{r['stack']} | {r['shared']} | {r['num_warps']} | {r['warps_per_sm']} | "
            f"{r['bytes']} |"
        )
        if before:
            b = bmap.get((r["key"], r["arch"]))
            row += f" {b['regs']} | {b['bytes']} |" if b and "regs" in b else " - | - |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", choices=("ci", "full"), default="ci")
    ap.add_argument("--label", default="")
    ap.add_argument("--compare", help="a previous results JSON: side-by-side columns")
    ap.add_argument("--only", default="", help="compile only variants whose key contains this")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--json-only", action="store_true", help="print the JSON, write no file")
    a = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    import triton

    t0 = time.perf_counter()
    specs = [s for s in _specs(a.set) if a.only in s["key"]]
    results = run(specs, a.jobs)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    meta = {
        "label": a.label,
        "date": date,
        "command": "python benchmarks/aot_kernels.py "
        + " ".join(x if not os.path.isabs(x) else os.path.relpath(x, ROOT) for x in sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
        "triton": triton.__version__,
        "set": a.set,
        "jobs": a.jobs,
        "variants": len(specs),
        "compiles": len(results),
        "seconds": time.perf_counter() - t0,
    }
    doc = {"meta": meta, "summary": _summary(results), "results": results}
    bad = failures(results)
    doc["failures"] = bad
    if a.json_only:
        print(json.dumps(doc))
    else:
        before = json.loads(Path(a.compare).read_text()) if a.compare else None
        stem = f"aot_kernels_{date}" + (f"_{a.label}" if a.label else "")
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / f"{stem}.md").write_text(_md(meta, results, before))
        print(f"wrote {out / stem}.md/.json: {len(specs)} variants x {len(TARGETS)} targets")
    for b in bad:
        print("FAIL", b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
