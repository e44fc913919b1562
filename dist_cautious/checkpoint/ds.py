"""The DeepSpeed backend: :func:`save_deepspeed` / :func:`load_deepspeed` of an engine (ZeRO
0-3) through ``engine.save_checkpoint`` / ``engine.load_checkpoint`` (DeepSpeed's own
format) inside the complete-marker protocol, and :func:`read_deepspeed` for inspection.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .fit import diff_groups, group_options
from .protocol import (
    Loaded,
    agree,
    describe,
    finish_load,
    open_load,
    save_step,
)
from .safe import ds_load, ds_safe_globals


@contextlib.contextmanager
def _safe_ds_loads(engine: Any) -> Iterator[None]:
    """Make the engine's checkpoint engine read with ``torch.load(weights_only=True)``
    (:func:`.safe.ds_load`) for the duration of one ``load_checkpoint``.

    This replaces ``engine.checkpoint_engine.load`` on this engine's instance and puts it
    back afterwards: DeepSpeed 0.19's ``TorchCheckpointEngine.load`` calls
    ``torch.load(weights_only=False)`` and has no option (config key or argument) to read
    with ``weights_only=True``, and ``load_checkpoint`` reads every file through it."""
    ce = engine.checkpoint_engine
    orig = ce.load
    ce.load = ds_load
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

    def write(tmp: Path) -> None:  # DeepSpeed writes <root>/<tag>: the tag is tmp's name
        engine.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state={}, save_latest=False)

    def info() -> dict[str, Any]:
        out = describe(
            step, engine.optimizer, meta, extra, engine="deepspeed", **_ds_layout(engine)
        )
        client = getattr(engine, "client_optimizer", None)
        if client is not None:
            out["optimizer"] = type(client).__name__
            out["param_groups"] = group_options(client)
        return out

    return save_step(root, step, write, info, keep, rng, checksum)


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
    opened = open_load(
        root,
        path,
        verify,
        meta,
        "deepspeed",
        "save_deepspeed: load it with dist_cautious.checkpoint.load into a non-DeepSpeed model",
    )
    if opened is None:
        return None
    where, info, err = opened
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
        err = diff_groups(where, info, client)
    agree(err)
    assert info is not None
    with _safe_ds_loads(engine):
        load_path, _ = engine.load_checkpoint(
            str(root),
            tag=where.name,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    agree(None if load_path is not None else f"DeepSpeed found no checkpoint in {where}")
    return finish_load(where, info, rng)


def read_deepspeed(path: str | os.PathLike) -> dict[str, Any]:
    """Every ``.pt`` file of a DeepSpeed checkpoint directory, ``{file name: content}``,
    read with ``torch.load(weights_only=True)`` (the same allowlist as
    :func:`load_deepspeed`), for inspection and tests."""
    out: dict[str, Any] = {}
    with torch.serialization.safe_globals(ds_safe_globals()):
        for f in sorted(Path(path).glob("*.pt")):
            out[f.name] = torch.load(f, map_location="cpu", weights_only=True)
    return out
