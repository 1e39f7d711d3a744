"""DeepSpeed ZeRO-1/2 engines: what a fork keeps, what is refused, and the full cooled state.

A ``deepspeed.DeepSpeedEngine`` holds main-branch state that module parameters and the torch
optimizer's ``state`` do not show (checked on CPU with DeepSpeed 0.19, ``DS_ACCELERATOR=cpu``):

- the **fp32 master partitions** (ZeRO-1/2: ``optimizer.single_partition_of_fp32_groups``; each rank
  owns ``1/world`` of every flattened param group). They are the params of the torch optimizer
  inside the ZeRO optimizer, not module parameters; :class:`~cooldown_callbacks.Snapshot` copies
  every optimizer param that is not a module parameter, so they are kept (per rank, local only);
- the engine's counters ``global_steps``, ``global_samples``, ``micro_steps``, ``skipped_steps``
  (and the last step's grad norm / applied flag), its LR scheduler and the ZeRO optimizer's loss
  scaler (dynamic under fp16) - :func:`engine_state` returns them as ``(get, set)`` pairs and
  :func:`engine_stateful` the LR scheduler.

A fork's cooldown steps go through ``engine.backward(loss)`` / ``engine.step()`` once per
micro-batch, so DeepSpeed itself owns accumulation (``gradient_accumulation_steps``), gradient
clipping (``gradient_clipping``) and loss scaling, exactly as in the user's loop.

Refused before the first step (:func:`check_engine`): ZeRO-3 (parameters are partitioned and
gathered by hooks; use ZeRO-1/2 or FSDP2 ``fully_shard``), optimizer/parameter offload, ZenFlow,
pipeline engines and compiled (DeepCompile) engines - none of them was verified exact.

Nothing here imports deepspeed at module level: the engine is recognised through
``sys.modules`` (an engine cannot exist unless deepspeed was imported).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

__all__ = ["SUPPORTED_STAGES", "is_engine", "check_engine", "engine_state", "engine_stateful",
           "full_state_dict"]

SUPPORTED_STAGES = (0, 1, 2)

# scalars of the engine and of its (ZeRO) optimizer that one optimizer step changes
# (and the accumulation boundary that Accelerate sets through set_gradient_accumulation_boundary)
_ENGINE_FIELDS = ("global_steps", "global_samples", "micro_steps", "skipped_steps", "_step_applied",
                  "_global_grad_norm", "_unmanaged_backward_count", "losses", "_is_gradient_accumulation_boundary")
_OPTIMIZER_FIELDS = ("_global_grad_norm", "overflow", "micro_step_id", "is_gradient_accumulation_boundary")
# loss scalers of the ZeRO optimizer (LossScaler / DynamicLossScaler) and of the unfused fp16/bf16
# optimizer of ZeRO stage 0 (LossScaleConfig: its cur_iter counts steps even under bf16)
_SCALERS = ("loss_scaler", "loss_scale_config")


def is_engine(obj: Any) -> bool:
    """Whether ``obj`` is a ``deepspeed.DeepSpeedEngine`` (without importing deepspeed)."""
    ds = sys.modules.get("deepspeed")
    engine_cls = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    return engine_cls is not None and isinstance(obj, engine_cls)


def _alternative(where: str) -> str:
    return (f"supported with {where}: DeepSpeed ZeRO stage 0, 1 or 2 without offload, or FSDP2 "
            "(torch.distributed.fsdp.fully_shard) for sharded parameters")


def check_engine(engine: Any, where: str = "CooldownHook") -> None:
    """Raise ``ValueError`` for a DeepSpeed configuration whose forks are not known to be exact.

    ``where`` names the adapter in the message (with the supported alternative).
    """
    problems = []
    ds = sys.modules.get("deepspeed")
    pipe = getattr(ds, "PipelineEngine", None)
    if pipe is not None and isinstance(engine, pipe):
        problems.append("pipeline parallelism (PipelineEngine)")
    stage = int(engine.zero_optimization_stage())
    if stage not in SUPPORTED_STAGES:
        problems.append(f"ZeRO stage {stage} (zero_optimization.stage={stage})")
    if engine.zero_offload_optimizer() is not None and str(getattr(engine.zero_offload_optimizer(), "device",
                                                                    "none")).rsplit(".", 1)[-1] != "none":
        problems.append("optimizer offload (zero_optimization.offload_optimizer)")
    if engine.zero_offload_param() is not None and str(getattr(engine.zero_offload_param(), "device",
                                                                "none")).rsplit(".", 1)[-1] != "none":
        problems.append("parameter offload (zero_optimization.offload_param)")
    if getattr(engine, "zenflow", False):
        problems.append("ZenFlow (zero_optimization.zenflow)")
    if getattr(engine, "is_compiled", False) or bool(getattr(engine, "_is_compiled", False)):
        problems.append("a compiled engine (engine.compile / DeepCompile)")
    if getattr(engine, "optimizer", None) is None:
        problems.append("an engine without optimizer")
    if problems:
        raise ValueError(f"{where} cannot keep the main branch exact with DeepSpeed {' and '.join(problems)}; "
                         f"{_alternative(where)}.")


def engine_state(engine: Any) -> list[tuple[Callable[[], Any], Callable[[Any], None]]]:
    """``(get, set)`` pairs for the engine's and its optimizer's step counters and loss scaler."""
    pairs = []

    def fields(obj: Any, names: tuple[str, ...]) -> None:
        names = tuple(n for n in names if hasattr(obj, n) and not callable(getattr(obj, n)))
        pairs.append((lambda: {n: getattr(obj, n) for n in names},
                      lambda v: [setattr(obj, n, x) for n, x in v.items()]))

    fields(engine, _ENGINE_FIELDS)
    opt = engine.optimizer
    fields(opt, _OPTIMIZER_FIELDS)
    for name in _SCALERS:  # cur_scale, cur_iter, last_overflow_iter, hysteresis (dynamic under fp16)
        scaler = getattr(opt, name, None)
        if scaler is not None and hasattr(scaler, "__dict__"):
            pairs.append((lambda s=scaler: dict(vars(s)), lambda v, s=scaler: (vars(s).clear(), vars(s).update(v))))
    return pairs


def engine_stateful(engine: Any) -> list[Any]:
    """The engine's objects with ``state_dict``/``load_state_dict`` that a step changes (its LR scheduler)."""
    sched = getattr(engine, "lr_scheduler", None)
    return [sched] if sched is not None and hasattr(sched, "state_dict") else []


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The module's full state dict (no ``module.`` prefix), loadable into the plain model.

    Under ZeRO-0/1/2 every rank holds the full module parameters; with fp16/bf16 they are the
    low-precision copies, so under ZeRO-1/2 the fp32 master values are gathered from the partitions
    (``deepspeed.utils.safe_get_full_fp32_param``, a collective: **every rank calls this**) and
    saved in fp32; under stage 0 the module's own (half-precision) values are saved. Buffers are the
    calling rank's (as under DDP).
    """
    module = engine.module
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        from deepspeed.utils import safe_get_full_fp32_param

        names = {id(p): n for n, p in module.named_parameters()}
        for p in module.parameters():
            full = safe_get_full_fp32_param(p)
            if full is not None and names[id(p)] in state:
                state[names[id(p)]] = full.detach().cpu().clone()
    return state
