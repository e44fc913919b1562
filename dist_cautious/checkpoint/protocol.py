"""The complete-marker protocol every backend shares: where checkpoints live, which count
(:func:`newest`), how one is written (temporary directory, ``checkpoint.json``, rename,
marker with sizes and CRC-32s), the rollback rule (newer checkpoints moved into
``abandoned/``), pruning (``keep``), the per-rank RNG files, and, at load, finding the
checkpoint and checking its files and ``checkpoint.json`` on every rank.

The backends (:mod:`.dcp`, :mod:`.ds`) save through :func:`save_step` (their writer fills the
temporary directory of :func:`prepare`, then :func:`commit`); at load they call :func:`open_load`
(:func:`locate`, :func:`read_info`, the engine and ``meta`` checks), their own fit checks,
:func:`agree`, and :func:`finish_load`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .fit import diff_meta, group_options, jsonable

MARKER = "COMPLETE"
INFO = "checkpoint.json"
FORMAT = 1
PREFIX = "step_"
TMP_PREFIX = ".tmp."
# Where a save after a rollback moves the checkpoints of the abandoned (newer) branch.
ABANDONED = "abandoned"
# The checksum the marker records per file (zlib's CRC-32: in the standard library, 0.3 CPU-s/GB
# measured on a 2-core CPU, see docs/checkpointing.md).
CHECKSUM = "crc32"
# Test hook: ``DIST_CAUTIOUS_CKPT_CRASH=<step>:<point>`` makes rank 0 exit (os._exit(17),
# as a crash would) at ``point`` of the save of ``step``: ``written`` (data and
# checkpoint.json written, directory not yet renamed) or ``renamed`` (renamed, no marker).
CRASH_ENV = "DIST_CAUTIOUS_CKPT_CRASH"


# Group keys that may change between save and resume without a word: schedulers set the
# learning rate, and the kernel backend / implementation flags do not change the numbers.
class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model / optimizer / settings it is loaded into."""


@dataclass
class Loaded:
    """What :func:`load` / :func:`load_deepspeed` resumed."""

    step: int
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    world_size: int = 0
    rng_restored: bool = False


# ----------------------------------------------------------------------------- directories


def step_path(root: str | os.PathLike, step: int) -> Path:
    """``ROOT/step_NNNNNNNN``: where the checkpoint of ``step`` lives."""
    if step < 0:
        raise ValueError(f"step {step}: checkpoint steps are >= 0")
    return Path(root) / f"{PREFIX}{step:08d}"


def complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint whose writing finished (its marker exists)."""
    return (Path(path) / MARKER).is_file()


def _steps(root: Path) -> list[int]:
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(PREFIX) and d.name[len(PREFIX) :].isdigit() and complete(d):
                out.append(int(d.name[len(PREFIX) :]))
    return sorted(out)


def newest(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (None if there is none).
    Temporary (``.tmp.*``) and unmarked directories are ignored."""
    steps = _steps(Path(root))
    return step_path(root, steps[-1]) if steps else None


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _world() -> int:
    return dist.get_world_size() if _is_dist() else 1


def barrier() -> None:
    if _is_dist():
        dist.barrier()


def _device() -> torch.device:
    if _is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_int(x: int) -> int:
    if not _is_dist():
        return x
    t = torch.tensor([x], dtype=torch.int64, device=_device())
    dist.broadcast(t, 0)
    return int(t.item())


def agree(error: str | None) -> None:
    """Raise on every rank if any rank found an error (so no rank enters a collective the
    others skip). A rank with its own message raises it; the others name the ranks."""
    bad = torch.tensor([1 if error else 0], dtype=torch.int64, device=_device())
    if _is_dist():
        flags = [torch.zeros_like(bad) for _ in range(_world())]
        dist.all_gather(flags, bad)
        ranks = [r for r, f in enumerate(flags) if int(f.item())]
    else:
        ranks = [0] if error else []
    if error:
        raise CheckpointMismatch(error)
    if ranks:
        raise CheckpointMismatch(
            f"checkpoint check failed on rank(s) {ranks} (their message says why); nothing "
            "was loaded"
        )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` through a temporary name and rename (readers never see half a file)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _maybe_crash(step: int, point: str) -> None:
    want = os.environ.get(CRASH_ENV)
    if want and want == f"{step}:{point}" and _rank() == 0:
        print(f"dist_cautious.checkpoint: {CRASH_ENV}={want}: rank 0 exits now", flush=True)
        os._exit(17)


def _file_sizes(path: Path) -> dict[str, int]:
    return {
        str(p.relative_to(path)): p.stat().st_size
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def crc32_file(path: str | os.PathLike, chunk: int = 8 << 20) -> int:
    """zlib's CRC-32 of a file, read in ``chunk``-byte pieces into one reused buffer."""
    crc = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


_OWNER = (re.compile(r"^__(\d+)_\d+\.distcp$"), re.compile(r"rank_?(\d+)"))


def _owner(name: str, world: int) -> int:
    """The rank that wrote file ``name`` (DCP's ``__<rank>_<n>.distcp``, our ``rng_rank<r>``,
    DeepSpeed's ``zero_pp_rank_<r>_...``); rank 0 for the shared files (``.metadata``)."""
    for pattern in _OWNER:
        m = pattern.search(Path(name).name)
        if m and int(m.group(1)) < world:
            return int(m.group(1))
    return 0


def _share(names: dict[str, int], world: int) -> list[list[str]]:
    """Split files over ranks so that each reads about the same number of bytes."""
    parts: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for name in sorted(names, key=lambda n: (-names[n], n)):
        r = load.index(min(load))
        parts[r].append(name)
        load[r] += names[name]
    return parts


def _checksums(tmp: Path) -> dict[str, int]:
    """Every rank: the CRC-32 of the files it wrote into ``tmp``; rank 0 gets them all."""
    world, rank = _world(), _rank()
    mine = {
        name: crc32_file(tmp / name) for name in _file_sizes(tmp) if _owner(name, world) == rank
    }
    if not _is_dist():
        return mine
    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts or [] for k, v in part.items()}


def prepare(root: Path, step: int) -> tuple[Path, Path]:
    final, tmp = step_path(root, step), root / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash during an earlier attempt at this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    return final, tmp


def save_rng(tmp: Path) -> None:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / f"rng_rank{_rank()}.pt")


def restore_rng(path: Path, saved_world: int) -> bool:
    f = path / f"rng_rank{_rank()}.pt"
    if saved_world != _world() or not f.is_file():
        return False  # resharded: the per-rank streams do not map onto the new ranks
    state = torch.load(f, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def _abandon_newer(root: Path, step: int) -> list[Path]:
    """Rank 0: move the complete checkpoints of steps after ``step`` (a branch the run rolled
    back from) into ``root/abandoned/``, where :func:`newest` does not look."""
    moved = []
    for s in _steps(root):
        if s <= step:
            continue
        src = step_path(root, s)
        (root / ABANDONED).mkdir(exist_ok=True)
        dst, n = root / ABANDONED / src.name, 1
        while dst.exists():  # abandoned once before (an earlier rollback)
            dst, n = root / ABANDONED / f"{src.name}.{n}", n + 1
        os.replace(src, dst)
        moved.append(dst)
    if moved:
        _fsync_dir(root)
        warnings.warn(
            f"dist_cautious.checkpoint: saving step {step} under {root}, which holds newer "
            f"checkpoints (a rollback): moved {[p.name for p in moved]} aside into "
            f"{root / ABANDONED}, so that a restart resumes this run; move them back to return "
            "to that branch, or delete them",
            stacklevel=3,
        )
    return moved


def commit(
    root: Path,
    tmp: Path,
    final: Path,
    step: int,
    info: dict[str, Any],
    keep: int | None,
    checksum: bool = True,
) -> Path:
    """Rank 0: checkpoint.json, rename, marker; then every rank returns together."""
    barrier()  # every rank's files are written
    crcs = _checksums(tmp) if checksum else {}
    if _rank() == 0:
        _abandon_newer(root, step)
        _write_json(tmp / INFO, info)
        if checksum:
            crcs[INFO] = crc32_file(tmp / INFO)
        _maybe_crash(step, "written")
        old = None
        if final.exists():  # an unmarked leftover, or an older save of the same step
            old = root / f"{TMP_PREFIX}old.{final.name}.{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        _maybe_crash(step, "renamed")
        marker: dict[str, Any] = {
            "step": step,
            "files": _file_sizes(final),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if checksum:
            marker[CHECKSUM] = crcs
        _write_json(final / MARKER, marker)
        _fsync_dir(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep is not None:  # the newest ``keep`` including this one; never this one
            older = [s for s in _steps(root) if s < step]
            for s in older[: max(0, len(older) - (keep - 1))]:
                shutil.rmtree(step_path(root, s), ignore_errors=True)
    barrier()
    return final


def save_step(
    root: str | os.PathLike,
    step: int,
    write: Callable[[Path], None],
    info: Callable[[], dict[str, Any]],
    keep: int | None,
    rng: bool,
    checksum: bool,
) -> Path:
    """Every backend's save, collective: ``write(tmp)`` puts the backend's files into the
    temporary directory of ``step`` under ``root`` (:func:`prepare`); then each rank's RNG
    file (``rng``), ``info()`` as ``checkpoint.json``, the rename and the marker
    (:func:`commit`). Returns the checkpoint's path."""
    check_keep(keep)
    root = Path(root)
    final, tmp = prepare(root, step)
    write(tmp)
    if rng:
        save_rng(tmp)
    return commit(root, tmp, final, step, info(), keep, checksum)


def describe(step: int, optimizer: Any, meta: dict | None, extra: dict | None, **more: Any) -> dict:
    return {
        "format": FORMAT,
        "step": int(step),
        "world_size": _world(),
        "meta": jsonable(meta or {}),
        "extra": jsonable(extra or {}),
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "param_groups": group_options(optimizer),
        "torch": torch.__version__,
        **more,
    }


# ----------------------------------------------------------------------------- loading


def check_files(path: Path, verify: bool = True, part: tuple[int, int] = (0, 1)) -> str | None:
    """The marker's sizes (every file) and, with ``verify``, its checksums: of the files in
    this rank's share ``part = (rank, world)`` (the ranks read the checkpoint once between
    them)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        return f"checkpoint {path}: its {MARKER} marker is unreadable ({e}); delete the directory"
    sizes = marker.get("files", {})
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return (
                f"checkpoint {path}: file {name} is missing (the marker lists it, {size} bytes); "
                f"the checkpoint is damaged: delete {path} to resume from an older one"
            )
        have = f.stat().st_size
        if have != size:
            return (
                f"checkpoint {path}: file {name} has {have} bytes, the marker recorded {size} "
                f"(truncated or overwritten); delete {path} to resume from an older one"
            )
    crcs = marker.get(CHECKSUM, {}) if verify else {}
    rank, world = part
    for name in _share({n: sizes.get(n, 0) for n in crcs}, world)[rank]:
        have = crc32_file(path / name)
        if have != crcs[name]:
            return (
                f"checkpoint {path}: file {name} has CRC-32 {have:08x}, the marker recorded "
                f"{crcs[name]:08x}: its content changed after it was written (a flipped bit, a "
                f"bad copy); copy it again from a good source, or delete {path} to resume from "
                "an older one (verify=False skips this check: only for files you trust)"
            )
    return None


def locate(root: Path, path: str | os.PathLike | None) -> Path | None:
    """The checkpoint every rank loads: ``path``, or rank 0's newest under ``root``."""
    if path is not None:
        p = Path(path)
        if not complete(p):
            raise CheckpointMismatch(
                f"{p} is not a complete checkpoint (no {MARKER} marker: its writing did not "
                f"finish); use dist_cautious.checkpoint.newest({str(p.parent)!r})"
            )
        return p
    found = newest(root) if _rank() == 0 else None
    step = _broadcast_int(int(found.name[len(PREFIX) :]) if found is not None else -1)
    return None if step < 0 else step_path(root, step)


def read_info(path: Path, verify: bool = True) -> tuple[dict | None, str | None]:
    err = check_files(path, verify, (_rank(), _world()))
    if err:
        return None, err
    try:
        info = json.loads((path / INFO).read_text())
    except (OSError, ValueError) as e:
        return None, f"checkpoint {path}: {INFO} is unreadable ({e})"
    if info.get("format") != FORMAT:
        return (
            None,
            f"checkpoint {path}: format {info.get('format')!r}, this version reads {FORMAT}",
        )
    return info, None


def open_load(
    root: Path,
    path: str | os.PathLike | None,
    verify: bool,
    meta: dict[str, Any] | None,
    engine: str,
    other: str,
) -> tuple[Path, dict | None, str | None] | None:
    """The checks every backend's load starts with, on every rank: the checkpoint
    (:func:`locate`; None when there is none), its files and ``checkpoint.json``
    (:func:`read_info`), written by ``engine`` (else the error says ``... not by {other}``:
    the right save and how to load), and ``meta`` equal to the saved one.

    Returns ``(where, info, err)``: ``err`` the first problem found or None. The backend
    adds its own checks while ``err`` is None and hands it to :func:`agree`."""
    where = locate(root, path)
    if where is None:
        return None
    info, err = read_info(where, verify)
    if info is not None and info.get("engine") != engine:
        err = f"checkpoint {where} was written by {info.get('engine')!r}, not by {other}"
    if info is not None and not err:
        err = diff_meta(where, info.get("meta", {}), meta or {})
    return where, info, err


def check_keep(keep: int | None) -> None:
    if keep is not None and keep < 1:
        raise ValueError(f"keep={keep}: keep at least 1 checkpoint (or None for all)")


def finish_load(where: Path, info: dict[str, Any], rng: bool) -> Loaded:
    """Every rank, after the backend loaded: restore the RNG (same world size only), wait for
    the others, and say what was resumed."""
    restored = restore_rng(where, int(info["world_size"])) if rng else False
    barrier()
    return Loaded(
        step=int(info["step"]),
        path=where,
        extra=info.get("extra", {}),
        meta=info.get("meta", {}),
        world_size=int(info["world_size"]),
        rng_restored=restored,
    )
