#!/usr/bin/env python
"""Summarise the quality runs of run_all.py: ``summary.json``, ``summary.md`` and PNGs.

    python benchmarks/quality/analyze.py [benchmarks/results/quality]

What it computes (docs/quality.md explains the choices):

- validation loss at fixed steps (25/50/75/100% of training), mean +- sample std over seeds;
- sample efficiency, per seed (paired: same seed = same initial weights and data order):
  AdamW's final validation loss is the target; ``ratio = T / S`` where ``S`` is the first step
  (linear interpolation between evaluations) at which the CAdamW run's validation loss reaches
  it. When the CAdamW run never reaches it, ``ratio = S_A / T`` with ``S_A`` the step at which
  AdamW reaches CAdamW's final loss (< 1). Mean +- std over seeds;
- the kept-mask fraction over training (all parameters, whole tensors), per configuration,
  and per rank's local shards for the shard runs;
- global vs shard: per seed final-loss differences (shard - global), against the seed noise;
- the shard factor: how far ``alpha_shard`` is from ``alpha_global`` in the shard runs
  (measured per step), and a fit of the per-shard kept-fraction deviation against the shard
  size on Shard(0) row blocks of the gathered per-row mask counts, used to extrapolate to
  64-1024 ranks on the LLaMA-60M/1B shapes.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality"
sys.path.insert(0, str(HERE.parent))
from portable import portable  # noqa: E402  (results files: no absolute paths)

CLAMP = 1e-3
LABELS = {
    ("adamw", "", 1): "AdamW",
    ("cadamw", "global", 1): "CAdamW global",
    ("cadamw", "shard", 2): "CAdamW shard@2",
    ("cadamw", "shard", 4): "CAdamW shard@4",
    ("cadamw", "global", 4): "CAdamW global@4 (FSDP2 control)",
}
EXTRAP_WORLDS = (64, 128, 256, 512, 1024)


def label(cfg: tuple[str, str, int]) -> str:
    return LABELS.get(cfg, f"{cfg[0]} {cfg[1]}@{cfg[2]}")


def run_name(opt: str, scale: str, world: int, seed: int) -> str:
    return f"{opt}_{scale or 'na'}_w{world}_s{seed}"


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, np.ndarray] = {}
    for k in rows[0]:
        vals = []
        for r in rows:
            v = r[k]
            try:
                vals.append(float(v) if v != "" else math.nan)
            except ValueError:
                vals.append(math.nan)
        cols[k] = np.array(vals)
    return cols


def val_curve(run: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ok = ~np.isnan(run["val_loss"])
    return run["step"][ok], run["val_loss"][ok]


def first_step_reaching(steps: np.ndarray, loss: np.ndarray, target: float) -> float | None:
    """First (linearly interpolated) step at which ``loss`` <= ``target``."""
    for i in range(len(loss)):
        if loss[i] <= target:
            if i == 0:
                return float(steps[0])
            s0, s1, l0, l1 = steps[i - 1], steps[i], loss[i - 1], loss[i]
            return float(s0 + (s1 - s0) * (l0 - target) / (l0 - l1)) if l0 != l1 else float(s1)
    return None


def mean_std(x: list[float]) -> dict[str, Any]:
    a = np.array([v for v in x if v is not None and not math.isnan(v)], dtype=float)
    if a.size == 0:
        return {"mean": None, "std": None, "n": 0, "values": list(x)}
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "n": int(a.size),
        "values": [float(v) for v in x],
    }


def pm(d: dict[str, Any], fmt: str = ".4f") -> str:
    if d.get("mean") is None:
        return "n/a"
    return f"{d['mean']:{fmt}} +- {d['std']:{fmt}}"


# ----------------------------------------------------------------------------- shard factor


def load_rows(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    d = np.load(path)
    shapes = [tuple(int(v) for v in s) for s in d["shapes"]]
    names = [str(n) for n in d["names"]]
    rows = d["rows"]
    offs = np.cumsum([0] + [s[0] for s in shapes])
    return {"steps": d["steps"], "rows": rows, "names": names, "shapes": shapes, "offs": offs}


def shard_blocks(rows: int, world: int) -> list[tuple[int, int]]:
    """Row ranges of torch.chunk(dim 0) / FSDP2 Shard(0): ceil(rows/world) rows per rank,
    the last ones short or empty."""
    c = math.ceil(rows / world)
    return [(min(r * c, rows), min((r + 1) * c, rows)) for r in range(world)]


def tensor_kind(name: str, shape: tuple[int, int]) -> str:
    if name.startswith("embed"):
        return "embed"
    return "norm" if shape[1] == 1 else "matrix"


def virtual_shards(rd: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (snapshot, tensor, virtual world W, shard): shard size and log(f_shard / f_tensor)."""
    out = []
    for si, step in enumerate(rd["steps"]):
        counts = rd["rows"][si]
        for ti, (name, shape) in enumerate(zip(rd["names"], rd["shapes"])):
            kind = tensor_kind(name, shape)
            rows, cols = shape
            per_row = counts[rd["offs"][ti] : rd["offs"][ti + 1]].astype(np.float64)
            f_t = per_row.sum() / (rows * cols)
            if f_t <= 0:
                continue
            w = 2
            while w <= rows:
                for a, b in shard_blocks(rows, w):
                    if b <= a:
                        continue
                    n = (b - a) * cols
                    f = per_row[a:b].sum() / n
                    out.append(
                        {
                            "step": int(step),
                            "tensor": name,
                            "kind": kind,
                            "world": w,
                            "n": n,
                            "f_t": f_t,
                            "f": f,
                            # log(alpha_shard / alpha_global) with the clamp formula
                            "logfactor": math.log(max(f_t, CLAMP) / max(f, CLAMP)),
                        }
                    )
                w *= 2
    return out


def fit_shard_deviation(points: list[dict[str, Any]]) -> dict[str, Any]:
    """RMS of log(alpha_shard/alpha_global) in bins of log2(shard size); power-law fit
    rms = c * n^(-gamma) over bins with >= 20 points, and the binomial reference
    sqrt((1 - f) / (f n)) (independent elements) at the mean kept fraction."""
    if not points:
        return {}
    n = np.array([p["n"] for p in points], dtype=float)
    lf = np.array([p["logfactor"] for p in points])
    kept = np.array([p["f"] for p in points]) > 0
    fbar = float(np.mean([p["f_t"] for p in points]))
    bins = []
    for e in range(int(np.floor(np.log2(n.min()))), int(np.ceil(np.log2(n.max()))) + 1):
        sel = (n >= 2**e) & (n < 2 ** (e + 1)) & kept
        if sel.sum() >= 20:
            bins.append(
                {
                    "n_lo": 2**e,
                    "n_mean": float(n[sel].mean()),
                    "rms_logfactor": float(np.sqrt(np.mean(lf[sel] ** 2))),
                    "p99_abs_logfactor": float(np.quantile(np.abs(lf[sel]), 0.99)),
                    "points": int(sel.sum()),
                    "binomial_rms": math.sqrt((1 - fbar) / (fbar * float(n[sel].mean()))),
                }
            )
    if len(bins) < 2:
        return {"bins": bins}
    x = np.log([b["n_mean"] for b in bins])
    y = np.log([b["rms_logfactor"] for b in bins])
    slope, icpt = np.polyfit(x, y, 1)
    return {
        "bins": bins,
        "fit": {"c": float(math.exp(icpt)), "gamma": float(-slope)},
        "mean_kept_fraction": fbar,
        "n_range": [float(n[kept].min()), float(n[kept].max())],
        "empty_kept_shards": int((~kept).sum()),
    }


def extrapolate(fit: dict[str, Any]) -> list[dict[str, Any]]:
    """Predicted RMS of log(alpha_shard / alpha_global) per tensor kind at 64-1024 ranks on
    the paper's LLaMA-60M and 1B shapes (Shard(0) row blocks), from the fitted power law."""
    if "fit" not in fit:
        return []
    sys.path.insert(0, str(ROOT / "launch"))
    from model import preset

    c, g = fit["fit"]["c"], fit["fit"]["gamma"]
    lo, hi = fit["n_range"]
    out = []
    for name in ("60m", "1b"):
        cfg = preset(name)
        h, i = cfg.hidden, cfg.intermediate
        kinds = {
            "attn q/k/v/o (h x h)": (h, h),
            "mlp gate/up (i x h)": (i, h),
            "mlp down (h x i)": (h, i),
            "lm_head (V x h)": (cfg.vocab, h),
        }
        for kind, (rows, cols) in kinds.items():
            for w in EXTRAP_WORLDS:
                nrows = math.ceil(rows / w)
                n = nrows * cols
                empty = sum(1 for a, b in shard_blocks(rows, w) if b <= a)
                rms = c * n ** (-g)
                out.append(
                    {
                        "model": name,
                        "tensor": kind,
                        "world": w,
                        "rows_per_shard": nrows,
                        "shard_elements": n,
                        "empty_shards": empty,
                        "pred_rms_logfactor": rms,
                        "pred_rms_factor_pct": 100 * (math.exp(rms) - 1),
                        "inside_measured_sizes": lo <= n <= hi,
                    }
                )
        out.append(
            {
                "model": name,
                "tensor": f"RMSNorm gain ({h})",
                "world": 1024,
                "rows_per_shard": math.ceil(h / 1024),
                "shard_elements": math.ceil(h / 1024),
                "empty_shards": sum(1 for a, b in shard_blocks(h, 1024) if b <= a),
                "pred_rms_logfactor": None,
                "pred_rms_factor_pct": None,
                "inside_measured_sizes": False,
            }
        )
    return out


# ----------------------------------------------------------------------------- main


def analyze(
    out: Path = DEFAULT_OUT,
    configs: tuple = tuple(LABELS),
    seeds: list[int] | None = None,
    command: str | None = None,
    sweep_configs: tuple = tuple(LABELS)[:2],
) -> dict[str, Any]:
    out = Path(out)
    runs_dir = out / "runs"
    runs: dict[tuple, dict[int, dict[str, np.ndarray]]] = {}
    metas: dict[str, Any] = {}
    for cfg in configs:
        runs[cfg] = {}
        for f in sorted(runs_dir.glob(f"{run_name(*cfg, seed=0)[:-1]}*.csv")):
            seed = int(f.stem.rsplit("_s", 1)[1])
            if seeds is not None and seed not in seeds:
                continue
            meta_path = f.with_suffix(".json")
            if not meta_path.exists():
                continue  # incomplete run
            runs[cfg][seed] = read_csv(f)
            metas[f.stem] = json.loads(meta_path.read_text())
    if not any(runs.values()):
        raise SystemExit(f"no complete runs under {runs_dir}")
    any_meta = next(iter(metas.values()))
    total = int(any_meta["hyper"]["steps"])
    fixed = sorted({max(1, round(total * q)) for q in (0.25, 0.5, 0.75, 1.0)})

    summary: dict[str, Any] = {
        "command": portable(
            command or (out / "command.txt").read_text().strip()
            if (out / "command.txt").exists()
            else None
        ),
        "corpus": any_meta["corpus"],
        "hyper": any_meta["hyper"],
        "model": any_meta["model"],
        "parameters": any_meta["parameters"],
        "torch": any_meta["torch"],
        "device": any_meta["device"],
        "clip": any_meta["args"]["clip"],
        "betas": any_meta["args"]["betas"],
        "weight_decay": any_meta["args"]["weight_decay"],
        "runs": {k: {"wall_s": m["wall_s"], "argv": portable(m["argv"])} for k, m in metas.items()},
        "configs": {},
    }
    corpora = {json.dumps(m["corpus"]["sha256"], sort_keys=True) for m in metas.values()}
    summary["same_corpus_in_all_runs"] = len(corpora) == 1

    adamw = runs.get(("adamw", "", 1), {})
    for cfg in configs:
        rs = runs[cfg]
        if not rs:
            continue
        c: dict[str, Any] = {"seeds": sorted(rs)}
        c["val_loss_at"] = {}
        for s in fixed:
            vals = []
            for seed in sorted(rs):
                st, vl = val_curve(rs[seed])
                vals.append(float(vl[st == s][0]) if (st == s).any() else math.nan)
            c["val_loss_at"][str(s)] = mean_std(vals)
        # kept fraction over training
        kf = {}
        for lo, hi in ((1, total // 10), (total // 10 + 1, total // 2), (total // 2 + 1, total)):
            vals = []
            for seed in sorted(rs):
                r = rs[seed]
                sel = (r["step"] >= lo) & (r["step"] <= hi)
                vals.append(float(np.nanmean(r["kept_fraction"][sel])))
            kf[f"{lo}-{hi}"] = mean_std(vals)
        c["kept_fraction"] = kf
        if cfg[2] > 1:
            per_rank = []
            for rk in range(min(cfg[2], 4)):
                per_rank.append(
                    mean_std([float(np.nanmean(rs[s][f"kept_rank{rk}"][1:])) for s in sorted(rs)])
                )
            c["kept_fraction_per_rank"] = per_rank
            c["shard_vs_global_factor"] = {
                k: mean_std([float(np.nanmean(rs[s][k][1:])) for s in sorted(rs)])
                for k in ("shard_frac_dev", "shard_logfactor_dev", "shard_logfactor_max")
            }
            c["shard_logfactor_max_over_run"] = mean_std(
                [float(np.nanmax(rs[s]["shard_logfactor_max"][1:])) for s in sorted(rs)]
            )
        # sample efficiency vs AdamW (paired by seed)
        if cfg[0] == "cadamw" and adamw:
            ratios, steps_to = [], []
            for seed in sorted(rs):
                if seed not in adamw:
                    continue
                sa, la = val_curve(adamw[seed])
                sc, lc = val_curve(rs[seed])
                s_c = first_step_reaching(sc, lc, float(la[-1]))
                if s_c is not None:
                    ratios.append(total / s_c)
                    steps_to.append(s_c)
                else:
                    s_a = first_step_reaching(sa, la, float(lc[-1]))
                    ratios.append((s_a if s_a is not None else math.nan) / total)
                    steps_to.append(math.nan)
            c["steps_to_adamw_final"] = mean_std(steps_to)
            c["sample_efficiency_ratio"] = mean_std(ratios)
            c["final_val_minus_adamw"] = mean_std(
                [
                    float(val_curve(rs[s])[1][-1] - val_curve(adamw[s])[1][-1])
                    for s in sorted(rs)
                    if s in adamw
                ]
            )
        summary["configs"][label(cfg)] = c

    # global vs shard, against seed noise
    glob = runs.get(("cadamw", "global", 1), {})
    gvs = {}
    for cfg in configs:
        if cfg[2] == 1 or cfg[0] != "cadamw" or not runs[cfg] or not glob:
            continue
        diffs = [
            float(val_curve(runs[cfg][s])[1][-1] - val_curve(glob[s])[1][-1])
            for s in sorted(runs[cfg])
            if s in glob
        ]
        d = mean_std(diffs)
        if d["n"] > 1 and d["std"] > 0:
            d["t_paired"] = d["mean"] / (d["std"] / math.sqrt(d["n"]))
        seed_std = mean_std([float(val_curve(glob[s])[1][-1]) for s in sorted(glob)])["std"]
        d["seed_std_global_final"] = seed_std
        d["abs_mean_over_seed_std"] = (
            abs(d["mean"]) / seed_std if seed_std and d["mean"] is not None else None
        )
        gvs[label(cfg)] = d
    # shard vs global under the same FSDP2 sharding (same reduction order): the factor alone
    same = {}
    for cfg in configs:
        ref = runs.get(("cadamw", "global", cfg[2]), {})
        if cfg[1] != "shard" or not runs[cfg] or not ref:
            continue
        d = mean_std(
            [
                float(val_curve(runs[cfg][s])[1][-1] - val_curve(ref[s])[1][-1])
                for s in sorted(runs[cfg])
                if s in ref
            ]
        )
        if d["n"] > 1 and d["std"] > 0:
            d["t_paired"] = d["mean"] / (d["std"] / math.sqrt(d["n"]))
        same[f"{label(cfg)} - {label(('cadamw', 'global', cfg[2]))}"] = d
    summary["shard_vs_global_same_world_final_val"] = same
    summary["global_vs_shard_final_val"] = gvs

    # shard-factor deviation: virtual Shard(0) blocks of the gathered per-row mask counts
    pts: list[dict[str, Any]] = []
    own: dict[int, list[dict[str, Any]]] = {}
    for cfg in configs:
        for seed in sorted(runs[cfg]):
            rd = load_rows(runs_dir / f"{run_name(*cfg, seed)}.rows.npz")
            if rd is None:
                continue
            vp = virtual_shards(rd)
            pts += vp
            if cfg[2] > 1:  # the shard run's own sharding, from its snapshots
                own.setdefault(cfg[2], []).extend(p for p in vp if p["world"] == cfg[2])

    def dev_stats(sel: list[dict[str, Any]]) -> dict[str, Any]:
        a = np.array([p["logfactor"] for p in sel if p["f"] > 0])
        if a.size == 0:
            return {"points": 0}
        return {
            "points": int(a.size),
            "zero_kept_shards": int(sum(1 for p in sel if p["f"] == 0)),
            "n_min": int(min(p["n"] for p in sel)),
            "n_max": int(max(p["n"] for p in sel)),
            "rms_logfactor": float(np.sqrt(np.mean(a**2))),
            "p99_abs_logfactor": float(np.quantile(np.abs(a), 0.99)),
            "max_abs_logfactor": float(np.abs(a).max()),
        }

    by_world: dict[str, Any] = {}
    for kind in ("matrix", "norm", "embed"):
        ws = sorted({p["world"] for p in pts if p["kind"] == kind})
        by_world[kind] = {
            str(w): dev_stats([p for p in pts if p["kind"] == kind and p["world"] == w])
            for w in ws
            if w <= 256
        }
    summary["shard_factor_by_world"] = by_world
    summary["shard_factor_own_runs"] = {
        str(w): {
            k: dev_stats([p for p in v if p["kind"] == k]) for k in ("matrix", "norm", "embed")
        }
        for w, v in own.items()
    }
    fit = fit_shard_deviation([p for p in pts if p["kind"] == "matrix"])
    summary["shard_factor_fit"] = fit
    summary["shard_factor_extrapolation"] = extrapolate(fit)

    summary["lr_sensitivity"] = lr_sensitivity(out, runs, sweep_configs, metas)

    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary, fixed))
    try:
        plots(out, runs, configs, fit)
    except ImportError as e:  # matplotlib is optional (dev/bench extras)
        print(f"analyze: no plots ({e})", file=sys.stderr)
    return summary


def lr_sensitivity(out: Path, runs: dict, sweep_configs: tuple, metas: dict) -> list[dict]:
    """Final validation loss per (optimizer, peak lr) on one seed: the table's runs at the
    preset's lr plus runs_lr/ at the other lrs."""
    rows: list[dict] = []
    folder = out / "runs_lr"
    files = sorted(folder.glob("*.csv")) if folder.exists() else []
    seeds_swept = set()
    for f in files:
        if not f.with_suffix(".json").exists():
            continue
        meta = json.loads(f.with_suffix(".json").read_text())
        a = meta["args"]
        cfg = (a["optimizer"], a["scale"] if a["optimizer"] == "cadamw" else "", a["world"])
        r = read_csv(f)
        rows.append(
            {
                "optimizer": label(cfg),
                "lr": meta["hyper"]["lr"],
                "seed": a["seed"],
                "final_val": float(val_curve(r)[1][-1]),
                "source": f"runs_lr/{f.name}",
            }
        )
        seeds_swept.add(a["seed"])
    for cfg in sweep_configs:
        for seed in sorted(seeds_swept):
            if seed in runs.get(cfg, {}):
                meta = metas[run_name(*cfg, seed)]
                rows.append(
                    {
                        "optimizer": label(cfg),
                        "lr": meta["hyper"]["lr"],
                        "seed": seed,
                        "final_val": float(val_curve(runs[cfg][seed])[1][-1]),
                        "source": f"runs/{run_name(*cfg, seed)}.csv",
                    }
                )
    return sorted(rows, key=lambda r: (r["optimizer"], r["lr"]))


def markdown(s: dict[str, Any], fixed: list[int]) -> str:
    hp = s["hyper"]
    L = [
        "# Quality: AdamW vs CAdamW (global / shard under FSDP2)",
        "",
        f"Command: `{s['command']}`  ",
        f"Device: {s['device']} (CPU; no GPU figure), torch {s['torch']}.  ",
        f"Model: {s['parameters']:,} parameters (hidden {s['model']['hidden']}, "
        f"{s['model']['layers']} layers, {s['model']['heads']} heads, intermediate "
        f"{s['model']['intermediate']}, byte vocabulary 256, seq {hp['seq_len']}), global batch "
        f"{hp['batch']} x {hp['seq_len']} bytes, {hp['steps']} steps, warm-up {hp['warmup']} "
        f"+ cosine to 10%, peak lr {hp['lr']}, betas {tuple(s['betas'])}, weight decay "
        f"{s['weight_decay']} (matrices), clip {s['clip']}; the same for every optimizer.  ",
        f"Corpus: Python {s['corpus']['python']} stdlib sources, train "
        f"{s['corpus']['bytes']['train']:,} B (sha256 {s['corpus']['sha256']['train'][:16]}...), "
        f"val {s['corpus']['bytes']['val']:,} B (sha256 {s['corpus']['sha256']['val'][:16]}...); "
        f"validation loss on {hp['eval_windows']} fixed held-out windows (nats per byte).",
        "",
        "## Validation loss at fixed steps (mean +- std over seeds)",
        "",
        "| optimizer | seeds | " + " | ".join(f"step {x}" for x in fixed) + " |",
        "|---|---|" + "---|" * len(fixed),
    ]
    for name, c in s["configs"].items():
        L.append(
            f"| {name} | {len(c['seeds'])} | "
            + " | ".join(pm(c["val_loss_at"][str(x)]) for x in fixed)
            + " |"
        )
    L += [
        "",
        "## Sample efficiency vs AdamW (paired by seed)",
        "",
        "ratio = T / (first step at which CAdamW's validation loss reaches AdamW's final one), "
        "interpolated between evaluations; < 1 means AdamW got there first (then "
        "ratio = AdamW's step to CAdamW's final loss / T).",
        "",
        "| optimizer | steps to AdamW's final val | ratio | final val - AdamW's |",
        "|---|---|---|---|",
    ]
    for name, c in s["configs"].items():
        if "sample_efficiency_ratio" in c:
            L.append(
                f"| {name} | {pm(c['steps_to_adamw_final'], '.0f')} | "
                f"{pm(c['sample_efficiency_ratio'], '.3f')} | {pm(c['final_val_minus_adamw'])} |"
            )
    L += [
        "",
        "## Kept-mask fraction (all parameters, mean over the step range, mean +- std over seeds)",
        "",
        "For AdamW: the fraction a cautious step would keep, `exp_avg * grad > 0`.",
        "",
    ]
    ranges = list(next(iter(s["configs"].values()))["kept_fraction"])
    L += ["| optimizer | " + " | ".join(f"steps {r}" for r in ranges) + " |"]
    L += ["|---|" + "---|" * len(ranges)]
    for name, c in s["configs"].items():
        L.append(
            f"| {name} | " + " | ".join(pm(c["kept_fraction"][r], ".3f") for r in ranges) + " |"
        )
    L += ["", "## global vs shard", ""]
    L += [
        "| FSDP2 run | final val - single-process global (per seed) | mean +- std | paired t | seed std of global |",
        "|---|---|---|---|---|",
    ]
    for name, d in s["global_vs_shard_final_val"].items():
        vals = ", ".join(f"{v:+.4f}" for v in d["values"])
        t = d.get("t_paired")
        L.append(
            f"| {name} | {vals} | {pm(d)} | {'n/a' if t is None else f'{t:+.2f}'} | "
            f"{d['seed_std_global_final']:.4f} |"
        )
    for name, d in s.get("shard_vs_global_same_world_final_val", {}).items():
        vals = ", ".join(f"{v:+.4f}" for v in d["values"])
        t = d.get("t_paired")
        L.append(
            f"| {name} (same sharding) | {vals} | {pm(d)} | "
            f"{'n/a' if t is None else f'{t:+.2f}'} | |"
        )
    L += [
        "",
        "Per-step deviation of the shard factor from the whole-tensor factor in the FSDP2 runs "
        "(for the global@4 control: the factor a shard step would have used; mean over steps; `logfactor` = |log(alpha_shard / alpha_global)| weighted by kept "
        "elements; `frac` = |f_shard - f_tensor| weighted by elements):",
        "",
        "| run | mean frac dev | mean logfactor dev | mean per-step max logfactor | max over run | kept fraction per rank |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in s["configs"].items():
        if "shard_vs_global_factor" in c:
            f = c["shard_vs_global_factor"]
            ranks = ", ".join(f"{d['mean']:.3f}" for d in c["kept_fraction_per_rank"])
            L.append(
                f"| {name} | {pm(f['shard_frac_dev'])} | {pm(f['shard_logfactor_dev'])} | "
                f"{pm(f['shard_logfactor_max'], '.3f')} | {pm(c['shard_logfactor_max_over_run'], '.3f')} | {ranks} |"
            )
    fit = s["shard_factor_fit"]
    if fit.get("fit"):
        L += [
            "",
            "## Shard-size model and extrapolation",
            "",
            "Every run's per-row mask counts at its snapshots are cut into the Shard(0) row "
            "blocks of W = 2, 4, ..., rows virtual ranks (2-D weights but the embedding, whose "
            "rows are tokens, see below). RMS of log(alpha_shard/alpha_global) by shard size n, fit "
            f"rms = c n^-gamma: c = {fit['fit']['c']:.3g}, gamma = {fit['fit']['gamma']:.3f} "
            f"(independent elements would give gamma = 0.5); measured n from "
            f"{fit['n_range'][0]:.0f} to {fit['n_range'][1]:.0f}.",
            "",
            "| shard size n (bin) | points | rms logfactor | p99 abs logfactor | binomial rms |",
            "|---|---|---|---|---|",
        ]
        for b in fit["bins"]:
            L.append(
                f"| {b['n_lo']}-{2 * b['n_lo'] - 1} | {b['points']} | {b['rms_logfactor']:.4f} | "
                f"{b['p99_abs_logfactor']:.4f} | {b['binomial_rms']:.4f} |"
            )
        L += [
            "",
            "Predicted RMS deviation of the shard factor from the global one at 64-1024 ranks "
            "(Shard(0) row blocks of the paper's shapes; a model fitted on a 0.87M-parameter "
            "byte model, not a measurement at scale):",
            "",
            "| model | tensor | world | rows/shard | elements/shard | empty shards | predicted rms deviation |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in s["shard_factor_extrapolation"]:
            pred = (
                "n/a (a few elements: factor in {1, 2, ...}, see text)"
                if e["pred_rms_factor_pct"] is None
                else f"{e['pred_rms_factor_pct']:.2f}%"
                + ("" if e["inside_measured_sizes"] else " (outside measured n)")
            )
            L.append(
                f"| {e['model']} | {e['tensor']} | {e['world']} | {e['rows_per_shard']} | "
                f"{e['shard_elements']:,} | {e['empty_shards']} | {pred} |"
            )
    bw = s.get("shard_factor_by_world", {})
    if bw:
        L += [
            "",
            "### Shard factor vs world size (Shard(0) row blocks of the snapshots)",
            "",
            "|log(alpha_shard / alpha_global)| per shard, over every run's snapshots (virtual "
            "worlds), and in brackets over the shard@W runs' own snapshots where W is 2 or 4. "
            "`matrix`: all 2-D weights but the embedding; `norm`: RMSNorm gains (1-D); `embed`: "
            "the embedding (rows = byte values; bytes absent from a batch give zero-gradient "
            "rows, which the mask drops).",
            "",
            "| tensors | W | elements/shard | rms | p99 | max | shards keeping nothing |",
            "|---|---|---|---|---|---|---|",
        ]
        own = s.get("shard_factor_own_runs", {})
        for kind, tab in bw.items():
            for w, d in tab.items():
                if not d.get("points"):
                    continue
                o = own.get(w, {}).get(kind)
                extra = f" ({o['rms_logfactor']:.4f})" if o and o.get("points") else ""
                L.append(
                    f"| {kind} | {w} | {d['n_min']}-{d['n_max']} | {d['rms_logfactor']:.4f}{extra} | "
                    f"{d['p99_abs_logfactor']:.4f} | {d['max_abs_logfactor']:.4f} | "
                    f"{d['zero_kept_shards']} |"
                )
    if s.get("lr_sensitivity"):
        L += [
            "",
            "## Learning-rate sensitivity (one seed, final validation loss)",
            "",
            "| optimizer | peak lr | seed | final val | run |",
            "|---|---|---|---|---|",
        ]
        for r in s["lr_sensitivity"]:
            L.append(
                f"| {r['optimizer']} | {r['lr']:g} | {r['seed']} | {r['final_val']:.4f} | "
                f"`{r['source']}` |"
            )
    L += ["", "Runs (wall seconds on a shared 2-core CPU, nice 19; not a speed figure):", ""]
    L += [f"- `{k}`: {v['wall_s']} s" for k, v in sorted(s["runs"].items())]
    return "\n".join(L) + "\n"


def plots(out: Path, runs: dict, configs: tuple, fit: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for cfg in configs:
        rs = runs[cfg]
        if not rs:
            continue
        st = val_curve(next(iter(rs.values())))[0]
        v = np.array([val_curve(r)[1] for r in rs.values()])
        m, sd = v.mean(0), v.std(0, ddof=1) if len(rs) > 1 else np.zeros(v.shape[1])
        for ax in axes[:2]:
            ax.plot(st, m, label=f"{label(cfg)} (n={len(rs)})")
            ax.fill_between(st, m - sd, m + sd, alpha=0.2)
        tr = np.array([r["train_loss"][1:] for r in rs.values()]).mean(0)
        k = 20
        sm = np.convolve(tr, np.ones(k) / k, mode="valid")
        axes[2].plot(np.arange(k, k + sm.size), sm, label=label(cfg))
    axes[0].set_title("validation loss (mean +- std over seeds)")
    axes[1].set_title("validation loss, second half")
    total = max(int(r["step"].max()) for rs in runs.values() for r in rs.values())
    axes[1].set_xlim(total // 2, total)
    lo = min(float(np.nanmin(val_curve(r)[1])) for rs in runs.values() for r in rs.values() if rs)
    axes[1].set_ylim(lo - 0.02, lo + 0.35)
    axes[2].set_title("train loss (mean over seeds, 20-step moving average)")
    axes[2].set_ylim(top=3.0)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for cfg in configs:
        rs = runs[cfg]
        if not rs:
            continue
        kf = np.array([r["kept_fraction"][1:] for r in rs.values()]).mean(0)
        axes[0].plot(np.arange(1, kf.size + 1), kf, lw=0.8, label=label(cfg))
        if cfg[2] > 1:
            r0 = next(iter(rs.values()))
            for rk in range(min(cfg[2], 4)):
                axes[1].plot(r0[f"kept_rank{rk}"][1:], lw=0.6, label=f"{label(cfg)} rank {rk}")
    axes[0].set_title("kept-mask fraction, all parameters (mean over seeds)")
    axes[1].set_title("kept fraction of each rank's local shards (first seed)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kept_fraction.png", dpi=110)
    plt.close(fig)

    if fit.get("fit"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        nb = np.array([b["n_mean"] for b in fit["bins"]])
        ax.loglog(nb, [b["rms_logfactor"] for b in fit["bins"]], "o", label="measured (rms)")
        ax.loglog(nb, [b["p99_abs_logfactor"] for b in fit["bins"]], "^", label="measured (p99)")
        ax.loglog(nb, [b["binomial_rms"] for b in fit["bins"]], ":", label="independent elements")
        nn = np.logspace(np.log10(nb.min()), np.log10(max(nb.max(), 2.2e6)), 50)
        c, g = fit["fit"]["c"], fit["fit"]["gamma"]
        ax.loglog(nn, c * nn ** (-g), "-", label=f"fit {c:.2g} n^-{g:.2f}")
        ax.set_xlabel("shard size n (elements)")
        ax.set_ylabel("|log(alpha_shard / alpha_global)|")
        ax.set_title("per-shard factor deviation vs shard size (Shard(0) row blocks)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "shard_factor.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    analyze(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
