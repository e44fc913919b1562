"""The DCP backend: :func:`save` / :func:`load` of a model and its optimizer (FSDP2, HSDP,
TP, DDP, plain modules) through ``torch.distributed.checkpoint``, and :func:`read` of a
whole checkpoint in one process.

Public DCP API only: ``get_state_dict`` / ``get_model_state_dict`` to save,
``set_model_state_dict`` / ``set_optimizer_state_dict`` to load, ``dcp.save`` /
``dcp.load`` with a ``FileSystemWriter`` / the safe ``FileSystemReader`` of :mod:`.safe`,
and ``DefaultLoadPlanner.set_up_planner`` for DCP's flattened key names (the fit check).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .fit import SCHEDULER_KEYS, diff_groups
from .protocol import (
    CheckpointMismatch,
    Loaded,
    agree,
    check_files,
    complete,
    describe,
    finish_load,
    open_load,
    save_step,
)
from .safe import safe_planner, safe_reader, whole_planner


def read(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The whole content of a DCP checkpoint directory as plain CPU tensors, in one process
    and without a process group (for inspection and tests): ``{"model": ..., "optim": ...}``
    with full (unsharded) tensors. Uses the same safe reader as :func:`load`, and checks the
    marker's sizes and (``verify``) checksums first."""
    from torch.distributed.checkpoint import load as dcp_load

    path = Path(path)
    if complete(path):
        err = check_files(path, verify)
        if err:
            raise CheckpointMismatch(err)
    planner = whole_planner()
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": no_dist is meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load({}, storage_reader=safe_reader(path), planner=planner, no_dist=True)
    return planner.original_state_dict


def _diff_tensors(path: Path, metadata: Any, state: dict[str, Any]) -> str | None:
    """Names and global shapes of the tensors we would load vs those in the checkpoint."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # DCP's own flattened names ("optim.state.<fqn>.exp_avg"), as its planner makes them
    flattener = DefaultLoadPlanner()
    flattener.set_up_planner(state, metadata)
    flat = flattener.state_dict
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

    def write(tmp: Path) -> None:
        if optimizer is not None:
            msd, osd = get_state_dict(model, optimizer)
            sd = {"model": msd, "optim": osd}
        else:
            sd = {"model": get_model_state_dict(model)}
        dcp_save(sd, storage_writer=FileSystemWriter(str(tmp)))

    def info() -> dict[str, Any]:
        return describe(step, optimizer, meta, extra, engine="dcp")

    return save_step(root, step, write, info, keep, rng, checksum)


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
    checkpoint does not fit (see the doc of the package, ``dist_cautious.checkpoint``).
    ``meta`` must equal what was saved; ``check_groups=False`` lets the saved group options
    win instead of raising.
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

    opened = open_load(
        Path(root),
        path,
        verify,
        meta,
        "dcp",
        "dist_cautious.checkpoint.save: use load_deepspeed for DeepSpeed checkpoints",
    )
    if opened is None:
        return None
    where, info, err = opened
    if info is not None and not err and check_groups:
        err = diff_groups(where, info, optimizer)
    if info is not None and not err and optimizer is None and info.get("optimizer"):
        err = None  # model-only loads of a full checkpoint are fine (partial load below)
    reader = safe_reader(where)
    metadata = None
    if not err:
        try:
            metadata = reader.read_metadata()
        except Exception as e:  # noqa: BLE001 - every rank must reach agree
            err = f"checkpoint {where}: DCP metadata unreadable ({type(e).__name__}: {e})"
    if not err:
        err = _diff_tensors(where, metadata, {"model": get_model_state_dict(model)})
    agree(err)
    assert info is not None
    kept: dict[tuple[int, str], Any] = {}
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)  # a zero-lr step creates missing state
        kept = _fit_optim_template(osd, metadata)
        sd: dict[str, Any] = {"model": msd, "optim": osd}
        agree(_diff_tensors(where, metadata, sd))
    else:
        sd = {"model": get_model_state_dict(model)}
    dcp_load(sd, storage_reader=reader, planner=safe_planner(allow_partial_load=optimizer is None))
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        # strict=False: parameters without saved state stay without (checked above)
        set_optimizer_state_dict(
            model, optimizer, sd["optim"], options=StateDictOptions(strict=False)
        )
        for (gi, k), v in kept.items():  # scheduler keys the checkpoint does not hold
            optimizer.param_groups[gi].setdefault(k, v)
    return finish_load(where, info, rng)
