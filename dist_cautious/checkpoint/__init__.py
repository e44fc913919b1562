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

The package, by concern:

* :mod:`.protocol`: directories, the marker (sizes, CRC-32s), commit order, rollback
  (``abandoned/``), pruning (``keep``), :func:`newest`, RNG files, locating and checking a
  checkpoint at load;
* :mod:`.fit`: the ``meta`` / optimizer-class / group-option checks (scheduler keys);
* :mod:`.safe`: allowlist unpickling of DCP metadata and DeepSpeed files;
* :mod:`.dcp`: :func:`save` / :func:`load` / :func:`read` (``torch.distributed.checkpoint``);
* :mod:`.ds`: :func:`save_deepspeed` / :func:`load_deepspeed` / :func:`read_deepspeed`.

Everything public is imported from here (``dist_cautious.checkpoint.save`` & co).

See docs/checkpointing.md for the restart recipe (torchrun, Slurm).
"""

from __future__ import annotations

from .dcp import load, read, save
from .ds import load_deepspeed, read_deepspeed, save_deepspeed
from .fit import FREE_GROUP_KEYS, SCHEDULER_KEYS, group_options
from .protocol import (
    ABANDONED,
    CHECKSUM,
    CRASH_ENV,
    FORMAT,
    INFO,
    MARKER,
    PREFIX,
    TMP_PREFIX,
    CheckpointMismatch,
    Loaded,
    complete,
    crc32_file,
    newest,
    step_path,
)

__all__ = [
    "ABANDONED",
    "CHECKSUM",
    "CRASH_ENV",
    "FORMAT",
    "FREE_GROUP_KEYS",
    "INFO",
    "MARKER",
    "PREFIX",
    "SCHEDULER_KEYS",
    "TMP_PREFIX",
    "CheckpointMismatch",
    "Loaded",
    "complete",
    "crc32_file",
    "group_options",
    "load",
    "load_deepspeed",
    "newest",
    "read",
    "read_deepspeed",
    "save",
    "save_deepspeed",
    "step_path",
]
