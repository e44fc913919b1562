"""Checkpoints that are complete or absent, resumed bitwise, and loaded without unpickling code.

A checkpoint is a directory ``ROOT/step_NNNNNNNN``. It is written in three moves, so that a
crash at any moment never leaves a directory that looks complete:

1. every rank writes into ``ROOT/.tmp.step_NNNNNNNN`` (model and optimizer through
   ``torch.distributed.checkpoint`` (DCP) with ``get_state_dict``, or DeepSpeed's
   ``engine.save_checkpoint``; plus one small RNG file per rank);
2. after a barrier, rank 0 writes ``checkpoint.json`` (step, world size, the caller's
   ``meta`` and ``extra``, the optimizer's class and group options), renames the directory
   to ``step_NNNNNNNN``, and
3. writes the marker ``COMPLETE`` last (itself through a temporary name), which lists every
   file with its size and CRC-32 (each rank checksums the files it wrote, right after
   writing them). Only a directory with that marker counts (:func:`newest`).

Saving step ``s`` after a rollback (complete checkpoints of steps ``> s`` exist: you loaded an
older one and trained on) moves those newer checkpoints aside into ``ROOT/abandoned/``
before anything is marked, so that :func:`newest` and a restart follow the branch being
written; ``keep`` prunes only older checkpoints and never the one just written.

Loading checks, on every rank and before anything is loaded, that the checkpoint fits: the
marker's file sizes (a truncated file) and checksums (a flipped bit; ``verify=False`` skips
them), the caller's ``meta`` (model preset, engine, ...),
the optimizer class and its group options, the model's and optimizer's tensor names and
global shapes (DCP), the data-parallel size (DeepSpeed cannot reshard). A misfit raises
:class:`CheckpointMismatch` on every rank, naming what differs and the fix.

Nothing is unpickled that could run code: DCP's ``.metadata`` is read with an unpickler that
admits only DCP's own metadata classes, its non-tensor entries with
``torch.load(weights_only=True)``; DeepSpeed's files are read with
``torch.load(weights_only=True)`` admitting only the handful of DeepSpeed classes its
checkpoints hold (DeepSpeed itself would call ``torch.load(weights_only=False)``).

See docs/checkpointing.md for the restart recipe (torchrun, Slurm).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "CheckpointMismatch",
    "Loaded",
    "complete",
    "load",
    "load_deepspeed",
    "newest",
    "read",
    "read_deepspeed",
    "save",
    "save_deepspeed",
    "step_path",
]

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
FREE_GROUP_KEYS = frozenset(
    {"params", "lr", "initial_lr", "backend", "foreach", "fused", "capturable", "differentiable"}
)
# Group keys that LR schedulers own (OneCycleLR, CyclicLR; ``initial_lr``: every scheduler):
# not options of the optimizer. They are not compared at load and their values come from the
# checkpoint, as with torch's ``load_state_dict``. With ``base_momentum`` / ``max_momentum``
# in a group (momentum cycling) the scheduler also owns ``momentum`` and ``betas[0]``.
SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})


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


def _barrier() -> None:
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


def _agree(error: str | None) -> None:
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


def _jsonable(x: Any) -> Any:
    """Group option values as JSON keeps them (tuples as lists, dtypes as strings)."""
    return json.loads(json.dumps(x, default=str))


def group_options(optimizer: torch.optim.Optimizer | None) -> list[dict[str, Any]]:
    """Every param group's options (not ``params``), as they are compared at load."""
    if optimizer is None:
        return []
    return [
        {k: _jsonable(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
    ]


def _prepare(root: Path, step: int) -> tuple[Path, Path]:
    final, tmp = step_path(root, step), root / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash during an earlier attempt at this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    return final, tmp


def _save_rng(tmp: Path) -> None:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / f"rng_rank{_rank()}.pt")


def _restore_rng(path: Path, saved_world: int) -> bool:
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


def _commit(
    root: Path,
    tmp: Path,
    final: Path,
    step: int,
    info: dict[str, Any],
    keep: int | None,
    checksum: bool = True,
) -> Path:
    """Rank 0: checkpoint.json, rename, marker; then every rank returns together."""
    _barrier()  # every rank's files are written
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
    _barrier()
    return final


def _info(step: int, optimizer: Any, meta: dict | None, extra: dict | None, **more: Any) -> dict:
    return {
        "format": FORMAT,
        "step": int(step),
        "world_size": _world(),
        "meta": _jsonable(meta or {}),
        "extra": _jsonable(extra or {}),
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "param_groups": group_options(optimizer),
        "torch": torch.__version__,
        **more,
    }


# ----------------------------------------------------------------------------- safe reading


_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "layout"),
    ("torch", "memory_format"),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    ("torch", "preserve_format"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "getattr"),  # how torch pickles torch.float32 & co (checked below)
    ("torch.serialization", "_get_layout"),  # a layout name -> torch.strided & co
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only DCP's metadata classes and torch types."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        elif (module, name) in _METADATA_GLOBALS:
            if (module, name) == ("builtins", "getattr"):
                return _safe_getattr
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a DCP checkpoint does not "
            "hold: refusing to unpickle it (the file is not one torch.distributed.checkpoint "
            "wrote, or it was tampered with)"
        )


def _safe_getattr(obj: Any, name: str) -> Any:
    if obj is torch and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
        return getattr(torch, name)
    raise pickle.UnpicklingError(f"checkpoint metadata asks for getattr({obj!r}, {name!r})")


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(md_path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _planner(**kw: Any) -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict  # noqa: F401
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, with non-tensor entries read by ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner(**kw)


def read(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The whole content of a DCP checkpoint directory as plain CPU tensors, in one process
    and without a process group (for inspection and tests): ``{"model": ..., "optim": ...}``
    with full (unsharded) tensors. Uses the same safe reader as :func:`load`, and checks the
    marker's sizes and (``verify``) checksums first."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class SafeEmpty(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._traverse import set_element

            obj = torch.load(value, weights_only=True)
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)

    path = Path(path)
    if complete(path):
        err = _check_files(path, verify)
        if err:
            raise CheckpointMismatch(err)
    sd: dict[str, Any] = {}
    _load_state_dict(sd, storage_reader=_reader(path), planner=SafeEmpty(), no_dist=True)
    return sd


# ----------------------------------------------------------------------------- checks


def _check_files(path: Path, verify: bool = True, part: tuple[int, int] = (0, 1)) -> str | None:
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


def _diff_meta(path: Path, saved: dict, now: dict) -> str | None:
    now = _jsonable(now)
    diffs = [
        f"{k}={saved.get(k, '<absent>')!r} (now {now.get(k, '<absent>')!r})"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if not diffs:
        return None
    return (
        f"checkpoint {path} was written with other settings: {', '.join(diffs)}. Resume with "
        "the settings it was written with, or point the checkpoint directory elsewhere to "
        "start a new run"
    )


def _diff_groups(path: Path, info: dict, optimizer: Any) -> str | None:
    if optimizer is None:
        return None
    want = info.get("optimizer")
    have = type(optimizer).__name__
    if want is None:
        return (
            f"checkpoint {path} was saved without an optimizer: load it with optimizer=None "
            f"(model only), then train the {have} from fresh state"
        )
    if want is not None and want != have:
        return (
            f"checkpoint {path} holds the state of a {want} optimizer, not of this {have}: "
            f"build a {want}, or start a new run in another directory"
        )
    saved, now = info.get("param_groups", []), group_options(optimizer)
    if len(saved) != len(now):
        return (
            f"checkpoint {path} has {len(saved)} param group(s), this optimizer {len(now)}: "
            "build the optimizer with the same groups"
        )
    diffs = []
    for i, (a, b) in enumerate(zip(saved, now)):
        cycling = any(k in g for g in (a, b) for k in ("base_momentum", "max_momentum"))
        for k in sorted(set(a) | set(b)):
            if k in FREE_GROUP_KEYS or k in SCHEDULER_KEYS or (cycling and k == "momentum"):
                continue
            if (
                cycling
                and k == "betas"
                and isinstance(a.get(k), list)
                and isinstance(b.get(k), list)
            ):
                if a[k][1:] != b[k][1:]:  # the scheduler cycles betas[0] only
                    diffs.append(f"group {i} betas[1:]: saved {a[k][1:]!r}, now {b[k][1:]!r}")
                continue
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                diffs.append(
                    f"group {i} {k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
                )
    if diffs:
        return (
            f"checkpoint {path} was written by an optimizer with other options ({'; '.join(diffs)}): "
            "build the optimizer with the saved values, or pass check_groups=False to let the "
            "checkpoint's values win (torch's load_state_dict rule)"
        )
    return None


def _diff_tensors(path: Path, metadata: Any, state: dict[str, Any]) -> str | None:
    """Names and global shapes of the tensors we would load vs those in the checkpoint."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    flat, _ = flatten_state_dict(state)
    tops = tuple(f"{k}." for k in state)  # compare only the parts we load (model, optim)
    saved = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith(tops)}
    missing = [k for k in flat if k not in saved]
    extra = [k for k in saved if k not in flat]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} entr(y/ies) it lacks, e.g. {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} entr(y/ies) not in this run, e.g. {extra[:3]}")
        return (
            f"checkpoint {path} does not fit this model/optimizer: {'; '.join(parts)}. Is it "
            "from another model (preset) or optimizer? Resume with the same model, or start a "
            "new run in another directory"
        )
    for k, v in flat.items():
        md = saved[k]
        if isinstance(v, torch.Tensor):
            if not isinstance(md, TensorStorageMetadata):
                return f"checkpoint {path}: {k} is not a tensor in the checkpoint"
            if tuple(md.size) != tuple(v.shape):
                return (
                    f"checkpoint {path}: {k} has shape {tuple(md.size)} there, "
                    f"{tuple(v.shape)} here (another model size?)"
                )
            if md.properties.dtype != v.dtype:
                return (
                    f"checkpoint {path}: {k} is {md.properties.dtype} there, {v.dtype} here "
                    "(another precision or state_dtype?)"
                )
    return None


def _fit_optim_template(osd: dict[str, Any], metadata: Any) -> dict[tuple[int, str], Any]:
    """Shape the optimizer state dict that DCP loads into like the checkpoint, where they may
    differ without being another model or optimizer:

    * a parameter without state in the checkpoint (it never had a gradient; ``get_state_dict``
      just created its state with a zero-lr step) is not loaded, and after the load it has
      no state, as in the saved run;
    * scheduler-owned group keys (``SCHEDULER_KEYS``) come from the checkpoint: absent here,
      they are added to be loaded; absent there, they are not loaded, and the current value
      is returned (``{(group, key): value}``) to be put back after the load.
    """
    saved = metadata.state_dict_metadata
    had_state = {
        k[len("optim.state.") :].rsplit(".", 1)[0] for k in saved if k.startswith("optim.state.")
    }
    state = osd.get("state", {})
    for name in [n for n in state if n not in had_state]:
        del state[name]
    kept: dict[tuple[int, str], Any] = {}
    for gi, g in enumerate(osd.get("param_groups", [])):
        for k in SCHEDULER_KEYS:
            there = f"optim.param_groups.{gi}.{k}" in saved
            if there and k not in g:
                g[k] = None  # a placeholder: DCP fills in the saved value
            elif not there and k in g:
                kept[(gi, k)] = g.pop(k)
    return kept


def _locate(root: Path, path: str | os.PathLike | None) -> Path | None:
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


def _read_info(path: Path, verify: bool = True) -> tuple[dict | None, str | None]:
    err = _check_files(path, verify, (_rank(), _world()))
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


# ----------------------------------------------------------------------------- DCP


def save(
    root: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    *,
    extra: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep: int | None = None,
    rng: bool = True,
    checksum: bool = True,
) -> Path:
    """Save ``model`` and ``optimizer`` (FSDP2 / HSDP / TP / DDP / plain) as the checkpoint of
    ``step`` under ``root``; collective: call it on every rank. Returns its path.

    ``extra``: JSON-able values to resume with (a loss history, a data position).
    ``meta``: JSON-able settings the resuming run must match (checked by :func:`load`).
    ``keep``: keep only the newest ``keep`` complete checkpoints, this one included (it is
    never pruned). Complete checkpoints of later steps (a rollback) are moved aside into
    ``root/abandoned/``. ``rng``: save each rank's torch RNG state (restored at load when the
    world size is the same). ``checksum``: record each file's CRC-32 in the marker (each rank
    reads back what it wrote: 0.3 CPU-seconds per GB).
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if keep is not None and keep < 1:
        raise ValueError(f"keep={keep}: keep at least 1 checkpoint (or None for all)")
    root = Path(root)
    final, tmp = _prepare(root, step)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optim": osd}
    else:
        sd = {"model": get_model_state_dict(model)}
    dcp_save(sd, storage_writer=FileSystemWriter(str(tmp)))
    if rng:
        _save_rng(tmp)
    info = _info(step, optimizer, meta, extra, engine="dcp")
    return _commit(root, tmp, final, step, info, keep, checksum)


def load(
    root: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    meta: dict[str, Any] | None = None,
    path: str | os.PathLike | None = None,
    check_groups: bool = True,
    rng: bool = True,
    verify: bool = True,
) -> Loaded | None:
    """Resume from the newest complete checkpoint under ``root`` (or from ``path``); None,
    with nothing changed, when there is none. Collective: call it on every rank.

    DCP reshards: a checkpoint saved on one world size loads on another (FSDP2 / HSDP).
    Raises :class:`CheckpointMismatch` on every rank, before loading anything, when the
    checkpoint does not fit (see the module doc). ``meta`` must equal what was saved;
    ``check_groups=False`` lets the saved group options win instead of raising.
    ``verify=False`` skips the checksums (the ranks read the whole checkpoint once between
    them to verify it; sizes are always checked).

    Parameters without optimizer state in the checkpoint (they never had a gradient) have
    none after the load either, as in the saved run.
    """
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    root = Path(root)
    where = _locate(root, path)
    if where is None:
        return None
    info, err = _read_info(where, verify)
    if info is not None and info.get("engine") != "dcp":
        err = (
            f"checkpoint {where} was written by {info.get('engine')!r}, not by "
            "dist_cautious.checkpoint.save: use load_deepspeed for DeepSpeed checkpoints"
        )
    if info is not None and not err:
        err = _diff_meta(where, info.get("meta", {}), meta or {})
    if info is not None and not err and check_groups:
        err = _diff_groups(where, info, optimizer)
    if info is not None and not err and optimizer is None and info.get("optimizer"):
        err = None  # model-only loads of a full checkpoint are fine (partial load below)
    reader = _reader(where)
    metadata = None
    if not err:
        try:
            metadata = reader.read_metadata()
        except Exception as e:  # noqa: BLE001 - every rank must reach _agree
            err = f"checkpoint {where}: DCP metadata unreadable ({type(e).__name__}: {e})"
    if not err:
        err = _diff_tensors(where, metadata, {"model": get_model_state_dict(model)})
    _agree(err)
    assert info is not None
    kept: dict[tuple[int, str], Any] = {}
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)  # a zero-lr step creates missing state
        kept = _fit_optim_template(osd, metadata)
        sd: dict[str, Any] = {"model": msd, "optim": osd}
        _agree(_diff_tensors(where, metadata, sd))
    else:
        sd = {"model": get_model_state_dict(model)}
    dcp_load(sd, storage_reader=reader, planner=_planner(allow_partial_load=optimizer is None))
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        # strict=False: parameters without saved state stay without (checked above)
        set_optimizer_state_dict(
            model, optimizer, sd["optim"], options=StateDictOptions(strict=False)
        )
        for (gi, k), v in kept.items():  # scheduler keys the checkpoint does not hold
            optimizer.param_groups[gi].setdefault(k, v)
    restored = _restore_rng(where, int(info["world_size"])) if rng else False
    _barrier()
    return Loaded(
        step=int(info["step"]),
        path=where,
        extra=info.get("extra", {}),
        meta=info.get("meta", {}),
        world_size=int(info["world_size"]),
        rng_restored=restored,
    )


# ----------------------------------------------------------------------------- DeepSpeed


def _ds_safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed 0.19 puts in its checkpoint files (stages 0-3)."""
    out: list[Any] = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    from collections import OrderedDict, defaultdict

    out += [OrderedDict, defaultdict, dict, set]
    return out


@contextlib.contextmanager
def _safe_ds_loads(engine: Any) -> Iterator[None]:
    """Make the engine's checkpoint engine read with ``weights_only=True``."""
    ce = engine.checkpoint_engine
    orig = ce.load

    def load_weights_only(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(_ds_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointMismatch(
                    f"DeepSpeed checkpoint file {path} holds objects that "
                    f"torch.load(weights_only=True) refuses ({e}); dist_cautious does not "
                    "unpickle arbitrary code: load it with DeepSpeed's own load_checkpoint if "
                    "you trust the file"
                ) from None

    ce.load = load_weights_only
    try:
        yield
    finally:
        ce.load = orig


def _ds_layout(engine: Any) -> dict[str, Any]:
    return {
        "zero_stage": int(engine.zero_optimization_stage()),
        "dp_world_size": int(engine.dp_world_size),
    }


def save_deepspeed(
    root: str | os.PathLike,
    engine: Any,
    step: int,
    *,
    extra: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep: int | None = None,
    rng: bool = True,
    checksum: bool = True,
) -> Path:
    """:func:`save` for a DeepSpeed engine (ZeRO 0-3), through ``engine.save_checkpoint``
    (DeepSpeed's own format, no ``latest`` file), with the same complete-marker protocol,
    rollback rule and checksums."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep={keep}: keep at least 1 checkpoint (or None for all)")
    root = Path(root)
    final, tmp = _prepare(root, step)
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
    if rng:
        _save_rng(tmp)
    info = _info(step, engine.optimizer, meta, extra, engine="deepspeed", **_ds_layout(engine))
    client = getattr(engine, "client_optimizer", None)
    if client is not None:
        info["optimizer"] = type(client).__name__
        info["param_groups"] = group_options(client)
    return _commit(root, tmp, final, step, info, keep, checksum)


def load_deepspeed(
    root: str | os.PathLike,
    engine: Any,
    *,
    meta: dict[str, Any] | None = None,
    path: str | os.PathLike | None = None,
    check_groups: bool = True,
    rng: bool = True,
    verify: bool = True,
) -> Loaded | None:
    """:func:`load` for a DeepSpeed engine: ``engine.load_checkpoint`` (module strict,
    optimizer states, no LR scheduler), after the same checks (sizes, checksums unless
    ``verify=False``) plus the ZeRO stage and the data-parallel size (ZeRO partitions do not
    reshard). Files are read with ``torch.load(weights_only=True)``."""
    root = Path(root)
    where = _locate(root, path)
    if where is None:
        return None
    info, err = _read_info(where, verify)
    if info is not None and info.get("engine") != "deepspeed":
        err = (
            f"checkpoint {where} was written by {info.get('engine')!r}, not by save_deepspeed: "
            "load it with dist_cautious.checkpoint.load into a non-DeepSpeed model"
        )
    if info is not None and not err:
        err = _diff_meta(where, info.get("meta", {}), meta or {})
    if info is not None and not err:
        now = _ds_layout(engine)
        for k, what in (("zero_stage", "ZeRO stage"), ("dp_world_size", "data-parallel size")):
            if info.get(k) != now[k]:
                err = (
                    f"checkpoint {where} was written with {what} {info.get(k)}, this engine has "
                    f"{now[k]}: DeepSpeed ZeRO checkpoints load only into the same layout "
                    "(convert it with DeepSpeed's ds_to_universal.py and load it as a universal "
                    "checkpoint, or resume with the same stage and number of ranks)"
                )
                break
    client = getattr(engine, "client_optimizer", None)
    if info is not None and not err and check_groups and client is not None:
        err = _diff_groups(where, info, client)
    _agree(err)
    assert info is not None
    with _safe_ds_loads(engine):
        load_path, _ = engine.load_checkpoint(
            str(root),
            tag=where.name,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    _agree(None if load_path is not None else f"DeepSpeed found no checkpoint in {where}")
    restored = _restore_rng(where, int(info["world_size"])) if rng else False
    _barrier()
    return Loaded(
        step=int(info["step"]),
        path=where,
        extra=info.get("extra", {}),
        meta=info.get("meta", {}),
        world_size=int(info["world_size"]),
        rng_restored=restored,
    )


def read_deepspeed(path: str | os.PathLike) -> dict[str, Any]:
    """Every ``.pt`` file of a DeepSpeed checkpoint directory, ``{file name: content}``,
    read with ``torch.load(weights_only=True)`` (the same allowlist as
    :func:`load_deepspeed`), for inspection and tests."""
    out: dict[str, Any] = {}
    with torch.serialization.safe_globals(_ds_safe_globals()):
        for f in sorted(Path(path).glob("*.pt")):
            out[f.name] = torch.load(f, map_location="cpu", weights_only=True)
    return out
