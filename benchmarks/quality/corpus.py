"""A byte-level text corpus that is on every machine and that nobody here wrote: the
Python standard library's own ``*.py`` sources.

Recipe (``build()``; anyone can rebuild it from these lines):

1. ``root = sysconfig.get_paths()["stdlib"]`` of the running interpreter.
2. Every ``*.py`` file under ``root`` (recursively), by its POSIX path relative to ``root``,
   **except** files under ``site-packages/`` (installed third-party packages) and under any
   directory named ``test``, ``tests`` or ``idle_test`` (the stdlib's test suite, ~half of the
   bytes and very repetitive). Files sorted by relative path.
3. Split by file: a file is **validation** when ``int(sha256(relpath)[:8], 16) % 20 == 0``
   (about 5% of the files, held out whole), else **train**.
4. Each split is the concatenation, in path order, of ``raw bytes of the file + b"\\0"``
   (NUL never occurs in Python source: it marks document boundaries). Vocabulary: the 256
   byte values; no tokenizer.

The arrays depend on the Python version (the stdlib changes between releases), so
:func:`describe` reports the version, file counts, sizes and a SHA-256 of each array; the
quality results record it.

    python benchmarks/quality/corpus.py          # prints the description as JSON
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np

EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
VAL_MODULUS = 20  # 1 file in 20 (by path hash) is held out for validation
SEPARATOR = b"\0"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the corpus files, sorted."""
    root = stdlib_root() if root is None else root
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if EXCLUDED_DIRS.isdisjoint(rel.split("/")[:-1]) and p.is_file():
            out.append(rel)
    return sorted(out)


def is_val(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % VAL_MODULUS == 0


@lru_cache(maxsize=2)
def build(root: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(train, val, description)``: uint8 arrays and what :func:`describe` returns."""
    base = stdlib_root() if root is None else Path(root)
    files = source_files(base)
    chunks: dict[str, list[bytes]] = {"train": [], "val": []}
    for rel in files:
        chunks["val" if is_val(rel) else "train"].append((base / rel).read_bytes() + SEPARATOR)
    arrays = {k: np.frombuffer(b"".join(v), dtype=np.uint8) for k, v in chunks.items()}
    desc = {
        "recipe": "benchmarks/quality/corpus.py (stdlib *.py, no site-packages/test dirs; "
        f"val = sha256(relpath)[:8] % {VAL_MODULUS} == 0; files joined with NUL; bytes)",
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "stdlib_root": str(base),
        "files": {k: len(v) for k, v in chunks.items()},
        "bytes": {k: int(a.size) for k, a in arrays.items()},
        "sha256": {k: hashlib.sha256(a.tobytes()).hexdigest() for k, a in arrays.items()},
        "distinct_bytes_train": int(np.unique(arrays["train"]).size),
    }
    return arrays["train"], arrays["val"], desc


NEAR_DUPLICATE_DIRS = ("encodings/",)  # codec tables: near-twins of training files


def val_half(rel: str) -> str:
    """``"report"`` or ``"tune"``: a second, independent hash bit of the path."""
    return "tune" if int(hashlib.sha256(rel.encode()).hexdigest()[8:16], 16) % 2 else "report"


@lru_cache(maxsize=2)
def val_parts(root: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Issue 20: the validation files split in two, without near-duplicates of training data.

    5. Drop validation files under ``encodings/`` (generated codec tables whose siblings in
       the training split differ from them in a few table rows).
    6. The rest is **report** (what the results quote) or **tune** (what a hyperparameter is
       selected on) by :func:`val_half`; each is joined as in step 4.

    ``build()``'s ``val`` array (all validation files, the issue-11 table's windows) is
    unchanged. Returns ``({"report": arr, "tune": arr}, description)``.
    """
    base = stdlib_root() if root is None else Path(root)
    chunks: dict[str, list[bytes]] = {"report": [], "tune": []}
    files: dict[str, list[str]] = {"report": [], "tune": [], "dropped": []}
    for rel in source_files(base):
        if not is_val(rel):
            continue
        if rel.startswith(NEAR_DUPLICATE_DIRS):
            files["dropped"].append(rel)
            continue
        h = val_half(rel)
        files[h].append(rel)
        chunks[h].append((base / rel).read_bytes() + SEPARATOR)
    arrays = {k: np.frombuffer(b"".join(v), dtype=np.uint8) for k, v in chunks.items()}
    desc = {
        "recipe": "benchmarks/quality/corpus.py val_parts (val files minus "
        f"{'/'.join(NEAR_DUPLICATE_DIRS)}; tune = sha256(relpath)[8:16] odd, else report)",
        "files": files,
        "bytes": {k: int(a.size) for k, a in arrays.items()},
        "sha256": {k: hashlib.sha256(a.tobytes()).hexdigest() for k, a in arrays.items()},
    }
    return arrays, desc


def describe() -> dict:
    return build()[2]


if __name__ == "__main__":
    print(json.dumps(describe(), indent=2))
