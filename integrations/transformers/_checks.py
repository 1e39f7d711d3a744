"""What the HF callback checks and says at train start, before the first step.

- :func:`check_fsdp`: FSDP2 forks exactly; FSDP v1 is refused.
- :func:`check_launch`: ``torchrun`` started several processes but the Trainer runs as one (on CPU
  without ``--use_cpu --ddp_backend gloo``): every process would act as rank zero, or train without
  gradient synchronisation.
- :func:`check_siblings`: several ``CooldownTrainerCallback`` in one Trainer: at most one drives the
  LR, and each writes its own folder and metrics.
- :func:`claim_dirpath`: a fresh run never writes into a folder holding another run's cooled models
  and records (rank zero decides, every rank raises the same error).
- :func:`note_schedule`: the schedule replaces ``lr_scheduler_type`` (warned once for decaying types)
  and is recorded in the model card; the Trainer's warmup is ignored unless it equals the schedule's.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer
from transformers.utils import logging

from cooldown_callbacks import sharding

if TYPE_CHECKING:
    from cooldown_callbacks.engine import ForkEngine

    from .callback import CooldownTrainerCallback

__all__ = ["check_fsdp", "check_launch", "check_siblings", "claim_dirpath", "note_schedule", "scheduler_name",
           "DECAYING_SCHEDULERS"]

logger = logging.get_logger("cooldown_callbacks.integrations.transformers")

DECAYING_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr",
                       "cosine_warmup_with_min_lr")


def scheduler_name(value: Any) -> str:
    """``'linear'`` for ``SchedulerType.LINEAR`` (its ``str()`` is ``'SchedulerType.LINEAR'``)."""
    return str(getattr(value, "value", value))


def check_launch(trainer: Trainer) -> None:
    """Refuse a multi-process launch that the Trainer runs as independent single processes."""
    try:
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return
    if launched <= 1:
        return
    args = trainer.args
    kind = str(getattr(trainer.accelerator.distributed_type, "value", trainer.accelerator.distributed_type))
    if args.world_size == 1:
        what = (f"the Trainer runs as a single process (world_size 1): all {launched} processes act as rank 0 "
                "(each writes every record and checkpoint)")
    elif kind == "NO":
        what = (f"the Trainer sees {args.world_size} processes but runs without distributed data parallel "
                "(DistributedType.NO): gradients are not synchronised and the losses are not those of one run")
    else:
        return
    raise ValueError(
        f"CooldownTrainerCallback: launched as {launched} processes (WORLD_SIZE={launched}), but {what}. On CPU "
        "pass --use_cpu --ddp_backend gloo (TrainingArguments(use_cpu=True, ddp_backend='gloo')); on GPUs check "
        "that each process sees its device (LOCAL_RANK) and the ddp_backend.")


def check_fsdp(trainer: Trainer, args: Any) -> None:
    """FSDP2 forks exactly (same code as DDP, on local shards); FSDP v1 is refused before the first step.

    Detected from accelerate's FSDP plugin (the Trainer enables FSDP on accelerators only) and from the
    model itself. On a machine where the Trainer ignores ``fsdp=`` (no accelerator: it runs DDP), say so.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    version = getattr(plugin, "fsdp_version", None) if getattr(trainer, "is_fsdp_enabled", False) else None
    if version == 1 or sharding.sharding_of(trainer.model_wrapped) == "fsdp1":
        raise ValueError("CooldownTrainerCallback does not support FSDP v1 (FullyShardedDataParallel): its forks "
                         "cannot be verified exact. Use FSDP2: TrainingArguments(fsdp='full_shard', "
                         "fsdp_config={'fsdp_version': 2}); forks are exact there.")
    if getattr(args, "fsdp", None) and plugin is None and not sharding.is_sharded(trainer.model_wrapped):
        logger.warning("CooldownTrainerCallback: TrainingArguments(fsdp=...) is set but the Trainer did not enable "
                       "FSDP (it needs an accelerator; this run is data-parallel without sharding). Forks are exact "
                       "either way.")


def check_siblings(cb: CooldownTrainerCallback, trainer: Trainer) -> None:
    """Several callbacks in one Trainer: one LR driver at most, distinct folders and metric prefixes."""
    seen: dict[int, Any] = {}
    for c in trainer.callback_handler.callbacks:
        if isinstance(c, type(cb)):
            seen.setdefault(id(c), c)
    mine = list(seen.values())
    if len(mine) < 2:
        return
    drivers = [c for c in mine if c.schedule is not None]
    if len(drivers) > 1:
        raise ValueError(
            f"Invalid callbacks: {len(drivers)} CooldownTrainerCallbacks with a schedule in one Trainer; only one can "
            "drive the learning rate (the other's forks would run at the main branch's LR and be saved as cooled). "
            "To compare cooldowns at the same fork points, give one callback several: ForkPlan(cooldown=[...]).")
    dirs = [_dirpath(c, trainer) for c in mine]
    shared = [d for i, d in enumerate(dirs) if d.resolve() in {e.resolve() for e in dirs[:i]}]
    if shared:
        raise ValueError(f"Invalid dirpath ({str(shared[0])!r}): several CooldownTrainerCallbacks in one Trainer "
                         "write there; their cooled models and records would mix. Give each its own dirpath=.")
    prefixes = [c.metric_key_prefix for c in mine]
    shared = [p for i, p in enumerate(prefixes) if p in prefixes[:i]]
    if shared:
        raise ValueError(f"Invalid metric_key_prefix ({shared[0]!r}): several CooldownTrainerCallbacks in one "
                         "Trainer log their cooled metrics under it; give each its own metric_key_prefix=.")


def _dirpath(cb: CooldownTrainerCallback, trainer: Trainer) -> Path:
    return Path(cb.dirpath) if cb.dirpath is not None else Path(trainer.args.output_dir) / "cooldowns"


def _from_rank_zero(trainer: Trainer, value: Any) -> Any:
    if trainer.args.world_size <= 1 or not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def claim_dirpath(cb: CooldownTrainerCallback, trainer: Trainer, engine: ForkEngine) -> None:
    """Refuse, on every rank, a folder that holds another run's records (``ForkEngine.claim_dirpath``)."""
    error = None
    if engine.is_global_zero:
        try:
            engine.claim_dirpath("dirpath")
        except ValueError as e:
            error = str(e)
            if cb.dirpath is None:
                error += (" It is the default dirpath, <output_dir>/cooldowns: use a new output_dir, pass "
                          "dirpath=..., or continue that run with trainer.train(resume_from_checkpoint=...).")
    error = _from_rank_zero(trainer, error)
    if error is not None:
        raise ValueError(error)


def note_schedule(cb: CooldownTrainerCallback, trainer: Trainer, max_steps: int) -> None:
    """Say once what the schedule replaces, and record it in the model card."""
    args, schedule = trainer.args, cb.schedule
    kind = scheduler_name(args.lr_scheduler_type)
    if kind in DECAYING_SCHEDULERS and not cb._warned_scheduler:
        cb._warned_scheduler = True
        logger.warning(f"CooldownTrainerCallback: schedule={schedule!r} replaces lr_scheduler_type='{kind}': the "
                       f"main branch does not decay to max_steps ({max_steps}); the forks cool down. Set "
                       "lr_scheduler_type='constant' to silence this warning. The schedule is recorded in "
                       "trainer_state.json (stateful_callbacks) and in the model card.")
    ours = getattr(schedule, "warmup_steps", None)
    theirs = args.get_warmup_steps(max_steps) if args.warmup_steps else 0
    if theirs and theirs != ours:
        logger.warning(f"CooldownTrainerCallback: TrainingArguments warmup ({theirs} steps) is ignored; the "
                       f"schedule's own warmup applies ({ours if ours is not None else 'see ' + repr(schedule)}). "
                       "Pass warmup_steps=training_args.warmup_steps to the schedule to use the Trainer's.")
    _record_in_model_card(trainer, f"{schedule!r} (cooldown-callbacks; replaces '{kind}')", kind)


def _record_in_model_card(trainer: Trainer, text: str, replaced: str) -> None:
    """Make ``trainer.create_model_card`` name the schedule used instead of ``lr_scheduler_type``."""
    current = trainer.__dict__.get("create_model_card")
    original = current.__wrapped__ if getattr(current, "_cooldown_card", False) else trainer.create_model_card

    @functools.wraps(original)
    def create_model_card(*a: Any, **kw: Any) -> None:
        original(*a, **kw)
        card = Path(trainer.args.output_dir) / "README.md"
        if trainer.is_world_process_zero() and card.is_file():
            old = f"- lr_scheduler_type: {replaced}\n"
            content = card.read_text(encoding="utf-8")
            if old in content:
                card.write_text(content.replace(old, f"- lr_scheduler_type: {text}\n", 1), encoding="utf-8")

    create_model_card._cooldown_card = True  # type: ignore[attr-defined]
    trainer.create_model_card = create_model_card
