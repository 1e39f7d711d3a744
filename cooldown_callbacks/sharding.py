"""Everything a fork needs from sharded and distributed training, in one framework-free place.

Adapters hand over their framework's objects (a model, a device, a process group) and call these
functions; :class:`~cooldown_callbacks.snapshot.Snapshot` uses them for sharded tensors.

**Sharded tensors** (FSDP2 ``fully_shard`` turns parameters, their gradients and the optimizer's
moments into DTensors, usually ``Shard(0)``): a fork copies and restores each rank's *local shard*
(:func:`local`), with no communication; a gradient missing at restore time is rebuilt from the
saved shard with :func:`like`. A snapshot therefore costs ``1/world`` of the full state per rank.

**Resharding** (:func:`reshard`): FSDP2 does not reshard the root module after its forward, and
FSDP1 keeps the root's unsharded flat parameter; after a no-grad evaluation (the fork's, or the
user's right before the fork) the next forward reuses those unsharded tensors instead of gathering
the shards. A restore that writes the shards would then change nothing the next forward uses, and
a snapshot taken while unsharded would see full-size parameters whose storage the fork's backward
frees. Resharding every FSDP module before the snapshot and before the restore is local (no
collective) and makes both exact.

**Model checkpoints** (*collective*: every rank calls, in the same order; never one rank alone):
:func:`save_full` gathers the unsharded state on all ranks and rank 0 writes it with ``torch.save``
(loads with ``model.load_state_dict(torch.load(path))``); :func:`save_dcp` writes a sharded
``torch.distributed.checkpoint`` folder from every rank (for models too large to gather). A DCP folder
converts to a ``torch.save`` file with
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, "model.pt")``, or loads back
into a (sharded) model with :func:`load_dcp`.

**Cross-rank decisions** (*collective*): :func:`any_rank` and :func:`barrier` on the default (or a
given) process group; the tensor lives on ``device`` (default: CUDA for NCCL, else CPU).

**DeepSpeed ZeRO** (a ``deepspeed.DeepSpeedEngine``, stages 0, 1 and 2; :func:`check_zero` refuses
the rest before the first step): every rank holds the full module; the optimizer holds this rank's
fp32 master partitions (ZeRO-1/2: ``single_partition_of_fp32_groups``), which are the params of the
torch optimizer inside it, not module parameters - :class:`~cooldown_callbacks.snapshot.Snapshot`
copies every optimizer param that is not a module parameter, so they are kept (local, 1/world).
The engine's step counters, the ZeRO optimizer's loss scaler and the engine's LR scheduler are state
too (and the GradScaler of its ``torch_autocast`` fp16 mode): Snapshot takes them for every engine
among its modules (:func:`zero_extras`, :func:`zero_stateful`). A fork's steps go through
``engine.backward`` / ``engine.step`` per micro-batch (DeepSpeed owns accumulation, clipping and loss
scaling). :func:`full_state_dict` of an
engine is the module's state without the ``module.`` prefix, with the fp32 masters gathered
(collective) under fp16/bf16. deepspeed is never imported here: an engine is recognised through
``sys.modules`` (it cannot exist unless deepspeed was imported).

Sections, for extension: detection, resharding, local shards, sync flags, ZeRO, checkpoints, collectives.

Private torch names used (FSDP1 only; isolated in :func:`_fsdp1_reshard`):
``torch.distributed.fsdp._runtime_utils._reshard`` and ``FullyShardedDataParallel._handle``
(``FlatParamHandle.uses_sharded_strategy``). Checked against torch 2.13.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch

__all__ = ["SAVE_FORMATS", "SHARDINGS", "is_dtensor", "local", "like", "fsdp2_modules", "fsdp1_modules",
           "sharding_of", "is_sharded", "reshard", "grads_finite", "sync_extras", "no_gradient_sync",
           "clip_grad_norm", "ZERO_STAGES", "is_zero", "check_zero", "torch_optimizer", "zero_extras",
           "zero_stateful", "full_state_dict", "save_full", "save_dcp", "load_dcp", "rank_and_world", "any_rank",
           "barrier"]

SAVE_FORMATS = ("full", "dcp")
"""``"full"``: one unsharded state dict written by rank 0; ``"dcp"``: a sharded DCP folder."""

SHARDINGS = ("fsdp2", "fsdp1", "dtensor", "zero")
"""What :func:`sharding_of` reports: FSDP2 (``fully_shard``), FSDP1 (``FullyShardedDataParallel``),
other DTensor parameters (tensor parallelism) or a DeepSpeed engine (ZeRO: sharded optimizer state)."""

SaveFormat = Literal["full", "dcp"]


# -- detection ---------------------------------------------------------------------------------
def _dtensor_cls() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _fsdp2_cls() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def _fsdp1_cls() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel
    return FullyShardedDataParallel


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated tensor)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def fsdp2_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module of ``module`` (itself included) that ``fully_shard`` was applied to."""
    cls = _fsdp2_cls()
    return [] if cls is None else [m for m in module.modules() if isinstance(m, cls)]


def fsdp1_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every ``FullyShardedDataParallel`` instance in ``module`` (itself included)."""
    cls = _fsdp1_cls()
    return [] if cls is None else [m for m in module.modules() if isinstance(m, cls)]


def sharding_of(module: torch.nn.Module) -> str | None:
    """``"fsdp2"``, ``"fsdp1"``, ``"dtensor"`` (DTensor parameters without FSDP), ``"zero"`` (a DeepSpeed
    engine) or ``None`` (plain or DDP)."""
    if is_zero(module):
        return "zero"
    if fsdp1_modules(module):
        return "fsdp1"
    if fsdp2_modules(module):
        return "fsdp2"
    if any(is_dtensor(p) for p in module.parameters()):
        return "dtensor"
    return None


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module``'s state is split over ranks (its full state dict needs a collective)."""
    return sharding_of(module) is not None


# -- resharding --------------------------------------------------------------------------------
def reshard(modules: Iterable[torch.nn.Module]) -> None:
    """Put every FSDP module of ``modules`` in its sharded state and free unsharded parameters.

    Local (no collective). After it, ``module.parameters()`` yields the sharded parameters (FSDP2
    DTensors, FSDP1 flat parameters) and the next forward gathers them again, so values written into
    the shards are the ones it uses. A no-op for modules without FSDP.
    """
    for top in modules:
        for m in fsdp2_modules(top):
            m.reshard()
        for m in fsdp1_modules(top):
            _fsdp1_reshard(m)


def _fsdp1_reshard(m: torch.nn.Module) -> None:
    """PRIVATE torch (FSDP1): free the handle's unsharded flat parameter, as FSDP does after backward."""
    from torch.distributed.fsdp._runtime_utils import _reshard

    handle = getattr(m, "_handle", None)
    if handle is not None and handle.uses_sharded_strategy:
        _reshard(m, handle, True)


# -- local shards ------------------------------------------------------------------------------
def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: ``t.to_local()`` for a DTensor (its storage, under no-grad), else ``t``.

    Copying into ``local(t)`` writes ``t``'s local shard in place.
    """
    return t.to_local() if is_dtensor(t) else t


def like(template: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """A new tensor laid out like ``template`` from this rank's ``shard`` (a copy, on template's device).

    For a DTensor template: ``DTensor.from_local`` with its mesh, placements, shape and stride (no
    communication); otherwise a copy of ``shard``.
    """
    shard = shard.to(local(template).device, copy=True)
    if not is_dtensor(template):
        return shard
    cls = _dtensor_cls()
    return cls.from_local(shard, template.device_mesh, template.placements, run_check=False,
                          shape=template.shape, stride=template.stride())


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient ``optimizer`` is about to apply is finite *on this rank* (its local shards).

    No communication (a norm of DTensors would all-reduce): combine ranks with :func:`any_rank`.
    """
    grads = [g for g in (local(p.grad) for grp in optimizer.param_groups for p in grp["params"]
                         if p.grad is not None) if g.numel() > 0]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))


# -- sync flags --------------------------------------------------------------------------------
def sync_extras(modules: Iterable[torch.nn.Module]) -> list[tuple[Callable[[], Any], Callable[[Any], None]]]:
    """``(get, set)`` pairs for gradient/buffer sync flags that a fork changes (Snapshot ``extras``).

    DDP decides in forward whether the *next* forward broadcasts buffers (a no-grad evaluation flips
    it); FSDP2's ``set_requires_gradient_sync`` flags are set by a fork that accumulates gradients.
    """
    out: list = []
    ddp = torch.nn.parallel.DistributedDataParallel
    for top in modules:
        for m in top.modules():
            if isinstance(m, ddp):
                out.append((lambda m=m: (m.require_forward_param_sync, m.require_backward_grad_sync),
                            lambda v, m=m: (setattr(m, "require_forward_param_sync", v[0]),
                                            setattr(m, "require_backward_grad_sync", v[1]))))
        for m in fsdp2_modules(top):
            groups = list(m._get_fsdp_state()._fsdp_param_groups)
            if groups:
                out.append((lambda gs=groups: [(g.reduce_grads, g.all_reduce_grads) for g in gs],
                             lambda v, gs=groups: [(setattr(g, "reduce_grads", r), setattr(g, "all_reduce_grads", a))
                                                   for g, (r, a) in zip(gs, v)]))
    return out


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """No gradient communication inside the block, as users accumulate micro-batches.

    DDP and FSDP1: ``model.no_sync()``; FSDP2: ``set_requires_gradient_sync(False)`` on the root
    module(s), set back to ``True`` after. ``enabled=False``: a no-op (the final micro-batch).
    """
    if not enabled:
        yield
        return
    fsdp1 = _fsdp1_cls()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or (fsdp1 is not None and isinstance(model, fsdp1)):
        with model.no_sync():
            yield
        return
    roots = _fsdp2_roots(model)
    for r in roots:
        r.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for r in roots:
            r.set_requires_gradient_sync(True)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """*Collective for sharded models.* Clip the total gradient norm as the user's loop does: FSDP1's
    own ``model.clip_grad_norm_`` (its gradients are flat local shards), else
    ``torch.nn.utils.clip_grad_norm_`` (DDP, and FSDP2's DTensor gradients)."""
    fsdp1 = _fsdp1_cls()
    if fsdp1 is not None and isinstance(model, fsdp1):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _fsdp2_roots(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost FSDP2 modules (``set_requires_gradient_sync`` recurses below them)."""
    mods = fsdp2_modules(model)
    inner = {id(s) for m in mods for s in m.modules() if s is not m}
    return [m for m in mods if id(m) not in inner]


# -- ZeRO (DeepSpeed) ----------------------------------------------------------------------------
ZERO_STAGES = (0, 1, 2)
"""DeepSpeed ZeRO stages whose forks are exact (checked on CPU with DeepSpeed 0.19, fp32/bf16/fp16)."""

# scalars of the engine and of its (ZeRO) optimizer that one optimizer step changes (and the
# accumulation boundary that Accelerate sets through set_gradient_accumulation_boundary)
_ZERO_ENGINE_FIELDS = ("global_steps", "global_samples", "micro_steps", "skipped_steps", "_step_applied",
                       "_global_grad_norm", "_unmanaged_backward_count", "losses", "_is_gradient_accumulation_boundary")
_ZERO_OPTIMIZER_FIELDS = ("_global_grad_norm", "overflow", "micro_step_id", "is_gradient_accumulation_boundary")
# loss scalers: the ZeRO optimizer's (LossScaler / DynamicLossScaler: cur_scale, cur_iter, last_overflow_iter,
# hysteresis) and the stage-0 fp16/bf16 optimizer's (LossScaleConfig)
_ZERO_SCALERS = ("loss_scaler", "loss_scale_config")


def is_zero(obj: Any) -> bool:
    """Whether ``obj`` is a ``deepspeed.DeepSpeedEngine`` (without importing deepspeed)."""
    ds = sys.modules.get("deepspeed")
    cls = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    return cls is not None and isinstance(obj, cls)


def check_zero(engine: Any, where: str) -> None:
    """Raise ``ValueError`` for a DeepSpeed configuration whose forks are not known to be exact.

    Refused: ZeRO stage 3 (parameters partitioned and gathered by hooks), optimizer or parameter
    offload, ZenFlow, ``torch_autocast`` with float16, pipeline engines, an engine without optimizer.
    ``where`` names the adapter.
    """
    problems = []
    pipe = getattr(sys.modules.get("deepspeed"), "PipelineEngine", None)
    if pipe is not None and isinstance(engine, pipe):
        problems.append("pipeline parallelism (PipelineEngine)")
    stage = int(engine.zero_optimization_stage())
    if stage not in ZERO_STAGES:
        problems.append(f"ZeRO stage {stage} (zero_optimization.stage={stage})")
    for what, cfg in (("optimizer", engine.zero_offload_optimizer()), ("parameter", engine.zero_offload_param())):
        if cfg is not None and str(getattr(cfg, "device", "none")).rsplit(".", 1)[-1] != "none":
            problems.append(f"{what} offload (zero_optimization.offload_{'param' if what == 'parameter' else what})")
    if getattr(engine, "zenflow", False):
        problems.append("ZenFlow (zero_optimization.zenflow)")
    if getattr(engine, "torch_autocast_enabled", lambda: False)() and engine.torch_autocast_dtype() == torch.float16:
        # its GradScaler skipped every step on CPU here, so exactness could not be verified
        problems.append("torch_autocast with float16 (torch_autocast.dtype; use bfloat16, or the fp16 config)")
    if getattr(engine, "optimizer", None) is None:
        problems.append("an engine without optimizer")
    if problems:
        raise ValueError(f"{where} cannot keep the main branch exact with DeepSpeed {' and '.join(problems)}; "
                         f"supported with {where}: DeepSpeed ZeRO stage 0, 1 or 2 without offload, or FSDP2 "
                         "(torch.distributed.fsdp.fully_shard) for sharded parameters.")


def torch_optimizer(opt: Any) -> Any:
    """The torch optimizer behind wrappers: accelerate's ``AcceleratedOptimizer``, DeepSpeed's ZeRO
    optimizer (whose inner optimizer's params are the fp32 master partitions), or ``opt`` itself."""
    while hasattr(getattr(opt, "optimizer", None), "param_groups"):
        opt = opt.optimizer
    return opt


def zero_extras(modules: Iterable[Any]) -> list[tuple[Callable[[], Any], Callable[[Any], None]]]:
    """``(get, set)`` pairs for every DeepSpeed engine in ``modules``: the engine's and its optimizer's
    step counters and last grad norm, and the loss scaler (Snapshot ``extras``)."""
    pairs: list = []

    def fields(obj: Any, names: tuple[str, ...]) -> None:
        names = tuple(n for n in names if hasattr(obj, n) and not callable(getattr(obj, n)))
        pairs.append((lambda: {n: getattr(obj, n) for n in names},
                      lambda v: [setattr(obj, n, x) for n, x in v.items()]))

    for engine in (m for m in modules if is_zero(m)):
        fields(engine, _ZERO_ENGINE_FIELDS)
        opt = engine.optimizer
        fields(opt, _ZERO_OPTIMIZER_FIELDS)
        for name in _ZERO_SCALERS:
            scaler = getattr(opt, name, None)
            if scaler is not None and hasattr(scaler, "__dict__"):
                pairs.append((lambda s=scaler: dict(vars(s)),
                              lambda v, s=scaler: (vars(s).clear(), vars(s).update(v))))
    return pairs


def zero_stateful(modules: Iterable[Any]) -> list[Any]:
    """For every DeepSpeed engine in ``modules``: its LR scheduler (stepped in ``engine.step``) and the
    ``torch.amp.GradScaler`` of its ``torch_autocast`` fp16 mode (the engine's under stage 0, else the
    ZeRO optimizer's)."""
    out = []
    for e in (m for m in modules if is_zero(m)):
        for obj in (getattr(e, "lr_scheduler", None), getattr(e, "torch_autocast_z0_gradscaler", None),
                    getattr(e.optimizer, "torch_autocast_gradscaler", None)):
            if obj is not None and hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
                out.append(obj)
    return out


def _zero_full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """*Collective under fp16/bf16.* The engine's module state (no ``module.`` prefix) on every rank; under
    ZeRO-1/2 with fp16/bf16 the fp32 masters gathered from the partitions (``safe_get_full_fp32_param``),
    under stage 0 the module's own values. Buffers are this rank's (as under DDP)."""
    module = engine.module
    state = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in module.state_dict().items()}
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p)  # every rank, same order
            if full is not None and name in state:
                state[name] = full.detach().cpu().clone()
    return state


# -- model checkpoints -------------------------------------------------------------------------
def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """*Collective.* The unsharded model state dict, on CPU, complete on rank 0 (empty on other ranks
    for sharded models). Keys are the plain model's (no FSDP / DDP / DeepSpeed prefixes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    kind = sharding_of(model)
    if kind == "zero":
        return _zero_full_state_dict(model)
    if kind is None:
        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in inner.state_dict().items()}
    # FSDP1 on CPU crashes in get_model_state_dict(cpu_offload=True) with use_orig_params=True; its
    # tensors are on the CPU already, so gather without the offload there.
    offload = not (kind == "fsdp1" and _on_cpu(model))
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    if not offload and rank_and_world()[0] != 0:
        return {}
    return sd


def _on_cpu(model: torch.nn.Module) -> bool:
    p = next(iter(model.parameters()), None)
    return p is None or local(p).device.type == "cpu"


def save_full(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """*Collective.* Gather the unsharded state on all ranks; rank 0 writes it to ``path`` (``torch.save``).

    Loads with ``model.load_state_dict(torch.load(path))`` into the plain (unsharded) model.
    """
    sd = full_state_dict(model)
    if rank_and_world()[0] == 0:
        torch.save(sd, Path(path))


def save_dcp(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """*Collective.* Every rank writes its shards of the model state into the folder ``path`` (DCP).

    Convert: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(path, "model.pt")`` gives a
    ``torch.save`` file of the plain state dict; or :func:`load_dcp` into a sharded model.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # Tensors every rank holds whole (buffers, replicated parameters) are written from rank 0, as in
    # save_full: per-rank buffers such as BatchNorm statistics are not synchronised by FSDP.
    dcp.save(get_model_state_dict(model), checkpoint_id=str(path),
             planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))


def load_dcp(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """*Collective.* Load a folder written by :func:`save_dcp` into ``model`` (sharded or not), in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    sd = get_model_state_dict(model)
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd)


# -- collectives -------------------------------------------------------------------------------
def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group); ``(0, 1)`` without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _device(device: torch.device | str | None, group: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.distributed.get_backend(group) == "nccl":  # pragma: no cover - GPU only
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, *, device: torch.device | str | None = None, group: Any = None) -> bool:
    """*Collective.* True if ``flag`` is True on some rank (``flag`` itself without a process group)."""
    if rank_and_world(group)[1] == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_device(device, group))
    torch.distributed.all_reduce(t, group=group)
    return bool(t.item() > 0)


def barrier(*, device: torch.device | str | None = None, group: Any = None) -> None:
    """*Collective.* Wait for every rank (nothing without a process group)."""
    if rank_and_world(group)[1] == 1:
        return
    dev = _device(device, group)
    if dev.type == "cuda" and torch.distributed.get_backend(group) == "nccl":  # pragma: no cover - GPU only
        torch.distributed.barrier(group=group, device_ids=[dev.index if dev.index is not None else
                                                           torch.cuda.current_device()])
    else:
        torch.distributed.barrier(group=group)
