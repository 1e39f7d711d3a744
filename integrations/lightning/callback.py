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
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from cooldown_callbacks.engine import ForkEngine
from cooldown_callbacks.plan import ForkPlan
from cooldown_callbacks.records import ForkRecord
from cooldown_callbacks.schedules import Schedule
from cooldown_callbacks.sharding import SAVE_FORMATS
from cooldown_callbacks.snapshot import STORAGES, capture_rng, restore_rng

from ._checks import (CooldownMisconfiguration, check_callbacks, check_data, check_fit, claim_dirpath, default_dirpath,
                      listed, unreachable_steps, warn_checkpoint_monitors, warn_data_source, warn_steps_per_batch)
from ._internals import (SIGTERMException, TrainerFn, _at_step_boundary, _check_internals, _eval_every_steps,
                         _logger_step, _publish_metrics, _will_validate)
from ._runner import _CooldownBar, _Runner, _float, _grads_finite

__all__ = ["CooldownCallback", "CooldownMisconfiguration"]


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
            base LR times ``schedule(t)`` for the update after ``t`` steps. ``None`` keeps your own
            scheduler and forks decay from the current LR.
        plan: when and how to fork (default ``ForkPlan()``: at every validation, 20% 1-sqrt).
        dirpath: where cooled checkpoints and ``forks.jsonl`` go. Default: ``ModelCheckpoint``'s
            convention, a folder of this run's own: ``<save_dir>/<name>/<version>/cooled`` of the first
            logger, or ``<default_root_dir>/cooled`` without a logger.
        filename: checkpoint name with ``{step}`` (fork step) and ``{cooldown}`` (its length);
            ``.ckpt`` is appended.
        prefix: prefix of the cooled metrics in the loggers, the progress bar and
            ``trainer.callback_metrics``; also keys the callback's state in checkpoints. With several
            cooldowns per fork point their label follows (``cooldown/50steps/val_loss``).
        save_weights_only: save only the weights (``trainer.save_checkpoint(weights_only=True)``).
        save_format: how a sharded strategy writes each cooled checkpoint. ``"full"`` (default): one
            ``.ckpt`` file with the unsharded state, gathered on every rank and written by rank 0
            (``load_from_checkpoint`` loads it); ``"dcp"``: ``ModelParallelStrategy``'s distributed
            checkpoint folder (every rank writes its shards; for models too large to gather; convert
            with ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``). Other strategies
            write one file either way; ``"dcp"`` needs ``ModelParallelStrategy``.
        snapshot_storage: where the main branch's copy lives during a fork: ``"cpu"``, ``"device"``
            or ``"disk"``.
        progress_bar: show the cooldown and the cooled validation under Lightning's progress bar.
        verbose: print a one-line summary of each fork on rank 0.

    ``records`` lists what each fork did (also in ``<dirpath>/forks.jsonl``); ``forking`` is True
    while a fork runs (e.g. to skip expensive logging in ``training_step``).

    **Steps.** A step is one optimizer step of the main branch: ``trainer.global_step`` under
    automatic optimization (with gradient accumulation, one step per ``accumulate_grad_batches``
    batches). Under manual optimization a step is one training batch whose ``training_step`` stepped
    at least one optimizer - a GAN stepping a generator and a discriminator per batch moves
    ``trainer.global_step`` by 2 but counts one step. Plan steps (``every``, ``at``,
    ``geometric``), ``Cooldown(steps=c)`` (c such batches, each optimizer stepping as your
    ``training_step`` does), ``Cooldown(fraction=...)``, the schedule's ``t`` and the records' ``step``
    all use this count (kept in the callback's checkpointed state). Lightning's ``max_steps`` counts
    every ``optimizer.step()``: a plan step that training cannot reach (``at=`` beyond ``max_steps``,
    or beyond what ``max_steps`` allows at several optimizer steps per batch) is reported with a warning.

    **Where things go.** Each fresh ``fit`` writes into a folder of its own (see ``dirpath``) and
    refuses, before the first step, a folder holding another run's ``forks.jsonl`` (a second fresh run
    would overwrite cooled checkpoints the first run's records describe). ``fit(ckpt_path=...)`` is
    the same run: it continues in the folder saved in the checkpoint (unless ``dirpath`` is given) and
    does not run again the forks it finished after that checkpoint: they are taken back from the
    records, printed as restored, and their metrics are published once.

    **Metrics.** The cooled model's metrics are logged to every logger under ``prefix``
    (``cooldown/val_loss``) at the logger step of the main branch's own validation at the fork step
    (the step Lightning's loggers give that validation's ``val_loss``), so both appear side by side;
    the records keep the fork step ``S`` and ``cooldown_steps`` ``c`` (the CLI's budget axis is
    ``S + c``). Metrics logged with ``prog_bar=True`` appear in the progress bar as
    ``cooldown/<name>``. ``ModelCheckpoint(monitor="cooldown/val_loss")`` would save *main-branch*
    weights scored by the cooled loss (a warning says so): the cooled models are this callback's
    checkpoints, listed with their metrics in ``forks.jsonl``.

    **Cooldown data** (``ForkPlan.data``): ``"auto"``/``"peek"`` cool on the main branch's upcoming
    batches: a stateful loader (torchdata's ``StatefulDataLoader``) is cloned; a stream (a
    DataLoader over an ``IterableDataset``, or any other plain iterable) is read ahead through
    Lightning's data fetcher and the batches are handed back to the main branch after the fork
    (``c * accumulate_grad_batches`` batches held in memory meanwhile; a fork the stream cannot feed
    fails with the reason; a dataset that draws from the main process's global RNG while a batch is
    drawn - ``num_workers=0`` with random shuffling or augmentation - is detected and the fork fails,
    saying the main branch is no longer exact; use ``num_workers>0``). A plain DataLoader over a
    map-style dataset falls back (``"auto"``) to a separate seeded loader (``"fresh"``), with a
    warning. ``"fresh"`` on a stream restarts it from its beginning, and says so. The record's
    ``data`` names the source.

    **Several callbacks.** Each instance needs its own ``prefix`` (Lightning refuses two with the same
    one: "Found more than one stateful callback of type CooldownCallback"); at most one may have a
    schedule. To compare cooldown lengths, give one callback several cooldowns per fork point.

    **Not forking.** ``fast_dev_run`` runs no fork and writes nothing (as ``ModelCheckpoint`` skips
    saving; said once at fit start). Under spawn-based strategies (``ddp_spawn``, ``ddp_notebook``)
    training runs in child processes: the callback object in your script never sees the forks -
    read them with ``cooldown_callbacks.records.read_records(dirpath)`` (give ``dirpath`` to know it).

    Resume: the callback's state (completed forks, records, step count, dirpath, the global RNG state
    when the checkpoint was written) is in every Lightning checkpoint; the RNG is put back at the first
    training batch after ``fit(ckpt_path=...)``, so a resume from a checkpoint taken mid-epoch
    continues bit for bit with a stateful train loader. Under DDP, rank 0's RNG state is the one saved
    and restored. Sharded training: exact under ``ModelParallelStrategy`` (FSDP2 in ``configure_model``;
    each rank snapshots its local shards); ``strategy="fsdp"`` (FSDP1) and ``strategy="deepspeed"`` are
    refused in ``setup``. Bad configuration raises :class:`CooldownMisconfiguration` (a ``ValueError`` and a
    Lightning ``MisconfigurationException``) in ``setup`` / ``on_fit_start`` / ``on_train_start``,
    before the first training step.
    """

    def __init__(
        self,
        schedule: Schedule | None = None,
        plan: ForkPlan | None = None,
        dirpath: str | os.PathLike | None = None,
        filename: str = "cooled-step={step:08d}-cd={cooldown}",
        prefix: str = "cooldown/",
        save_weights_only: bool = False,
        save_format: Literal["full", "dcp"] = "full",
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
        if save_format not in SAVE_FORMATS:
            raise ValueError(f"Invalid save_format ({save_format!r}): choose one of {SAVE_FORMATS}.")
        self.engine = ForkEngine(plan, schedule, dirpath if dirpath is not None else "cooled", filename=filename)
        self._dirpath_arg = None if dirpath is None else str(dirpath)
        self.prefix = prefix
        self.save_weights_only = bool(save_weights_only)
        self.save_format = save_format
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
        self._steps = 0  # manual optimization: training batches that stepped an optimizer (see "Steps")
        self._global_step_at_batch_start = 0
        self._log_step = 0  # Lightning's logger step of the latest main-branch training batch
        self._rng_before_validation: dict | None = None
        self._skip_forks = False  # fast_dev_run
        self._peers: list[CooldownCallback] = []
        self._data_warned = self._rate_warned = self._stream_rng_moved = False

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

    def _step(self, trainer: pl.Trainer) -> int:
        """The main branch's step count (see "Steps" in the class docstring)."""
        return trainer.global_step if trainer.lightning_module.automatic_optimization else self._steps

    # -- set-up: every configuration error surfaces here, before the first step ----------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._check_strategy(trainer)
        # A new fit starts a new history (Lightning loads the checkpoint's state after this hook when
        # resuming with ckpt_path=); reusing the callback for another fit must not skip its forks.
        self._skip_forks = bool(trainer.fast_dev_run)
        if self._dirpath_arg is not None:
            dirpath = Path(self._dirpath_arg)
        else:  # the logger's version can differ between ranks before it is created: rank 0's, as ModelCheckpoint
            dirpath = Path(trainer.strategy.broadcast(str(default_dirpath(trainer)), src=0))
        self.engine = ForkEngine(self.plan, self.schedule, dirpath, filename=self.engine.filename,
                                 is_global_zero=trainer.is_global_zero, rank=trainer.global_rank,
                                 world_size=trainer.world_size)
        self._resume_rng = None
        self._steps, self._rng_before_validation = 0, None
        self._data_warned = self._rate_warned = self._stream_rng_moved = False

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        """Sharded strategies: exact with ModelParallelStrategy (FSDP2); FSDP1 and DeepSpeed are refused, before
        any step."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):  # Lightning runs it on CUDA only: not verified here
            raise CooldownMisconfiguration(
                "CooldownCallback does not support strategy='deepspeed' (DeepSpeedStrategy): its forks cannot be "
                "verified exact. Use strategy='ddp', or strategy=ModelParallelStrategy() with FSDP2's fully_shard in "
                "LightningModule.configure_model; for DeepSpeed ZeRO-1/2 (exact), use CooldownHook with a DeepSpeed "
                "engine in your own loop, or the HF Trainer's CooldownTrainerCallback with deepspeed=...")
        if isinstance(strategy, FSDPStrategy):
            raise CooldownMisconfiguration(
                "CooldownCallback does not support strategy='fsdp' (FSDPStrategy, FSDP1 FullyShardedDataParallel): "
                "its forks cannot be verified exact. Use strategy=ModelParallelStrategy() and apply FSDP2's "
                "fully_shard in LightningModule.configure_model; forks are exact there.")
        if self.save_format == "dcp" and not isinstance(strategy, ModelParallelStrategy):
            raise CooldownMisconfiguration(
                f"Invalid save_format ('dcp') with {type(strategy).__name__}: only ModelParallelStrategy writes "
                "distributed (DCP) checkpoints; use save_format='full'.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_internals(trainer)
        self._peers = check_callbacks(self, trainer)
        check_fit(self, trainer, pl_module)
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
        if self._skip_forks:
            rank_zero_info("CooldownCallback: fast_dev_run: no forks and nothing written (as ModelCheckpoint skips "
                           "saving); the schedule still drives the LR.")
            return
        warn_checkpoint_monitors(self, trainer)
        lost = unreachable_steps(self.plan, trainer.max_steps)
        if lost:
            rank_zero_warn(f"CooldownCallback: ForkPlan step(s) {listed(lost)} lie beyond max_steps="
                           f"{trainer.max_steps} and will never be reached.")

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
        check_data(plan, trainer)
        if self._steps < 0:  # resumed from a checkpoint written before the callback kept its step count
            self._steps = trainer.global_step
        if not self._skip_forks:
            claim_dirpath(self, trainer)  # after the checkpoint's state (the run id) is loaded
        self._apply_main_lr(trainer)
        cost = self.engine.cost_line(_horizon(trainer), _eval_every_steps(trainer) if plan.on_eval else None)
        if cost is not None and self.verbose:
            rank_zero_info(f"CooldownCallback: {cost}")

    # -- LR ----------------------------------------------------------------------------------
    def _groups(self, trainer: pl.Trainer) -> list[dict]:
        return [g for opt in trainer.optimizers for g in opt.param_groups]

    def _apply_main_lr(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer | None = None) -> None:
        mult = self.engine.main_multiplier(self._step(trainer))
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
        if any(p._forking for p in self._peers):
            return  # another CooldownCallback's fork sets the LRs of its cooldown
        self._apply_main_lr(trainer, optimizer)

    # -- triggers ----------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._forking:
            return
        if self._resume_rng is not None:
            # Lightning checkpoints hold no RNG state: put back the one saved with this callback's state,
            # after Lightning has rebuilt its data iterators and done its restart bookkeeping.
            _set_rng_state(self._resume_rng)
            self._resume_rng = None
        self._global_step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._forking:
            return
        if not pl_module.automatic_optimization:
            moved = trainer.global_step - self._global_step_at_batch_start
            self._steps += int(moved > 0)
            if moved > 1 and not self._rate_warned:
                self._rate_warned = True
                warn_steps_per_batch(self.plan, trainer, moved)
        if not _at_step_boundary(trainer):
            return
        self._log_step = _logger_step(trainer)
        self._apply_main_lr(trainer)  # the LR of the next update, visible to LR monitors and loggers
        if self._skip_forks:
            return
        step = self._step(trainer)
        if self.plan.record_grad_norms:
            self._record_grad_norm(pl_module)
        if self.plan.mode == "continue":
            start = self.engine.continue_due(step)
            if start is not None:
                runner = _Runner(self, trainer, step)
                rec = self.engine.finish_continue(start, step, runner, suffix=".ckpt")
                self._after(trainer, rec, runner)
            return
        evaluating = self.plan.on_eval and _will_validate(trainer)
        if self.engine.should_fork(step, evaluating=evaluating):
            self._fork(trainer, step)
        if self.plan.on_eval:  # what a fork after this step's validation evaluates from (see on_validation_end)
            self._rng_before_validation = capture_rng()

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._forking and self._bar is not None:
            self._bar.advance()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._forking or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        step = self._step(trainer)
        plan = self.plan
        if not self._skip_forks and plan.mode == "branch" and plan.on_eval and \
                self.engine.should_fork(step, evaluating=True):
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
        step = self._step(trainer)
        if not self.plan.at_end or step <= 0 or step in self.engine.completed or self._forking or self._skip_forks:
            return
        self._fork(trainer, step, from_validation=trainer.validating)

    # -- running a fork ----------------------------------------------------------------------
    def _fork(self, trainer: pl.Trainer, step: int, from_validation: bool = False) -> ForkRecord:
        runner = _Runner(self, trainer, step, from_validation=from_validation)
        recs = self.engine.fork_point(step, runner, suffix=".ckpt")
        for rec in recs:
            self._after(trainer, rec, runner)
        return recs[-1]

    def _after(self, trainer: pl.Trainer, rec: ForkRecord, runner: _Runner) -> None:
        prefix = self.prefix + (f"{rec.label}/" if rec.label else "")
        if rec.status == "ok" and rec.metrics:
            shown = [prefix + k for k in runner.prog_bar_keys]
            _publish_metrics(trainer, {prefix + k: v for k, v in rec.metrics.items()}, self._log_step, shown)
        if rec.status == "skipped":
            if self.verbose and trainer.is_global_zero:
                self._print(trainer, f"[cooldown] step {rec.step}: skipped ({rec.reason})")
            return
        if rec.status != "ok" and not rec.restored:
            fate = ("the main branch is NOT bit-identical to a run without forks from here on" if
                    self._stream_rng_moved else "the main branch goes on unchanged")
            rank_zero_warn(f"CooldownCallback: the fork at step {rec.step} failed and was recorded; {fate}. "
                           f"{rec.error}")
        if self.verbose and trainer.is_global_zero:
            if rec.status == "ok":
                m = rec.metrics.get("val_loss")
                name = "val_loss" if m is not None else next(iter(rec.metrics), None)
                shown = f"{prefix}{name}={rec.metrics[name]:.4f}" if name is not None else "no metrics"
            else:
                shown = f"FAILED ({rec.error})"
            if rec.restored:
                what = f"{rec.cooldown_steps} cooldown steps, restored from the records (finished before the restart)"
                self._print(trainer, f"[cooldown] step {rec.step}: {what} -> {shown}")
            else:
                self._print(trainer, f"[cooldown] step {rec.step}: {rec.cooldown_steps} cooldown steps ({rec.shape}, "
                                     f"{rec.mode}) -> {shown} in {rec.seconds:.1f}s")

    def _note_data_source(self, source: str) -> None:
        """Warn once per fit when forks cool on data that is not the main branch's upcoming batches."""
        if not self._data_warned:
            self._data_warned = warn_data_source(self.plan, source)

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
        return {"version": 2, "engine": self.engine.state_dict(), "rng": _rng_state(), "steps": self._steps,
                "dirpath": str(self.engine.dirpath)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict["engine"])
        self._resume_rng = state_dict.get("rng")
        self._steps = int(state_dict.get("steps", -1))  # -1: taken from global_step in on_train_start
        if self._dirpath_arg is None and state_dict.get("dirpath"):
            self.engine.dirpath = Path(state_dict["dirpath"])  # the same run goes on in its own folder

