#!/usr/bin/env python
"""Results files name no absolute path of the machine that wrote them.

:func:`portable` rewrites a string (or every string inside a JSON-like object): paths in
this repository become repository-relative (``launch/bench.py``), the interpreter becomes
``python``, installed packages ``<site-packages>/...``, a temporary export of the library
(``benchmarks/quality/run_all.py --library-rev``) ``<library export>``, other temporary
directories ``<tmp>``, the home directory ``~``. The writers under ``benchmarks/`` pass what
they store through it.

    python benchmarks/portable.py --check             # exit 1 listing files with such paths
    python benchmarks/portable.py --rewrite           # rewrite benchmarks/results in place

``--rewrite`` also maps the paths of machines that wrote the existing files (``/work/main``
as the repository, ``/root/.pyenv/...`` as the interpreter, ``/root/out`` as ``out``).
"""

from __future__ import annotations

import argparse
import os
import re
import site
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# what tests/unit/test_portable_results.py and --check look for
ABSOLUTE = re.compile(r"(^|[^A-Za-z0-9_.])/(work|root|tmp|home)/")
TEXT_SUFFIXES = {".json", ".md", ".txt", ".csv", ".log"}


def _rules() -> list[tuple[re.Pattern, str]]:
    rules: list[tuple[str, str]] = []
    lib = os.environ.get("QUALITY_LIB_ROOT")
    if lib:
        rules.append((re.escape(str(Path(lib).resolve())), "<library export>"))
    # the interpreter first (a venv may live inside the repository), then the repository
    # as a whole path component only (/tmp/ci must not eat the /tmp/ci of /tmp/civenv)
    for exe in {sys.executable, os.path.realpath(sys.executable)}:
        rules.append((re.escape(exe) + r"(?![\w.])", "python"))
    rules.append((re.escape(str(ROOT)) + r"(?:/|(?![\w.-]))", ""))
    sites = {*site.getsitepackages(), sysconfig.get_paths()["purelib"], site.getusersitepackages()}
    for s in sorted(sites, key=len, reverse=True):
        rules.append((re.escape(s), "<site-packages>"))
    rules.append((re.escape(sys.prefix), "<python>"))
    rules.append((re.escape(tempfile.gettempdir()) + r"/quality_lib_\w+", "<library export>"))
    rules.append((re.escape(tempfile.gettempdir()) + r"/[^\s\"'`,;:)]*", "<tmp>"))
    rules.append((re.escape(str(Path.home())), "~"))
    return [(re.compile(p), r) for p, r in rules]


# paths of the machines that wrote the files before the writers used portable()
_LEGACY = [
    (r"/tmp/quality_lib_\w+", "<library export>"),
    (r"/work/main/?", ""),
    (r"/root/\.pyenv/versions/[^/\s\"]+/bin/python[0-9.]*(?![\w.])", "python"),
    (r"/root/\.pyenv/versions/[^/\s\"]+/lib/python3\.\d+/site-packages", "<site-packages>"),
    (r"/root/\.pyenv/versions/[^/\s\"]+", "<python>"),
    (r"/root/out/", "out/"),
    (r"/tmp/[^\s\"'`,;:)]*", "<tmp>"),
]


def portable(obj: Any, legacy: bool = False) -> Any:
    """``obj`` with absolute machine paths replaced (strings, and lists / dicts of them)."""
    if isinstance(obj, str):
        if legacy:  # the old machines' exact paths first: the generic rules below would
            for pat, rep in _LEGACY:  # turn /root/.pyenv/.../python into ~/.pyenv/...
                obj = re.sub(pat, rep, obj)
        for pat, rep in _rules():
            obj = pat.sub(rep, obj)
        return obj
    if isinstance(obj, dict):
        return {k: portable(v, legacy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v, legacy) for v in obj)
    return obj


def offending(root: Path = RESULTS) -> list[Path]:
    """Text files under ``root`` that still name an absolute path."""
    out = []
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix in TEXT_SUFFIXES:
            if ABSOLUTE.search(f.read_text(errors="replace")):
                out.append(f)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--rewrite", action="store_true")
    ap.add_argument("root", nargs="?", type=Path, default=RESULTS)
    a = ap.parse_args()
    if a.rewrite:
        for f in offending(a.root):
            f.write_text(portable(f.read_text(), legacy=True))
            print(f"rewrote {f.relative_to(ROOT)}")
    bad = offending(a.root)
    for f in bad:
        print(f"absolute path in {f.relative_to(ROOT)}", file=sys.stderr)
    return 1 if bad and (a.check or a.rewrite) else 0


if __name__ == "__main__":
    raise SystemExit(main())
