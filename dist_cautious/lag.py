"""``factor_lag=1``: the factor of the previous step, so the count all-reduce leaves the
critical path.

With ``factor_lag=0`` (the default) a step is count pass -> all-reduce -> factor -> update
pass: the update waits for the collective. With ``factor_lag=1`` a parameter's step ``t``
uses the factor of its step ``t - 1``'s mask counts (already reduced), its mask ``t`` is
still this step's; the counts of step ``t`` are reduced asynchronously (``async_op=True``)
and waited for at the start of step ``t + 1`` (or when ``state_dict()``, the statistics or
``load_state_dict`` need them), so the collective overlaps the next forward and backward.
A parameter's first step (fresh state, after ``del opt.state[p]``, or loaded without saved
counts) uses its exact factor: that step waits for its all-reduce, as ``factor_lag=0``.

The previous counts are optimizer state, ``state[p]["cautious_count"]``: int64, the count
summed over the whole original tensor (over every shard), so it is the same on every rank
of the shard group (a replicated value: DCP saves and reshards it like ``step``). A
parameter that is one tensor (plain, DDP, DTensor) or holds a fragment of one original
tensor keeps a 0-d tensor; a flat parameter holding fragments of several (an FSDP1
``FlatParameter``, a ZeRO partition) keeps one count per original tensor (per count slot), a
1-D tensor, which ``state_dict()`` gives as a tuple of ints for FSDP1 parameters (FSDP1's
optimizer state dicts take a positive-dim tensor for a flattened one and copy a hashable
non-tensor value, equal on every rank, to each original parameter). Within a cached step plan they are views of
one buffer (:class:`LagState`), read with one gather and written with one scatter per step.

Why the collectives cannot hang: whether a step waits for its all-reduce at once or at the
next step changes *when* a rank waits, never which collectives it issues: every step
issues the same one all-reduce per shard group as with ``factor_lag=0``, in the same
order, so the ranks' sequences stay identical even if one rank waits now (a parameter with
fresh state there) and another later. A pending all-reduce is always waited for before the
next one on the same plan is started (``step()`` begins with it).
"""

from __future__ import annotations

import numbers
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from .layout import DEFAULT_LAYOUT, ParamLayout, Reduction
from .reduce import ReducedCounts

COUNT_KEY = "cautious_count"
FACTOR_LAGS = (0, 1)


def check_factor_lag(value: Any, scale: str, where: str) -> None:
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or value not in FACTOR_LAGS
    ):
        raise ValueError(
            f"{where}: invalid factor_lag={value!r}; use 0 (the exact factor of this step: "
            "count, all-reduce, update) or 1 (the previous step's factor: the count "
            "all-reduce overlaps the next forward/backward)"
        )
    if value == 1 and scale == "shard":
        raise ValueError(
            f"{where}: factor_lag=1 with scale='shard': the lag hides scale='global''s count "
            "all-reduce, and scale='shard' has none to hide. Use factor_lag=0 for this group "
            "(or scale='global')."
        )


class LagState:
    """The ``factor_lag=1`` bookkeeping of one step plan (see module doc).

    ``buf`` holds every lagged entry's previous counts back to back ("units": one per count
    slot of a sharded tensor, one per local piece otherwise); ``state[p]["cautious_count"]``
    is a view of it. ``piece_unit`` maps each piece of the plan to its unit.
    """

    def __init__(
        self,
        entries: list[Any],
        layouts: list[ParamLayout],
        pieces: list[Any],
        piece_entry: list[int],
        lag_groups: set[int],
        home: torch.device,
    ) -> None:
        by_entry: dict[int, list[int]] = defaultdict(list)
        for pi, ei in enumerate(piece_entry):
            by_entry[ei].append(pi)
        n_units = 0
        spans: list[tuple[int, int, int, bool]] = []  # (entry, start, length, 0-d)
        piece_unit = [0] * len(pieces)
        lag_piece = [False] * len(pieces)
        token_units: dict[Reduction, tuple[list[int], list[int]]] = {}
        local_units: tuple[list[int], list[int]] = ([], [])
        for ei, e in enumerate(entries):
            if e.gi not in lag_groups:
                continue
            pis = by_entry.get(ei, [])
            layout = layouts[ei]
            flat = layout is not DEFAULT_LAYOUT
            tok = e.token
            if tok is None:  # nothing crosses ranks: the local counts are the counts
                n = len(pis) if flat else 1
                for k, pi in enumerate(pis):
                    piece_unit[pi] = n_units + k
                    local_units[0].append(n_units + k)
                    local_units[1].append(pi)
            else:
                if flat:  # one slot per original tensor of the flat buffer
                    slots, red = list(tok), layout.reduction  # type: ignore[attr-defined]
                else:  # a DTensor: (reduction, slot)
                    red, slot = tok
                    slots = [slot]
                n = len(slots)
                us, ss = token_units.setdefault(red, ([], []))
                us.extend(range(n_units, n_units + n))
                ss.extend(slots)
                for pi in pis:
                    piece_unit[pi] = n_units + (slots.index(pieces[pi].slot) if flat else 0)
            for pi in pis:
                lag_piece[pi] = True
            spans.append((ei, n_units, n, not flat or n == 1))
            n_units += n
        self.param_ids = frozenset(id(e.param) for e in entries if e.gi in lag_groups)
        self.buf = torch.zeros(n_units, dtype=torch.int64, device=home)
        # per piece, the numel the factor divides (the original tensor's)
        self.numels = torch.tensor([pc.numel for pc in pieces], dtype=torch.int64, device=home)
        self.deferrable = False  # set by the optimizer: every count slot of the step lags
        # adopt the counts the state already holds (a previous plan, a loaded checkpoint)
        has_prev = [False] * len(entries)
        self.views: list[tuple[dict, Tensor]] = []
        for ei, start, n, zero_d in spans:
            st = entries[ei].state
            old = st.get(COUNT_KEY)
            view = self.buf[start] if zero_d else self.buf[start : start + n]
            if isinstance(old, (tuple, list)):  # FSDP1's optimizer state dict (see base.py)
                old = torch.tensor(old, dtype=torch.int64)
            if torch.is_tensor(old) and old.numel() == view.numel():
                view.copy_(old.reshape(view.shape))
                has_prev[ei] = True
            st[COUNT_KEY] = view
            self.views.append((st, view))
        use_prev = [lag_piece[pi] and has_prev[ei] for pi, ei in enumerate(piece_entry)]
        self.fresh = any(lp and not up for lp, up in zip(lag_piece, use_prev))
        # every piece of the plan lags: once none is fresh, a step's factors are all known
        # before it (the one-pass step, plan.execute)
        self.all_lagged = all(lag_piece)
        self.lag_piece = torch.tensor(lag_piece, dtype=torch.bool, device=home)
        self.use_prev = torch.tensor(use_prev, dtype=torch.bool, device=home)
        self.piece_unit = torch.tensor(piece_unit, dtype=torch.int64, device=home)
        self.token_units = {
            red: (
                torch.tensor(us, dtype=torch.int64, device=home),
                torch.tensor(ss, dtype=torch.int64, device=home),
            )
            for red, (us, ss) in token_units.items()
        }
        self.local_units = (
            (
                torch.tensor(local_units[0], dtype=torch.int64, device=home),
                torch.tensor(local_units[1], dtype=torch.int64, device=home),
            )
            if local_units[0]
            else None
        )

    def intact(self) -> bool:
        """The state still holds this plan's views (a cached plan checks it every step)."""
        return all(st.get(COUNT_KEY) is v for st, v in self.views)

    def previous(self) -> Tensor:
        """Per piece, its previous counts (meaningful where ``use_prev``)."""
        return self.buf[self.piece_unit]

    def counts(self, current: Tensor) -> Tensor:
        """Per piece: the previous counts where the factor lags, ``current`` elsewhere."""
        return torch.where(self.use_prev, self.buf[self.piece_unit], current)

    def store_local(self, local_counts: Tensor) -> None:
        """This step's counts of pieces whose tensor does not cross ranks."""
        if self.local_units is not None:
            units, pis = self.local_units
            self.buf[units] = local_counts[pis]

    def store_reduced(self, red: ReducedCounts) -> None:
        """This step's counts of sharded tensors, summed over their shards."""
        for r, (units, slots) in self.token_units.items():
            self.buf[units] = red.slot_counts[r][slots]

    def stepped(self) -> None:
        """After a step every lagged piece has previous counts."""
        if self.fresh:
            self.use_prev = self.lag_piece
            self.fresh = False


class Pending:
    """A step's count all-reduce still in flight (``factor_lag=1``), and where its result
    goes. :meth:`finish` waits for it and returns the step's statistics."""

    def __init__(self, work: Any, lag: LagState) -> None:
        self.work, self.lag = work, lag

    def finish(self) -> ReducedCounts:
        red = self.work.wait()
        self.lag.store_reduced(red)
        return red
