"""``CAdamW``: Cautious AdamW with an exact per-tensor factor on sharded parameters.

A step, in four stages (each in its own module):

1. plan (:mod:`.layout`): walk every parameter of every group, reserve count slots for
   tensors split across ranks, and cut the local pieces the kernels will step;
2. count pass (:mod:`.kernels`): update ``exp_avg`` and count ``exp_avg * grad > 0`` per piece;
3. reduce (:mod:`.reduce`): sum counts over shards (one all-reduce per reduction group),
   then ``alpha = N / max(nnz, clamp * N)`` per piece, on the device;
4. update pass (:mod:`.kernels`): ``exp_avg_sq``, decoupled weight decay, masked step.

No host synchronisation happens inside ``step()`` on CUDA (counts and factors stay on the
device); the kept-mask statistics are device tensors read only when you ask for them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import accumulate, repeat
from operator import attrgetter, is_
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import kernels
from .kernels import UpdateHyper, cautious_factor
from .layout import DEFAULT_LAYOUT, ParamLayout, Piece, SlotTable, is_dtensor, zeros_state
from .reduce import ReducedCounts, check_agreement, device_index, reduce_counts


def flat_layout_for(p: Tensor) -> ParamLayout | None:
    """The layout of an FSDP1 flattened parameter (see :mod:`.fsdp1`), else None."""
    from .fsdp1 import layout_for  # lazy: imports torch.distributed.fsdp

    return layout_for(p)


SCALES = ("global", "shard")
FORMULAS = ("clamp", "paper")
STATE_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16, torch.float16)

# CAdamW's own options. Like every torch hyperparameter they live in each param group (so
# they work per group, travel in ``state_dict()``, are restored by ``load_state_dict`` and
# survive ``copy.deepcopy`` / ``pickle``); the constructor arguments are the defaults.
OPTION_KEYS = ("scale", "formula", "clamp", "backend", "state_dtype")
_OPTION_DEFAULTS = dict(
    scale="global", formula="clamp", clamp=1e-3, backend="auto", state_dtype=None
)

# Keys torch.optim.AdamW keeps in every group. We keep them too (with AdamW's meaning) so
# that a CAdamW state_dict loads into torch.optim.AdamW and means the same thing there:
# without ``decoupled_weight_decay=True`` AdamW's __setstate__ would fall back to Adam's
# L2 penalty.
_ADAMW_GROUP_KEYS = dict(
    amsgrad=False,
    foreach=None,
    capturable=False,
    differentiable=False,
    fused=None,
    decoupled_weight_decay=True,
)


def _real(x: Any) -> bool:
    """A real number (Python or NumPy scalar), not a bool and not a Tensor."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, Tensor))


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any, where: str) -> None:
    if isinstance(lr, Tensor):
        raise TypeError(
            f"{where}: lr given as a Tensor ({lr!r}); CAdamW takes a Python float "
            "(pass float(lr); LR schedulers already set floats)"
        )
    if not _real(lr):
        raise TypeError(
            f"{where}: lr={lr!r} of type {type(lr).__name__}; it must be a real number "
            "(a Python float or a NumPy scalar)"
        )
    if math.isnan(lr) or lr < 0:
        raise ValueError(f"{where}: invalid learning rate lr={lr!r}; it must be a float >= 0")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{where}: betas={betas!r} must be a pair (beta1, beta2)") from None
    for i, b in enumerate((b1, b2)):
        if not _real(b) or not 0.0 <= b < 1.0:
            raise ValueError(
                f"{where}: invalid beta{i + 1}={b!r} in betas={betas!r}; each must be a float in [0, 1)"
            )
    if not _real(eps) or math.isnan(eps) or eps <= 0:
        raise ValueError(f"{where}: invalid eps={eps!r}; it must be a float > 0")
    if not _real(weight_decay) or math.isnan(weight_decay) or weight_decay < 0:
        raise ValueError(f"{where}: invalid weight_decay={weight_decay!r}; it must be a float >= 0")


def _check_options(opts: dict[str, Any], where: str) -> None:
    """Validate CAdamW's own options (constructor arguments or a param group's values)."""
    scale, formula, clamp = opts["scale"], opts["formula"], opts["clamp"]
    backend, state_dtype = opts["backend"], opts["state_dtype"]
    if scale not in SCALES:
        raise ValueError(
            f"{where}: unknown scale={scale!r}; use 'global' (exact, one all-reduce per step) "
            "or 'shard' (local piece only, no communication)"
        )
    if formula not in FORMULAS:
        raise ValueError(
            f"{where}: unknown formula={formula!r}; use 'clamp' (N / max(nnz, clamp*N)) or "
            "'paper' (N / (nnz + 1))"
        )
    if not _real(clamp) or not 0 < clamp <= 1:
        raise ValueError(f"{where}: invalid clamp={clamp!r}; it must be a float in (0, 1]")
    if backend not in kernels.BACKENDS:
        raise ValueError(f"{where}: unknown backend={backend!r}; choose one of {kernels.BACKENDS}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"{where}: invalid state_dtype={state_dtype!r}; use None, torch.float32, "
            "torch.float64, torch.bfloat16 or torch.float16"
        )


_GRAD = attrgetter("grad")
_IS_SPARSE = attrgetter("is_sparse")


class _Registered:
    """Layouts registered by adapters (DeepSpeed), carried through ``copy.deepcopy`` (the
    copy's tensors take the layouts of the tensors they copy; layouts are immutable
    metadata and hold process groups, so they are shared, not copied) but not through
    ``pickle``: an unpickled optimizer does not know the partitions of another process's
    engine, so its step raises until the adapter attaches it again."""

    def __init__(self, pairs: list[tuple[Tensor, ParamLayout]]) -> None:
        self.pairs = pairs

    def __deepcopy__(self, memo: dict) -> _Registered:
        import copy

        return _Registered([(copy.deepcopy(p, memo), layout) for p, layout in self.pairs])

    def __reduce__(self) -> tuple:
        return (_Registered, ([],))


def _pieces(
    layout: ParamLayout,
    p: Tensor,
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    token: object,
    shard: bool,
) -> list[Piece]:
    """The non-empty pieces of ``p`` (an empty piece's slot, if any, stays reserved and
    contributes 0). Under ``scale="shard"`` every piece is a tensor of its own: local ``N``,
    no slot, no reduction (the factor of a piece depends only on the piece)."""
    out = []
    for pc in layout.pieces(p, g, exp_avg, exp_avg_sq, token):
        if pc.param.numel() == 0:
            continue
        if shard:
            pc.numel, pc.reduction, pc.slot = pc.param.numel(), None, -1
        out.append(pc)
    return out


def _factors(
    red: ReducedCounts,
    groups: list[dict[str, Any]],
    buckets: list[_Bucket],
    slices: list[slice],
) -> dict[torch.dtype, Tensor]:
    """Per-piece factors from the reduced counts, with each bucket's group's formula and
    clamp, in float64 and (where a bucket needs it) rounded to float32."""
    opts = {(groups[b.gi]["formula"], float(groups[b.gi]["clamp"])) for b in buckets}
    if len(opts) <= 1:
        f, c = opts.pop() if opts else ("clamp", 1e-3)
        a64 = cautious_factor(red.counts, red.numels, f, c, dtype=torch.float64)
    else:  # groups with their own formula or clamp
        parts = []
        for b, sl in zip(buckets, slices):
            g = groups[b.gi]
            parts.append(
                cautious_factor(
                    red.counts[sl],
                    red.numels[sl],
                    g["formula"],
                    float(g["clamp"]),
                    dtype=torch.float64,
                )  # fmt: skip
            )
        a64 = torch.cat(parts)
    out = {torch.float64: a64}
    if any(b.factor_dtype == torch.float32 for b in buckets):
        out[torch.float32] = a64.to(torch.float32)
    return out


class _Entry:
    """A parameter with a gradient in a step plan."""

    __slots__ = ("param", "state", "exp_avg", "exp_avg_sq", "token", "gi", "step")

    def __init__(
        self,
        param: Tensor,
        state: dict[str, Any],
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        token: object,
        gi: int,
        step: int,
    ) -> None:
        self.param, self.state, self.token, self.gi = param, state, token, gi
        self.exp_avg, self.exp_avg_sq = exp_avg, exp_avg_sq
        self.step: Any = step  # the int step while planning; the counter view once frozen


class _Bucket:
    """Pieces stepped by one backend call: one param group, step value, device and dtypes."""

    def __init__(self, gi: int, step: int, backend: ModuleType, shard: bool) -> None:
        self.gi, self.step, self.backend, self.shard = gi, step, backend, shard
        # the backend's hand-off between its two passes (foreach: the mask), per bucket
        self.scratch_kw = {"scratch": {}} if getattr(backend, "TAKES_SCRATCH", False) else {}
        self.pieces: list[Piece] = []
        self.params: list[Tensor] = []
        self.exp_avgs: list[Tensor] = []
        self.exp_avg_sqs: list[Tensor] = []
        self.src: list[int] = []  # entry index of each piece
        self.dynamic: list[Piece] | None = None  # DTensor buckets: pieces refreshed per step
        self.device: torch.device | None = None
        self.grad_dtype: torch.dtype | None = None
        self.all_entries = False  # src == every entry, in order: the gradient list as is

    def add(self, pc: Piece, entry: int) -> None:
        self.pieces.append(pc)
        self.params.append(pc.param)
        self.exp_avgs.append(pc.exp_avg)
        self.exp_avg_sqs.append(pc.exp_avg_sq)
        self.src.append(entry)
        self.device = pc.param.device
        self.grad_dtype = pc.grad.dtype
        self.factor_dtype = torch.float64 if pc.exp_avg.dtype == torch.float64 else torch.float32


class _Plan:
    """Everything a step needs except the gradients (see the comment above ``step``)."""

    def __init__(self, **kw: Any) -> None:
        self.groups: list[dict[str, Any]] = kw["groups"]
        self.param_ids: list[tuple[int, ...]] = kw["param_ids"]
        self.params: list[Tensor] = kw["params"]
        self.none_pattern: list[bool] = kw["none_pattern"]
        self.entries: list[_Entry] = kw["entries"]
        self.table: SlotTable = kw["table"]
        self.home: torch.device = kw["home"]
        self.buckets: list[_Bucket] = kw["buckets"]
        self.state_obj: Any = kw["state_obj"]
        self.settings: tuple = kw["settings"]
        self.pieces = [pc for b in self.buckets for pc in b.pieces]
        self.piece_group = [b.gi for b in self.buckets for _ in b.pieces]
        starts = list(accumulate((len(b.pieces) for b in self.buckets), initial=0))
        self.slices = [slice(a, z) for a, z in zip(starts, starts[1:])]
        self.grad_index = [i for i, none in enumerate(self.none_pattern) if not none]
        self.states = [e.state for e in self.entries]
        self.eparams = [e.param for e in self.entries]
        self.ms = [e.exp_avg for e in self.entries]
        self.vs = [e.exp_avg_sq for e in self.entries]
        self.steps: list[Tensor] = []
        n = len(self.entries)
        for b in self.buckets:
            b.all_entries = b.src == list(range(n))
        self.created: list[bool] = []  # per entry: its state was created by this plan
        self.step_buf: Tensor | None = None
        self.step_version = -1
        self.local_numels: dict[torch.device, Tensor] = {}  # per-piece numels on the device

    def freeze(self) -> None:
        """Make the plan reusable: drop gradient references, share the step counters."""
        for b in self.buckets:
            b.pieces = [dataclasses.replace(pc, grad=None) for pc in b.pieces]
            if any(is_dtensor(self.entries[i].param) for i in b.src):
                b.dynamic = list(b.pieces)
        self.pieces = [pc for b in self.buckets for pc in b.pieces]
        buf = torch.tensor([float(e.step) for e in self.entries], dtype=torch.float32)
        for j, e in enumerate(self.entries):
            view = buf[j]
            e.state["step"] = view
            e.step = view
        self.steps = [e.step for e in self.entries]
        self.step_buf = buf
        self.step_version = buf._version


class CAdamW(Optimizer):
    r"""Cautious AdamW (arXiv 2411.16085) that stays exact under FSDP2, HSDP, TP and ZeRO.

    Per original parameter tensor :math:`W` with :math:`N` elements::

        m     <- beta1 m + (1 - beta1) g          v <- beta2 v + (1 - beta2) g^2
        mask   = (m * g > 0)
        alpha  = N / max(nnz(mask), clamp * N)     (formula="clamp", default)
               | N / (nnz(mask) + 1)               (formula="paper")
        W     <- W (1 - lr wd) - lr / bc1 * alpha * mask * m / (sqrt(v / bc2) + eps)

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay,
            applied to every element, masked or not). Per-group overrides work.
        scale: ``"global"`` (default) computes ``nnz`` and ``N`` over the whole original
            tensor wherever its shards live (one small all-reduce per reduction group per
            step); ``"shard"`` uses the local piece only (no communication; the factor then
            depends on how the tensor is split). Identical on a single process.
        formula: ``"clamp"`` (timm and the reference repository) or ``"paper"``.
        clamp: lower bound on the kept fraction in the ``"clamp"`` formula (default 1e-3).
        maximize: maximize the objective instead of minimizing it.
        backend: ``"auto"`` (Triton on CUDA when available, else ``"foreach"``),
            ``"foreach"``, ``"triton"`` or ``"reference"`` (slow, readable; the test oracle).
        state_dtype: dtype of ``exp_avg`` / ``exp_avg_sq``. ``None`` (default): float32 for
            float16/bfloat16 parameters, the parameter's dtype otherwise.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        scale: str = "global",
        formula: str = "clamp",
        clamp: float = 1e-3,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay, "CAdamW")
        options = dict(
            scale=scale, formula=formula, clamp=clamp, backend=backend, state_dtype=state_dtype
        )
        _check_options(options, "CAdamW")
        self._init_tables()
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize
        )
        defaults.update(_ADAMW_GROUP_KEYS)
        defaults.update(options)
        super().__init__(params, defaults)

    def _init_tables(self) -> None:
        # What is not in torch's (defaults, state, param_groups): rebuilt by __setstate__.
        self._given: dict[int, Tensor] = {}  # tensors passed in by the user, by id
        self._layouts: dict[int, ParamLayout] = {}  # registered by adapters, by id
        self._layout_params: dict[int, Tensor] = {}  # ... and their tensors
        self._stats: ReducedCounts | None = None
        self._plan: _Plan | None = None  # cached step plan, see step()
        self._validated: set = set()  # count-vector signatures all ranks agreed on (reduce.py)

    # ------------------------------------------------------------------ options
    #
    # The constructor's scale / formula / clamp / backend / state_dtype are the defaults of
    # the param-group keys of the same names. Reading ``opt.scale`` gives the default;
    # assigning it sets the option in the defaults and in every group.

    def _option(self, key: str) -> Any:
        return self.defaults[key]

    def _set_option(self, key: str, value: Any) -> None:
        _check_options({**self.defaults, key: value}, "CAdamW")
        self.defaults[key] = value
        for group in self.param_groups:
            group[key] = value

    scale = property(lambda self: self._option("scale"), lambda s, v: s._set_option("scale", v))
    formula = property(
        lambda self: self._option("formula"), lambda s, v: s._set_option("formula", v)
    )
    clamp = property(lambda self: self._option("clamp"), lambda s, v: s._set_option("clamp", v))
    backend = property(
        lambda self: self._option("backend"), lambda s, v: s._set_option("backend", v)
    )
    state_dtype = property(
        lambda self: self._option("state_dtype"), lambda s, v: s._set_option("state_dtype", v)
    )

    @property
    def _known_params(self) -> set[int]:
        """ids of every tensor this optimizer may step (given, or registered by an adapter)."""
        return set(self._given) | set(self._layouts)

    # ------------------------------------------------------------------ copy / pickle
    #
    # torch's Optimizer.__getstate__ keeps only defaults, state and param_groups. Everything
    # CAdamW computes with is in those (options are group keys), except which tensors it was
    # given and the adapters' layouts, which are added here; the caches are rebuilt.

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # a tensor with a registered layout is only known through it (pickle drops layouts)
        state["_given_params"] = [p for i, p in self._given.items() if i not in self._layouts]
        state["_registered"] = _Registered(
            [(self._layout_params[i], layout) for i, layout in self._layouts.items()]
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by copy/pickle (with "defaults") and by torch's load_state_dict (state and
        # param_groups only: the optimizer's own tables stay as they are).
        unpickled = "defaults" in state
        given = state.pop("_given_params", None)
        registered = state.pop("_registered", None)
        super().__setstate__(state)
        if unpickled:
            self._init_tables()
            for key, value in {**_OPTION_DEFAULTS, **_ADAMW_GROUP_KEYS}.items():
                self.defaults.setdefault(key, value)  # saved by an older version
            if given is None:  # torch's own format: the groups' tensors were given
                given = [p for g in self.param_groups for p in g["params"]]
            self._given = {id(p): p for p in given}
            if registered is not None:
                for p, layout in registered.pairs:
                    self.register_layout(p, layout)
        for group in self.param_groups:  # groups saved without CAdamW's keys (AdamW, older)
            for key in (*OPTION_KEYS, *_ADAMW_GROUP_KEYS):
                group.setdefault(key, self.defaults[key])
        self._plan = None

    # ------------------------------------------------------------------ set-up

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        gi = len(self.param_groups)
        params = param_group.get("params")
        if isinstance(params, (list, tuple)):
            seen: set[int] = set()
            for p in params:
                if id(p) in seen:
                    raise ValueError(
                        f"param group {gi} lists the same parameter (shape "
                        f"{tuple(p.shape)}) twice; it would be stepped twice per step with "
                        "one state. Pass each parameter once."
                    )
                seen.add(id(p))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {gi}"
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"], where)
        _check_options(group, where)
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(
                    f"complex parameter of shape {tuple(p.shape)} and dtype {p.dtype}: CAdamW's "
                    "sign mask is defined for real tensors; pass torch.view_as_real(param) "
                    "views or keep this parameter in torch.optim.AdamW"
                )
            self._given[id(p)] = p
        self._plan = None

    def register_layout(self, param: Tensor, layout: ParamLayout) -> None:
        """Tell the optimizer how ``param`` maps to pieces of original tensors.

        Used by adapters whose parameters are not the model's tensors (DeepSpeed ZeRO's
        flat partitions, see :mod:`dist_cautious.deepspeed`).
        """
        self._layouts[id(param)] = layout
        self._layout_params[id(param)] = param
        self._plan = None

    def _layout_for(self, p: Tensor) -> ParamLayout:
        layout = self._layouts.get(id(p))
        if layout is not None:
            return layout
        layout = flat_layout_for(p)  # FSDP1 FlatParameters and use_orig_params views
        if layout is not None:
            return layout
        if is_dtensor(p):
            # A DTensor describes its own layout completely (mesh, placements, global
            # shape), so one swapped into param_groups after construction (HF Accelerate's
            # FSDP2 path) is stepped exactly, like one given at construction.
            return DEFAULT_LAYOUT
        if id(p) not in self._given:
            raise RuntimeError(
                f"CAdamW is asked to step a tensor it was never given (shape {tuple(p.shape)}, "
                f"dtype {p.dtype}). DeepSpeed does this when it swaps the model's parameters "
                "for flat ZeRO partitions that mix slices of many tensors (a factor computed "
                "on them would be per-partition, not per-tensor) or for fp32 master copies. "
                "Use dist_cautious.deepspeed.initialize(...) instead of "
                "deepspeed.initialize(...), or call dist_cautious.deepspeed.attach(engine) "
                "right after it (see docs/deepspeed.md). If you changed param_groups by hand, "
                "use optimizer.add_param_group instead."
            )
        return DEFAULT_LAYOUT

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict`` (AdamW state dicts load too).

        * The saved groups' values win, options included (``scale``, ``formula``, ``clamp``,
          ``backend``, ``state_dtype``), as for every torch hyperparameter; a state dict
          without them (torch AdamW, older versions) keeps this optimizer's defaults.
        * Moments are restored in the loaded group's ``state_dtype`` from the saved values,
          bitwise: torch would cast them to the parameter's dtype (float64 moments of float32
          parameters, float32 moments of bfloat16 parameters would lose precision).
        * The state dict is checked first: a state dict of another optimizer (SGD's
          ``momentum_buffer``, Adam's ``amsgrad``), missing moments or moments of the wrong
          shape raise a ``ValueError`` naming the parameter and the key, before anything
          is loaded.
        """
        self._check_loadable(state_dict)
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        current = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(saved_ids, current):
            st = saved_state.get(pid)
            if not st:
                continue
            dt = self._state_dtype_for(p, group)
            for key in ("exp_avg", "exp_avg_sq"):
                v = st[key]
                if self.state[p][key].dtype != dt or v.dtype != dt:
                    self.state[p][key] = v.to(device=self.state[p][key].device, dtype=dt)
        self._plan = None

    def _check_loadable(self, state_dict: Any) -> None:
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(
                "CAdamW.load_state_dict needs a dict with 'state' and 'param_groups' (what "
                f"optimizer.state_dict() returns); got {type(state_dict).__name__}"
                + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, dict) else "")
            )
        groups = state_dict["param_groups"]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in groups for i in g.get("params", ())]
        for gi, g in enumerate(groups):
            where = f"loaded param group {gi}"
            self._check_group({**self.defaults, **g}, gi, where=where)
        for k, (pid, p) in enumerate(zip(saved_ids, params)):
            st = state_dict["state"].get(pid)
            if not st:
                continue
            what = f"loaded state of parameter {k} (id {pid!r}, shape {tuple(p.shape)})"
            foreign = sorted(set(st) - {"step", "exp_avg", "exp_avg_sq"})
            if foreign:
                raise ValueError(
                    f"{what} has keys {foreign}, which CAdamW does not keep (a state dict of "
                    "another optimizer, e.g. SGD's momentum_buffer or Adam's amsgrad "
                    "max_exp_avg_sq?); load it into the optimizer that saved it"
                )
            missing = [key for key in ("step", "exp_avg", "exp_avg_sq") if key not in st]
            if missing:
                raise ValueError(
                    f"{what} lacks {missing} (a truncated or foreign state dict); a CAdamW / "
                    "AdamW state holds 'step', 'exp_avg' and 'exp_avg_sq'"
                )
            for key in ("exp_avg", "exp_avg_sq"):
                v = st[key]
                if not torch.is_tensor(v) or tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{what}: {key!r} has shape "
                        f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}, not "
                        "the parameter's; the state dict belongs to another model (or another "
                        "sharding: use torch.distributed.checkpoint to reshard)"
                    )

    def _state_dtype_for(self, p: Tensor, group: dict[str, Any]) -> torch.dtype:
        dt = group.get("state_dtype", self.defaults["state_dtype"])
        if dt is not None:
            return dt
        return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    def _state_for(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        dt = self._state_dtype_for(p, group)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = zeros_state(p, dt)
            state["exp_avg_sq"] = zeros_state(p, dt)
        else:
            for k in ("exp_avg", "exp_avg_sq"):
                if state[k].dtype != dt:  # e.g. loaded from an AdamW state dict
                    state[k] = state[k].to(dt)
            if not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        return state

    @staticmethod
    def _check_group(group: dict[str, Any], gi: int, where: str | None = None) -> None:
        where = where or f"param group {gi}"
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"], where)
        _check_options(group, where)
        for key, ok in (("amsgrad", False), ("capturable", False), ("differentiable", False)):
            if group.get(key, ok) != ok:
                raise ValueError(
                    f"{where} has {key}={group[key]!r}, which CAdamW does not implement; "
                    f"set it to {ok} (it may come from a loaded Adam/AdamW state dict)"
                )
        if not group.get("decoupled_weight_decay", True):
            raise ValueError(
                f"{where} has decoupled_weight_decay=False (an Adam state dict?); "
                "CAdamW always decouples weight decay, as AdamW does. Set it to True."
            )

    # ------------------------------------------------------------------ step
    #
    # A step is planned (walk every parameter: layouts, slots, state, pieces, buckets) and
    # then executed (count pass, reduce, factor, update pass). Planning is Python work per
    # parameter; at LLaMA-60M shapes it would cost more than the kernels. So a plan whose
    # parameters all use the default layout (plain tensors, DDP, DTensors) is cached and
    # reused while nothing it depends on changed: the same param_groups (same dicts, same
    # parameters in the same order), the same gradient presence pattern, the same state
    # objects (``load_state_dict`` and ``register_layout`` drop the plan), unchanged step
    # counters (checked through their version counter) and the same ``scale`` / ``backend``
    # / ``state_dtype``. Reusing a plan then costs O(1) work per parameter: read ``.grad``
    # and compare identities. Step counters of a cached plan are 0-d views of one float32
    # buffer (``state["step"]`` keeps its meaning and its value), incremented by one op.
    # Layouts registered by adapters (DeepSpeed ZeRO) are planned every step.

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plan = getattr(self, "_plan", None)
        grads = self._reuse(plan) if plan is not None else None
        if grads is None:
            self._plan = None
            plan, grads = self._make_plan()
            if plan is None:
                return loss
            if plan.table.sizes and not plan.table.agreed:
                self._check_agreement(plan)
        self._execute(plan, grads)  # gradients are held by locals only, never by the plan
        return loss

    def _check_agreement(self, plan: _Plan) -> None:
        """The ranks' one-time check that they count the same tensors (see reduce.py), before
        anything is stepped; on failure the planned step is undone (no state is left)."""
        try:
            check_agreement(plan.table, self._validated)
        except RuntimeError:
            self._plan = None
            for e, created in zip(plan.entries, plan.created):
                if created:
                    self.state.pop(e.param, None)
                else:
                    e.state["step"] = e.state["step"].clone() - 1
            raise

    def _settings(self) -> tuple:
        """What a cached plan depends on besides parameters, gradients and state objects
        (formula, clamp and the AdamW scalars are read at every step)."""
        return tuple((g["scale"], g["backend"], g["state_dtype"]) for g in self.param_groups)

    def _make_plan(self) -> tuple[_Plan | None, list[list[Tensor]] | None]:
        """Walk every parameter (the reference path); cache the plan when it may be reused."""
        table = SlotTable()
        buckets: dict[tuple, _Bucket] = {}
        bucket_grads: dict[tuple, list[Tensor]] = defaultdict(list)
        home: torch.device | None = None
        params: list[Tensor] = []
        none_pattern: list[bool] = []
        entries: list[_Entry] = []
        created: list[bool] = []
        cacheable = True
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            table.current_group = gi
            shard = group["scale"] == "shard"
            for p in group["params"]:
                layout = self._layout_for(p)
                if layout is not DEFAULT_LAYOUT:
                    cacheable = False
                # Reserve slots for every parameter, gradient or not (see reduce.py).
                token = None if shard else layout.reserve(p, table)
                if home is None:
                    home = (p.to_local() if is_dtensor(p) else p).device
                g = p.grad
                params.append(p)
                none_pattern.append(g is None)
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"sparse gradient for a parameter of shape {tuple(p.shape)}: CAdamW does "
                        "not support sparse gradients (use torch.optim.SparseAdam for them)"
                    )
                created.append(not self.state.get(p))
                state = self._state_for(p, group)
                state["step"] += 1
                step = int(state["step"].item())  # a CPU tensor: no device sync
                ei = len(entries)
                entries.append(
                    _Entry(p, state, state["exp_avg"], state["exp_avg_sq"], token, gi, step)
                )
                for pc in _pieces(
                    layout, p, g, state["exp_avg"], state["exp_avg_sq"], token, shard
                ):
                    key = (
                        gi,
                        step,
                        pc.param.device,
                        pc.param.dtype,
                        pc.grad.dtype,
                        pc.exp_avg.dtype,
                    )
                    b = buckets.get(key)
                    if b is None:
                        be = kernels.get_backend(kernels.resolve(group["backend"], pc.param.device))
                        b = buckets[key] = _Bucket(gi, step, be, shard)
                    b.add(pc, ei)
                    bucket_grads[key].append(pc.grad)

        if home is None or (not buckets and not table.sizes):
            return None, None
        order = list(buckets)
        plan = _Plan(
            groups=list(self.param_groups),
            param_ids=[tuple(map(id, g["params"])) for g in self.param_groups],
            params=params,
            none_pattern=none_pattern,
            entries=entries,
            table=table,
            home=home,
            buckets=[buckets[k] for k in order],
            state_obj=self.state,
            settings=self._settings(),
        )
        plan.created = created
        grads = [bucket_grads[k] for k in order]
        if cacheable:
            plan.freeze()
            self._plan = plan
        return plan, grads

    def _reuse(self, plan: _Plan) -> list[list[Tensor]] | None:
        """The per-bucket gradients if ``plan`` still describes this step, else None."""
        if plan.state_obj is not self.state or plan.settings != self._settings():
            return None
        if not all(map(is_, map(self.state.get, plan.eparams), plan.states)):
            return None  # a parameter's state was deleted, replaced or cleared
        for group, g0, ids in zip(self.param_groups, plan.groups, plan.param_ids):
            if group is not g0 or tuple(map(id, group["params"])) != ids:
                return None
        buf = plan.step_buf
        if buf is None or buf._version != plan.step_version:
            return None  # a step counter was changed in place
        # C-level loops (map/operator): this runs for every parameter on every step.
        pgrads = list(map(_GRAD, plan.params))
        if list(map(is_, pgrads, repeat(None))) != plan.none_pattern:
            return None
        states = plan.states
        for key, objs in (("step", plan.steps), ("exp_avg", plan.ms), ("exp_avg_sq", plan.vs)):
            if not all(map(is_, map(dict.get, states, repeat(key)), objs)):
                return None  # a state tensor was replaced
        egrads = list(map(pgrads.__getitem__, plan.grad_index))
        if any(map(_IS_SPARSE, egrads)):
            return None  # the full path raises the error
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
        # Valid: this step is the cached one with every counter one further.
        buf.add_(1)
        plan.step_version = buf._version
        for b in plan.buckets:
            b.step += 1
        out = []
        for b in plan.buckets:
            if b.dynamic is None:
                out.append(egrads if b.all_entries else list(map(egrads.__getitem__, b.src)))
            else:  # DTensors: fresh local views (and the layout's checks) every step
                for j, i in enumerate(b.src):
                    e = plan.entries[i]
                    pcs = _pieces(
                        DEFAULT_LAYOUT,
                        e.param,
                        egrads[i],
                        e.exp_avg,
                        e.exp_avg_sq,
                        e.token,
                        b.shard,
                    )
                    if len(pcs) != 1 or pcs[0].grad.dtype != b.grad_dtype:
                        plan.step_buf.sub_(1)  # undo; the full path re-plans this step
                        plan.step_version = buf._version
                        for bb in plan.buckets:
                            bb.step -= 1
                        return None
                    b.dynamic[j] = pcs[0]
                out.append([pc.grad for pc in b.dynamic])
                b.params = [pc.param for pc in b.dynamic]
                b.exp_avgs = [pc.exp_avg for pc in b.dynamic]
                b.exp_avg_sqs = [pc.exp_avg_sq for pc in b.dynamic]
                for pc in b.dynamic:
                    pc.grad = None  # type: ignore[assignment]
        return out

    def _execute(self, plan: _Plan, grads: list[list[Tensor]]) -> None:
        home = plan.home
        groups = self.param_groups
        # Pass 1: moments and local counts, one backend call per bucket.
        # A backend that can defer the exp_avg write to pass 2 (triton: pass 1 becomes
        # read-only) is asked to; it says whether it did.
        counts_parts = []
        deferred = []
        for b, gs in zip(plan.buckets, grads):
            group = groups[b.gi]
            beta1, maximize = group["betas"][0], bool(group["maximize"])
            if getattr(b.backend, "DEFER_EXP_AVG", False):
                c, d = b.backend.count_pass(gs, b.exp_avgs, beta1, maximize, defer_exp_avg=True)
            else:
                c, d = b.backend.count_pass(gs, b.exp_avgs, beta1, maximize, **b.scratch_kw), False
            counts_parts.append(c if c.device == home else c.to(home))
            deferred.append(d)
        if len(counts_parts) == 1:
            local_counts = counts_parts[0]
        elif counts_parts:
            local_counts = torch.cat(counts_parts)
        else:
            local_counts = torch.zeros(0, dtype=torch.int64, device=home)

        # When no count crosses ranks (whole tensors, or scale="shard" everywhere) and every
        # bucket's backend can compute the factor inside its update kernel (triton), the
        # update is launched straight from the local counts and the statistics are reduced
        # after it: the factor's small launches leave the critical path. Same numbers.
        fuse = not plan.table.sizes and all(
            getattr(b.backend, "SUPPORTS_FUSED_FACTOR", False) and b.device == home
            for b in plan.buckets
        )
        slices = plan.slices
        if fuse:
            numels = plan.local_numels.get(home)
            if numels is None:
                numels = device_index(tuple(pc.param.numel() for pc in plan.pieces), home)
                plan.local_numels[home] = numels
            alphas: dict[torch.dtype, Tensor] = {}
        else:
            # Reduce counts over shards (no-op for whole tensors and scale="shard" groups).
            red = reduce_counts(
                plan.pieces, plan.piece_group, local_counts, plan.table, len(groups),
                validated=self._validated,
            )  # fmt: skip
            self._stats = red
            alphas = _factors(red, groups, plan.buckets, slices)

        # Pass 2: second moment, weight decay and the masked, rescaled step.
        for b, gs, d, sl in zip(plan.buckets, grads, deferred, slices):
            group = groups[b.gi]
            h = UpdateHyper(
                lr=float(group["lr"]),
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                step=b.step,
                maximize=bool(group["maximize"]),
            )
            kw: dict[str, Any] = {"exp_avg_pending": True} if d else dict(b.scratch_kw)
            if fuse:
                kw["factor"] = (local_counts[sl], numels[sl], group["formula"], group["clamp"])
                a = None
            else:
                # float64 moments (float64 parameters) get the float64 factor; the others
                # its float32 rounding, as the Triton kernels compute it.
                a = alphas[b.factor_dtype]
                a = a if len(plan.buckets) == 1 else a[sl]
                a = a if a.device == b.device else a.to(b.device)
            b.backend.update_pass(b.params, gs, b.exp_avgs, b.exp_avg_sqs, a, h, **kw)

        if fuse:  # the statistics (kept / stepped elements per group); no collective here
            self._stats = reduce_counts(
                plan.pieces, plan.piece_group, local_counts, plan.table, len(groups)
            )

    # ------------------------------------------------------------------ statistics

    @property
    def mask_stats(self) -> dict[str, Tensor] | None:
        """Device tensors of the last step, per param group: ``kept`` (elements the mask
        kept) and ``elements`` (elements stepped). Reading them does not synchronise."""
        if self._stats is None:
            return None
        return {"kept": self._stats.kept_per_group, "elements": self._stats.elements_per_group}

    @property
    def kept_fraction(self) -> float | None:
        """Fraction of elements the mask kept in the last step, over all groups.

        With ``scale="global"`` it covers whole tensors (counts summed over shards); with
        ``scale="shard"`` this rank's pieces only. ``None`` before the first step.
        Reading it synchronises with the device (it calls ``.item()``).
        """
        if self._stats is None:
            return None
        e = int(self._stats.elements_per_group.sum().item())
        k = int(self._stats.kept_per_group.sum().item())
        return k / e if e else None

    @property
    def kept_fraction_per_group(self) -> list[float | None]:
        """Like :attr:`kept_fraction`, one value per param group (``None`` where nothing stepped)."""
        if self._stats is None:
            return [None] * len(self.param_groups)
        k = self._stats.kept_per_group.tolist()
        e = self._stats.elements_per_group.tolist()
        return [ki / ei if ei else None for ki, ei in zip(k, e)]
