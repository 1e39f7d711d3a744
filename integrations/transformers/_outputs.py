"""What the HF callback shows and leaves behind: the ``[cooldown]`` line (through the progress bar), a fork
taken back from the records after a restart, and the cooled final model (``final_model="cooled"``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging

from cooldown_callbacks import sharding
from cooldown_callbacks.records import ForkRecord

from ._runner import _weights

if TYPE_CHECKING:
    from .callback import CooldownTrainerCallback

__all__ = ["report", "restored_record", "end_on_cooled", "write"]

logger = logging.get_logger("cooldown_callbacks.integrations.transformers")


def write(trainer: Trainer, line: str) -> None:
    """Print ``line`` through the Trainer's progress bar (``tqdm.write``: the bar is cleared, the line printed
    on a line of its own, the bar redrawn), else plainly."""
    bar = next((getattr(c, "training_bar", None) for c in trainer.callback_handler.callbacks
                if isinstance(c, ProgressCallback)), None)
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def report(cb: CooldownTrainerCallback, trainer: Trainer, rec: ForkRecord) -> None:
    """One line per fork: logged at INFO, printed on the main process when ``verbose``."""
    losses = ", ".join(f"{k}={v:.4f}" for k, v in rec.metrics.items() if k.endswith("_loss"))
    label = f" [{rec.label}]" if rec.label else ""
    head = f"[cooldown] step {rec.step}{label}: {rec.cooldown_steps} cooldown steps ({rec.shape}, {rec.mode})"
    if rec.status == "skipped":
        line = f"[cooldown] step {rec.step}{label}: skipped ({rec.reason})"
    elif rec.restored:
        line = f"{head} restored from the records (finished before the restart) -> {losses}"
    elif rec.status == "ok":
        line = f"{head} -> {losses} in {rec.seconds:.1f}s"
    else:
        line = f"{head} -> FAILED ({rec.error}) in {rec.seconds:.1f}s"
    logger.info(line)
    if cb.verbose and cb._engine is not None and cb._engine.is_global_zero:
        write(trainer, line)


def restored_record(cb: CooldownTrainerCallback, trainer: Trainer, rec: ForkRecord) -> ForkRecord:
    """Rank zero's record of a fork taken back from the records (the other ranks hold a placeholder)."""
    if trainer.args.world_size <= 1 or not torch.distributed.is_initialized():
        return rec
    box = [rec.to_json() if cb._engine.is_global_zero else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return ForkRecord.from_json(box[0])


def end_on_cooled(cb: CooldownTrainerCallback, trainer: Trainer, step: int) -> None:
    """``final_model="cooled"``: copy the cooled final model (kept by the fork at ``step``) into ``trainer.model``."""
    kept, cb._final_cooled = cb._final_cooled, None
    if kept is None or kept[0] != step:
        rec = next((r for r in reversed(cb.records) if r["step"] == step), None)
        if rec is not None and rec.get("restored"):
            why = f"its fork was taken back from the records after a restart (load it from {rec['checkpoint']})"
        elif rec is not None and rec.get("status") != "ok":
            why = "its fork failed"
        else:
            why = "no fork ran at that step"
        logger.warning(f"CooldownTrainerCallback(final_model='cooled'): the Trainer's model stays the main branch "
                       f"at step {step}: {why}.")
        return
    sharding.reshard([trainer.model])  # FSDP: the next forward must gather these shards, not reuse unsharded copies
    with torch.no_grad():
        for dst, src in zip(_weights(trainer.model), kept[1]):
            sharding.local(dst).copy_(src)
    if cb.verbose and cb._engine.is_global_zero:
        write(trainer, f"[cooldown] final_model='cooled': the Trainer's model is now the cooled model of step {step} "
                       "(the main branch is in the last checkpoint)")
