"""The package's modules talk through public names only (issue 21), measured by
tools/shape_report.py; and the tool itself sees a crossing when there is one."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import shape_report  # noqa: E402


def test_no_private_name_of_the_project_crosses_modules() -> None:
    r = shape_report.report(None)
    assert r["private_crossing"] == [], shape_report.markdown(r)


def test_the_report_sees_a_crossing() -> None:
    a = ast.parse("class A:\n    def __init__(self):\n        self._given = {}\n")
    b = ast.parse("def f(opt):\n    return opt._given, opt._mine, self_like._init_group\n")
    assert "_given" in shape_report.definitions(a)
    used = {name for name, _, how in shape_report.uses(b)}
    assert {"_given", "_mine", "_init_group"} <= used
    imp = ast.parse("from .flat import _window, packed_offsets\n")
    assert [u[0] for u in shape_report.uses(imp)] == ["_window"]
