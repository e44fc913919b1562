"""Compile every Triton kernel of ``dist_cautious.kernels`` for GPU targets, on any machine.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
lowers each kernel variant to PTX and a cubin, then ``ptxas -v`` (the binary Triton itself
uses for the target: ``ptxas`` below sm_90, ``ptxas-blackwell`` from sm_90 up) is run once
more on the PTX, its exit status checked, and its report parsed: registers, spill stores and
loads, stack frame. Shared memory comes from Triton's metadata. Occupancy is what the
registers allow: 64K 32-bit registers per SM, allocated per warp in units of 256, whole
programs (``num_warps`` warps) per SM, at most 64 warps and 32 programs per SM (sm_80 and
sm_90 alike).

Variants: the dispatcher's choice space, read from ``dist_cautious.kernels`` (see
``_specs``): per kernel its flag axes (maximize, decay, ...), the dtypes of its operands
(fp32 / bf16 / fp16 each; float64 is stepped by foreach, never by Triton) and launch
configurations (the defaults and the tests' small one). ``--set ci`` (the default, and what
tests/unit/test_aot_compile.py compiles) takes a pairwise covering set of each kernel's axes
(every value of every axis meets every value of every other axis in at least one variant;
the full product is ~4,800 variants per target, about 50 minutes of compiling on 2 cores),
plus the all-default and all-heaviest rows; ``--set full`` compiles the full product.

    python benchmarks/aot_kernels.py --jobs 2 --label before
    python benchmarks/aot_kernels.py --jobs 2 --label after --compare <before.json>

writes ``benchmarks/results/aot_kernels_<date>[_<label>].{md,json}``. Exit status 1 on a
compile error, a ptxas failure or a spill in an update kernel.
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
ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPES = ("fp32", "bf16", "fp16")

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


# --------------------------------------------------------------------------- legacy space
# The choice space of the kernels as they were before the kernel refactor (issue 21), read
# off their dispatchers (triton_kernels.count_pass / update_pass, triton_lion_sgd.*): kept
# only to record the baseline table.

_V = {"fp32": 4, "bf16": 8, "fp16": 8}
_LEGACY_CFG = {
    "default": {
        "count": dict(BLOCK=4096, TILES=1, LOAD_EV="evict_first", STORE_CM="", num_warps=8),
        "update": dict(BLOCK=2048, TILES=4, LOAD_EV="evict_first", STORE_CM=".cs", num_warps=8),
    },
    "tests": {
        "count": dict(BLOCK=64, TILES=2, LOAD_EV="evict_first", STORE_CM="", num_warps=4),
        "update": dict(BLOCK=64, TILES=2, LOAD_EV="evict_first", STORE_CM=".cs", num_warps=4),
    },
}
_FLAG = (False, True)
_DT = {"p": DTYPES, "g": DTYPES, "s": DTYPES}


def variant_key(name: str, row: dict, cfg: str) -> str:
    flags = ",".join(f"{k}={v}" for k, v in row.items() if k not in ("p", "g", "s"))
    dts = "/".join(f"{k}:{row[k]}" for k in ("p", "g", "s") if k in row)
    return f"{name}[{flags};{dts};{cfg}]"


def _bytes(row: dict, loads: str, stores: str) -> int:
    return sum(ESIZE[row[o]] for o in loads) + sum(ESIZE[row[o]] for o in stores)


def _factor_sig(factor: str) -> dict:
    if factor == "alphas":
        return dict(alphas="*fp32", counts="*fp32", numels="*fp32", fparams="*fp32")
    return dict(alphas="*i64", counts="*i64", numels="*i64", fparams="*fp64")


def _legacy_space() -> list[dict]:
    mod = "dist_cautious.kernels."
    tk, tl2 = mod + "triton_kernels.", mod + "triton_lion_sgd."
    fmode = {"alphas": 0, "clamp": 1, "paper": 2}

    def mk(name, kernel, row, cfg, pass_, sig, const, loads, stores, scalars):
        c = _LEGACY_CFG[cfg][pass_]
        const = {**const, "BLOCK": c["BLOCK"], "TILES": c["TILES"], "LOAD_EV": c["LOAD_EV"]}
        if "STORE_CM" in const:  # the kernels that store take the store cache modifier
            const["STORE_CM"] = c["STORE_CM"]
        full = {**sig, "nc": "i32", "n": "i32", **{k: "fp32" for k in scalars}}
        full.update({k: "constexpr" for k in const})
        return {
            "key": variant_key(name, row, cfg),
            "kernel": kernel,
            "signature": full,
            "constexprs": const,
            "num_warps": c["num_warps"],
            "bytes": _bytes(row, loads, stores),
            "update": pass_ == "update",
        }

    def adamw_count(row, cfg):
        s = {"G": "*" + row["g"], "M": "*" + row["s"], "tab": "*i64", "counts": "*i64"}
        lerp_hi = row["lerp_hi"]
        const = dict(
            MAXIMIZE=row["maximize"],
            LERP_HI=lerp_hi,
            WRITE_M=not row["defer"],
            VG=_V[row["g"]],
            VM=_V[row["s"]],
            SOFT_BF16=False,
            STORE_CM="",
        )
        return mk(
            "adamw.count",
            tk + "_count_kernel",
            row,
            cfg,
            "count",
            s,
            const,
            "gs",
            "" if row["defer"] else "s",
            ["w"],
        )

    def adamw_update(row, cfg):
        if not row["defer"]:
            row["lerp_hi"] = False
        s = {
            "P": "*" + row["p"],
            "G": "*" + row["g"],
            "M": "*" + row["s"],
            "V": "*" + row["s"],
            "tab": "*i64",
            **_factor_sig(row["factor"]),
        }
        const = dict(
            MAXIMIZE=row["maximize"],
            DECAY=row["decay"] != "none",
            CWD=row["decay"] == "cautious",
            LERP_M=row["defer"],
            LERP_HI=row["lerp_hi"],
            VP=_V[row["p"]],
            VG=_V[row["g"]],
            VM=_V[row["s"]],
            VV=_V[row["s"]],
            SOFT_BF16=False,
            FACTOR=fmode[row["factor"]],
            STORE_CM="",
        )
        return mk(
            "adamw.update",
            tk + "_update_kernel",
            row,
            cfg,
            "update",
            s,
            const,
            "pgss",
            "ssp" if row["defer"] else "sp",
            ["w", "beta2", "omb2", "decay", "neg_step", "bc2", "eps"],
        )

    def lion_count(row, cfg):
        s = {"G": "*" + row["g"], "M": "*" + row["s"], "tab": "*i64", "counts": "*i64"}
        const = dict(
            MAXIMIZE=row["maximize"], LERP_HI=row["lerp_hi1"], VG=_V[row["g"]], VM=_V[row["s"]]
        )
        return mk(
            "lion.count", tl2 + "_lion_count_kernel", row, cfg, "count", s, const, "gs", "", ["w1"]
        )

    def lion_update(row, cfg):
        s = {
            "P": "*" + row["p"],
            "G": "*" + row["g"],
            "M": "*" + row["s"],
            "tab": "*i64",
            **_factor_sig(row["factor"]),
        }
        const = dict(
            MAXIMIZE=row["maximize"],
            DECAY=row["decay"] != "none",
            CWD=row["decay"] == "cautious",
            LERP_HI1=row["lerp_hi1"],
            LERP_HI2=row["lerp_hi2"],
            VP=_V[row["p"]],
            VG=_V[row["g"]],
            VM=_V[row["s"]],
            SOFT_BF16=False,
            FACTOR=fmode[row["factor"]],
            STORE_CM="",
        )
        return mk(
            "lion.update",
            tl2 + "_lion_update_kernel",
            row,
            cfg,
            "update",
            s,
            const,
            "pgs",
            "sp",
            ["w1", "w2", "lr", "decay"],
        )

    def sgd_count(row, cfg):
        if not row["l2"]:
            row["p"] = "fp32"  # not read: the pointer's dtype does not change the code
        s = {
            "P": "*" + row["p"],
            "G": "*" + row["g"],
            "B": "*" + row["s"],
            "tab": "*i64",
            "counts": "*i64",
        }
        const = dict(
            MAXIMIZE=row["maximize"],
            L2=row["l2"],
            FIRST=row["first"],
            NESTEROV=row["nesterov"],
            VP=_V[row["p"]],
            VG=_V[row["g"]],
            VB=_V[row["s"]],
            SOFT_BF16=False,
            STORE_CM="",
        )
        loads = "g" + ("p" if row["l2"] else "") + ("" if row["first"] else "s")
        return mk(
            "sgd.count",
            tl2 + "_sgd_count_kernel",
            row,
            cfg,
            "count",
            s,
            const,
            loads,
            "s",
            ["wd", "momentum", "omd"],
        )

    def sgd_update(row, cfg):
        s = {
            "P": "*" + row["p"],
            "G": "*" + row["g"],
            "B": "*" + row["s"],
            "tab": "*i64",
            **_factor_sig(row["factor"]),
        }
        const = dict(
            MAXIMIZE=row["maximize"],
            L2=row["decay"] == "l2",
            CWD=row["decay"] == "cautious",
            NESTEROV=row["nesterov"],
            VP=_V[row["p"]],
            VG=_V[row["g"]],
            VB=_V[row["s"]],
            SOFT_BF16=False,
            FACTOR=fmode[row["factor"]],
            STORE_CM="",
        )
        return mk(
            "sgd.update",
            tl2 + "_sgd_update_kernel",
            row,
            cfg,
            "update",
            s,
            const,
            "gsp",
            "p",
            ["wd", "momentum", "lr", "decay"],
        )

    factor = ("alphas", "clamp", "paper")
    decay = ("none", "plain", "cautious")
    cfgs = ("default", "tests")
    return [
        dict(
            axes=dict(maximize=_FLAG, lerp_hi=_FLAG, defer=(True, False), g=DTYPES, s=DTYPES),
            configs=cfgs,
            spec=adamw_count,
        ),
        dict(
            axes=dict(
                maximize=_FLAG, decay=decay, defer=_FLAG, lerp_hi=_FLAG, factor=factor, **_DT
            ),
            configs=cfgs,
            spec=adamw_update,
        ),
        dict(
            axes=dict(maximize=_FLAG, lerp_hi1=_FLAG, g=DTYPES, s=DTYPES),
            configs=cfgs,
            spec=lion_count,
        ),
        dict(
            axes=dict(
                maximize=_FLAG, decay=decay, lerp_hi1=_FLAG, lerp_hi2=_FLAG, factor=factor, **_DT
            ),
            configs=cfgs,
            spec=lion_update,
        ),
        dict(
            axes=dict(maximize=_FLAG, l2=_FLAG, first=_FLAG, nesterov=_FLAG, **_DT),
            configs=cfgs,
            spec=sgd_count,
        ),
        dict(
            axes=dict(
                maximize=_FLAG,
                decay=("none", "l2", "cautious"),
                nesterov=_FLAG,
                factor=factor,
                **_DT,
            ),
            configs=cfgs,
            spec=sgd_update,
        ),
    ]


def _specs(which: str) -> list[dict]:
    """Every variant to compile: ``{key, kernel, signature, constexprs, num_warps, bytes}``.

    The choice space and the mapping to constexprs come from the dispatcher itself
    (``dist_cautious.kernels.triton_mt.aot_space``), so a new constexpr or a new kernel is
    compiled without editing this file."""
    try:
        from dist_cautious.kernels.triton_mt import aot_space
    except ImportError:
        aot_space = _legacy_space

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


def failures(results: list[dict]) -> list[str]:
    bad = []
    for r in results:
        where = f"{r['key']} sm_{r['arch']}"
        if "error" in r:
            bad.append(f"{where}: {r['error']}")
        elif r["update"] and (r["spill_st"] or r["spill_ld"]):
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
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--json-only", action="store_true", help="print the JSON, write no file")
    a = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    import triton

    t0 = time.perf_counter()
    specs = _specs(a.set)
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
