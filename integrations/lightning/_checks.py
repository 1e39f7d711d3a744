"""Configuration checks of :class:`CooldownCallback` that run before the first training step.

Each function raises :class:`CooldownMisconfiguration` (bad configuration: a ``ValueError`` and a
Lightning ``MisconfigurationException``) or warns on rank zero; none changes the trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from cooldown_callbacks.data import is_stateful_loader
from cooldown_callbacks.engine import check_writable_dir
from cooldown_callbacks.plan import ForkPlan
from cooldown_callbacks.records import RECORDS_NAME

from ._internals import _uses_dataloader_iter, _validation_configured
from ._runner import is_stream

if TYPE_CHECKING:
    from .callback import CooldownCallback

__all__ = ["CooldownMisconfiguration", "default_dirpath", "check_callbacks", "check_fit", "check_data",
           "claim_dirpath", "warn_checkpoint_monitors", "unreachable_steps", "warn_steps_per_batch", "warn_data_source",
           "listed"]


class CooldownMisconfiguration(MisconfigurationException, ValueError):
    """Bad configuration of :class:`CooldownCallback`, raised before training starts.

    Both a Lightning ``MisconfigurationException`` and a ``ValueError``.
    """


def default_dirpath(trainer: pl.Trainer) -> Path:
    """``ModelCheckpoint``'s convention with ``cooled`` for ``checkpoints``: the first logger's version
    directory ``<save_dir>/<name>/<version>/cooled``, or ``<default_root_dir>/cooled`` without a logger."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return Path(os.path.join(save_dir, str(logger.name), version, "cooled"))
    return Path(trainer.default_root_dir) / "cooled"


def check_callbacks(cb: CooldownCallback, trainer: pl.Trainer) -> list:
    """One instance per prefix, and at most one LR-driving instance; returns the other instances."""
    from .callback import CooldownCallback

    mine = [c for c in trainer.callbacks if isinstance(c, CooldownCallback)]
    if sum(c is cb for c in mine) > 1 or any(c is not cb and c.prefix == cb.prefix for c in mine):
        raise CooldownMisconfiguration(
            f"Invalid callbacks: CooldownCallback(prefix={cb.prefix!r}) is passed twice, or two CooldownCallbacks share "
            f"that prefix. The prefix names a callback's metrics and keys its state in checkpoints, so it must differ: "
            f"e.g. prefix='cooldown_long/' for the second one (Lightning's own check of Trainer(callbacks=...) says "
            f"'Found more than one stateful callback of type CooldownCallback' for the same reason).")
    drivers = [c for c in mine if c.schedule is not None]
    if len(drivers) > 1:
        raise CooldownMisconfiguration(
            f"Invalid callbacks: {len(drivers)} CooldownCallbacks with a schedule drive this Trainer's LR (prefixes "
            f"{', '.join(repr(c.prefix) for c in drivers)}); one schedule drives the main branch. Several cooldowns "
            f"per fork point are the supported way: one callback with ForkPlan(cooldown=[Cooldown(steps=...), "
            f"Cooldown(steps=...)]). A second callback needs schedule=None (its forks decay from the LR the first "
            f"one sets).")
    return [c for c in mine if c is not cb]


def check_fit(cb: CooldownCallback, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Schedule vs. the module's own scheduler, optimizers, validation for ``on_eval``."""
    if cb.schedule is not None and trainer.lr_scheduler_configs:
        names = ", ".join(type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs)
        raise CooldownMisconfiguration(
            f"Invalid schedule: CooldownCallback(schedule={type(cb.schedule).__name__}(...)) drives the LR, but "
            f"configure_optimizers also returns a scheduler ({names}) that would fight it. Remove the scheduler "
            f"from configure_optimizers, or pass schedule=None to keep it (forks then decay from its LR).")
    if len(trainer.optimizers) == 0:
        raise CooldownMisconfiguration("CooldownCallback needs an optimizer: configure_optimizers returned none.")
    if pl_module.automatic_optimization and len(trainer.optimizers) > 1:
        raise CooldownMisconfiguration("Automatic optimization with several optimizers is not supported by "
                                       "Lightning; use manual optimization.")
    if cb.plan.on_eval and not _validation_configured(trainer):
        raise CooldownMisconfiguration(
            "Invalid plan: ForkPlan(on_eval=True) forks at validation points, but this trainer never validates "
            "(no validation_step, no val dataloader, or limit_val_batches=0). Give validation data, or use "
            "ForkPlan(every=N) / at=[...] / geometric=(first, ratio).")


def check_data(plan: ForkPlan, trainer: pl.Trainer) -> None:
    """Whether ``plan.data`` can be served from this train loader (called in ``on_train_start``)."""
    if not isinstance(plan.data, str):
        return
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple, dict)):
        raise CooldownMisconfiguration(
            f"Invalid plan: ForkPlan(data={plan.data!r}) needs a single train dataloader; with several, pass "
            "ForkPlan(data=<iterable of batches>).")
    stateful, stream = is_stateful_loader(loader), is_stream(loader)
    if plan.data in ("peek", "auto") and stream and not stateful:
        if _uses_dataloader_iter(trainer):
            raise CooldownMisconfiguration(
                f"Invalid plan: ForkPlan(data={plan.data!r}) cools on the train stream's upcoming batches, drawn from "
                "Lightning's data fetcher, but training_step takes the data iterator itself (dataloader_iter). Pass "
                "ForkPlan(data=<iterable of batches>), or data='fresh' to restart the stream for each fork.")
        return
    if plan.data == "peek" and not stateful:
        raise CooldownMisconfiguration(
            "Invalid plan: ForkPlan(data='peek') needs a stateful train loader (state_dict/load_state_dict), "
            "e.g. torchdata.stateful_dataloader.StatefulDataLoader, or a stream (an IterableDataset); or use "
            "data='fresh'.")
    if plan.data in ("fresh", "auto") and not stateful and \
            getattr(loader, "batch_size", None) is None and getattr(loader, "batch_sampler", None) is None:
        raise CooldownMisconfiguration(
            f"Invalid plan: ForkPlan(data={plan.data!r}) builds a separate loader with the train loader's "
            "batch size, which it does not have; pass ForkPlan(data=<iterable of batches>).")


def claim_dirpath(cb: CooldownCallback, trainer: pl.Trainer) -> None:
    """``dirpath`` is writable and holds no other run's records (rank zero checks, every rank raises)."""
    error = ""
    if trainer.is_global_zero:
        try:
            check_writable_dir(cb.engine.dirpath, "dirpath")
            cb.engine.claim_dirpath("dirpath")
        except ValueError as e:
            error = str(e)
            if cb._dirpath_arg is None and RECORDS_NAME in error:
                error += (" (CooldownCallback's default dirpath is <save_dir>/<name>/<version>/cooled of the first "
                          "logger, or <default_root_dir>/cooled without one: a logger with a fixed version, or no "
                          "logger, gives every fresh run the same folder.)")
    error = trainer.strategy.broadcast(error, src=0)
    if error:
        raise CooldownMisconfiguration(error)


def warn_checkpoint_monitors(cb: CooldownCallback, trainer: pl.Trainer) -> None:
    """A ``ModelCheckpoint`` monitoring a cooled metric saves main-branch weights under a cooled score."""
    for ckpt in trainer.checkpoint_callbacks:
        monitor = getattr(ckpt, "monitor", None)
        if isinstance(monitor, str) and monitor.startswith(cb.prefix):
            rank_zero_warn(
                f"{type(ckpt).__name__}(monitor={monitor!r}) saves the main branch's weights, ranked by the cooled "
                f"models' {monitor[len(cb.prefix):]}: its best checkpoint is not a cooled model. The cooled models "
                f"are CooldownCallback's checkpoints in {str(cb.dirpath)!r} (each fork's metrics are in its "
                f"{RECORDS_NAME}); monitor a main-branch metric, or pick the best cooled model from the records.")


def unreachable_steps(plan: ForkPlan, max_steps: int, steps_per_batch: int = 1) -> list[int]:
    """Plan steps that training cannot reach when Lightning stops at ``global_step == max_steps`` and
    each counted step moves ``global_step`` by ``steps_per_batch``."""
    if max_steps is None or max_steps < 0:
        return []
    bound = max_steps // max(1, steps_per_batch)
    beyond = [s for s in (plan.at or ()) if s > max_steps]
    return sorted(set(beyond + [s for s in plan.fork_steps(max_steps) if s > bound]))


def warn_steps_per_batch(plan: ForkPlan, trainer: pl.Trainer, moved: int) -> None:
    """Manual optimization moved ``global_step`` by ``moved`` in one batch: report plan steps it cannot reach."""
    lost = unreachable_steps(plan, trainer.max_steps, moved)
    if lost:
        rank_zero_warn(
            f"CooldownCallback: training_step made {moved} optimizer steps in one batch. Lightning's global_step "
            f"and max_steps={trainer.max_steps} count every optimizer.step(); CooldownCallback counts one step "
            f"per training batch that steps an optimizer (plan steps, cooldown lengths and the schedule use that "
            f"count). Training stops after about {trainer.max_steps // moved} such steps, so ForkPlan step(s) "
            f"{listed(lost)} will never be reached; raise max_steps or lower them.")


def warn_data_source(plan: ForkPlan, source: str) -> bool:
    """Warn when forks cool on data that is not the main branch's upcoming batches; returns whether it warned."""
    if source.startswith("fresh (stream"):
        msg = ("ForkPlan(data='fresh') restarts the train stream from its beginning for each fork: the cooldown "
               "trains on batches the main branch has already seen (and a dataset whose iterators share one read "
               "position would lose batches to the fork).")
    elif source == "fresh" and plan.data == "auto":
        msg = ("ForkPlan(data='auto') cannot peek at this plain DataLoader's upcoming batches, so forks cool on "
               "a separate loader over the training data, shuffled with its own seed ('fresh'), which may repeat "
               "batches the main branch has seen. Use torchdata's StatefulDataLoader to cool on the main "
               "branch's next batches, or pass data='fresh' to choose this.")
    else:
        return False
    rank_zero_warn(f"CooldownCallback: {msg} The records say data={source!r}.")
    return True


def listed(steps: list[int], n: int = 6) -> str:
    return ", ".join(map(str, steps[:n])) + (f", ... ({len(steps)} in all)" if len(steps) > n else "")
