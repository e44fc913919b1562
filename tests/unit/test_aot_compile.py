"""Every Triton kernel of dist_cautious.kernels compiles for sm_80 and sm_90, without a GPU.

The Triton interpreter (what the other Triton tests run) accepts code that the GPU compiler
rejects, so the kernels are also compiled ahead of time for real targets:
``benchmarks/aot_kernels.py`` lowers every variant the dispatcher can choose (pairwise
covering set of its constexpr axes, see that file) to PTX and a cubin with
``triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32))`` and runs ``ptxas -v``
(Triton's own binary for the target) on it. The run fails on a compile error, a ptxas
failure, or a register spill in an update kernel (``KNOWN_SPILLS`` in that file: one 4-byte
spill in the masked path's tile loop setup of one 16-bit mixed-dtype AdamW variant on sm_90, there
before and after the kernel refactor, allowed at exactly that size). It runs in a subprocess without
``TRITON_INTERPRET`` (Triton fixes the mode at import).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "aot_kernels.py"


def _script():
    spec = importlib.util.spec_from_file_location("aot_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def aot() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--json-only", "--jobs", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.stdout.strip(), f"aot_kernels.py printed nothing (exit {r.returncode}):\n{r.stderr}"
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    doc["returncode"] = r.returncode
    return doc


def test_every_variant_compiles_without_spills(aot: dict) -> None:
    assert aot["failures"] == [], "\n".join(aot["failures"])
    assert aot["returncode"] == 0
    res = aot["results"]
    assert len(res) == 2 * aot["meta"]["variants"]
    known = _script().KNOWN_SPILLS  # see KNOWN_SPILLS there
    for r in res:
        # Triton's own ptxas for the target: the legacy one rejects the PTX emitted for sm_90
        assert r["ptxas"] == ("ptxas" if r["arch"] == 80 else "ptxas-blackwell"), r
        assert r["ptxas_rc"] == 0 and 0 < r["regs"] <= 255, r
        if r["update"]:  # an update kernel (the one-pass ones too: they write p)
            allowed = known.get((r["key"], r["arch"]), 0)
            assert r["spill_st"] <= allowed and r["spill_ld"] <= allowed, r


def test_every_kernel_and_axis_value_is_compiled(aot: dict) -> None:
    """Each (optimizer, pass) kernel and each value of each of its dispatcher axes (flags,
    dtypes, launch configurations) appears in a compiled variant, for both targets."""
    mod = _script()
    spaces = {}
    for sp in mod._specs("ci"):
        name, rest = sp["key"].split("[", 1)
        spaces.setdefault(name, []).append(rest)
    assert set(spaces) == {
        f"{o}.{p}" for o in ("adamw", "lion", "sgd") for p in ("count", "update")
    } | {"adamw.onepass", "lion.onepass"}  # the factor_lag=1 step in one launch
    # the one-pass kernels write p: held to the update kernels' no-spill rule
    assert all(r["update"] for r in aot["results"] if ".onepass[" in r["key"])
    compiled = {(r["key"], r["arch"]) for r in aot["results"] if "regs" in r}
    for key in {r["key"] for r in aot["results"]}:
        assert (key, 80) in compiled and (key, 90) in compiled, key
    for name, keys in spaces.items():
        for dt in ("fp32", "bf16", "fp16"):
            assert any(f"s:{dt}" in k for k in keys), (name, dt)
            assert any(f"g:{dt}" in k for k in keys), (name, dt)
        for cfg in ("default", "tests"):
            assert any(k.endswith(f";{cfg}]") for k in keys), (name, cfg)


def test_pairwise_set_covers_every_pair() -> None:
    mod = _script()
    axes = [("a", (0, 1)), ("b", ("x", "y", "z")), ("c", (False, True)), ("d", (1, 2, 3))]
    rows = mod._pairwise(axes)
    assert len(rows) < len(mod._full(axes))
    for (na, va), (nb, vb) in itertools.combinations(axes, 2):
        for x, y in itertools.product(va, vb):
            assert any(r[na] == x and r[nb] == y for r in rows), (na, x, nb, y)


def test_occupancy_from_registers() -> None:
    occ = _script().occupancy
    # 32 regs/thread: 1024 per warp, 64 warps fit the 64K register file (the SM's limit)
    assert occ(32, 8) == {"warps_per_sm": 64, "occupancy": 1.0}
    # 96 regs/thread: 3072 per warp, 21 warps by registers, whole programs of 8: 16
    assert occ(96, 8) == {"warps_per_sm": 16, "occupancy": 0.25}
    # 255 regs -> 256 per thread after rounding: 8 warps by registers
    assert occ(255, 4) == {"warps_per_sm": 8, "occupancy": 0.125}
