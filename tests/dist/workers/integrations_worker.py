"""CAdamW inside the frameworks people meet FSDP through (torchrun, gloo on CPU).

usage: integrations_worker.py OUT.json SCENARIO [SCENARIO ...]

Scenarios (each trains the same tiny model for ``STEPS`` optimizer steps on 2 ranks):

* ``accel_fsdp2[_shard]``: ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(
  fsdp_version=2))`` + ``accelerator.prepare(model, CAdamW(model.parameters()))``: Accelerate
  shards the model with ``fully_shard`` *after* the optimizer exists and swaps DTensors into
  its ``param_groups`` (``fsdp2_switch_optimizer_parameters``).
* ``trainer_fsdp2_opt`` / ``trainer_fsdp2_cls``: ``transformers.Trainer`` with
  ``fsdp_config={"fsdp_version": 2}``, the optimizer passed as ``optimizers=(CAdamW(...),
  None)`` or as ``optimizer_cls_and_kwargs=(CAdamW, {...})``.
* ``trainer_fsdp1_orig`` / ``trainer_fsdp1_flat``: the Trainer with FSDP1
  (``fsdp_config={"fsdp_version": 1}``), ``use_orig_params`` True / False,
  ``optimizer_cls_and_kwargs`` (the optimizer is built on the wrapped model).
* ``lightning_fsdp`` / ``lightning_mp``: Lightning ``FSDPStrategy`` (FSDP1) and
  ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``), CAdamW from
  ``configure_optimizers``.

Accelerate (and so the HF Trainer) refuses FSDP on CPU without a word: with no GPU its
``AcceleratorState`` picks ``MULTI_CPU`` and drops the plugin (the run is then plain DDP).
``cpu_fsdp_state`` patches ``AcceleratorState.__init__`` before any ``Accelerator`` is built
to do what its GPU branch does (``distributed_type = FSDP``,
``fsdp_plugin.set_mixed_precision(...)``, ``fsdp_plugin``); everything after that -- the
Trainer's post-processing, ``prepare``, wrapping, activation checkpointing, the optimizer
swap, mixed precision, clipping, backward, step, save / resume -- is the frameworks' own code.
After set-up every FSDP2 scenario records how many original parameters are still alive and
the parameter bytes per rank (``resources``).

Every rank records the batches it trained on; they are gathered and replayed in one
process by a reference: ``dist_cautious.CAdamW`` on a plain copy of the initial model, the
loss the mean of the ranks' losses (FSDP averages gradients). Rank 0 writes, per scenario,
the relative errors of the final full parameters and of the total updates ``p - p0``
against the reference, the kept fraction of both, and what the optimizer looked like.
tests/dist/test_integrations.py asserts on those numbers.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
)

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import D_IN, D_OUT, Block, TinyNet  # noqa: E402

from dist_cautious import CAdamW  # noqa: E402
from dist_cautious.integrations import decay_groups, hf_optimizer_cls_and_kwargs  # noqa: E402
from launch import engines  # noqa: E402
from tests.oracle import rel_err  # noqa: E402

STEPS = 10
BATCH = 4  # per rank
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
WD = 0.1


# --- the model ---------------------------------------------------------------------------


def init_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in TinyNet().state_dict().items()}


def fresh_net() -> TinyNet:
    """A TinyNet with the initial weights (``init_state``)."""
    net = TinyNet()
    net.load_state_dict(init_state())
    return net


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_OUT, generator=g)


def no_decay(name: str) -> bool:
    """Biases and norms: the usual decay / no-decay split (two param groups)."""
    return name.endswith("bias") or ".norm." in name or name == "gain"


def groups(named: list[tuple[str, nn.Parameter]]) -> list[dict]:
    return [
        {"params": [p for n, p in named if not no_decay(clean(n))], "weight_decay": WD},
        {"params": [p for n, p in named if no_decay(clean(n))], "weight_decay": 0.0},
    ]


# --- reference and comparison -------------------------------------------------------------


def clean(name: str) -> str:
    for s in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.", "net.", "model."):
        name = name.replace(s, "")
    return name


def rank_grads(net: nn.Module, per_rank: list[tuple], mp: str) -> list[torch.Tensor]:
    """The averaged gradient a sharded step reduces, with the casts of precision ``mp``:

    * ``"fp32"``: plain fp32;
    * ``"autocast"``: ``torch.autocast("cpu", bfloat16)`` around the forward, fp32
      parameters and fp32 gradients (Lightning ``precision="bf16-mixed"``);
    * ``"bf16_params"``: FSDP's mixed precision (FSDP2 ``MixedPrecisionPolicy`` / FSDP1
      ``MixedPrecision`` with param_dtype = reduce_dtype = bfloat16, as Accelerate sets for
      ``mixed_precision="bf16"``) plus Accelerate's autocast: each rank computes with
      bfloat16 copies of the parameters and inputs, its bfloat16 gradient is halved and the
      two are summed in bfloat16 (one rounding), then cast to the fp32 master gradient;
    * ``"bf16_noac"``: the same policy without autocast (the HF Trainer's FSDP2 path: its
      model's forward is not wrapped), so the loss is computed in bfloat16 too;
    * ``"fp16_params"``: FSDP2's float16 policy alone (Accelerate on CPU adds no autocast
      and no scaler for fp16); ``"fp16_root"``: FSDP1 ``MixedPrecision(float16)`` with the
      loss in float16 (Lightning ``16-mixed`` on CPU, whose scaler is disabled there).
    """
    params = list(net.parameters())
    if mp == "fp32":
        loss = sum(F.mse_loss(net(x), y) for x, y in per_rank) / len(per_rank)
        return list(torch.autograd.grad(loss, params))
    if mp == "autocast":  # each rank's gradient on its own (autocast caches its casts)
        total = [torch.zeros_like(p) for p in params]
        for x, y in per_rank:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.mse_loss(net(x), y)
            gs = torch.autograd.grad(loss, params)
            total = [t + g / len(per_rank) for t, g in zip(total, gs)]
        return total
    if mp == "fp16_root":  # FSDP1 MixedPrecision(float16), no autocast, no working scaler
        names = [n for n, _ in net.named_parameters()]
        total = None
        for x, y in per_rank:  # inputs cast to fp16 by FSDP1's root (cast_root_forward_inputs)
            low = {n: p.detach().half().requires_grad_() for n, p in zip(names, params)}
            out = torch.func.functional_call(net, low, (x.half(),))
            loss = F.mse_loss(out, y.half())
            gs = torch.autograd.grad(loss, [low[n] for n in names])
            part = [g / len(per_rank) for g in gs]  # FSDP1 pre-divides, sums in fp16
            total = part if total is None else [t + g for t, g in zip(total, part)]
        return [t.float() for t in total]
    assert mp in ("bf16_params", "fp16_params", "bf16_noac"), mp
    low_dtype = torch.float16 if mp == "fp16_params" else torch.bfloat16
    names = [n for n, _ in net.named_parameters()]
    total = [torch.zeros_like(p) for p in params]
    for x, y in per_rank:
        low = {n: p.detach().to(low_dtype).requires_grad_() for n, p in zip(names, params)}
        if mp == "bf16_params":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = torch.func.functional_call(net, low, (x.bfloat16(),))
            loss = F.mse_loss(out.float(), y)
        elif mp == "bf16_noac":  # the policy's casts without autocast: bf16 ops, bf16 loss
            out = torch.func.functional_call(net, low, (x.bfloat16(),))
            loss = F.mse_loss(out, y.bfloat16())
        else:  # Accelerate on CPU: no autocast and no scaler for fp16, only FSDP's policy
            loss = F.mse_loss(torch.func.functional_call(net, low, (x.half(),)), y)
        gs = torch.autograd.grad(loss, [low[n] for n in names])
        total = [t + g.float() for t, g in zip(total, gs)]
    return [(t.to(low_dtype).float()) / len(per_rank) for t in total]


def reference(
    init: dict[str, torch.Tensor],
    batches: list[list[tuple]],
    decay_names: set[str] | None,
    mp: str = "fp32",
    clip: float = 0.0,
) -> tuple[dict[str, torch.Tensor], float | None, int]:
    """Single-process CAdamW on the full model; ``batches[step][rank] = (x, y)``; the
    gradients with the casts of ``mp`` (see ``rank_grads``), clipped to total norm
    ``clip`` as ``torch.nn.utils.clip_grad_norm_`` (the Trainer's ``max_grad_norm``)."""
    net = TinyNet()
    net.load_state_dict(init)
    named = list(net.named_parameters())
    if decay_names is None:
        opt = CAdamW(groups(named), backend="foreach", **HYPER)
    else:
        opt = CAdamW(
            [
                {"params": [p for n, p in named if n in decay_names], "weight_decay": WD},
                {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
            ],
            backend="foreach",
            **HYPER,
        )
    clipped = 0
    for per_rank in batches:
        grads = rank_grads(net, per_rank, mp)
        for (_, p), g in zip(named, grads):
            p.grad = g
        if clip > 0:
            clipped += int(torch.nn.utils.clip_grad_norm_(net.parameters(), clip) > clip)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in named}, opt.kept_fraction, clipped


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters by clean name (torch's own full state dict: FSDP1 and FSDP2)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {clean(k): v.detach().clone().float() for k, v in sd.items()}


def unwrap(opt) -> tuple[CAdamW, list[str]]:
    """The CAdamW under Accelerate's / Lightning's / DeepSpeed's wrappers, and the wrappers'
    class names, outermost first."""
    chain = []
    while not isinstance(opt, CAdamW):
        chain.append(type(opt).__name__)
        opt = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if opt is None:
            raise RuntimeError(f"no CAdamW under {chain}")
    return opt, chain


def inner(opt) -> CAdamW:
    """The CAdamW under Accelerate's / Lightning's / DeepSpeed's wrappers."""
    return unwrap(opt)[0]


def originals(model: nn.Module) -> list[weakref.ref]:
    """Weak references to a model's parameters before a framework shards it."""
    return [weakref.ref(p) for p in model.parameters()]


def resources(refs: list[weakref.ref], model: nn.Module) -> dict:
    """After set-up: how many original (unsharded) parameters are still alive, and the bytes
    of parameter storage this rank holds (its shards' storages plus any live original),
    against the bytes of the whole model. Gathered from every rank (issue 17, item 1)."""
    gc.collect()
    storages: dict[int, int] = {}
    for p in model.parameters():
        t = engines.local_tensor(p)
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    alive = 0
    for r in refs:
        o = r()
        if o is not None:
            alive += 1
            storages.setdefault(o.untyped_storage().data_ptr(), o.untyped_storage().nbytes())
        del o
    init = init_state().values()
    model_bytes = sum(v.numel() * v.element_size() for v in init)
    w = dist.get_world_size()  # FSDP2 pads dim 0 to a multiple of the world size
    shard_bytes = sum(-(-v.shape[0] // w) * v[0].numel() * v.element_size() for v in init)
    mine = {"alive": alive, "bytes": sum(storages.values())}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {
        "originals": len(refs),
        "originals_alive": [e["alive"] for e in everyone],
        "param_bytes": [e["bytes"] for e in everyone],
        "model_bytes": model_bytes,
        "padded_shard_bytes": shard_bytes,  # ceil(rows / W) rows of every tensor
    }


def report(
    model: nn.Module,
    opt,
    batches: list[list[tuple]],
    decay_names: set[str] | None = None,
    mp: str = "fp32",
    clip: float = 0.0,
) -> dict:
    init = init_state()
    got = model if isinstance(model, dict) else full_params(model)
    c = inner(opt)
    kinds = sorted({type(p).__name__ for g in c.param_groups for p in g["params"]})
    steps = sorted({int(s["step"]) for s in c.state.values() if "step" in s})
    kept = c.kept_fraction
    local = sum(engines.local_tensor(p).numel() for g in c.param_groups for p in g["params"])
    fractions = [None] * dist.get_world_size()
    dist.all_gather_object(fractions, local / sum(v.numel() for v in got.values()))
    res: dict = {"kinds": kinds, "state_steps": steps, "n_steps": len(batches)}
    res["local_fraction"] = fractions  # of all elements, per rank: < 1 means sharded
    if dist.get_rank() == 0:
        ref, ref_kept, clipped = reference(init, batches, decay_names, mp, clip)
        missing = sorted(set(ref) - set(got))
        res["missing"] = missing
        names = [n for n in ref if n in got]
        res["param"] = max(rel_err(got[n], ref[n]) for n in names)
        res["delta"] = max(rel_err(got[n] - init[n], ref[n] - init[n]) for n in names)
        res["moved"] = min((ref[n] - init[n]).norm().item() for n in names)
        res["kept"], res["ref_kept"] = kept, ref_kept
        res["clipped_steps"] = clipped
        if mp != "fp32" or clip > 0:  # how far the same run is from a reference without them
            plain, _, _ = reference(init, batches, decay_names)
            res["delta_plain_ref"] = max(
                rel_err(got[n] - init[n], plain[n] - init[n]) for n in names
            )
    return res


def train(net, opt, steps, mine: list[tuple], backward=torch.Tensor.backward) -> None:
    """Optimizer steps ``steps`` on this rank's batches (appended to ``mine``); ``backward``:
    e.g. ``accelerator.backward``."""
    rank = dist.get_rank()
    for step in steps:
        x, y = batch(step, rank)
        mine.append((x, y))
        backward(F.mse_loss(net(x), y))
        opt.step()
        opt.zero_grad()


def gather_batches(mine: list[tuple]) -> list[list[tuple]]:
    """Per-rank lists of (x, y) -> ``[step][rank]``."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [(x.tolist(), y.tolist()) for x, y in mine])
    n = min(len(e) for e in everyone)
    return [[(torch.tensor(e[s][0]), torch.tensor(e[s][1])) for e in everyone] for s in range(n)]


# --- HF Accelerate ------------------------------------------------------------------------


CPU_FSDP_FORCED: list[bool] = []  # one entry per AcceleratorState built with a plugin


def cpu_fsdp_state() -> None:
    """On CPU Accelerate's ``AcceleratorState.__init__`` silently drops the FSDP plugin (its
    state becomes MULTI_CPU). Patched before any ``Accelerator`` is built, it then does what
    its GPU branch does, in the same place: ``distributed_type = FSDP``,
    ``fsdp_plugin.set_mixed_precision(mixed_precision)`` (FSDP2 ``MixedPrecisionPolicy`` /
    FSDP1 ``MixedPrecision``) and ``fsdp_plugin``. So the Trainer's own post-processing (its
    ``is_fsdp_enabled``, ``fsdp_config`` options such as activation checkpointing,
    ``max_grad_norm``) runs on the state it would have on a GPU machine."""
    import inspect

    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    orig = AcceleratorState.__init__
    if getattr(orig, "_dc_cpu_fsdp", False):
        return
    sig = inspect.signature(orig)

    def init(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        plugin = sig.bind(self, *args, **kwargs).arguments.get("fsdp_plugin")
        if plugin is None or self.distributed_type != DistributedType.MULTI_CPU:
            return
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        CPU_FSDP_FORCED.append(True)

    init._dc_cpu_fsdp = True
    AcceleratorState.__init__ = init


def fsdp1_cpu_device_id() -> None:
    """torch's FSDP1 runs on CPU only with ``device_id=torch.device("cpu")`` (no index: else
    "Inconsistent compute device"; none: "FSDP needs a non-CPU accelerator device").
    Accelerate passes ``accelerator.device`` (``cpu:0`` on CPU), Lightning passes None on
    CPU. On a GPU machine both pass the GPU and this is not needed."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if getattr(FSDP.__init__, "_dc_cpu", False):
        return
    orig = FSDP.__init__

    def init(self, module, *args, device_id=None, **kwargs):
        if device_id is None or torch.device(device_id).type == "cpu":
            device_id = torch.device("cpu")
        orig(self, module, *args, device_id=device_id, **kwargs)

    init._dc_cpu = True
    FSDP.__init__ = init


def reset_accelerate() -> None:
    """Forget the last scenario's Accelerator (the process group stays)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state()
    GradientState._reset_state()
    if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU


MP_CASTS = {
    "no": "fp32",
    "bf16": "bf16_params",
    "fp16": "fp16_params",
}  # Accelerate's mixed_precision -> casts


def sc_accel(version: int = 2, scale: str = "global", flat: bool = False, mp: str = "no") -> dict:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    reset_accelerate()
    cpu_fsdp_state()
    extra = {} if version == 2 else dict(use_orig_params=not flat, sync_module_states=False)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
        reshard_after_forward=True if version == 2 else "FULL_SHARD",
        **extra,
    )
    n_forced = len(CPU_FSDP_FORCED)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, mixed_precision=mp)
    refused = len(CPU_FSDP_FORCED) > n_forced
    if version == 1:
        fsdp1_cpu_device_id()
    net = fresh_net()
    refs = originals(net)
    decay_names = None
    if flat:  # FlatParameters: prepare the model first, then the optimizer on its params
        net = accelerator.prepare(net)
        opt = accelerator.prepare(CAdamW(net.parameters(), weight_decay=WD, **HYPER))
        decay_names = set(init_state())  # one group: every tensor decays
    else:
        opt = CAdamW(groups(list(net.named_parameters())), scale=scale, **HYPER)
        net, opt = accelerator.prepare(net, opt)
    seen = (str(accelerator.distributed_type), accelerator.state.fsdp_plugin.fsdp_version)
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy
    res_mem = resources(refs, net)
    mine: list[tuple] = []
    train(net, opt, range(STEPS), mine, accelerator.backward)
    res = report(net, opt, gather_batches(mine), decay_names, mp=MP_CASTS[mp])
    res.update(res_mem)
    res["mp_policy"] = None if policy is None else str(policy.param_dtype)
    res["refused_cpu_fsdp"] = refused
    res["prepared_as"] = seen
    res["wrapper"] = type(net).__name__
    reset_accelerate()
    return res


def sc_accel_resume(state_dict_type: str) -> dict:
    """FSDP2: 5 steps, ``accelerator.save_state``, a fresh model / optimizer / Accelerator,
    ``accelerator.load_state``, 5 more steps; against 10 uninterrupted reference steps."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    ckpt = Path(os.environ["DC_OUT_DIR"]) / f"accel_ckpt_{state_dict_type}"
    cpu_fsdp_state()
    refs: list = []

    def prepared():
        reset_accelerate()
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Block"],
            state_dict_type=state_dict_type,
        )
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        net = fresh_net()
        refs.append(originals(net))
        opt = CAdamW(groups(list(net.named_parameters())), **HYPER)
        net, opt = accelerator.prepare(net, opt)
        return accelerator, net, opt

    mine: list[tuple] = []
    accelerator, net, opt = prepared()
    train(net, opt, range(STEPS // 2), mine, accelerator.backward)
    accelerator.save_state(str(ckpt))
    accelerator, net, opt = prepared()  # fresh: initial weights, empty state
    accelerator.load_state(str(ckpt))
    res_mem = resources(refs[-1], net)  # after the resumed set-up (the first run's are gone)
    train(net, opt, range(STEPS // 2, STEPS), mine, accelerator.backward)
    res = report(net, opt, gather_batches(mine))
    res.update(res_mem)
    reset_accelerate()
    return res


# --- HF Trainer ---------------------------------------------------------------------------


def sc_trainer(
    fsdp_version: int,
    how: str,
    use_orig_params: bool = True,
    gas: int = 1,
    bf16: bool = False,
    ac: bool = False,
    clip: bool = False,
    resume: bool = False,
) -> dict:
    """``clip``: the Trainer's default ``max_grad_norm`` (1.0; else 0) with targets large
    enough that it clips; ``ac``: ``fsdp_config["activation_checkpointing"]``; ``bf16``:
    ``bf16=True``; ``resume``: a run that saves at step 5, then a fresh Trainer and model
    ``train(resume_from_checkpoint=...)`` to step 10."""
    from hf_recipe import CAdamWTrainer
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    reset_accelerate()
    cpu_fsdp_state()  # before the Trainer builds its Accelerator: its own set-up runs
    if fsdp_version == 1:
        fsdp1_cpu_device_id()
    n_forced = len(CPU_FSDP_FORCED)

    class TinyConfig(PretrainedConfig):
        model_type = "dc_tiny"

    class TinyModel(PreTrainedModel):
        config_class = TinyConfig
        _no_split_modules = ["Block"]

        def __init__(self, config: TinyConfig) -> None:
            super().__init__(config)
            self.net = TinyNet()
            self.seen: list[tuple] = []

        def get_input_embeddings(self) -> nn.Module:
            return self.net.inp

        def get_output_embeddings(self) -> nn.Module:
            return self.net.out

        def forward(self, x, labels=None):
            if self.training:
                self.seen.append((x.detach().clone(), labels.detach().clone()))
            out = self.net(x)
            return {"loss": F.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(7)
            n = 2 * BATCH * STEPS * gas
            self.x, self.y = torch.randn(n, D_IN, generator=g), torch.randn(n, D_OUT, generator=g)
            if clip:
                self.y *= 10  # gradient norms of ~3-8: max_grad_norm=1.0 clips every step

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    class Resources(TrainerCallback):
        """After the Trainer's set-up (prepare: sharding, the optimizer swap)."""

        def __init__(self, refs: list) -> None:
            self.refs, self.seen = refs, None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.seen = resources(self.refs, model)

    def new_model():
        m = TinyModel(TinyConfig())
        m.net.load_state_dict(init_state())
        return m

    model = new_model()
    fsdp_config: dict = {"fsdp_version": fsdp_version, "transformer_layer_cls_to_wrap": ["Block"]}
    if fsdp_version == 1:
        fsdp_config["use_orig_params"] = use_orig_params
        fsdp_config["sync_module_states"] = False  # Accelerate refuses it on CPU (seeded init)
    if ac:
        fsdp_config["activation_checkpointing"] = True
    out_dir = Path(os.environ["DC_OUT_DIR"]) / f"hf_out_{fsdp_version}_{how}_{int(resume)}"
    extra_args: dict = {} if clip else {"max_grad_norm": 0.0}  # clip: the Trainer's default
    if resume:
        extra_args.update(save_strategy="steps", save_steps=STEPS // 2)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=gas,
        max_steps=STEPS,
        learning_rate=HYPER["lr"],
        adam_beta1=HYPER["betas"][0],
        adam_beta2=HYPER["betas"][1],
        adam_epsilon=HYPER["eps"],
        weight_decay=WD,
        lr_scheduler_type="constant",
        warmup_steps=0,
        fsdp="full_shard",
        fsdp_config=fsdp_config,
        use_cpu=True,
        bf16=bf16,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **({"save_strategy": "no"} | extra_args),
    )
    kw: dict = {}
    cls = Trainer
    if how == "optimizers":  # the Trainer refuses a ready optimizer under FSDP
        try:
            cls(
                model=model,
                args=args,
                train_dataset=Data(),
                optimizers=(CAdamW(model.parameters()), None),
            )
        except RuntimeError as e:
            reset_accelerate()
            return {"rejected": str(e)}
        raise RuntimeError("the Trainer accepted optimizers=(...) under FSDP")
    if how == "override":  # docs/integrations.md: create_optimizer builds CAdamW (hf_recipe)
        cls = CAdamWTrainer
    else:  # the Trainer builds it (its decay / no-decay groups, its lr, betas, eps)
        # (the Trainer passes only the param groups: lr, betas and eps go in the kwargs)
        # the one-liner of docs/integrations.md: lr, betas, eps from the TrainingArguments
        kw["optimizer_cls_and_kwargs"] = hf_optimizer_cls_and_kwargs(args)
    watch = Resources(originals(model))
    trainer = cls(model=model, args=args, train_dataset=Data(), callbacks=[watch], **kw)
    decay_names = {clean(n) for n in trainer.get_decay_parameter_names(model)}
    trainer.train()
    micro = gather_batches(model.seen)  # [micro-step][rank]
    extra: dict = {}
    if resume:  # a fresh model and Trainer from the checkpoint of step 5
        first = trainer
        model = new_model()
        watch = Resources(originals(model))
        reset_accelerate()
        trainer = cls(model=model, args=args, train_dataset=Data(), callbacks=[watch], **kw)
        trainer.train(resume_from_checkpoint=str(out_dir / f"checkpoint-{STEPS // 2}"))
        again = gather_batches(model.seen)
        extra["resumed_batches_match"] = len(again) == len(micro) // 2 and all(
            torch.equal(a[0], b[0])
            for ra, rb in zip(again, micro[len(micro) // 2 :])
            for a, b in zip(ra, rb)
        )
        extra["resumed_from_step"] = first.state.global_step // 2
    c = inner(trainer.optimizer)
    sizes = [len(g["params"]) for g in c.param_groups if g["params"]]
    if not use_orig_params:
        # The Trainer splits decay / no-decay by parameter *name*; with FlatParameters the
        # names are "..._flat_param", so every FlatParameter (biases and norms included)
        # lands in the decay group. That is the Trainer's grouping, not CAdamW's: the
        # reference decays every tensor too.
        decay_names = set(init_state())  # every parameter name (TinyNet has no buffers)
    steps = [sum(micro[i : i + gas], []) for i in range(0, len(micro), gas)]
    # Accelerate's prepare wraps forward in autocast (keeping _original_forward) when it
    # applies it; the Trainer's FSDP2 bf16 path does not (FSDP2's policy casts alone)
    wrapped = hasattr(trainer.model, "_original_forward")
    res = report(
        trainer.model,
        trainer.optimizer,
        steps,
        decay_names,
        mp=("bf16_params" if wrapped else "bf16_noac") if bf16 else "fp32",
        clip=args.max_grad_norm,
    )
    res.update(watch.seen or {})
    res.update(extra)
    res["micro_steps"] = len(micro)
    res["group_sizes"] = sizes
    res["refused_cpu_fsdp"] = len(CPU_FSDP_FORCED) > n_forced
    res["max_grad_norm"] = args.max_grad_norm
    res["autocast_wrapped"] = wrapped
    res["checkpointed_blocks"] = sum(
        "CheckpointWrapper" in type(m).__name__ for m in trainer.model.modules()
    )
    res["mp_policy"] = str(
        getattr(trainer.accelerator.state.fsdp_plugin, "mixed_precision_policy", None)
    )
    res["wrapper"] = type(trainer.model).__name__
    reset_accelerate()
    return res


# --- Lightning ----------------------------------------------------------------------------


class RankBatches(torch.utils.data.Dataset):
    """This rank's batches in order, ``BATCH`` rows each (no distributed sampler)."""

    def __len__(self) -> int:
        return STEPS * BATCH

    def __getitem__(self, i):
        x, y = batch(i // BATCH, dist.get_rank())
        return x[i % BATCH], y[i % BATCH]


def lightning_module() -> type:
    """A LightningModule class: ``TinyNet`` with the initial weights, the batches it trained
    on in ``seen``, CAdamW on the decay / no-decay ``groups`` from configure_optimizers."""
    import lightning as L

    class TinyModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = fresh_net()
            self.seen: list[tuple] = []

        def training_step(self, b, i):
            x, y = b
            self.seen.append((x.detach().clone(), y.detach().clone()))
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return CAdamW(groups(list(self.net.named_parameters())), **HYPER)

    return TinyModule


def lightning_fit(module, strategy, max_steps: int = STEPS, ckpt_path: str | None = None, **kw):
    """``L.Trainer(...).fit`` on CPU, every rank on its ``RankBatches``; returns the trainer."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        devices=dist.get_world_size(),
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        **kw,
    )
    loader = torch.utils.data.DataLoader(RankBatches(), batch_size=BATCH, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def sc_lightning(
    strategy_name: str, precision: str = "32-true", resume: bool = False, named_groups=False
) -> dict:
    """``precision="bf16-mixed"``: Lightning's autocast (fp32 parameters and gradients);
    ``resume``: 5 steps, ``trainer.save_checkpoint`` through the strategy (DCP for
    ModelParallelStrategy), then a fresh module and Trainer ``fit(ckpt_path=...)`` to 10."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    ckpt = Path(os.environ["DC_OUT_DIR"]) / f"lightning_{strategy_name}_{precision}.ckpt"

    class Module(lightning_module()):
        def __init__(self) -> None:
            super().__init__()
            self.refs = originals(self.net)
            self.mem: dict = {}

        def on_train_start(self) -> None:  # after configure_model / configure_optimizers
            self.mem = resources(self.refs, self.trainer.strategy.model)

        def configure_model(self) -> None:
            if strategy_name == "mp":  # FSDP2: the user shards in configure_model
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for b in self.net.blocks:
                    fully_shard(b, mesh=mesh)
                fully_shard(self.net, mesh=mesh)

        def configure_optimizers(self):
            if named_groups:  # the helper: named groups, no decay for tensors of <= 1 dim
                return CAdamW(decay_groups(self.net, WD), **HYPER)
            return super().configure_optimizers()

    class CPUFSDPStrategy(FSDPStrategy):
        """Lightning refuses ``type(strategy) is FSDPStrategy`` with accelerator="cpu";
        a subclass is the same strategy past that check."""

    def strategy():
        if strategy_name == "fsdp":
            fsdp1_cpu_device_id()
            return CPUFSDPStrategy(
                auto_wrap_policy={Block},
                sharding_strategy="FULL_SHARD",
                process_group_backend="gloo",
            )
        return ModelParallelStrategy(
            data_parallel_size=dist.get_world_size(), tensor_parallel_size=1
        )

    def fit(max_steps: int, ckpt_path: str | None = None):
        module = Module()
        return module, lightning_fit(module, strategy(), max_steps, ckpt_path, precision=precision)

    seen: list[tuple] = []
    if resume:
        module, trainer = fit(STEPS // 2)
        trainer.save_checkpoint(str(ckpt))  # through the strategy
        seen += module.seen
        module, trainer = fit(STEPS, ckpt_path=str(ckpt))
    else:
        module, trainer = fit(STEPS)
    seen += module.seen
    wrapped = trainer.strategy.model
    mp = {"32-true": "fp32", "bf16-mixed": "autocast", "16-mixed": "fp16_root"}[precision]
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if precision == "16-mixed" and scaler is not None and scaler.is_enabled():
        raise NotImplementedError("the reference does not emulate a working GradScaler")
    decay_names = {n for n, v in init_state().items() if v.ndim > 1} if named_groups else None
    res = report(wrapped, trainer.optimizers[0], gather_batches(seen), decay_names, mp=mp)
    res["param_names"] = [g.get("param_names") for g in inner(trainer.optimizers[0]).param_groups]
    res.update(module.mem)
    res["wrapper"] = type(wrapped).__name__
    res["scaler"] = None if scaler is None else [type(scaler).__name__, scaler.is_enabled()]
    return res


def sc_lightning_deepspeed(stage: int) -> dict:
    """Lightning ``DeepSpeedStrategy`` (ZeRO ``stage``), CAdamW from
    ``configure_optimizers``, ``dist_cautious.deepspeed.attach`` in ``on_train_start`` (the
    engine exists by then, nothing has been stepped); the config from
    ``dist_cautious.deepspeed.config`` (no clipping, client optimizer allowed)."""
    import deepspeed
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from dist_cautious import deepspeed as dc_ds

    class Module(lightning_module()):
        def on_train_start(self) -> None:
            dc_ds.attach(self.trainer.strategy.deepspeed_engine)

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning refuses DeepSpeedStrategy unless the accelerator is CUDA (DeepSpeed
        itself runs on CPU with DS_ACCELERATOR=cpu): skip its two CUDA checks (the
        accelerator type, GPU indices) and hand DeepSpeed the local rank where Lightning
        passes the CPU device's index (None); nothing else."""

        def _setup_model_and_optimizer(self, *args, **kwargs):
            orig = deepspeed.initialize

            def initialize(*a, **kw):
                if getattr(kw.get("args"), "device_rank", 0) is None:
                    kw["args"].device_rank = self.local_rank
                return orig(*a, **kw)

            deepspeed.initialize = initialize
            try:
                return super()._setup_model_and_optimizer(*args, **kwargs)
            finally:
                deepspeed.initialize = orig

        def setup_environment(self) -> None:
            super(DeepSpeedStrategy, self).setup_environment()

        def setup_distributed(self) -> None:
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    cfg = dc_ds.config(
        {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": BATCH}
    )
    module = Module()
    trainer = lightning_fit(module, CPUDeepSpeedStrategy(config=cfg, process_group_backend="gloo"))
    engine = trainer.strategy.deepspeed_engine
    o, chain = unwrap(trainer.optimizers[0])
    ds = engines.Setup("deepspeed", engine.module, engine, o, zero_stage=stage, ds_engine=engine)
    got = {clean(n): t for n, t in engines.full_params(ds).items()}  # ZeRO-3: gathered
    res = report(got, trainer.optimizers[0], gather_batches(module.seen))
    res["chain"] = chain
    res["layouts"] = len(o.registered_layouts())
    return res


# --- torchtitan ---------------------------------------------------------------------------


def cadamw_container():
    """docs/integrations.md's torchtitan recipe: an OptimizersContainer that also knows
    "CAdamW" (torchtitan builds it after fully_shard, from ``config.optimizer.build``)."""
    from dist_cautious.integrations import torchtitan_container

    return torchtitan_container()


def sc_titan() -> dict:
    from torchtitan.components.optimizer import ParamGroupConfig

    net = fresh_net()
    kw = dict(HYPER)
    config = cadamw_container().Config(
        param_groups=[  # first match wins: the no-decay split of ``groups``
            ParamGroupConfig(
                pattern=r"(bias$|\.norm\.|^gain$)",
                optimizer_name="CAdamW",
                optimizer_kwargs={**kw, "weight_decay": 0.0},
            ),
            ParamGroupConfig(
                pattern=r".*", optimizer_name="CAdamW", optimizer_kwargs={**kw, "weight_decay": WD}
            ),
        ]
    )
    # torchtitan builds the optimizers after fully_shard (a unit per Block, then the root)
    opts = engines.build(
        "fsdp2", net, lambda m: config.build(model_parts=[m]), units=lambda m: m.blocks
    ).opt
    mine: list[tuple] = []
    train(net, opts, range(STEPS), mine)
    res = report(net, opts.optimizers[0], gather_batches(mine))
    sd = opts.state_dict()  # torchtitan's flat, FQN-keyed optimizer state (for DCP)
    res["n_optimizers"] = len(opts.optimizers)
    res["state_keys"] = sum(1 for k in sd if k.startswith("state.") and k.endswith("exp_avg"))
    return res


SCENARIOS = {
    "accel_fsdp2": lambda: sc_accel(2, "global"),
    "accel_fsdp2_shard": lambda: sc_accel(2, "shard"),
    "accel_fsdp1": lambda: sc_accel(1, "global"),
    "accel_fsdp2_resume_sharded": lambda: sc_accel_resume("SHARDED_STATE_DICT"),
    "accel_fsdp2_resume_full": lambda: sc_accel_resume("FULL_STATE_DICT"),
    "accel_fsdp1_flat": lambda: sc_accel(1, "global", flat=True),
    "accel_fsdp2_bf16": lambda: sc_accel(2, "global", mp="bf16"),
    "accel_fsdp2_bf16_shard": lambda: sc_accel(2, "shard", mp="bf16"),
    "accel_fsdp1_bf16": lambda: sc_accel(1, "global", mp="bf16"),
    "accel_fsdp2_fp16": lambda: sc_accel(2, "global", mp="fp16"),
    "trainer_fsdp2_optimizers": lambda: sc_trainer(2, "optimizers"),
    "trainer_fsdp2_override": lambda: sc_trainer(2, "override"),
    "trainer_fsdp1_override": lambda: sc_trainer(1, "override"),
    "trainer_fsdp2_cls": lambda: sc_trainer(2, "cls"),
    "trainer_fsdp2_gas2": lambda: sc_trainer(2, "override", gas=2),
    "trainer_fsdp1_orig": lambda: sc_trainer(1, "cls", use_orig_params=True),
    "trainer_fsdp1_flat": lambda: sc_trainer(1, "cls", use_orig_params=False),
    "trainer_fsdp2_ac_clip": lambda: sc_trainer(2, "override", ac=True, clip=True),
    "trainer_fsdp2_bf16": lambda: sc_trainer(2, "cls", bf16=True, ac=True, clip=True),
    "trainer_fsdp2_resume": lambda: sc_trainer(2, "override", resume=True),
    "lightning_fsdp": lambda: sc_lightning("fsdp"),
    "lightning_mp": lambda: sc_lightning("mp"),
    "lightning_mp_bf16": lambda: sc_lightning("mp", "bf16-mixed", named_groups=True),
    "lightning_mp_resume": lambda: sc_lightning("mp", resume=True),
    "lightning_fsdp_fp16": lambda: sc_lightning("fsdp", "16-mixed"),
    "lightning_deepspeed_z2": lambda: sc_lightning_deepspeed(2),
    "lightning_deepspeed_z3": lambda: sc_lightning_deepspeed(3),
    "titan_fsdp2": sc_titan,
}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    os.environ["DC_OUT_DIR"] = str(Path(out).parent)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results: dict = {}
    for name in names:
        try:
            results[name] = SCENARIOS[name]()
        except Exception as e:  # reported per scenario: the others still run
            results[name] = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        dist.barrier()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1, sort_keys=True))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
