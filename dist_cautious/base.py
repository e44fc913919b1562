"""``CautiousOptimizer``: what every cautious optimizer shares, whatever its math.

A step, in four stages (each in its own module):

1. plan (:mod:`.plan`, :mod:`.layout`): walk every parameter of every group, reserve count
   slots for tensors split across ranks, and cut the local pieces the kernels will step
   (``plan.build``), or reuse the cached plan (``plan.reuse``);
2. count pass (the optimizer's kernels): update what the mask needs and count
   ``u * g > 0`` per piece (``u`` the update direction, ``g`` the gradient);
3. reduce (:mod:`.reduce`): sum counts over shards (one all-reduce per shard process group),
   then ``alpha = N / max(nnz, clamp * N)`` per piece, on the device;
4. update pass (the optimizer's kernels): the masked, rescaled step and the state update.

Stages 2-4 are ``plan.execute``; :meth:`CautiousOptimizer.step` is gather -> plan -> execute,
and the plan reaches the optimizer only through its public surface (``plan.Stepper``).

The base is the engine: it holds the options every cautious optimizer has (``scale``,
``formula``, ``clamp``, ``backend``, ``state_dtype``, ``cautious_weight_decay``,
``factor_lag``: param-group keys like ``lr``; their defaults and checks are
:mod:`.options`), the state (created, typed, validated at load and healed by
:mod:`.state`), copies and pickling, the cached step plan, the statistics (read from the
last :class:`~.reduce.ReducedCounts`), the adapters' layouts and the ``factor_lag=1``
all-reduces in flight; each concern's work is a call into its module. A subclass (:mod:`.optim`: ``CAdamW``, ``CLion``, ``CSGD``) is its math: hyperparameters and
their checks, ``state_keys``, and four hooks (``_check_hyper``, ``_resolve``, ``_count``,
``_update``) that call its kernels; the base calls them (``count`` / ``update`` are the
public face of the last two).

No host synchronisation happens inside ``step()`` on CUDA (counts and factors stay on the
device); the kept-mask statistics are device tensors read only when you ask for them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import device_step
from . import plan as planning
from . import state as opt_state
from .lag import Pending
from .layout import ParamLayout, SlotTable, is_dtensor
from .options import (  # noqa: F401 (re-exported: optim.py, __init__.py, users)
    FORMULAS,
    HEALED_KEYS,
    OPTION_DEFAULTS,
    OPTION_KEYS,
    SCALES,
    STATE_DTYPES,
    TORCH_FLAG_DEFAULTS,
    TYPO_CUTOFF,
    check_betas,
    check_fused,
    check_group_keys,
    check_lr,
    check_nonneg,
    check_options,
    check_param_names,
    check_real,
    check_torch_flags,
    check_unique_params,
    option_property,
    param_devices,
    real,
)
from .plan import Bucket, Plan, backend_name
from .reduce import ReducedCounts, check_agreement
from .resolve import resolve


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


class CautiousOptimizer(Optimizer):
    """The shared machinery of :class:`~dist_cautious.CAdamW`, ``CLion`` and ``CSGD``.

    Not used directly: a subclass sets ``state_keys`` (the per-parameter state tensors, in
    the order the kernels take them), ``compat_keys`` (group keys its torch counterpart
    keeps, so that state dicts load there with the same meaning) and implements the hooks.
    """

    state_keys: ClassVar[tuple[str, ...]] = ()
    compat_keys: ClassVar[dict[str, Any]] = {}
    # torch SGD, lion-pytorch and timm Lion keep no "step": a loaded state without one is
    # healed to 1 (a buffer exists)
    step_optional: ClassVar[bool] = False
    # group keys an older state dict may lack, healed at load with this optimizer's default
    healed_keys: ClassVar[tuple[str, ...]] = HEALED_KEYS

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        options: dict[str, Any],
    ) -> None:
        name = type(self).__name__
        self._check_hyper(defaults, name)
        options = {**TORCH_FLAG_DEFAULTS, **options}
        check_options(options, name)
        if "amsgrad" not in self.compat_keys:  # checked False above; torch SGD keeps none
            options.pop("amsgrad", None)
        self._init_tables()
        super().__init__(params, {**defaults, **self.compat_keys, **options})

    # ------------------------------------------------------------------ subclass hooks

    def _check_hyper(self, group: dict[str, Any], where: str) -> None:
        """Raise for a bad value of the subclass's own hyperparameters in ``group``."""
        raise NotImplementedError

    def _resolve(self, name: str, device: torch.device) -> Any:
        """The kernel backend object for backend ``name`` ("auto", ...) on ``device``."""
        raise NotImplementedError

    def _count(self, b: Bucket, grads: list[Tensor], group: dict[str, Any]) -> tuple[Tensor, dict]:
        """Pass 1 on bucket ``b``: int64 counts per piece, and keyword arguments for the
        bucket's ``_update`` call (a backend's hand-off between its passes)."""
        raise NotImplementedError

    def _update(
        self,
        b: Bucket,
        grads: list[Tensor],
        group: dict[str, Any],
        alphas: Tensor | None,
        kw: dict[str, Any],
    ) -> None:
        """Pass 2 on bucket ``b`` with per-piece factors ``alphas`` (or ``kw["factor"]``)."""
        raise NotImplementedError

    def _one_pass(
        self, b: Bucket, grads: list[Tensor], group: dict[str, Any], alphas: Tensor
    ) -> Tensor:
        """Both passes on bucket ``b`` in one backend call (``b.backend.one_pass``) with
        given per-piece factors ``alphas``: int64 counts per piece. Needed by a subclass
        with a backend whose ``caps.one_pass_lagged`` is set."""
        raise NotImplementedError

    # ------------------------------------------------------------------ tables

    def _init_tables(self) -> None:
        # What is not in torch's (defaults, state, param_groups): rebuilt by __setstate__.
        # Tensors passed in by the user, by id, held weakly: HF Accelerate / the HF Trainer
        # swap sharded DTensors into param_groups after construction, and the originals (the
        # unsharded model) must be freed. A dead entry leaves at once, so a recycled id never
        # matches; look up with ``was_given`` (identity, not just the id).
        self._given: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        self._layouts: dict[int, ParamLayout] = {}  # registered by adapters, by id
        self._layout_params: dict[int, Tensor] = {}  # ... and their tensors
        self._stats: ReducedCounts | None = None
        self._plan: Plan | None = None  # cached step plan, see step()
        self._validated: set = set()  # count-vector signatures all ranks agreed on (reduce.py)
        # factor_lag=1: all-reduces left in flight, one per step() call (ZeRO calls step()
        # once per param group / sub-group: each waits for its own at the next call on them)
        self._pending: dict[int, Pending] = {}
        # kernel backends by (backend name, device), see backend_for
        self._backends: dict[tuple[str, torch.device], Any] = {}

    # ------------------------------------------------------------------ given tensors

    def was_given(self, p: Tensor) -> bool:
        """``p`` itself (not a new tensor that reuses a freed one's id) was given: at
        construction or by ``add_param_group`` (held weakly: a swapped-out original is freed)."""
        return self._given.get(id(p)) is p

    # ------------------------------------------------------------------ copy / pickle
    #
    # torch's Optimizer.__getstate__ keeps only defaults, state and param_groups. Everything
    # the step computes with is in those (options are group keys), except which tensors it
    # was given and the adapters' layouts, which are added here; the caches are rebuilt.

    def __getstate__(self) -> dict[str, Any]:
        self._finish_pending()  # the last step's counts belong to the state
        state = super().__getstate__()
        # a tensor with a registered layout is only known through it (pickle drops layouts)
        # only the given tensors it still steps: a swapped-out original is not copied
        state["_given_params"] = [
            p
            for g in self.param_groups
            for p in g["params"]
            if self.was_given(p) and not self.layout_registered(p)
        ]
        state["_registered"] = _Registered(self.registered_layouts())
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
            if given is None:  # torch's own format: the groups' tensors were given
                given = [p for g in self.param_groups for p in g["params"]]
            self._given = weakref.WeakValueDictionary((id(p), p) for p in given)
            if registered is not None:
                for p, layout in registered.pairs:
                    self.register_layout(p, layout)
        opt_state.heal(self, defaults=unpickled)  # saved by torch or an older version
        self._plan = None

    # ------------------------------------------------------------------ set-up

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        gi = len(self.param_groups)
        check_unique_params(param_group.get("params"), gi)
        if isinstance(param_group, dict):  # a misspelt key would be ignored: refuse it
            check_group_keys(param_group, self.defaults, f"param group {gi}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self.check_group(group, gi)
        try:
            check_fused(group, param_devices(group["params"]), f"param group {gi}")
        except ValueError:
            self.param_groups.pop()
            raise
        check_param_names(group, gi)
        for p in group["params"]:
            check_real(p)
            self._given[id(p)] = p
        self._plan = None

    def register_layout(self, param: Tensor, layout: ParamLayout) -> None:
        """Tell the optimizer how ``param`` maps to pieces of original tensors.

        Used by adapters whose parameters are not the model's tensors (DeepSpeed ZeRO's
        flat partitions, see :mod:`dist_cautious.deepspeed`). The first resolver of the
        chain (:mod:`dist_cautious.resolve`) answers with it, before any other.
        """
        self._layouts[id(param)] = layout
        self._layout_params[id(param)] = param
        self._plan = None

    def registered_layout(self, p: Tensor) -> ParamLayout | None:
        """The layout registered for ``p`` with :meth:`register_layout`, else None."""
        return self._layouts.get(id(p))  # (the tensor is held: its id cannot be reused)

    def layout_registered(self, p: Tensor) -> bool:
        """Whether ``p`` has a layout from :meth:`register_layout` (planned every step)."""
        return id(p) in self._layouts

    def registered_layouts(self) -> list[tuple[Tensor, ParamLayout]]:
        """``[(tensor, layout)]`` registered with :meth:`register_layout`, in that order."""
        return [(self._layout_params[i], layout) for i, layout in self._layouts.items()]

    def layout_for(self, p: Tensor) -> ParamLayout:
        """The layout ``p`` is stepped with: the first answer of the resolver chain
        (:mod:`dist_cautious.resolve`: registered, FSDP1, DTensor, a given tensor). Raises
        for a tensor none of them knows (one this optimizer was never given)."""
        found = resolve(p, self)
        if found is None:
            raise RuntimeError(
                f"{type(self).__name__} is asked to step a tensor it was never given (shape "
                f"{tuple(p.shape)}, dtype {p.dtype}). DeepSpeed does this when it swaps the "
                "model's parameters for flat ZeRO partitions that mix slices of many tensors (a "
                "factor computed on them would be per-partition, not per-tensor) or for fp32 "
                "master copies. Use dist_cautious.deepspeed.initialize(...) instead of "
                "deepspeed.initialize(...), or call dist_cautious.deepspeed.attach(engine) "
                "right after it (see docs/deepspeed.md). If you changed param_groups by hand, "
                "use optimizer.add_param_group instead."
            )
        return found[1]

    def check_group(self, group: dict[str, Any], gi: int, where: str | None = None) -> None:
        """Raise for a bad value in param group ``gi`` (hyperparameters and options)."""
        where = where or f"param group {gi}"
        self._check_hyper(group, where)
        check_options(group, where)

    # ------------------------------------------------------------------ state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict`` (the torch counterpart's state dicts
        load too).

        * The saved groups' values win, options included, as for every torch hyperparameter;
          a state dict without them (the torch counterpart, older versions) keeps this
          optimizer's defaults.
        * State tensors are restored in the loaded group's ``state_dtype`` from the saved
          values, bitwise: torch would cast them to the parameter's dtype (float64 moments of
          float32 parameters, float32 moments of bfloat16 parameters would lose precision).
        * A single-device state dict (full plain tensors) loaded for DTensor parameters
          (FSDP2, TP) is sharded like each parameter, every rank from its own copy: load the
          same state dict on every rank.
        * The state dict is checked first: a state dict of another optimizer, missing or
          misshapen state tensors raise a ``ValueError`` naming the parameter and the key,
          before anything is loaded.
        """
        hooks = self._optimizer_load_state_dict_pre_hooks  # they may translate a format
        state_dict = opt_state.run_load_pre_hooks(self, state_dict, hooks.values())
        opt_state.check_loadable(self, state_dict)  # before anything is loaded
        self._finish_pending()
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        self._optimizer_load_state_dict_pre_hooks = type(hooks)()  # they ran above
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        opt_state.restore_loaded(self, saved_state, saved_ids)
        self._plan = None

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``; with ``factor_lag=1`` the last step's
        count all-reduce is waited for first, so its counts are in the state."""
        self._finish_pending()
        return opt_state.flat_counts_as_tuples(self, super().state_dict())

    def _finish_pending(self, params: set[int] | None = None) -> None:
        """Wait for the count all-reduces left in flight (``factor_lag=1``) and store their
        counts: all of them, or (``params``: ids of tensors about to be stepped) those of
        steps that counted any of these tensors. In the order they were started, so the
        statistics end with the latest."""
        pending = getattr(self, "_pending", None)
        if not pending:
            return
        for key in list(pending):
            pd = pending[key]
            if params is None or not params.isdisjoint(pd.lag.param_ids):
                del pending[key]
                self._stats = pd.finish()

    def state_for(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """``p``'s state, created (zeros, step 0) or brought to the group's state dtype."""
        dt = opt_state.state_dtype(p, group, self.defaults["state_dtype"])
        return opt_state.prepare(self.state[p], p, dt, self.state_keys)

    # ------------------------------------------------------------------ step
    #
    # A step is gather -> plan -> execute (:mod:`.plan`): the plan is built (walk every
    # parameter: layouts, slots, state, pieces, buckets) or, while nothing it depends on
    # changed, the cached one is reused; executing it runs the count pass, the reduce, the
    # factors and the update pass. ``capturable=True`` and ``torch.compile`` take the
    # device-scalar step instead (:mod:`.device_step`).

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if device_step.wanted(self):  # capturable=True, or under torch.compile
            stats = device_step.step(self)
            if stats is not None:  # kept / stepped elements per group (see _stats_buffers)
                for buf, value in zip(self._device_stats, stats):
                    buf.copy_(value)
            return loss
        if getattr(self, "_pending", None):  # factor_lag=1: previous counts of these tensors
            self._finish_pending({id(p) for g in self.param_groups for p in g["params"]})
        plan = getattr(self, "_plan", None)
        grads = planning.reuse(plan, self) if plan is not None else None
        if grads is None:
            self._plan = None
            for gi, group in enumerate(self.param_groups):  # before any state changes
                if group.get("fused"):
                    check_fused(group, param_devices(group["params"]), f"param group {gi}")
            plan, grads = planning.build(self)
            if plan is None:
                return loss
            planning.agree(plan, self)  # the ranks' one-time check; undoes the step on failure
            if plan.cached:
                self._plan = plan
        stats, pending = planning.execute(plan, grads, self)  # grads: held by locals only
        if pending is None:
            self._stats = stats
        else:  # factor_lag=1: this step's all-reduce is in flight, waited for later
            if id(pending.lag) in self._pending or len(self._pending) >= 64:
                self._finish_pending()  # (not expected: a plan's own was waited for above)
            self._pending[id(pending.lag)] = pending
        return loss

    # ------------------------------------------------------------------ plan.Stepper
    #
    # The surface plan.py and device_step.py step through (with param_groups, state,
    # state_keys, layout_for, check_group and state_for above).

    def backend_for(self, group: dict[str, Any], device: torch.device) -> Any:
        """The kernel backend ``group`` asks for (:func:`~.plan.backend_name`) on ``device``:
        ``_resolve``'s, one per (name, device) for the optimizer's life, so a Triton
        backend's chunk-table cache outlives a re-planned step (ZeRO layouts)."""
        name = backend_name(group)
        be = self._backends.get((name, device))
        if be is None:
            be = self._backends[(name, device)] = self._resolve(name, device)
        return be

    def count(
        self, b: Bucket, grads: list[Tensor], group: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        """Pass 1 on bucket ``b``: the subclass's ``_count``."""
        return self._count(b, grads, group)

    def update(
        self,
        b: Bucket,
        grads: list[Tensor],
        group: dict[str, Any],
        alphas: Tensor | None,
        kw: dict[str, Any],
    ) -> None:
        """Pass 2 on bucket ``b``: the subclass's ``_update``."""
        self._update(b, grads, group, alphas, kw)

    def one_pass(
        self, b: Bucket, grads: list[Tensor], group: dict[str, Any], alphas: Tensor
    ) -> Tensor:
        """A ``factor_lag=1`` step on bucket ``b`` in one pass, with the previous step's
        per-piece factors ``alphas``: the subclass's ``_one_pass``; returns this step's
        counts. Called only where the bucket's backend declares ``one_pass_lagged``."""
        return self._one_pass(b, grads, group, alphas)

    def check_agreement(self, table: SlotTable) -> None:
        """The ranks' one-time check that they count the same tensors (:mod:`.reduce`),
        remembering the count-vector signatures agreed on."""
        check_agreement(table, self._validated)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        steps: list[Tensor],
        states: list[Tensor],
        prevs: list[Tensor],
    ) -> tuple:
        """The device-scalar step's gather (``device_step.gather``). Named as torch's
        optimizers name it: dynamo runs it eagerly instead of tracing it."""
        self._finish_pending()  # factor_lag=1: an eager step's counts still in flight
        info, table, moved = device_step.gather(self, group, params, grads, steps, states, prevs)
        if moved:  # a step counter left the cached plan's shared buffer
            self._plan = None
        if params:
            p = params[0]
            self._stats_buffers((p.to_local() if is_dtensor(p) else p).device)
        if table.sizes:
            check_agreement(table, self._validated)
        return info

    def _stats_buffers(self, device: torch.device) -> None:
        """Kept / stepped elements per param group: buffers the device-scalar step writes in
        place (a traced step cannot rebind ``_stats``); ``_stats`` points at them."""
        box = getattr(self, "_device_stats", None)
        n = len(self.param_groups)
        if box is None or box[0].numel() != n or box[0].device != device:
            box = tuple(torch.zeros(n, dtype=torch.int64, device=device) for _ in range(2))
            self._device_stats = box
        if self._stats is None or self._stats.kept_per_group is not box[0]:
            none = box[0][:0]
            self._stats = ReducedCounts(none, none, box[0], box[1])

    # ------------------------------------------------------------------ statistics

    @property
    def mask_stats(self) -> dict[str, Tensor] | None:
        """Device tensors of the last step, per param group: ``kept`` (elements the mask
        kept) and ``elements`` (elements stepped). Reading them does not synchronise."""
        self._finish_pending()
        return None if self._stats is None else self._stats.mask_stats()

    @property
    def settled_mask_stats(self) -> dict[str, Tensor] | None:
        """As :attr:`mask_stats`, but never waits for a collective: with ``factor_lag=1``,
        while the last step's all-reduce is still in flight, the statistics of the step
        before it (complete); otherwise the last step's. For a training loop that logs
        every step without putting the hidden all-reduce back on the critical path."""
        if not getattr(self, "_pending", None):
            return self.mask_stats
        return None if self._stats is None else self._stats.mask_stats()

    @property
    def kept_fraction(self) -> float | None:
        """Fraction of elements the mask kept in the last step, over all groups.

        With ``scale="global"`` it covers whole tensors (counts summed over shards); with
        ``scale="shard"`` this rank's pieces only. ``None`` before the first step.
        Reading it synchronises with the device (it calls ``.item()``).
        """
        self._finish_pending()
        return None if self._stats is None else self._stats.kept_fraction()

    @property
    def kept_fraction_per_group(self) -> list[float | None]:
        """Like :attr:`kept_fraction`, one value per param group (``None`` where nothing stepped)."""
        self._finish_pending()
        if self._stats is None:
            return [None] * len(self.param_groups)
        return self._stats.kept_fraction_per_group()


# The constructor's options are the defaults of the param-group keys of the same names.
# Reading ``opt.scale`` gives the default; assigning it sets the default and every group.
for _key in OPTION_KEYS:
    setattr(CautiousOptimizer, _key, option_property(_key))
del _key
