"""The shape of the code, measured: module and class sizes, private names crossing modules.

Used for issue 21's before/after figures (docs/architecture.md). Reads files as text and
AST; imports nothing of the project. ``python tools/shape_report.py [--rev REV] [--json]``
(``--rev`` reads the tree of a git revision instead of the working tree).

A *private name crossing modules* is a leading-underscore name (not a dunder) defined in
one project module (``def _x``, ``class _X``, a module-level ``_X = ...`` or an attribute
``self._x = ...``) and used in another: imported (``from .a import _x``) or read as an
attribute on anything but ``self``/``cls`` (``opt._given``). Names of third-party internals
(``fp._numels`` of torch) are counted apart, as ``foreign``: a name used as ``obj._x`` that
no project module defines.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dist_cautious"
AREAS = ("dist_cautious", "launch", "tests", "benchmarks")
# Underscore names that are torch's conventions, not the project's privates: dynamo runs a
# method named ``_init_group`` of an optimizer eagerly instead of tracing it
# (torch/_dynamo/variables/optimizer.py), so the name is part of torch's contract.
TORCH_CONVENTIONS = frozenset({"_init_group"})


def files(rev: str | None) -> dict[str, str]:
    if rev is None:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", *AREAS],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
        ).stdout.split()  # fmt: skip
        return {f: (ROOT / f).read_text() for f in out if f.endswith(".py") and (ROOT / f).exists()}
    out = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, *AREAS],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    return {
        f: subprocess.run(
            ["git", "show", f"{rev}:{f}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout  # fmt: skip
        for f in out
        if f.endswith(".py")
    }


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def definitions(tree: ast.AST) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out.add(n.id)
                    elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                        if n.value.id in ("self", "cls"):
                            out.add(n.attr)
    return {n for n in out if private(n)}


def uses(tree: ast.AST) -> list[tuple[str, int, str]]:
    """(name, line, how) for private names this module takes from elsewhere."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level or (node.module or "").startswith(PACKAGE)
        ):
            for a in node.names:
                if private(a.name):
                    out.append(
                        (a.name, node.lineno, f"from {'.' * node.level}{node.module or ''} import")
                    )
        elif isinstance(node, ast.Attribute) and private(node.attr):
            v = node.value
            if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            out.append((node.attr, node.lineno, "attribute"))
    return out


def report(rev: str | None) -> dict:
    src = files(rev)
    trees = {}
    for f, text in src.items():
        try:
            trees[f] = ast.parse(text)
        except SyntaxError:
            continue
    defined: dict[str, set[str]] = defaultdict(set)  # name -> modules of the package defining it
    for f, t in trees.items():
        if f.startswith(PACKAGE + "/"):
            for n in definitions(t):
                defined[n].add(f)
    crossing, foreign = [], []
    for f, t in trees.items():
        if not f.startswith((PACKAGE + "/", "launch/")):
            continue
        own = definitions(t)
        for name, line, how in uses(t):
            if name in own and how == "attribute":
                continue  # its own private name (another instance of its own class, say)
            if name in defined and name not in TORCH_CONVENTIONS:
                crossing.append(dict(module=f, line=line, name=name, how=how,
                                     defined_in=sorted(defined[name])))  # fmt: skip
            elif how == "attribute":
                foreign.append(dict(module=f, line=line, name=name))
    modules = sorted(((len(src[f].splitlines()), f) for f in trees), reverse=True)
    classes = []
    for f, t in trees.items():
        for node in ast.walk(t):
            if isinstance(node, ast.ClassDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                methods = sum(
                    isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) for b in node.body
                )
                classes.append(dict(module=f, name=node.name, lines=n, methods=methods))
    classes.sort(key=lambda c: -c["lines"])
    return dict(
        rev=rev or "working tree",
        largest_modules=[dict(module=f, lines=n) for n, f in modules[:15]],
        largest_classes=classes[:10],
        package_lines=sum(n for n, f in modules if f.startswith(PACKAGE + "/")),
        workers_lines=sum(n for n, f in modules if f.startswith("tests/dist/workers/")),
        private_crossing=crossing,
        foreign_private=foreign,
    )


def markdown(r: dict) -> str:
    lines = [f"## {r['rev']}", "", "| module | lines |", "|---|---|"]
    lines += [f"| {m['module']} | {m['lines']} |" for m in r["largest_modules"]]
    lines += ["", "| class | module | lines | methods |", "|---|---|---|---|"]
    lines += [
        f"| {c['name']} | {c['module']} | {c['lines']} | {c['methods']} |"
        for c in r["largest_classes"]
    ]
    lines += [
        "",
        f"package lines: {r['package_lines']}; test workers lines: {r['workers_lines']}",
        "",
    ]
    lines += [f"private names of the project crossing modules: {len(r['private_crossing'])}"]
    lines += [f"- {c['module']}:{c['line']} `{c['name']}` ({c['how']}; defined in {', '.join(c['defined_in'])})"
              for c in r["private_crossing"]]  # fmt: skip
    names = sorted({f"{x['name']}" for x in r["foreign_private"]})
    lines += ["", f"third-party private names used: {len(r['foreign_private'])} uses of {len(names)} names: "
              + ", ".join(f"`{n}`" for n in names)]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="a git revision (default: the working tree)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = report(a.rev)
    print(json.dumps(r, indent=1) if a.json else markdown(r))


if __name__ == "__main__":
    main()
