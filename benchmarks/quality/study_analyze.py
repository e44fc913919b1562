#!/usr/bin/env python
"""The issue-20 study's summary from its run files (benchmarks/quality/study.py)::

    python benchmarks/quality/study_analyze.py [--out benchmarks/results/quality/study]

writes ``summary.json`` and ``summary.md`` next to ``runs/``: the embedding-lr sweep and the
selected AdamW, C-AdamW against it (paired by seed: final-loss difference and in-schedule
sample-efficiency ratio, each a mean with a t-based 95% CI), the horizon (steps AdamW needs
with its own schedule to reach C-AdamW's final loss, interpolated in log steps across its
schedules), kept fraction and factor per tensor kind, the shard arms against global at the
same world size, ``factor_lag=1`` against 0, the tied model, and the issue-11 runs re-read
(their embedding's kept fraction; shard@4 - global@4). Arms with fewer than 2 finished seeds
are listed as pending. Losses are nats per byte; ``report`` is the reported validation
split without the ``encodings/`` tables (corpus.val_parts), ``all`` the issue-11 windows.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality" / "study"
OLD_RUNS = ROOT / "benchmarks" / "results" / "quality" / "runs"
KINDS = ("embed", "head", "attn", "mlp", "norm")
CLAMP = 1e-3

# two-sided 95% quantiles of Student's t (df 1..30); above 30 the df-30 value (conservative)
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"t975(df={df}): need at least 2 values (df >= 1)")
    return T975[min(df, len(T975)) - 1]


def ci(xs: list[float]) -> dict[str, Any]:
    """Mean and t-based 95% confidence interval of ``xs`` (n >= 2), with the values."""
    x = np.asarray(xs, dtype=np.float64)
    n = x.size
    out: dict[str, Any] = {"n": int(n), "values": [float(v) for v in x]}
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n >= 2:
        sd = float(x.std(ddof=1))
        half = t975(n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, lo=out["mean"] - half, hi=out["mean"] + half)
    return out


def fmt(c: dict[str, Any], digits: int = 4) -> str:
    if c.get("n", 0) == 0:
        return "pending"
    if "lo" not in c:
        return f"{c['mean']:+.{digits}f} (n=1)"
    return f"{c['mean']:+.{digits}f} [{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}] (n={c['n']})"


def steps_to_reach(steps: list[int], loss: list[float], target: float) -> float | None:
    """First step (linear interpolation between evaluations) at which ``loss`` <= target."""
    for i, (s, v) in enumerate(zip(steps, loss)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], loss[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def schedule_steps_to_reach(finals: dict[int, float], target: float) -> float | None:
    """Steps a run needs *with its own schedule* to end at ``target``: its final losses at
    schedule lengths T (``{T: loss}``) interpolated linearly in log T. None if ``target`` is
    below the longest schedule's loss (not reached within the measured schedules); the
    shortest T if already reached there (an upper bound on the steps needed: shorter
    schedules were not run)."""
    ts = sorted(finals)
    if not ts or target < finals[ts[-1]]:
        return None
    if target >= finals[ts[0]]:
        return float(ts[0])
    for a, b in zip(ts, ts[1:]):
        la, lb = finals[a], finals[b]
        if lb <= target <= la:
            w = 0.0 if la == lb else (la - target) / (la - lb)
            return float(math.exp(math.log(a) + w * (math.log(b) - math.log(a))))
    return None  # non-monotone finals with the target between: not interpolated


# ----------------------------------------------------------------------------- reading


def read_csv(path: Path) -> dict[str, Any]:
    rows = list(csv.DictReader(path.open()))
    out: dict[str, Any] = {"rows": rows}
    for col in ("val_report", "val_tune", "val_loss"):
        ev = [(int(r["step"]), float(r[col])) for r in rows if r.get(col)]
        out[col] = ev
    out["steps"] = int(rows[-1]["step"])
    out["elapsed_s"] = float(rows[-1]["elapsed_s"])
    return out


def load(out: Path, names: set[str]) -> dict[str, dict]:
    runs = {}
    for n in names:
        p = out / "runs" / f"{n}.csv"
        if p.exists() and p.with_suffix(".json").exists():
            runs[n] = read_csv(p)
    return runs


def final(run: dict, col: str = "val_report") -> float:
    return run[col][-1][1]


def per_kind(run: dict, lo: int, hi: int) -> dict[str, float]:
    """Mean of the kept_<kind> / factor_<kind> columns over steps lo..hi."""
    res = {}
    rows = [r for r in run["rows"] if lo <= int(r["step"]) <= hi and r.get("kept_fraction")]
    for col in [f"{p}_{k}" for p in ("kept", "factor") for k in KINDS] + ["kept_fraction"]:
        v = [float(r[col]) for r in rows if r.get(col)]
        if v:
            res[col] = float(np.mean(v))
    return res


def shard_embed_factor(out: Path, name: str) -> list[float] | None:
    """Per rank: the embedding's mean factor with its own counts / with the whole tensor's
    (kept-weighted over steps) from ``<run>.counts.npz``."""
    p = out / "runs" / f"{name}.counts.npz"
    if not p.exists():
        return None
    d = np.load(p)
    c = d["counts"].astype(np.float64)  # (steps, world, tensors, 2)
    i = list(d["kinds"]).index("embed")
    kept, n = c[:, :, i, 0], c[:, :, i, 1]
    tot_k, tot_n = kept.sum(1, keepdims=True), n.sum(1, keepdims=True)
    a_local = n / np.maximum(kept, CLAMP * n)
    a_glob = tot_n / np.maximum(tot_k, CLAMP * tot_n)
    return [float(np.exp(np.mean(np.log(a_local[:, r] / a_glob[:, 0])))) for r in range(c.shape[1])]


def shard_per_kind(out: Path, name: str) -> dict[str, list[dict[str, float]]] | None:
    """Per tensor kind and rank, from ``<run>.counts.npz`` (every step): the rank's kept
    fraction of its local pieces, its share of the kind's kept elements, and the kept-weighted
    mean factor its kept elements get with the piece's own counts (``shard``) and with the
    whole tensor's (``global``), both ``N / max(kept, 1e-3 N)``."""
    p = out / "runs" / f"{name}.counts.npz"
    if not p.exists():
        return None
    d = np.load(p)
    c = d["counts"].astype(np.float64)  # (steps, world, tensors, 2)
    kinds = [str(k) for k in d["kinds"]]
    kept, n = c[..., 0], c[..., 1]
    a_local = n / np.maximum(kept, CLAMP * n)
    tk, tn = kept.sum(1, keepdims=True), n.sum(1, keepdims=True)
    a_glob = np.broadcast_to(tn / np.maximum(tk, CLAMP * tn), kept.shape)
    res: dict[str, list[dict[str, float]]] = {}
    for k in KINDS:
        sel = [i for i, kk in enumerate(kinds) if kk == k]
        if not sel:
            continue
        kk, nn = kept[:, :, sel], n[:, :, sel]
        tot = kk.sum()
        rows = []
        for r in range(c.shape[1]):
            w = kk[:, r].sum()
            rows.append(
                {
                    "kept": float(w / max(nn[:, r].sum(), 1.0)),
                    "share": float(w / max(tot, 1.0)),
                    "factor_shard": float((a_local[:, r][:, sel] * kk[:, r]).sum() / max(w, 1.0)),
                    "factor_global": float((a_glob[:, r][:, sel] * kk[:, r]).sum() / max(w, 1.0)),
                }
            )
        res[k] = rows
    return res


def n_ok(g: dict[str, list[dict[str, float]]]) -> bool:
    return all(len(v) > 0 for v in g.values())


def old_runs_reread() -> dict[str, Any]:
    """Issue-11 runs (benchmarks/results/quality/runs): embedding vs all-parameter kept
    fraction from the per-row snapshots, and the same-sharding shard@4 - global@4 CI."""
    res: dict[str, Any] = {}
    if not OLD_RUNS.exists():
        return res
    fr: dict[str, list[float]] = {k: [] for k in KINDS}
    fr["all"] = []
    for p in sorted(OLD_RUNS.glob("cadamw_global_w1_s*.rows.npz")):
        d = np.load(p)
        names = [str(x) for x in d["names"]]
        shapes = d["shapes"]
        sizes = [int(s[0]) for s in shapes]  # rows (1-D: elements) per tensor
        width = [int(s[1]) for s in shapes]
        rows = d["rows"].astype(np.float64)  # (snapshots, sum of rows)
        off = np.cumsum([0, *sizes])
        kept_k: dict[str, float] = {k: 0.0 for k in KINDS}
        n_k: dict[str, float] = {k: 0.0 for k in KINDS}
        for i, nm in enumerate(names):
            k = kind_of(nm)
            kept_k[k] += rows[:, off[i] : off[i + 1]].sum()
            n_k[k] += rows.shape[0] * sizes[i] * width[i]
        for k in KINDS:
            fr[k].append(kept_k[k] / n_k[k])
        fr["all"].append(sum(kept_k.values()) / sum(n_k.values()))
    res["kept_fraction_cadamw_global (snapshots every 50 steps, seeds)"] = {
        k: ci(v) for k, v in fr.items()
    }
    diffs, ratios = [], []
    for s in (0, 1, 2):
        a, b = OLD_RUNS / f"cadamw_shard_w4_s{s}.csv", OLD_RUNS / f"cadamw_global_w4_s{s}.csv"
        if a.exists() and b.exists():
            diffs.append(final(read_csv(a), "val_loss") - final(read_csv(b), "val_loss"))
        ad, cd = OLD_RUNS / f"adamw_na_w1_s{s}.csv", OLD_RUNS / f"cadamw_global_w1_s{s}.csv"
        if ad.exists() and cd.exists():
            A, C = read_csv(ad), read_csv(cd)
            st, vl = zip(*C["val_loss"])
            reach = steps_to_reach(list(st), list(vl), final(A, "val_loss"))
            if reach:
                ratios.append(A["steps"] / reach)
    gaps: dict[int, list[float]] = {st: [] for st in (150, 250, 375, 500)}
    for s in (0, 1, 2):
        ad, cd = OLD_RUNS / f"adamw_na_w1_s{s}.csv", OLD_RUNS / f"cadamw_global_w1_s{s}.csv"
        if ad.exists() and cd.exists():
            A, C = dict(read_csv(ad)["val_loss"]), dict(read_csv(cd)["val_loss"])
            for st in gaps:
                if st in A and st in C:
                    gaps[st].append(C[st] - A[st])
    for st, v in gaps.items():
        res[f"CAdamW - AdamW(lr 3e-3, mult 1) val_loss at step {st} (issue 11)"] = ci(v)
    res["shard@4 - global@4 final val_loss (issue 11)"] = ci(diffs)
    res["in-schedule ratio CAdamW vs AdamW(lr 3e-3, mult 1) (issue 11)"] = ci(ratios)
    return res


def kind_of(name: str) -> str:
    if name.startswith("embed."):
        return "embed"
    if name.startswith("lm_head."):
        return "head"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    return "norm"


# ----------------------------------------------------------------------------- analysis


def analyze(out: Path = DEFAULT_OUT) -> dict[str, Any]:
    import study

    runs_planned, notes = study.plan(out)
    arms: dict[str, dict[int, str]] = {}
    for r in runs_planned:
        arms.setdefault(r.arm, {})[r.seed] = r.name
    data = load(out, {r.name for r in runs_planned})
    S: dict[str, Any] = {"notes": notes, "arms": {}, "finished": sorted(data)}
    md: list[str] = ["# Quality study (issue 20): summary", ""]
    md.append(f"{len(data)} of {len(study.unique(runs_planned))} planned runs finished. ")
    md += [f"- {n}" for n in notes] + [""]

    def finals(arm: str, col: str = "val_report") -> dict[int, float]:
        return {s: final(data[n], col) for s, n in arms.get(arm, {}).items() if n in data}

    def paired(a: str, b: str, col: str = "val_report") -> dict[str, Any]:
        fa, fb = finals(a, col), finals(b, col)
        seeds = sorted(set(fa) & set(fb))
        return ci([fa[s] - fb[s] for s in seeds]) | {"seeds": seeds}

    # sweep
    best, best_mult, table, _, _ = study.best_adamw(out)
    S["sweep_val_tune"] = table
    S["adamw_star"] = None if best is None else {"lr": best.lr, "embed_mult": best.embed_mult}
    md += ["## AdamW embedding-lr sweep (seed 0; selected on the tune split)", ""]
    md += ["| run | val_tune | val_report | val all (issue 11) |", "|---|---|---|---|"]
    seen: set[str] = set()
    for r in runs_planned:
        c0 = r.arm == "cadamw" and r.seed == 0  # C-AdamW at x1: its sweep's reference
        if (r.arm in ("sweep", "cadamw sweep") or c0) and r.name in data and r.name not in seen:
            seen.add(r.name)
            d = data[r.name]
            md.append(
                f"| {r.opt} lr {r.lr:g}, embedding x{r.embed_mult:g} | {final(d, 'val_tune'):.4f} | "
                f"{final(d):.4f} | {final(d, 'val_loss'):.4f} |"
            )
    md.append("")
    md.append(
        "selected (adamw*): "
        + ("pending" if best is None else f"lr {best.lr:g}, embedding x{best.embed_mult:g}")
    )
    md.append("")

    # arms' final losses
    md += ["## Final loss per arm (mean [95% CI])", ""]
    md += ["| arm | report split | all windows (issue 11) | seeds |", "|---|---|---|---|"]
    for arm in arms:
        if arm == "sweep":
            continue
        f, g = finals(arm), finals(arm, "val_loss")
        S["arms"][arm] = {"report": ci(list(f.values())), "all": ci(list(g.values()))}
        md.append(
            f"| {arm} | {fmt(ci(list(f.values())))} | {fmt(ci(list(g.values())))} | {sorted(f)} |"
        )
    md.append("")

    # C-AdamW vs adamw*: difference and ratio
    cmp: dict[str, Any] = {}
    for a, b, label in (
        ("cadamw", "adamw*", "T500"),
        ("cadamw*", "adamw*", "T500, both embedding-tuned"),
        ("cadamw T1500", "adamw* T1500", "T1500"),
        ("cadamw T3000", "adamw* T3000", "T3000"),
        ("cadamw tied", "adamw tied", "tied T500"),
    ):
        fa, fb = finals(a), finals(b)
        ratios, never = [], []
        for s in sorted(set(fa) & set(fb)):
            st, vl = zip(*data[arms[a][s]]["val_report"])
            reach = steps_to_reach(list(st), list(vl), fb[s])
            if reach:
                ratios.append(data[arms[b][s]]["steps"] / reach)
            else:
                never.append(s)  # C-AdamW never reached AdamW's final loss: ratio < 1
        cmp[label] = {
            "diff_report": paired(a, b),
            "diff_all": paired(a, b, "val_loss"),
            "in_schedule_ratio": ci(ratios),
            "seeds_not_reaching_adamw_final": never,
        }
    S["cadamw_vs_adamw"] = cmp
    md += ["## C-AdamW against AdamW (paired by seed, mean [95% CI])", ""]
    md += [
        "| schedule | final loss diff (report) | diff (all windows) | in-schedule ratio "
        "(seeds that reach AdamW's final loss) | seeds that never do |"
    ]
    md += ["|---|---|---|---|---|"]
    for k, v in cmp.items():
        md.append(
            f"| {k} | {fmt(v['diff_report'])} | {fmt(v['diff_all'])} | "
            f"{fmt(v['in_schedule_ratio'], 3)} | {v['seeds_not_reaching_adamw_final']} |"
        )
    md.append("")

    # the paired gap inside the schedule (30%, 50%, 75%, 100% of it)
    gap: dict[str, Any] = {}
    for a, b, label in (
        ("cadamw", "adamw*", "T500"),
        ("cadamw*", "adamw*", "T500, both embedding-tuned"),
        ("cadamw T1500", "adamw* T1500", "T1500"),
        ("cadamw T3000", "adamw* T3000", "T3000"),
        ("cadamw tied", "adamw tied", "tied T500"),
    ):
        row: dict[str, Any] = {}
        seeds = sorted(set(arms.get(a, {})) & set(arms.get(b, {})))
        seeds = [s for s in seeds if arms[a][s] in data and arms[b][s] in data]
        for fr in (0.3, 0.5, 0.75, 1.0):
            vals = []
            for s in seeds:
                A, B = dict(data[arms[a][s]]["val_report"]), dict(data[arms[b][s]]["val_report"])
                st = int(round(fr * data[arms[b][s]]["steps"]))
                if st in A and st in B:
                    vals.append(A[st] - B[st])
            row[f"{fr:g}"] = ci(vals)
        gap[label] = row
    S["gap_in_schedule"] = gap
    md += ["## C-AdamW - AdamW inside the schedule (report split, paired, mean [95% CI])", ""]
    md += ["| schedule | 30% | 50% | 75% | 100% |", "|---|---|---|---|---|"]
    for k, v in gap.items():
        md.append(f"| {k} | " + " | ".join(fmt(c) for c in v.values()) + " |")
    md.append("")

    # horizon: steps AdamW needs with its own schedule
    hz: dict[str, Any] = {}
    for tc in (500, 1500, 3000):
        c_arm = "cadamw" if tc == 500 else f"cadamw T{tc}"
        fc = finals(c_arm)
        ratios, bounds, capped = [], [], []
        for s, lc in fc.items():
            fa = {}
            for ta in (500, 1500, 3000):
                arm = "adamw*" if ta == 500 else f"adamw* T{ta}"
                if s in finals(arm):
                    fa[ta] = finals(arm)[s]
            if len(fa) < 2:
                continue
            need = schedule_steps_to_reach(fa, lc)
            if need is None:
                bounds.append(s)
            elif lc >= fa[min(fa)]:
                # AdamW's shortest schedule already reaches it: the ratio is at most
                # min(fa) / tc (shorter AdamW schedules were not run); left out of the mean
                capped.append(s)
            else:
                ratios.append(need / tc)
        hz[f"T{tc}"] = {
            "ratio": ci(ratios),
            "not_reached_by_longest_adamw_seeds": bounds,
            "reached_by_shortest_adamw_seeds": capped,
        }
    S["horizon"] = hz
    md += ["## Horizon: AdamW steps (own schedule) to C-AdamW's final loss / C-AdamW's steps", ""]
    md += [
        "| C-AdamW schedule | ratio | seeds AdamW did not reach within its longest schedule "
        "(ratio above the measured range) | seeds AdamW's 500-step schedule already reaches "
        "(ratio <= 500 / T) |"
    ]
    md += ["|---|---|---|---|"]
    for k, v in hz.items():
        md.append(
            f"| {k} | {fmt(v['ratio'], 3)} | {v['not_reached_by_longest_adamw_seeds']} | "
            f"{v['reached_by_shortest_adamw_seeds']} |"
        )
    md.append("")

    # per-tensor accounting
    pk: dict[str, Any] = {}
    for arm in ("cadamw", "adamw*", "cadamw tied", "cadamw T1500", "shard all@4", "global@4"):
        names = [n for n in arms.get(arm, {}).values() if n in data]
        if not names:
            continue
        total = data[names[0]]["steps"]
        # the first 10% of the schedule (warm-up), 10-50%, 50-100%
        for lo, hi in ((1, total // 10), (total // 10 + 1, total // 2), (total // 2 + 1, total)):
            vals = [per_kind(data[n], lo, hi) for n in names]
            vals = [v for v in vals if v]
            if vals:
                keys = vals[0].keys()
                pk[f"{arm} steps {lo}-{hi}"] = {
                    k: float(np.mean([v[k] for v in vals if k in v])) for k in keys
                } | {"seeds": len(vals)}
    S["per_kind"] = pk
    md += ["## Kept fraction / factor per tensor kind (mean over steps and seeds)", ""]
    md += ["| arm, steps | all | " + " | ".join(f"{k} kept / factor" for k in KINDS) + " |"]
    md += ["|---" * (2 + len(KINDS)) + "|"]
    for k, v in pk.items():
        cells = [
            f"{v.get('kept_' + kk, float('nan')):.3f} / {v.get('factor_' + kk, float('nan')):.2f}"
            for kk in KINDS
        ]
        md.append(
            f"| {k} (n={v['seeds']}) | {v.get('kept_fraction', float('nan')):.3f} | "
            + " | ".join(cells)
            + " |"
        )
    md.append("")
    sh = {}
    for w in (2, 4, 8):
        for s, n in arms.get(f"shard all@{w}", {}).items():
            if n in data:
                sh[f"w{w} s{s}"] = shard_embed_factor(out, n)
    S["shard_embed_factor_over_global_per_rank"] = sh
    if sh:
        md += ["Embedding factor per rank / the whole tensor's (geometric mean over steps):", ""]
        md += [f"- {k}: " + ", ".join(f"{x:.2f}" for x in v) for k, v in sh.items() if v]
        md.append("")

    ps: dict[str, Any] = {}
    for w in (2, 4, 8):
        got = [shard_per_kind(out, n) for s, n in sorted(arms.get(f"shard all@{w}", {}).items())]
        got = [g for g in got if g and n_ok(g)]
        if not got:
            continue
        ps[f"w{w}"] = {
            k: [
                {q: float(np.mean([g[k][r][q] for g in got])) for q in got[0][k][r]}
                for r in range(w)
            ]
            for k in got[0]
        } | {"seeds": len(got)}
    S["shard_all_per_kind_per_rank"] = ps
    if ps:
        md += [
            "### shard all: per tensor kind and rank (all steps, mean over seeds)",
            "",
            "kept fraction of the rank's pieces / its share of the kind's kept elements / "
            "kept-weighted factor with the piece's own counts (shard) / with the whole "
            "tensor's (global)",
            "",
        ]
        for wk, v in ps.items():
            w = int(wk[1:])
            md += [f"| {wk} (n={v['seeds']}) | " + " | ".join(f"rank {r}" for r in range(w)) + " |"]
            md += ["|---" * (w + 1) + "|"]
            for k in KINDS:
                if k in v:
                    md.append(
                        f"| {k} | "
                        + " | ".join(
                            f"{c['kept']:.3f} / {c['share']:.3f} / {c['factor_shard']:.2f} / "
                            f"{c['factor_global']:.2f}"
                            for c in v[k]
                        )
                        + " |"
                    )
            md.append("")

    # shard decomposed
    sd: dict[str, Any] = {}
    for w in (2, 4, 8):
        # the control: FSDP2's reduction order alone (same algorithm as single process)
        sd[f"global@{w} - single process"] = paired(f"global@{w}", "cadamw")
        sd[f"global@{w} - single process (all windows)"] = paired(
            f"global@{w}", "cadamw", "val_loss"
        )
        for arm in ("shard all", "shard dense", "shard embed"):
            sd[f"{arm}@{w} - global@{w}"] = paired(f"{arm}@{w}", f"global@{w}")
            sd[f"{arm}@{w} - global@{w} (all windows)"] = paired(
                f"{arm}@{w}", f"global@{w}", "val_loss"
            )
    S["shard_decomposed"] = sd
    md += ["## shard, decomposed: final loss minus global at the same world size", ""]
    md += ["| comparison | report split | all windows (issue 11) | seeds |", "|---|---|---|---|"]
    md += [
        f"| {k} | {fmt(v)} | {fmt(sd[k + ' (all windows)'])} | {v['seeds']} |"
        for k, v in sd.items()
        if not k.endswith("(all windows)")
    ]
    md.append("")

    # lag
    S["factor_lag1_minus_0"] = paired("cadamw lag1", "cadamw")
    md += ["## factor_lag=1 - factor_lag=0 (C-AdamW, single process)", ""]
    md += [fmt(S["factor_lag1_minus_0"]), ""]

    S["issue11_reread"] = old_runs_reread()
    md += ["## Issue-11 runs re-read", ""]
    for k, v in S["issue11_reread"].items():
        if "mean" in v or "n" in v and "values" in v:
            md.append(f"- {k}: {fmt(v)}")
        else:
            md.append(f"- {k}: " + ", ".join(f"{kk} {fmt(vv, 3)}" for kk, vv in v.items()))
    md.append("")
    S["wall_s_per_step"] = {
        n: round(d["elapsed_s"] / max(1, d["steps"]), 3) for n, d in sorted(data.items())
    }
    (out / "summary.json").write_text(json.dumps(S, indent=1))
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return S


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    import sys

    sys.path.insert(0, str(HERE))
    analyze(a.out.resolve())
    print((a.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
