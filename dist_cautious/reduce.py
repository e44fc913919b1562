"""Summing mask counts over shards: one batched all-reduce per process group per step.

Every rank builds, for each :class:`~dist_cautious.layout.Reduction` in the step's
:class:`~dist_cautious.layout.SlotTable`, one int64 vector ``[counts | elements]`` of
``2 * slots`` entries (slots in the table's vector order: named slots sorted by name):
``counts[s]`` is the number of kept elements of original tensor ``s`` in this rank's
pieces, ``elements[s]`` the number of its elements this rank stepped (used only for the
kept-fraction statistic). Pieces add into their slot; slots this rank
has no piece for (no gradient here, empty local shard) stay 0. The factor's ``N`` is the
original tensor's numel, known on every rank from the DTensor's global shape, so it is not
communicated.

Schedule (:func:`plan_schedule`): the vectors of all reductions that contain a given process
group are concatenated and summed with **one** all-reduce on that group. A tensor sharded
over several mesh dims (FSDP + TP: ``Reduction((dp, tp))``) is summed over each of its groups
in turn, which sums over their product; the groups are visited in one fixed order (first
appearance in the table), and a group's all-reduce goes in the earliest *round* after the
rounds of the groups that precede it in some reduction. Every all-reduce of a round is
started (``async_op=True``) before any is waited on. So a step issues exactly one
all-reduce per distinct shard group (FSDP2: 1; HSDP: 1, on the shard dim; FSDP + TP: 2, in
two rounds), and none for whole tensors (plain, DDP, replicated DTensors) or with
``scale="shard"``.

Why in turn rather than over a flattened dp x tp group: flattening needs a new process
group, and creating one is itself a collective over the whole world that every rank must
enter in the same order; doing that lazily inside ``step()`` would hang a job where only
some ranks hold such tensors (pipeline stages), and doing it eagerly would need a mesh the
optimizer is not given. The extra round costs one latency of a tiny message.

Why this cannot hang: the table, the schedule and every vector length come from
*metadata* only: the order of ``param_groups``, each DTensor's mesh, placements and global
shape. :meth:`CAdamW.step` reserves the slots of **every** parameter on every rank, whether
or not it has a gradient there, and nothing here depends on a gradient's presence, on the
size (or emptiness) of a local shard or on data. So every member of a group issues exactly
one all-reduce on it per step, in the same round, with a vector of the same length; a
round only waits for its own all-reduces, which every member has started, so the rounds
cannot wait on each other in a cycle. This holds as long as all ranks call ``step()``
together with the same parameters in the same order and the same ``scale`` (the SPMD
contract FSDP2 already imposes; members of a group hold the same parameters). An exception raised on one
rank only before the all-reduce (say a sparse or wrongly placed gradient) leaves the others
waiting in it until the process group's timeout, as with any collective.

No host synchronisation on CUDA: counts stay on the device, index tensors are cached on
the device (:func:`device_index`), NCCL's ``work.wait()`` only orders streams, and nothing
calls ``.item()``. (A gloo group given CUDA counts copies them to the host, which syncs.)

Counts are exact integers, so the sum does not depend on the reduction order and the
factor computed from it is bitwise identical on every rank.

Cross-rank consistency guard (no extra collective per step). The SPMD contract above is
checked rather than trusted, because breaking it otherwise gives wrong factors without a
word (same lengths, slots matched by position: parameters listed in another order on one
rank) or a gloo abort / NCCL hang (different lengths):

* identity: each slot carries what it claims to be (param group, numel, shape and dtype for
  DTensors) and, where one exists, a name (``param_names`` from ``named_parameters()``,
  FSDP1's ``_fqns``, the DeepSpeed engine's names; :class:`~.layout.SlotTable`). Named
  slots sit in the vector sorted by (group, name), so an order difference between ranks is
  harmless; unnamed slots keep the walk's order, and a swap of two tensors with the same
  tag (same shape) cannot be seen: pass names;
* exact agreement test: a value ``x < 2**40`` is sent as a *lane* ``[x, hi, lo]`` with
  ``x*x = hi * 2**40 + lo``. Every entry is below ``2**40``, so the int64 SUM over fewer than
  :data:`MAX_WORLD` ``= 2**23`` ranks cannot overflow, and ``sum(x*x) = sum(hi) * 2**40 +
  sum(lo)`` is rebuilt exactly in Python integers. The ranks sent the same ``x`` iff
  ``w * sum(x*x) == sum(x)**2`` (equality in Cauchy-Schwarz); every rank sees the same sums,
  so every rank decides the same way. (The former ``[h, h*h]`` with a 16-bit ``h`` let a
  disagreement through with odds 2**-16; a single 31-bit ``h`` would overflow ``w * h*h``
  sums at two ranks);
* every all-reduce vector starts with one lane of ``h``, a 40-bit fingerprint (blake2b) of
  the collective's slots, in vector order (24 bytes). Checked on the host when the vector
  is on the host (gloo); on CUDA only at agreement checks (below), to keep ``step()`` free
  of host syncs. It is a belt: it fires after the count pass, so the parameters are not
  updated but that step's moments and step counters have advanced (the error says so);
* the first time a collective's signature is seen (the first step, new param groups, a
  new ZeRO-3 sub-group), :func:`check_agreement` sends one fixed-size vector of three lanes
  (``n`` the vector length, and two independent 40-bit fingerprints: 80 bits) on that group
  **before anything is stepped** (the optimizer undoes its planned step on failure), so
  ranks that disagree on the *number* of slots fail with a message instead of an abort.
  Signatures agreed on are remembered by the optimizer; a cached plan skips the check.
  Moving the per-step check before the count pass would cost a collective (or, on CUDA, a
  host sync) per step, so the plan-time check is what runs before stepping;
* on disagreement every rank raises the same ``RuntimeError``; where the lengths agree, one
  more all-reduce of per-slot fingerprints names the first slot that differs (all ranks
  take that path together, since they all saw the same sums).

What it cannot catch: same-tag tensors in swapped places without names (above); a rank
that changes its parameters mid-run *alone* to a layout it never had agreed sends the
fixed-size check while the others send their count vectors (lengths differ: gloo aborts);
and a rank with no sharded tensor at all on a group issues nothing there (the others wait
until the process group's timeout).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import Piece, Reduction, SlotTable, group_key

_INDEX_CACHE: dict[tuple, Tensor] = {}


def device_index(values: tuple[int, ...], device: torch.device) -> Tensor:
    """A cached int64 tensor of ``values`` on ``device``: avoids a blocking host-to-device copy
    every step (the same plan repeats step after step)."""
    key = (values, device)
    t = _INDEX_CACHE.get(key)
    if t is None:
        if len(_INDEX_CACHE) > 4096:
            _INDEX_CACHE.clear()
        t = torch.tensor(values, dtype=torch.int64, device=device)
        _INDEX_CACHE[key] = t
    return t


_BITS = 40  # fingerprint width; every int64 entry of a lane is < 2**_BITS
_MASK = (1 << _BITS) - 1
MAX_WORLD = 1 << (63 - _BITS)  # sums of up to this many entries < 2**_BITS fit an int64
_LANE = 3  # int64 entries per exactly-compared value: [x, x*x >> 40, x*x & (2**40 - 1)]
_HEAD = _LANE  # one lane (a 40-bit fingerprint) at the start of every count vector


def _fingerprint(obj: object, salt: bytes = b"") -> int:
    """A 40-bit, process-independent fingerprint in [1, 2**40) (``hash()`` is salted per
    process); ``salt`` gives independent fingerprints of the same object."""
    d = hashlib.blake2b(repr(obj).encode(), digest_size=8, person=salt).digest()
    return 1 + int.from_bytes(d, "little") % _MASK


def _lane(x: int) -> list[int]:
    """``x`` (0 <= x < 2**40) as ``[x, hi, lo]`` with ``x*x = hi * 2**40 + lo``: each entry is
    below 2**40, so their SUM over up to :data:`MAX_WORLD` (2**23) ranks fits an int64."""
    sq = x * x
    return [x, sq >> _BITS, sq & _MASK]


def _agree(lane: list[int], world: int) -> bool:
    """All ``world`` ranks sent the same ``x`` iff ``world * sum(x^2) == sum(x)^2`` (equality
    in Cauchy-Schwarz), with ``sum(x^2) = sum(hi) * 2**40 + sum(lo)`` rebuilt exactly (Python
    integers) from the summed lane."""
    s, s_hi, s_lo = lane
    return world * ((s_hi << _BITS) + s_lo) == s * s


def _check_world(w: int) -> None:
    if w >= MAX_WORLD:
        raise ValueError(
            f"dist_cautious: a process group of {w} ranks; the cross-rank guard sums 40-bit "
            f"values exactly in int64 for groups of fewer than {MAX_WORLD} ranks"
        )


def _all_reduce(vec: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, object]:
    """Start a SUM all-reduce of ``vec`` on ``group``, on a device that group's backend takes.

    ``dist.all_reduce`` is looked up on the module at call time (tests count calls by
    patching it)."""
    backend = str(dist.get_backend(group))
    on_cuda = vec.device.type == "cuda"
    if on_cuda and "nccl" not in backend and "gloo" in backend:
        buf = vec.cpu()  # gloo runs on host memory
    elif not on_cuda and "gloo" not in backend and torch.cuda.is_available():
        buf = vec.cuda()  # NCCL-only group
    else:
        buf = vec
    work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return buf, work


@dataclass(frozen=True)
class Collective:
    """One all-reduce of a step: the concatenated vectors of ``reductions`` over ``group``."""

    round: int
    group: dist.ProcessGroup
    reductions: tuple[Reduction, ...]
    signature: tuple = ()  # what its slots claim to be, in order (see the guard above)
    fingerprint: int = 0  # 40-bit fingerprint of the signature

    def length(self, table: SlotTable) -> int:
        return _HEAD + sum(2 * table.sizes[r] for r in self.reductions)

    def slot_tags(self, table: SlotTable) -> list[tuple]:
        """What each slot claims to be, in count-vector order (names included)."""
        return [t for r in self.reductions for t in table.signature(r)]


def plan_schedule(reductions: list[Reduction]) -> list[Collective]:
    """The step's all-reduces: one per distinct process group, in rounds (see module doc).

    Depends only on the reductions (metadata), listed in table order, so every rank computes
    the same schedule for the groups it shares with others.
    """
    order: dict[object, int] = {}  # group key -> position in the one fixed order
    groups: dict[object, dist.ProcessGroup] = {}
    for red in reductions:
        for g in red.groups:
            k = group_key(g)
            if k not in order:
                order[k] = len(order)
                groups[k] = g
    preds: dict[object, set[object]] = {k: set() for k in order}
    members: dict[object, list[Reduction]] = {k: [] for k in order}
    for red in reductions:
        ks = sorted({group_key(g) for g in red.groups}, key=order.__getitem__)
        for a, b in zip(ks, ks[1:]):
            preds[b].add(a)
        for k in ks:
            members[k].append(red)
    rnd: dict[object, int] = {}
    for k in order:  # the fixed order is a topological order of `preds`
        rnd[k] = max((rnd[p] + 1 for p in preds[k]), default=0)
    return sorted(
        (Collective(rnd[k], groups[k], tuple(members[k])) for k in order),
        key=lambda c: (c.round, order[group_key(c.group)]),
    )


def _schedule(table: SlotTable) -> list[Collective]:
    """The table's schedule with each collective's signature (cached on the table)."""
    if table.schedule is None:
        out = []
        for c in plan_schedule(list(table.sizes)):
            sig = (group_key(c.group), tuple(tuple(table.signature(r)) for r in c.reductions))
            out.append(
                Collective(c.round, c.group, c.reductions, sig, _fingerprint(sig))
            )  # fmt: skip
        table.schedule = out
    return table.schedule


_STEPPED = (
    " This was caught by the per-step check inside the count all-reduce: the parameters "
    "were not updated, but this step's moments and step counters had already advanced "
    "(restore them from a checkpoint)."
)


def _disagreement(c: Collective, table: SlotTable, what: str, after: str = "") -> RuntimeError:
    w = dist.get_world_size(c.group)
    return RuntimeError(
        f"dist_cautious: the ranks of a process group of size {w} disagree on {what}. All "
        "ranks must build the optimizer with the same parameters, in the same param groups "
        "and, for tensors without names, in the same order (the SPMD contract FSDP/ZeRO "
        "already impose); with different ones the per-tensor counts would be summed across "
        "different tensors. Pass model.named_parameters() (or groups with 'param_names') so "
        "that the order does not matter, and never build param groups from sets. This rank "
        f"counts {sum(table.sizes[r] for r in c.reductions)} sharded tensors on this group." + after
    )


def _describe(tag: tuple) -> str:
    gi, numel, *rest, name = tag
    desc = f"param group {gi}, {numel} elements" + (f", {rest}" if rest else "")
    return desc + (f", named {name!r}" if name is not None else ", unnamed")


def _name_first_mismatch(
    c: Collective, table: SlotTable, device: torch.device, after: str = ""
) -> None:
    """Every rank is here together (they saw the same sums) and the vector lengths agree:
    all-reduce per-slot fingerprints and raise naming the first slot that differs."""
    tags = c.slot_tags(table)
    lanes = [_lane(_fingerprint(t)) for t in tags]
    n = len(lanes)
    flat = [v[j] for j in range(_LANE) for v in lanes]  # [x... | hi... | lo...]
    buf, work = _all_reduce(torch.tensor(flat, dtype=torch.int64, device=device), c.group)
    work.wait()  # type: ignore[attr-defined]
    summed = buf.tolist()
    w = dist.get_world_size(c.group)
    for s in range(n):
        if not _agree([summed[j * n + s] for j in range(_LANE)], w):
            raise _disagreement(
                c,
                table,
                f"sharded tensor number {s} on this group (first mismatch; on this rank: "
                f"{_describe(tags[s])})",
                after,
            )
    raise _disagreement(c, table, "what the sharded tensors are (fingerprint collision?)", after)


def check_agreement(table: SlotTable, validated: set) -> None:
    """Before the first step with a new count-vector layout: check that every member of each
    collective's group has the same layout (module doc); remember agreed signatures.

    One fixed-size all-reduce per new signature: three lanes (``n``, and two independent
    40-bit fingerprints of the signature: 80 bits), 9 int64."""
    if table.agreed:
        return
    schedule = _schedule(table)
    device = torch.device("cpu")
    for r in range(schedule[-1].round + 1 if schedule else 0):
        started = []
        for c in schedule:
            if c.round != r or c.signature in validated:
                continue
            _check_world(dist.get_world_size(c.group))
            h2 = _fingerprint(c.signature, salt=b"agreement")
            vals = [*_lane(c.length(table)), *_lane(c.fingerprint), *_lane(h2)]
            vec = torch.tensor(vals, dtype=torch.int64, device=device)
            started.append((c, *_all_reduce(vec, c.group)))
        for c, buf, work in started:
            work.wait()  # type: ignore[attr-defined]
            summed = buf.tolist()
            w = dist.get_world_size(c.group)
            if not _agree(summed[:_LANE], w):
                raise _disagreement(c, table, "the number of sharded tensors they count")
            if not (_agree(summed[_LANE : 2 * _LANE], w) and _agree(summed[2 * _LANE :], w)):
                _name_first_mismatch(c, table, device)
            validated.add(c.signature)
    table.agreed = True


@dataclass
class ReducedCounts:
    counts: Tensor  # int64 per piece: counts over the whole original tensor (or local)
    numels: Tensor  # int64 per piece: elements the factor divides (global or local)
    kept_per_group: Tensor  # int64 per param group: kept elements (for statistics)
    elements_per_group: Tensor  # int64 per param group: stepped elements
    # per reduction, the summed count of each slot (factor_lag=1 keeps them, see lag.py)
    slot_counts: dict = dataclasses.field(default_factory=dict)

    # The kept-mask statistics (the optimizer's ``mask_stats`` & co read them from here).

    def mask_stats(self) -> dict[str, Tensor]:
        """Per param group, device tensors: ``kept`` and ``elements``; no synchronisation."""
        return {"kept": self.kept_per_group, "elements": self.elements_per_group}

    def kept_fraction(self) -> float | None:
        """Kept / stepped elements over all groups (``None`` if nothing stepped); reads the
        device (``.item()``)."""
        e = int(self.elements_per_group.sum().item())
        k = int(self.kept_per_group.sum().item())
        return k / e if e else None

    def kept_fraction_per_group(self) -> list[float | None]:
        """As :meth:`kept_fraction`, per param group (``None`` where nothing stepped)."""
        k = self.kept_per_group.tolist()
        e = self.elements_per_group.tolist()
        return [ki / ei if ei else None for ki, ei in zip(k, e)]


class CountReduction:
    """A count reduction started by :func:`start_reduce`: its first round of all-reduces is
    in flight; :meth:`wait` completes every round and returns the :class:`ReducedCounts`.
    Later rounds (FSDP + TP) start only when the previous one is complete.

    ``fused``: the update kernels compute each factor themselves from the local counts and
    ``local_numels`` (per piece, on the counts' device); :meth:`wait` then gives only the
    statistics, and the caller runs it after the update (see :func:`start_reduce`)."""

    def __init__(self, finish: Any, local_numels: Tensor, fused: bool = False) -> None:
        self._finish = finish
        self._result: ReducedCounts | None = None
        self.local_numels = local_numels
        self.fused = fused

    def wait(self) -> ReducedCounts:
        if self._result is None:
            self._result = self._finish()
            self._finish = None
        return self._result


def start_reduce(
    pieces: list[Piece],
    piece_group: list[int],
    local_counts: Tensor,
    table: SlotTable,
    n_groups: int,
    validated: set | None = None,
    in_kernel: bool = False,
) -> CountReduction:
    """Start turning local per-piece counts into the counts each piece's factor is computed from.

    Pieces with a ``reduction`` (a slot of a sharded tensor) are summed over the ranks that
    hold pieces of the same original tensor (one all-reduce per shard process group, see
    :func:`plan_schedule`); pieces without one (whole tensors, and every piece of a
    ``scale="shard"`` group, which the optimizer gives local numels) count locally.
    ``validated``: the optimizer's set of agreed signatures (see :func:`check_agreement`).

    The fuse decision: ``in_kernel`` says that the update kernels could compute the factors
    from the local counts (every backend of the step can, on the counts' device, and no
    factor lags). When in addition no count crosses ranks (no slot in ``table``: whole
    tensors, or ``scale="shard"`` everywhere) the result is ``fused``: the caller launches
    the update straight from the local counts and waits for this reduction (the
    statistics) after it, so the factor's small launches leave the critical path. Same
    numbers. Without slots nothing is computed before :meth:`CountReduction.wait`.
    """
    device = local_counts.device
    local_numels = device_index(tuple(p.param.numel() for p in pieces), device)
    groups_t = device_index(tuple(piece_group), device)

    if not table.sizes:

        def local_only() -> ReducedCounts:
            kept = torch.zeros(n_groups, dtype=torch.int64, device=device)
            elems = torch.zeros(n_groups, dtype=torch.int64, device=device)
            kept.index_add_(0, groups_t, local_counts)
            elems.index_add_(0, groups_t, local_numels)
            return ReducedCounts(local_counts, local_numels, kept, elems)

        return CountReduction(local_only, local_numels, fused=in_kernel)

    kept = torch.zeros(n_groups, dtype=torch.int64, device=device)
    elems = torch.zeros(n_groups, dtype=torch.int64, device=device)

    counts = local_counts.clone()
    numels = device_index(tuple(p.numel for p in pieces), device)

    # Pieces of whole tensors (no reduction) count directly.
    whole = tuple(i for i, p in enumerate(pieces) if p.reduction is None)
    if whole:
        w = device_index(whole, device)
        kept.index_add_(0, groups_t[w], local_counts[w])
        elems.index_add_(0, groups_t[w], local_numels[w])

    # One local vector per reduction; every slot is present whether or not a piece fills it.
    by_red: dict[Reduction, list[int]] = {}
    for i, p in enumerate(pieces):
        if p.reduction is not None:
            by_red.setdefault(p.reduction, []).append(i)
    vecs: dict[Reduction, Tensor] = {}
    where: dict[Reduction, tuple[Tensor, Tensor] | None] = {}
    for red, size in table.sizes.items():
        idx = tuple(by_red.get(red, ()))
        vec = torch.zeros(2 * size, dtype=torch.int64, device=device)
        if idx:
            ii = device_index(idx, device)
            pos = table.positions(red)  # named slots: sorted by name (layout.SlotTable)
            slot_ids = (pc.slot for pc in map(pieces.__getitem__, idx))
            slots = device_index(
                tuple(slot_ids if pos is None else map(pos.__getitem__, slot_ids)), device
            )
            vec.index_add_(0, slots, local_counts[ii])
            vec.index_add_(0, slots + size, local_numels[ii])
            where[red] = (ii, slots)
        else:
            where[red] = None
        vecs[red] = vec

    # One all-reduce per process group; a round's all-reduces all start before any wait.
    check_agreement(table, validated if validated is not None else set())
    schedule = _schedule(table)  # a cached step plan reuses its table, and the schedule
    n_rounds = schedule[-1].round + 1 if schedule else 0

    def start_round(r: int) -> list:
        started = []
        for c in schedule:
            if c.round != r:
                continue
            head = device_index(tuple(_lane(c.fingerprint)), device)
            flat = torch.cat([head, *(vecs[red] for red in c.reductions)])
            buf, work = _all_reduce(flat, c.group)
            started.append((c, buf, work))
        return started

    first = start_round(0) if n_rounds else []
    return CountReduction(
        lambda: _finish_reduce(
            first, start_round, n_rounds, table, vecs, where, counts, numels, kept, elems, device
        ),
        local_numels,
    )


def _finish_reduce(
    first: list,
    start_round: Any,
    n_rounds: int,
    table: SlotTable,
    vecs: dict,
    where: dict,
    counts: Tensor,
    numels: Tensor,
    kept: Tensor,
    elems: Tensor,
    device: torch.device,
) -> ReducedCounts:
    for r in range(n_rounds):
        started = first if r == 0 else start_round(r)
        for c, buf, work in started:
            work.wait()  # type: ignore[attr-defined]
            if buf.device.type == "cpu":  # free on the host; on CUDA see the module doc
                if not _agree(buf[:_HEAD].tolist(), dist.get_world_size(c.group)):
                    _name_first_mismatch(c, table, torch.device("cpu"), _STEPPED)
            summed = buf.to(device, non_blocking=True) if buf.device != device else buf
            off = _HEAD
            for red in c.reductions:
                n = 2 * table.sizes[red]
                vecs[red] = summed[off : off + n]
                off += n

    for red, size in table.sizes.items():
        vec = vecs[red]
        w = where[red]
        if w is not None:
            ii, slots = w
            counts[ii] = vec[slots]
        gi = device_index(tuple(table.ordered(red, table.group_index[red])), device)
        kept.index_add_(0, gi, vec[:size])
        elems.index_add_(0, gi, vec[size:])
    slot_counts = {}  # in reservation order (slot indices), whatever the vector order
    for red, size in table.sizes.items():
        pos = table.positions(red)
        v = vecs[red][:size]
        slot_counts[red] = v if pos is None else v[device_index(tuple(pos), device)]
    return ReducedCounts(counts, numels, kept, elems, slot_counts)
