"""What the checkpoint checksums cost (dist_cautious.checkpoint: CRC-32 per file).

Measures, on this machine, in one process (medians of ``--repeats`` runs):

* ``crc32_file`` on a freshly written file (page cache warm, as right after a save):
  seconds per GB (1e9 bytes), and ``zlib.crc32`` on an in-memory buffer (compute only);
* ``checkpoint.save`` of a plain model + CAdamW with ``checksum=True`` vs ``checksum=False``
  and ``checkpoint.load`` with ``verify=True`` vs ``verify=False``: the difference per GB of
  checkpoint. Under FSDP2 / DeepSpeed each rank checksums (and verifies) its own share, so
  the per-rank cost is this figure times the rank's share of the bytes.

    python benchmarks/checksum_cost.py --out benchmarks/results/checksum_cpu_2026-12-03.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_cautious import CAdamW  # noqa: E402
from dist_cautious import checkpoint as ck  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(median, min) wall seconds and min CPU seconds (this process) of ``repeats`` calls."""
    ts, cs = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return statistics.median(ts), min(ts), min(cs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file-mb", type=int, default=1024, help="size of the raw-file test")
    ap.add_argument("--params-m", type=float, default=32, help="model size, millions (fp32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--out", default=None, help="JSON results (a .md is written next to it)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    torch.set_num_threads(1)
    scratch = Path(a.dir or tempfile.mkdtemp(prefix="ckcost."))
    scratch.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores (shared), {platform.system()}",
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "checksum": "zlib.crc32 (CRC-32)",
        "command": "python benchmarks/checksum_cost.py " + " ".join(sys.argv[1:]),
        "GB": "1e9 bytes",
    }
    try:
        # raw: a file just written (warm page cache), and a buffer in memory
        data = os.urandom(a.file_mb << 20)
        f = scratch / "blob.bin"
        f.write_bytes(data)
        gb = len(data) / 1e9
        res["file_bytes"] = len(data)
        med, best, cpu = timed(lambda: ck.crc32_file(f), a.repeats)
        res["crc32_file_s_per_GB"], res["crc32_file_s_per_GB_min"] = med / gb, best / gb
        res["crc32_file_cpu_s_per_GB"] = cpu / gb
        med, best, cpu = timed(lambda: zlib.crc32(data), a.repeats)
        res["crc32_memory_s_per_GB"], res["crc32_memory_s_per_GB_min"] = med / gb, best / gb
        res["crc32_memory_cpu_s_per_GB"] = cpu / gb
        f.unlink()

        # end to end: save / load with and without checksums
        n = int(a.params_m * 1e6)
        rows = 1024
        model = torch.nn.ModuleList(
            [torch.nn.Linear(rows, max(1, n // rows // 4), bias=False) for _ in range(4)]
        )
        opt = CAdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        root = scratch / "ck"
        ck.save(root, model, opt, 1, rng=False)  # warm-up (imports, first DCP call)
        ck.load(root, model, opt, rng=False)
        times: dict[str, list[float]] = {k: [] for k in ("save_crc", "save", "load_v", "load")}
        size = 0
        for _ in range(a.repeats):
            for key, kw in (("save_crc", {"checksum": True}), ("save", {"checksum": False})):
                shutil.rmtree(root, ignore_errors=True)
                t = time.perf_counter()
                path = ck.save(root, model, opt, 1, rng=False, **kw)
                times[key].append(time.perf_counter() - t)
            shutil.rmtree(root, ignore_errors=True)
            path = ck.save(root, model, opt, 1, rng=False)
            size = sum(json.loads((path / ck.MARKER).read_text())["files"].values())
            for key, verify in (("load_v", True), ("load", False)):
                t = time.perf_counter()
                ck.load(root, model, opt, rng=False, verify=verify)
                times[key].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        res["min_s"] = best
        cgb = size / 1e9
        res["checkpoint_bytes"] = size
        res["params"] = sum(p.numel() for p in model.parameters())
        res["median_s"] = med
        res["all_s"] = times
        res["save_checksum_extra_s_per_GB"] = (med["save_crc"] - med["save"]) / cgb
        res["load_verify_extra_s_per_GB"] = (med["load_v"] - med["load"]) / cgb
        res["save_checksum_extra_s_per_GB_min"] = (best["save_crc"] - best["save"]) / cgb
        res["load_verify_extra_s_per_GB_min"] = (best["load_v"] - best["load"]) / cgb
        res["save_checksum_extra_fraction"] = med["save_crc"] / med["save"] - 1
        res["load_verify_extra_fraction"] = med["load_v"] / med["load"] - 1
    finally:
        if a.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if a.out:
        out = Path(a.out)
        out.write_text(json.dumps(res, indent=1) + "\n")
        m = res["median_s"]
        md = [
            f"# Checkpoint checksum cost, CPU ({res['date']})",
            "",
            f"Machine: {res['machine']}; load average at start {res['load_average_at_start']}; "
            f"torch {res['torch']}, Python {res['python']}. CPU only, one process: not a GPU "
            "figure.",
            "",
            f"Command: `{res['command']}`",
            "",
            f"Checksum: {res['checksum']}; GB = 1e9 bytes; median and fastest of {a.repeats} "
            "runs (the fastest is the least disturbed by other processes on a shared machine).",
            "",
            "| what | wall s/GB, median | wall s/GB, fastest | CPU s/GB (process time) |",
            "|---|---|---|---|",
            f"| `crc32_file` of a file just written ({res['file_bytes'] >> 20} MiB, page cache "
            f"warm) | {res['crc32_file_s_per_GB']:.3f} | {res['crc32_file_s_per_GB_min']:.3f} | "
            f"{res['crc32_file_cpu_s_per_GB']:.3f} |",
            f"| `zlib.crc32` of a buffer in memory | {res['crc32_memory_s_per_GB']:.3f} | "
            f"{res['crc32_memory_s_per_GB_min']:.3f} | {res['crc32_memory_cpu_s_per_GB']:.3f} |",
            f"| `save(checksum=True)` minus `save(checksum=False)` | "
            f"{res['save_checksum_extra_s_per_GB']:.3f} | "
            f"{res['save_checksum_extra_s_per_GB_min']:.3f} | |",
            f"| `load(verify=True)` minus `load(verify=False)` | "
            f"{res['load_verify_extra_s_per_GB']:.3f} | "
            f"{res['load_verify_extra_s_per_GB_min']:.3f} | |",
            "",
            f"End to end: a {res['params'] / 1e6:.1f}M-parameter fp32 model with CAdamW "
            f"(checkpoint {size / 1e9:.3f} GB): save {m['save']:.2f} s without checksums, "
            f"{m['save_crc']:.2f} s with ({100 * res['save_checksum_extra_fraction']:+.0f}%); "
            f"load {m['load']:.2f} s without verifying, {m['load_v']:.2f} s with "
            f"({100 * res['load_verify_extra_fraction']:+.0f}%).",
            "",
        ]
        out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
