#!/usr/bin/env python
"""Build the wheel, install it into a fresh venv and import every module from it.

    python .ci/check_wheel.py            # called by .ci/run

The editable install that the tests use reads the source tree, so a file missing from the
wheel (a module outside ``packages``, ``py.typed``, the CPU kernel's C source) would pass
every test and break every user. This builds ``pip wheel . --no-deps``, creates a venv
(``--system-site-packages``, for torch and the optional dependencies only), installs the wheel
there with ``--no-deps``, and from a directory outside the repository with ``PYTHONPATH``
unset: checks that ``dist_cautious`` resolves to the venv's copy (not the editable install),
imports every submodule, checks the package data, the version (one source: the
``__version__`` the metadata was built from) and the SPDX license, and builds and runs the
fused CPU kernel from the installed source.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib, importlib.metadata as md, pkgutil, sys
from pathlib import Path
import dist_cautious
where = Path(dist_cautious.__file__).resolve()
assert where.is_relative_to(Path(sys.prefix).resolve()), (
    f"dist_cautious imported from {where}, not from the venv {sys.prefix}: the wheel is not "
    "what is being tested")
names = [m.name for m in pkgutil.walk_packages(dist_cautious.__path__, "dist_cautious.")]
for name in names:
    importlib.import_module(name)
pkg = where.parent
for data in ("py.typed", "kernels/cpu_fused.c"):
    assert (pkg / data).is_file(), f"{data} missing from the wheel"
assert md.version("dist-cautious") == dist_cautious.__version__, (
    md.version("dist-cautious"), dist_cautious.__version__)
meta = md.metadata("dist-cautious")
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
dist = md.distribution("dist-cautious")
assert any(str(f).endswith("licenses/LICENSE") for f in dist.files), "LICENSE not in the wheel"
import torch
from dist_cautious import CAdamW
from dist_cautious.kernels import cpu_fused
assert cpu_fused.available(), cpu_fused.why_unavailable()
p = torch.nn.Parameter(torch.randn(1000))
opt = CAdamW([p], lr=1e-2)
assert opt._resolve("auto", torch.device("cpu")) is cpu_fused
p.grad = torch.randn(1000)
opt.step()
print(f"wheel OK: dist_cautious {dist_cautious.__version__} from {pkg}, {len(names)} modules, "
      f"{cpu_fused.describe()}")
"""


def run(cmd: list[str], **kw) -> None:
    shown = ["<check>" if str(c) == CHECK else str(c) for c in cmd]
    print("+", " ".join(shown), flush=True)
    subprocess.run(cmd, check=True, timeout=900, **kw)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dc_wheel_") as tmp:
        t = Path(tmp)
        run(
            [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", t / "w"],
            cwd=t,
        )
        wheels = sorted((t / "w").glob("dist_cautious-*.whl"))
        assert len(wheels) == 1, wheels
        run([sys.executable, "-m", "venv", "--system-site-packages", t / "venv"])
        py = t / "venv" / "bin" / "python"
        run([py, "-m", "pip", "install", "-q", "--no-deps", wheels[0]], cwd=t)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["DIST_CAUTIOUS_BUILD_DIR"] = str(t / "build")  # a fresh kernel build
        run([py, "-c", CHECK], cwd=t, env=env)


if __name__ == "__main__":
    main()
