"""Counting and timing the collectives an optimizer step issues.

:class:`CommMeter` wraps torch's collective entry points — the c10d API
(``torch.distributed.all_reduce``, ``all_gather_into_tensor``, ...) and the functional
collectives DTensor uses (``torch.distributed._functional_collectives``) — for as long as
it is installed. While :attr:`CommMeter.active` is set (launch/bench.py sets it only inside
``optimizer.step()``) every call is counted and its payload bytes added, and ``seconds``
adds up the **exposed** collective time: the time the step spends blocked on collectives,
between device synchronisations on CUDA, including any wait for slower ranks:

* a blocking call (``async_op=False``) and a functional collective: from the call to its
  completion (the wrapper waits for the functional collective right away);
* an ``async_op=True`` call: the call itself plus the time spent in its ``work.wait()``,
  *wherever* that wait happens while the meter is active. The wrapper returns the work
  wrapped, and does not wait for it. So a collective waited for right after it is issued
  (``factor_lag=0``) counts in full, and one left in flight across the forward and backward
  and waited for at the next step (``factor_lag=1``) counts only what was still left then:
  its hidden part is not exposed time. ``waits`` counts the waits seen.

Outside the step (forward, backward, FSDP's own all-gathers) the wrappers only forward.

Payload bytes of one call: the size of its result buffer on this rank (the reduced tensor
of an all-reduce, the full output of an all-gather, the local shard of a reduce-scatter or
scatter; for a gather, the tensor this rank sends).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

C10D_OPS = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_coalesced",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
)
FUNCOL_OPS = (
    "broadcast",
    "all_reduce",
    "all_gather_single",
    "reduce_scatter_single",
    "all_gather_tensor",
    "reduce_scatter_tensor",
    "all_reduce_coalesced",
    "all_gather_single_coalesced",
    "reduce_scatter_single_coalesced",
    "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor_coalesced",
    "all_to_all_single",
)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        out: list[torch.Tensor] = []
        for y in x:
            out.extend(_tensors(y))
        return out
    return []


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class _TimedWork:
    """An async collective's work handle whose ``wait()`` the meter times while it is active
    (the rest is forwarded to the real handle)."""

    def __init__(self, work: Any, meter: CommMeter) -> None:
        self._work, self._meter = work, meter

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        m = self._meter
        if not m.active:
            return self._work.wait(*args, **kwargs)
        m._sync()
        t0 = time.perf_counter()
        out = self._work.wait(*args, **kwargs)
        m._sync()
        m.seconds += time.perf_counter() - t0
        m.waits += 1
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class CommMeter:
    """Counts, sizes and times collectives while :attr:`active` is true."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.active = False
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0
        self.waits = 0
        self.by_op: Counter[str] = Counter()
        self._depth = 0
        self._saved: list[tuple[Any, str, Callable]] = []

    def reset(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0
        self.waits = 0
        self.by_op.clear()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _timed(self, run: Callable[[], Any], complete: Callable[[Any], None]) -> Any:
        """Run one collective and wait for it, timing the whole between device syncs.
        Collectives issued inside another one (DTensor's scatter, ...) are not counted twice."""
        self._depth += 1
        try:
            self._sync()
            t0 = time.perf_counter()
            out = run()
            complete(out)
            self._sync()
            self.seconds += time.perf_counter() - t0
        finally:
            self._depth -= 1
        return out

    def _record(self, op: str, payload: int) -> None:
        self.calls += 1
        self.bytes += payload
        self.by_op[op] += 1

    def _wrap_c10d(self, name: str, fn: Callable) -> Callable:
        meter = self

        def complete(work: Any) -> None:
            if work is not None and hasattr(work, "wait"):
                work.wait()

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not meter.active or meter._depth:
                return fn(*args, **kwargs)
            if kwargs.get("async_op"):  # exposed time: the call, then wherever it is waited for
                work = meter._timed(lambda: fn(*args, **kwargs), lambda w: None)
                if work is not None and hasattr(work, "wait"):
                    work = _TimedWork(work, meter)
            else:
                work = meter._timed(lambda: fn(*args, **kwargs), complete)
            ts = _tensors(list(args) + list(kwargs.values()))
            if name == "all_gather":
                payload = _nbytes(ts[:-1])  # (tensor_list, tensor): the gathered list
            elif name in ("all_gather_into_tensor", "_all_gather_base"):
                payload = _nbytes(ts[:1])  # (output, input): the full output
            elif name == "all_to_all":
                payload = _nbytes(ts) // 2  # (outputs, inputs)
            elif name in (
                "reduce_scatter_tensor",
                "_reduce_scatter_base",
                "reduce_scatter",
                "scatter",
            ):
                payload = _nbytes(ts[:1])  # the output shard (scatter: not the source's list)
            elif name == "gather":
                payload = _nbytes(ts[:1])  # the tensor this rank contributes
            else:
                payload = _nbytes(ts)
            meter._record(name, payload)
            return work

        return wrapper

    def _wrap_funcol(self, name: str, fn: Callable) -> Callable:
        meter = self

        def complete(out: Any) -> None:
            for t in _tensors(out):
                if hasattr(t, "wait"):
                    t.wait()  # AsyncCollectiveTensor: complete it now, keep the wrapper
                else:
                    torch.ops._c10d_functional.wait_tensor(t)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not meter.active or meter._depth:
                return fn(*args, **kwargs)
            out = meter._timed(lambda: fn(*args, **kwargs), complete)
            meter._record("funcol." + name, _nbytes(_tensors(out)))
            return out

        return wrapper

    def install(self) -> CommMeter:
        """Wrap the entry points where torch defines them and wherever a module imported
        them by name (DTensor's ``from ...distributed_c10d import scatter``, ...)."""
        import sys

        import torch.distributed._functional_collectives as funcol
        import torch.distributed.distributed_c10d as c10d

        targets: list[tuple[Callable, Callable]] = []
        for name in C10D_OPS:
            fn = getattr(c10d, name, None)
            if fn is not None:
                targets.append((fn, self._wrap_c10d(name, fn)))
        for name in FUNCOL_OPS:
            fn = getattr(funcol, name, None)
            if fn is not None:
                targets.append((fn, self._wrap_funcol(name, fn)))
        by_id = {id(fn): w for fn, w in targets}
        for modname, mod in list(sys.modules.items()):
            if mod is None or not modname.startswith(
                ("torch.distributed", "dist_cautious", "deepspeed")
            ):
                continue
            try:
                items = list(vars(mod).items())
            except TypeError:
                continue
            for attr, val in items:
                w = by_id.get(id(val))
                if w is not None:
                    self._saved.append((mod, attr, val))
                    setattr(mod, attr, w)
        return self

    def uninstall(self) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()

    def __enter__(self) -> CommMeter:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()
