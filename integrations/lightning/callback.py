"""The Lightning ``CooldownCallback``: drives the main-branch LR and forks cooldowns per plan."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from cooldown_callbacks.data import is_stateful_loader
from cooldown_callbacks.engine import ForkEngine, check_writable_dir
from cooldown_callbacks.plan import ForkPlan
from cooldown_callbacks.records import ForkRecord
from cooldown_callbacks.schedules import Schedule
from cooldown_callbacks.snapshot import STORAGES, capture_rng, restore_rng

from ._internals import (SIGTERMException, TrainerFn, _at_step_boundary, _check_internals, _eval_every_steps,
                         _publish_metrics, _validation_configured, _will_validate)
from ._runner import _CooldownBar, _Runner, _float, _grads_finite

__all__ = ["CooldownCallback", "CooldownMisconfiguration"]


class CooldownMisconfiguration(MisconfigurationException, ValueError):
    """Bad configuration of :class:`CooldownCallback`, raised before training starts.

    Both a Lightning ``MisconfigurationException`` and a ``ValueError``.
    """



def _rng_state() -> dict:
    """Global RNG states in a form that loads with ``torch.load(weights_only=True)`` (no numpy arrays)."""
    s = capture_rng()
    py = s["python"]
    npy = s["numpy"]
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
           "torch": s["torch"]}
    if "cuda" in s:
        out["cuda"] = list(s["cuda"])
    return out


def _set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    s = {"python": (py[0], tuple(py[1]), py[2]),
         "numpy": (npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]),
         "torch": state["torch"], "generators": []}
    if "cuda" in state and torch.cuda.is_available():
        s["cuda"] = state["cuda"]
    restore_rng(s)




def _horizon(trainer: pl.Trainer) -> int | None:
    """The optimizer steps this fit will run (``max_steps``, or what ``max_epochs`` gives), if known."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    try:
        n = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - an unknown horizon only means no cost line
        return None
    return int(n) if isinstance(n, (int, float)) and math.isfinite(n) and n > 0 else None


class CooldownCallback(Callback):
    """Drive the main-branch LR from ``schedule`` and fork cooldown-to-zero runs per ``plan``.

    Args:
        schedule: the main-branch schedule (``WSD``, ``RSqrt``, ...): each param group's LR is its
            base LR times ``schedule(trainer.global_step)``. ``None`` keeps your own scheduler and
            forks decay from the current LR.
        plan: when and how to fork (default ``ForkPlan()``: at every validation, 20% 1-sqrt).
        dirpath: where cooled checkpoints and ``forks.jsonl`` go (default
            ``<trainer.default_root_dir>/cooled``).
        filename: checkpoint name with ``{step}`` (fork step) and ``{cooldown}`` (its length);
            ``.ckpt`` is appended.
        prefix: prefix of the cooled metrics in the loggers and ``trainer.callback_metrics``; with
            several cooldowns per fork point their label follows (``cooldown/50steps/val_loss``).
        save_weights_only: save only the weights (``trainer.save_checkpoint(weights_only=True)``).
        snapshot_storage: where the main branch's copy lives during a fork: ``"cpu"``, ``"device"``
            or ``"disk"``.
        progress_bar: show the cooldown's progress under Lightning's progress bar.
        verbose: print a one-line summary of each fork on rank 0.

    ``records`` lists what each fork did (also in ``<dirpath>/forks.jsonl``); ``forking`` is True
    while a fork runs (e.g. to skip expensive logging in ``training_step``).

    Resume: the callback's state (completed forks, records, the global RNG state when the checkpoint
    was written) is in every Lightning checkpoint; the RNG is put back at the first training batch
    after ``fit(ckpt_path=...)``, so a resume from a checkpoint taken mid-epoch continues bit for bit
    with a stateful train loader. Under DDP, rank 0's RNG state is the one saved and restored.
    Bad configuration raises :class:`CooldownMisconfiguration` (a ``ValueError`` and a Lightning
    ``MisconfigurationException``) in ``setup`` / ``on_fit_start`` / ``on_train_start``, before the
    first training step.
    """

    def __init__(
        self,
        schedule: Schedule | None = None,
        plan: ForkPlan | None = None,
        dirpath: str | os.PathLike | None = None,
        filename: str = "cooled-step={step:08d}-cd={cooldown}",
        prefix: str = "cooldown/",
        save_weights_only: bool = False,
        snapshot_storage: Literal["cpu", "device", "disk"] = "cpu",
        progress_bar: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        plan = ForkPlan() if plan is None else plan
        if not isinstance(plan, ForkPlan):
            raise ValueError(f"Invalid plan ({plan!r}): must be a ForkPlan(...), e.g. ForkPlan(on_eval=True).")
        if plan.mode == "continue" and schedule is None:
            raise ValueError("Invalid schedule (None) with ForkPlan(mode='continue'): WSD-S decays the main branch "
                             "in-loop, so the callback must drive the LR; pass schedule=WSD(...) or RSqrt(...).")
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"Invalid dirpath ({dirpath!r}): must be a directory path (str or PathLike), or None.")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"Invalid prefix ({prefix!r}): must be a non-empty string such as 'cooldown/'.")
        if snapshot_storage not in STORAGES:
            raise ValueError(f"Invalid snapshot_storage ({snapshot_storage!r}): choose one of {STORAGES}.")
        self.engine = ForkEngine(plan, schedule, dirpath if dirpath is not None else "cooled", filename=filename)
        self._dirpath_arg = None if dirpath is None else str(dirpath)
        self.prefix = prefix
        self.save_weights_only = bool(save_weights_only)
        self.snapshot_storage = snapshot_storage
        self.progress_bar = bool(progress_bar)
        self.verbose = bool(verbose)
        self._forking = False
        self._fork_lrs: list[float] | None = None
        self._resume_rng: dict | None = None
        self._fallback_warned = False
        self._fork_step = 0  # the main-branch step count the current cooldown update continues from
        self._fork_bad_grad: int | None = None  # first cooldown step with a non-finite gradient
        self._bar: _CooldownBar | None = None

    # -- public read-only views --------------------------------------------------------------
    @property
    def schedule(self) -> Schedule | None:
        return self.engine.schedule

    @property
    def plan(self) -> ForkPlan:
        return self.engine.plan

    @property
    def dirpath(self) -> Path:
        return self.engine.dirpath

    @property
    def records(self) -> list[dict]:
        """One dict per fork (see :class:`~cooldown_callbacks.records.ForkRecord`), oldest first."""
        return self.engine.records

    @property
    def forking(self) -> bool:
        """True while a fork (its cooldown steps or its validation) is running."""
        return self._forking

    @property
    @override
    def state_key(self) -> str:
        # Keyed by the metric prefix, which must differ between two callbacks of one trainer anyway; not by
        # dirpath, so a resumed run that writes its cooled checkpoints elsewhere still gets its state back.
        return self._generate_state_key(prefix=self.prefix)

    # -- set-up: every configuration error surfaces here, before the first step ----------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        # A new fit starts a new history (Lightning loads the checkpoint's state after this hook when
        # resuming with ckpt_path=); reusing the callback for another fit must not skip its forks.
        dirpath = Path(self._dirpath_arg) if self._dirpath_arg is not None else Path(trainer.default_root_dir) / "cooled"
        self.engine = ForkEngine(self.plan, self.schedule, dirpath, filename=self.engine.filename,
                                 is_global_zero=trainer.is_global_zero, rank=trainer.global_rank,
                                 world_size=trainer.world_size)
        self._resume_rng = None
        error = ""
        if trainer.is_global_zero:
            try:
                check_writable_dir(self.engine.dirpath, "dirpath")
            except ValueError as e:
                error = str(e)
        error = trainer.strategy.broadcast(error, src=0)
        if error:
            raise CooldownMisconfiguration(error)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_internals(trainer)
        plan = self.plan
        if self.schedule is not None and trainer.lr_scheduler_configs:
            names = ", ".join(type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs)
            raise CooldownMisconfiguration(
                f"Invalid schedule: CooldownCallback(schedule={type(self.schedule).__name__}(...)) drives the LR, but "
                f"configure_optimizers also returns a scheduler ({names}) that would fight it. Remove the scheduler "
                f"from configure_optimizers, or pass schedule=None to keep it (forks then decay from its LR).")
        if len(trainer.optimizers) == 0:
            raise CooldownMisconfiguration("CooldownCallback needs an optimizer: configure_optimizers returned none.")
        if pl_module.automatic_optimization and len(trainer.optimizers) > 1:
            raise CooldownMisconfiguration("Automatic optimization with several optimizers is not supported by "
                                           "Lightning; use manual optimization.")
        if plan.on_eval:
            if not _validation_configured(trainer):
                raise CooldownMisconfiguration(
                    "Invalid plan: ForkPlan(on_eval=True) forks at validation points, but this trainer never validates "
                    "(no validation_step, no val dataloader, or limit_val_batches=0). Give validation data, or use "
                    "ForkPlan(every=N) / at=[...] / geometric=(first, ratio).")
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = self.plan
        if plan.mode == "continue" and plan.on_eval:
            every = _eval_every_steps(trainer)
            if every is None:
                raise CooldownMisconfiguration(
                    "Invalid plan: ForkPlan(mode='continue', on_eval=True) ends each cooldown at a validation step, so "
                    "validation must be evenly spaced in optimizer steps: use Trainer(val_check_interval=<int, a "
                    "multiple of accumulate_grad_batches>, check_val_every_n_epoch=None), or ForkPlan(every=N).")
            self.engine.eval_every = every
        if isinstance(plan.data, str):
            loader = trainer.train_dataloader
            if isinstance(loader, (list, tuple, dict)):
                raise CooldownMisconfiguration(
                    f"Invalid plan: ForkPlan(data={plan.data!r}) needs a single train dataloader; with several, pass "
                    "ForkPlan(data=<iterable of batches>).")
            if plan.data == "peek" and not is_stateful_loader(loader):
                raise CooldownMisconfiguration(
                    "Invalid plan: ForkPlan(data='peek') needs a stateful train loader (state_dict/load_state_dict), "
                    "e.g. torchdata.stateful_dataloader.StatefulDataLoader; or use data='fresh'.")
            if plan.data in ("fresh", "auto") and not is_stateful_loader(loader) and \
                    getattr(loader, "batch_size", None) is None and getattr(loader, "batch_sampler", None) is None:
                raise CooldownMisconfiguration(
                    f"Invalid plan: ForkPlan(data={plan.data!r}) builds a separate loader with the train loader's "
                    "batch size, which it does not have; pass ForkPlan(data=<iterable of batches>).")
        self._apply_main_lr(trainer)
        cost = self.engine.cost_line(_horizon(trainer), _eval_every_steps(trainer) if plan.on_eval else None)
        if cost is not None and self.verbose:
            rank_zero_info(f"CooldownCallback: {cost}")

    # -- LR ----------------------------------------------------------------------------------
    def _groups(self, trainer: pl.Trainer) -> list[dict]:
        return [g for opt in trainer.optimizers for g in opt.param_groups]

    def _apply_main_lr(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer | None = None) -> None:
        mult = self.engine.main_multiplier(trainer.global_step)
        if mult is None:
            return
        groups = optimizer.param_groups if optimizer is not None else self._groups(trainer)
        for g in groups:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * mult

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._fork_lrs is not None:
            if self._fork_bad_grad is None and not _grads_finite(optimizer):
                self._fork_bad_grad = self._fork_step
            i = 0
            for opt in trainer.optimizers:
                n = len(opt.param_groups)
                if opt is optimizer:
                    for g, lr in zip(opt.param_groups, self._fork_lrs[i:i + n]):
                        g["lr"] = lr
                    return
                i += n
            return
        self._apply_main_lr(trainer, optimizer)

    # -- triggers ----------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._resume_rng is not None and not self._forking:
            # Lightning checkpoints hold no RNG state: put back the one saved with this callback's state,
            # after Lightning has rebuilt its data iterators and done its restart bookkeeping.
            _set_rng_state(self._resume_rng)
            self._resume_rng = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._forking or not _at_step_boundary(trainer):
            return
        self._apply_main_lr(trainer)  # the LR of the next update, visible to LR monitors and loggers
        step = trainer.global_step
        if self.plan.record_grad_norms:
            self._record_grad_norm(pl_module)
        if self.plan.mode == "continue":
            start = self.engine.continue_due(step)
            if start is not None:
                rec = self.engine.finish_continue(start, step, _Runner(self, trainer), suffix=".ckpt")
                self._after(trainer, rec, log_step=step)
            return
        evaluating = self.plan.on_eval and _will_validate(trainer)
        if self.engine.should_fork(step, evaluating=evaluating):
            self._fork(trainer, step)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._forking or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        step = trainer.global_step
        plan = self.plan
        if plan.mode == "branch" and plan.on_eval and self.engine.should_fork(step, evaluating=True):
            # Lightning validated where on_train_batch_end could not foresee it (a later callback set
            # should_stop, a time-based val_check_interval): fork now, still before ModelCheckpoint.
            if _at_step_boundary(trainer):
                self._fork(trainer, step, from_validation=True)
            elif not self._fallback_warned:
                self._fallback_warned = True
                rank_zero_warn(f"CooldownCallback: Lightning validated at step {step} in the middle of gradient "
                               "accumulation; no fork there. Make val_check_interval a multiple of "
                               "accumulate_grad_batches.")
        self._note_main_metrics(trainer, step)

    def _note_main_metrics(self, trainer: pl.Trainer, step: int) -> None:
        """Keep the main branch's own validation metrics at ``step`` in the fork's record."""
        target = None
        for r in reversed(self.engine.records):
            if r["step"] == step and r["mode"] == "branch" or \
                    r["mode"] == "continue" and r["step"] + r["cooldown_steps"] == step:
                target = r["step"]
                break
        if target is None:
            return
        main = {k: v for k, v in ((k, _float(v)) for k, v in trainer.callback_metrics.items()
                                  if not k.startswith(self.prefix)) if v is not None}
        if main:
            self.engine.note_main_metrics(target, main)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fork_at_end(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not self._forking:
            try:
                self._fork_at_end(trainer)
            except Exception as e:  # noqa: BLE001 - never mask the preemption itself
                rank_zero_warn(f"CooldownCallback: cooling the final model after SIGTERM failed: {e}")

    def _fork_at_end(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if not self.plan.at_end or step <= 0 or step in self.engine.completed or self._forking:
            return
        self._fork(trainer, step, from_validation=trainer.validating)

    # -- running a fork ----------------------------------------------------------------------
    def _fork(self, trainer: pl.Trainer, step: int, from_validation: bool = False) -> ForkRecord:
        recs = self.engine.fork_point(step, _Runner(self, trainer, from_validation=from_validation), suffix=".ckpt")
        for rec in recs:
            self._after(trainer, rec, log_step=step)
        return recs[-1]

    def _after(self, trainer: pl.Trainer, rec: ForkRecord, log_step: int) -> None:
        prefix = self.prefix + (f"{rec.label}/" if rec.label else "")
        if rec.status == "ok" and rec.metrics:
            _publish_metrics(trainer, {prefix + k: v for k, v in rec.metrics.items()}, log_step)
        if rec.status == "skipped":
            if self.verbose and trainer.is_global_zero:
                self._print(trainer, f"[cooldown] step {rec.step}: skipped ({rec.reason})")
            return
        if rec.status != "ok":
            rank_zero_warn(f"CooldownCallback: the fork at step {rec.step} failed and was recorded; the main branch "
                           f"goes on unchanged. {rec.error}")
        if self.verbose and trainer.is_global_zero:
            if rec.status == "ok":
                m = rec.metrics.get("val_loss")
                name = "val_loss" if m is not None else next(iter(rec.metrics), None)
                shown = f"{prefix}{name}={rec.metrics[name]:.4f}" if name is not None else "no metrics"
            else:
                shown = f"FAILED ({rec.error})"
            self._print(trainer, f"[cooldown] step {rec.step}: {rec.cooldown_steps} cooldown steps ({rec.shape}, "
                                 f"{rec.mode}) -> {shown} in {rec.seconds:.1f}s")

    def _print(self, trainer: pl.Trainer, msg: str) -> None:
        from lightning.pytorch.callbacks import RichProgressBar

        pb = trainer.progress_bar_callback
        if isinstance(pb, RichProgressBar) and pb.is_enabled:
            pb.print(msg)
            return
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()

    def _record_grad_norm(self, pl_module: pl.LightningModule) -> None:
        grads = [p.grad.detach().flatten() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self.engine.record_grad_norm(float(torch.linalg.vector_norm(torch.cat(grads).float())))

    # -- checkpointed state ------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "engine": self.engine.state_dict(), "rng": _rng_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict["engine"])
        self._resume_rng = state_dict.get("rng")

