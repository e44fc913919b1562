"""Results files under benchmarks/results name no absolute path of the machine that wrote
them (issue 18): the writers pass what they store through benchmarks/portable.py."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from portable import ABSOLUTE, offending, portable  # noqa: E402


def test_results_files_carry_no_absolute_paths():
    bad = [str(f.relative_to(ROOT)) for f in offending()]
    assert not bad, f"absolute paths in {bad}: run python benchmarks/portable.py --rewrite"


def test_portable_maps_this_machines_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("QUALITY_LIB_ROOT", str(tmp_path / "export"))
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "quality" / "train.py"),
        "--out",
        str(ROOT / "benchmarks" / "results" / "x.csv"),
        str(tmp_path / "export" / "dist_cautious" / "__init__.py"),
        str(Path(__import__("torch").__file__)),
    ]
    got = portable({"argv": argv, "n": 3})
    assert got["n"] == 3
    assert got["argv"][:4] == [
        "python",
        "benchmarks/quality/train.py",
        "--out",
        "benchmarks/results/x.csv",
    ]
    assert got["argv"][4] == "<library export>/dist_cautious/__init__.py"
    assert got["argv"][5].startswith("<site-packages>/torch/") or got["argv"][5].startswith("~")
    assert not any(ABSOLUTE.search(" " + a) for a in got["argv"]), got
    legacy = portable("/root/.pyenv/versions/3.11.7/bin/python /work/main/launch/bench.py", True)
    assert legacy == "python launch/bench.py"
