"""Reading checkpoint files without unpickling anything that could run code.

* DCP's ``.metadata`` (a pickle): :class:`_MetadataUnpickler` admits only the classes of
  DCP's metadata modules and a few torch / standard types (:func:`safe_reader`).
* DCP's non-tensor entries (step counts, group options): ``torch.load(weights_only=True)``
  instead of DCP's ``weights_only=False`` (:func:`safe_planner`, :func:`whole_planner`).
* DeepSpeed's ``.pt`` files: ``torch.load(weights_only=True)`` admitting the handful of
  DeepSpeed classes its checkpoints hold (:func:`ds_load`; DeepSpeed 0.19's
  ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``).

Only public DCP API is used: ``FileSystemReader`` and ``DefaultLoadPlanner`` are subclassed
through their documented hooks (``read_metadata``, ``set_up_planner``, ``load_bytes``) and
the planner's public attributes (``original_state_dict``, ``mappings``, ``state_dict``,
``flatten_state_dict``). The two things DCP keeps private are written out here instead:
the metadata file's name (``.metadata``, ``__<rank>.metadata`` for rank-local metadata: DCP's
on-disk format) and :func:`put` (what ``torch.distributed.checkpoint._traverse.set_element``
does).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .protocol import CheckpointMismatch

# DCP's metadata file in a checkpoint directory (``__<rank>.metadata`` when rank-local).
DCP_METADATA = ".metadata"

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


def safe_reader(path: Path) -> Any:
    """DCP's ``FileSystemReader`` on ``path`` whose ``read_metadata`` unpickles with
    :class:`_MetadataUnpickler` (DCP's own calls ``pickle.load``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    where = Path(path)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
            with open(where / name, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(os.fspath(path))


def put(root: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    """Set ``value`` at the object path ``path`` (DCP's ``planner_data`` / ``mappings``
    entries: keys and list indices) in the nested ``root``, creating the dicts and lists on
    the way: what DCP's private ``_traverse.set_element`` does, written here so that no
    private DCP module is imported."""
    cur: Any = root
    for key, nxt in zip(path[:-1], path[1:]):
        fresh: Any = {} if type(nxt) is str else []
        if isinstance(cur, Mapping):
            cur = cur.setdefault(key, fresh)
        else:
            cur.extend([None] * (key + 1 - len(cur)))
            if cur[key] is None:
                cur[key] = fresh
            cur = cur[key]
    key = path[-1]
    if type(key) is int:
        cur.extend([None] * (key + 1 - len(cur)))
    cur[key] = value


def _safe_planner_class() -> type:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, with non-tensor entries read by ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                put(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner


def safe_planner(**kw: Any) -> Any:
    """DCP's ``DefaultLoadPlanner(**kw)`` with non-tensor entries read by
    ``torch.load(weights_only=True)``."""
    return _safe_planner_class()(**kw)


def whole_planner() -> Any:
    """:func:`safe_planner` that loads everything a checkpoint holds into an empty state
    dict, built from the checkpoint's metadata (full tensors on the CPU): what DCP's private
    ``_EmptyStateDictLoadPlanner`` does. The loaded dict is the planner's
    ``original_state_dict`` after ``dcp.load``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    class WholePlanner(_safe_planner_class()):  # type: ignore[misc]
        def set_up_planner(
            self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False
        ) -> None:
            if state_dict or metadata is None:
                raise ValueError("whole_planner: load into an empty dict, with metadata")
            mappings = metadata.planner_data or {}
            for k, v in metadata.state_dict_metadata.items():
                if isinstance(v, TensorStorageMetadata):
                    v = torch.empty(v.size, dtype=v.properties.dtype)
                if k in mappings:
                    put(state_dict, mappings[k], v)
                else:
                    state_dict[k] = v
            super().set_up_planner(state_dict, metadata, is_coordinator)

    return WholePlanner()


def ds_safe_globals() -> list[Any]:
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


def ds_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """One DeepSpeed checkpoint file, read with ``torch.load(weights_only=True)`` admitting
    :func:`ds_safe_globals`; a file that needs more raises :class:`CheckpointMismatch`."""
    with torch.serialization.safe_globals(ds_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointMismatch(
                f"DeepSpeed checkpoint file {path} holds objects that "
                f"torch.load(weights_only=True) refuses ({e}); dist_cautious does not "
                "unpickle arbitrary code: load it with DeepSpeed's own load_checkpoint if "
                "you trust the file"
            ) from None
