#!/usr/bin/env python
"""The C-AdamW paper's 2-D toy (arXiv 2411.16085, Fig. 2): ``L(w) = 4 w1^2 + w2^2`` from
``w0 = (1, 1)``, gradient descent with heavy-ball momentum vs its cautious version.

Momentum (PyTorch SGD's form)::

    g = grad L(w) = (8 w1, 2 w2)        m <- beta m + g        w <- w - lr * u

plain: ``u = m``; cautious: ``u = phi * mask * m`` with ``mask = (m * g > 0)`` (the update's
sign agrees with the current gradient's) and, with N = 2 coordinates, the rescaling

- ``"clamp"`` (``dist_cautious.CAdamW``'s default): ``phi = N / max(nnz(mask), 1e-3 N)``,
- ``"paper"``: ``phi = N / (nnz(mask) + 1)`` (the paper's code; 2/3 when nothing is masked),
- ``"none"``: ``phi = 1`` (the bare mask of the paper's theory).

(The EMA form ``m <- beta m + (1 - beta) g`` is the same with ``lr / (1 - beta)``: the mask
does not depend on the scale of ``m``.) Everything is float64 numpy and deterministic.

    python benchmarks/quality/toy.py     # writes benchmarks/results/quality/toy.{png,json,md}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CURVATURE = np.array([8.0, 2.0])  # Hessian diagonal of L(w) = 4 w1^2 + w2^2
W0 = (1.0, 1.0)
TOL = 1e-6
FORMULAS = ("clamp", "paper", "none")
# The settings tests/unit/test_toy.py asserts on: strong momentum, lr from small to large.
SETTINGS = tuple((lr, beta) for lr in (0.003, 0.01, 0.03, 0.1) for beta in (0.8, 0.9, 0.95, 0.99))
# The wider grid toy.md reports (includes settings where the claim does not hold).
GRID_LR = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2)
GRID_BETA = (0.5, 0.8, 0.9, 0.95, 0.99)
OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "quality"


def loss(w: np.ndarray) -> float:
    return float(4.0 * w[0] ** 2 + w[1] ** 2)


@dataclass
class Trajectory:
    ws: np.ndarray  # (steps + 1, 2) iterates, w0 first
    losses: np.ndarray  # (steps + 1,)
    mask_acts: int  # steps where the mask dropped at least one coordinate
    steps_to_tol: int | None  # first step with loss < tol (None: not within max_steps)
    diverged: bool = False
    extra: dict = field(default_factory=dict)


def run(
    lr: float,
    beta: float,
    cautious: bool,
    formula: str = "clamp",
    max_steps: int = 5000,
    tol: float = TOL,
    stop_at_tol: bool = True,
) -> Trajectory:
    if formula not in FORMULAS:
        raise ValueError(f"formula {formula!r}: use one of {FORMULAS}")
    w = np.array(W0, dtype=np.float64)
    m = np.zeros(2)
    ws, losses = [w.copy()], [loss(w)]
    acts, hit, diverged = 0, None, False
    n = w.size
    for t in range(1, max_steps + 1):
        g = CURVATURE * w
        m = beta * m + g
        if cautious:
            mask = (m * g > 0).astype(np.float64)
            nnz = mask.sum()
            acts += int(nnz < n)
            if formula == "clamp":
                phi = n / max(nnz, 1e-3 * n)
            elif formula == "paper":
                phi = n / (nnz + 1)
            else:
                phi = 1.0
            u = phi * mask * m
        else:
            u = m
        w = w - lr * u
        ws.append(w.copy())
        losses.append(loss(w))
        if hit is None and losses[-1] < tol:
            hit = t
            if stop_at_tol:
                break
        if not np.isfinite(losses[-1]) or losses[-1] > 1e12:
            diverged = True
            break
    return Trajectory(np.array(ws), np.array(losses), acts, hit, diverged)


def grid() -> list[dict]:
    rows = []
    for lr in GRID_LR:
        for beta in GRID_BETA:
            row = {"lr": lr, "beta": beta, "plain": run(lr, beta, False).steps_to_tol}
            for f in FORMULAS:
                tr = run(lr, beta, True, f)
                row[f] = tr.steps_to_tol
                row[f"{f}_mask_acts"] = tr.mask_acts
            rows.append(row)
    return rows


def _fmt(x: int | None) -> str:
    return "-" if x is None else str(x)


def write_report(out: Path = OUT) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = grid()
    slower = {
        f: [(r["lr"], r["beta"]) for r in rows if (r[f] or 10**9) > (r["plain"] or 10**9)]
        for f in FORMULAS
    }
    lines = [
        "# 2-D toy: heavy-ball momentum vs cautious momentum",
        "",
        "`L(w) = 4 w1^2 + w2^2`, `w0 = (1, 1)`, `m <- beta m + g`, `w <- w - lr u`; steps until "
        f"`L < {TOL:g}` (max 5000; `-` = not reached). Written by `python benchmarks/quality/toy.py`.",
        "",
        "| lr | beta | plain | cautious clamp | cautious paper | cautious none |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lr']} | {r['beta']} | {_fmt(r['plain'])} | "
            + " | ".join(_fmt(r[f]) for f in FORMULAS)
            + " |"
        )
    lines += ["", "Settings where the cautious variant is slower than plain momentum:", ""]
    for f in FORMULAS:
        lines.append(f"- `{f}`: {slower[f] if slower[f] else 'none'}")
    (out / "toy.md").write_text("\n".join(lines) + "\n")
    result = {"tol": TOL, "w0": W0, "grid": rows, "slower": slower, "settings": SETTINGS}
    (out / "toy.json").write_text(json.dumps(result, indent=1))
    plot(out / "toy.png")
    return result


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(0.01, 0.9), (0.03, 0.95), (0.1, 0.9), (0.2, 0.8)]
    fig, axes = plt.subplots(2, len(shown), figsize=(4.2 * len(shown), 7.5))
    x1, x2 = np.meshgrid(np.linspace(-1.2, 1.2, 200), np.linspace(-1.2, 1.2, 200))
    for j, (lr, beta) in enumerate(shown):
        plain = run(lr, beta, False, max_steps=300, stop_at_tol=False)
        caut = run(lr, beta, True, "clamp", max_steps=300, stop_at_tol=False)
        ax = axes[0, j]
        ax.contour(x1, x2, 4 * x1**2 + x2**2, levels=12, colors="0.8", linewidths=0.7)
        ax.plot(plain.ws[:80, 0], plain.ws[:80, 1], ".-", ms=3, lw=0.8, label="momentum")
        ax.plot(caut.ws[:80, 0], caut.ws[:80, 1], ".-", ms=3, lw=0.8, label="cautious")
        ax.set_title(f"lr={lr}, beta={beta}")
        ax.set_aspect("equal")
        ax.set_xlabel("w1")
        if j == 0:
            ax.set_ylabel("w2")
            ax.legend(loc="lower left", fontsize=8)
        ax = axes[1, j]
        ax.semilogy(np.maximum(plain.losses, 1e-300), label="momentum")
        ax.semilogy(np.maximum(caut.losses, 1e-300), label="cautious (clamp)")
        ax.axhline(TOL, color="0.5", ls=":", lw=0.8)
        ax.set_ylim(1e-12, 10)
        ax.set_xlabel("step")
        if j == 0:
            ax.set_ylabel("L(w)")
            ax.legend(fontsize=8)
    fig.suptitle(
        "L = 4 w1^2 + w2^2 from (1, 1): heavy-ball momentum vs cautious (first 80 iterates)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    res = write_report()
    print((OUT / "toy.md").read_text())
