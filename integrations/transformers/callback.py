"""The HF ``CooldownTrainerCallback``: replaces the Trainer's schedule and forks cooldowns per plan."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import weakref
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerControl
from transformers.utils import logging

from cooldown_callbacks import sharding
from cooldown_callbacks.engine import ForkEngine, check_writable_dir
from cooldown_callbacks.plan import ForkPlan, plan_lost_data
from cooldown_callbacks.records import ForkRecord
from cooldown_callbacks.schedules import Schedule, schedule_from_dict
from cooldown_callbacks.sharding import SAVE_FORMATS
from cooldown_callbacks.snapshot import STORAGES, capture_rng, restore_rng

from . import _stream
from ._checks import (DECAYING_SCHEDULERS, check_fsdp, check_launch, check_siblings, claim_dirpath, note_schedule,
                      scheduler_name)
from ._data import _data_kind
from ._outputs import end_on_cooled, report, restored_record, write
from ._runner import _TrainerRunner, _holds

__all__ = ["CooldownTrainerCallback", "FINAL_MODELS", "TRL_ATTRIBUTES"]

logger = logging.get_logger("cooldown_callbacks.integrations.transformers")

_RESERVED_PREFIXES = ("eval", "train", "test")
FINAL_MODELS = ("main", "cooled")
# What TRL's trainers accumulate between logging steps (SFTTrainer: in compute_loss), put back after each fork.
TRL_ATTRIBUTES = ("_metrics", "_total_train_tokens")
# The callback the user passed to a Trainer, kept so a callback that the Trainer re-creates from a
# checkpoint (restore_callback_states_from_checkpoint=True) can take back what JSON cannot store.
_ORIGINALS: "weakref.WeakKeyDictionary[Trainer, CooldownTrainerCallback]" = weakref.WeakKeyDictionary()


def _main_multiplier(callback: "CooldownTrainerCallback", t: int) -> float:
    """LambdaLR multiplier of the main branch (a module-level function bound with ``partial``, so the
    scheduler's ``state_dict`` stays ``{}`` for it and loads with ``weights_only=True``)."""
    m = callback._engine.main_multiplier(t) if callback._engine is not None else None
    if m is None:  # pragma: no cover - the scheduler is only replaced when a schedule is given
        raise RuntimeError("CooldownTrainerCallback: main-branch multiplier requested without a schedule")
    return m


class CooldownTrainerCallback(TrainerCallback, ExportableState):
    """Fork exact cooldowns from a ``transformers.Trainer`` run and keep the main branch training.

    Args:
        schedule: the main branch's LR multiplier (``WSD(...)``, ``RSqrt(...)``, any
            :class:`~cooldown_callbacks.Schedule`, or its ``to_dict()``). It replaces the Trainer's
            scheduler. ``None`` keeps the Trainer's scheduler (``lr_scheduler_type``) for the main
            branch; forks then decay from the current LR.
        plan: when and how to fork (:class:`~cooldown_callbacks.ForkPlan` or its dict); default
            ``ForkPlan()`` - fork at every evaluation with a 20% 1-sqrt cooldown.
        dirpath: where cooled models and ``forks.jsonl`` go (default ``<output_dir>/cooldowns``).
        filename: name of each cooled model's directory, with ``{step}`` and ``{cooldown}``.
        metric_key_prefix: prefix of the cooled evaluation's metrics (``cooldown_loss``, ...); with
            several cooldowns per fork point their label follows in the logged names
            (``cooldown_50steps_loss``), while the records keep ``cooldown_loss`` and a ``label``.
        snapshot_storage: where the main branch's copy waits during a fork: ``"cpu"`` (default),
            ``"device"`` or ``"disk"``.
        save_format: ``"full"`` (default): each cooled model is a ``save_pretrained`` folder that
            ``from_pretrained`` loads (under FSDP2 the full state is gathered on every rank and written by
            the main process); ``"dcp"``: a folder of ``torch.distributed.checkpoint`` shards written by
            every rank (for models too large to gather; convert with
            ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``).
        verbose: print one line per fork on the main process (through the progress bar).
        final_model: ``"main"`` (default) leaves the Trainer's model as the main branch at the end of
            ``train()``. ``"cooled"`` (needs ``ForkPlan(at_end=True)``) loads the cooled final model (the fork
            at the last step; its last cooldown in the plan's order) into ``trainer.model`` when training ends,
            so what a script does after ``train()`` - ``trainer.save_model()``, the final ``evaluate()``, the
            model card - describes the cooled model. The main branch's weights stay in the Trainer's last checkpoint
            (resume from it to train on; with ``save_strategy="no"`` there is none, which is warned about).
            A copy of the cooled weights (this rank's shards under FSDP) is held in CPU memory from the final
            fork until then. Not with ``load_best_model_at_end=True`` (two different final models).
        trainer_attributes: attributes of the Trainer (subclass) that its ``compute_loss`` or
            ``training_step`` accumulates, e.g. metrics for its logs: each is deep-copied before a fork and
            put back after, so the fork's steps never reach the main branch's logs. Default ``None``:
            TRL's ``_metrics`` and ``_total_train_tokens`` (:data:`TRL_ATTRIBUTES`) where the Trainer has
            them. Give ``()`` to keep none, or your own names (each must exist at train start).

    Attributes:
        records: one dict per fork (the JSON-lines records).
        in_fork: ``True`` while a fork runs (e.g. to skip your own logging in ``compute_loss``).
        trainer: the Trainer this callback belongs to, once found.
        fork_state: the fork history saved in checkpoints (``ExportableState.state()["attributes"]``).

    Where the plan's triggers fire: step triggers and ``on_eval`` with ``eval_strategy="steps"`` in
    ``on_step_end`` (after the Trainer decided to evaluate, before it evaluates, logs or saves);
    ``on_eval`` with ``eval_strategy="epoch"`` in ``on_epoch_end``. ``at_end`` cools the final model
    when the Trainer decides to stop: at ``max_steps`` (``on_step_end``), after a callback such as
    ``EarlyStoppingCallback`` stopped it (``on_epoch_end``), else in ``on_train_end`` (after
    ``load_best_model_at_end``, if set). ``ForkPlan(record_grad_norms=True)`` keeps the ``grad_norm``
    values the Trainer logs (every ``logging_steps``).

    Sharded training: FSDP2 (``fsdp_config={"fsdp_version": 2}``) forks on each rank's local shards and
    saves the gathered full model; FSDP v1 is refused in ``on_train_begin``.
    """

    def __init__(
        self,
        schedule: Schedule | dict | None = None,
        plan: ForkPlan | dict | None = None,
        *,
        dirpath: str | os.PathLike | None = None,
        filename: str = "cooled-step={step:08d}-cd={cooldown}",
        metric_key_prefix: str = "cooldown",
        snapshot_storage: str = "cpu",
        save_format: str = "full",
        verbose: bool = True,
        final_model: Literal["main", "cooled"] = "main",
        trainer_attributes: Sequence[str] | None = None,
    ) -> None:
        if isinstance(schedule, dict):
            schedule = schedule_from_dict(schedule)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ValueError(f"Invalid schedule ({schedule!r}): must be a Schedule such as WSD(...) or RSqrt(...), "
                             "or None to keep the Trainer's lr_scheduler_type for the main branch.")
        self._data_missing = False
        if plan is None:
            plan = ForkPlan()
        elif isinstance(plan, dict):
            plan, self._data_missing = _plan_from_json(plan)
        if not isinstance(plan, ForkPlan):
            raise ValueError(f"Invalid plan ({plan!r}): must be a ForkPlan(...), e.g. ForkPlan(on_eval=True).")
        if plan.mode == "continue" and schedule is None:
            raise ValueError("Invalid schedule (None): ForkPlan(mode='continue') needs schedule=... "
                             "(the WSD-S decays are part of the main branch's schedule).")
        if not isinstance(metric_key_prefix, str) or not metric_key_prefix.isidentifier() \
                or metric_key_prefix in _RESERVED_PREFIXES:
            raise ValueError(f"Invalid metric_key_prefix ({metric_key_prefix!r}): must be a name such as 'cooldown', "
                             f"not one of {_RESERVED_PREFIXES} (they are the main branch's).")
        if snapshot_storage not in STORAGES:
            raise ValueError(f"Invalid snapshot_storage ({snapshot_storage!r}): choose one of {STORAGES}.")
        if save_format not in SAVE_FORMATS:
            raise ValueError(f"Invalid save_format ({save_format!r}): choose one of {SAVE_FORMATS}.")
        if final_model not in FINAL_MODELS:
            raise ValueError(f"Invalid final_model ({final_model!r}): choose one of {FINAL_MODELS}.")
        if final_model == "cooled" and not plan.at_end:
            raise ValueError("Invalid final_model ('cooled'): it loads the cooled final model at the end of training, "
                             "which ForkPlan(at_end=True) creates; add at_end=True to the plan.")
        if trainer_attributes is not None:
            if isinstance(trainer_attributes, str) or not all(isinstance(n, str) and n.isidentifier()
                                                              for n in trainer_attributes):
                raise ValueError(f"Invalid trainer_attributes ({trainer_attributes!r}): must be a list of attribute "
                                 "names, e.g. ['_metrics'].")
            trainer_attributes = tuple(trainer_attributes)
        if dirpath is not None:
            check_writable_dir(dirpath, "dirpath")
        ForkEngine(plan, schedule, "." if dirpath is None else dirpath, filename=filename)  # validates filename
        self.schedule = schedule
        self.plan = plan
        self.dirpath = None if dirpath is None else str(dirpath)
        self.filename = filename
        self.metric_key_prefix = metric_key_prefix
        self.snapshot_storage = snapshot_storage
        self.save_format = save_format
        self.verbose = bool(verbose)
        self.final_model = final_model
        self.trainer_attributes = trainer_attributes
        self._engine: ForkEngine | None = None
        self._stream: _stream.MainStream | None = None
        self._warned_scheduler = False
        self._final_cooled: tuple[int, list] | None = None
        self._pending_state: dict | None = None
        self._trainer_ref: weakref.ref | None = None
        self._in_fork = False
        self._data_kind = "auto"
        self._eval_record_step: dict[int, int] = {}

    # -- public helpers ----------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> "CooldownTrainerCallback":
        """Bind this callback to ``trainer`` (adding it to the callbacks if missing).

        Only needed when the Trainer's events are called from code that is not a ``Trainer``
        method; ``Trainer(callbacks=[...])`` and ``trainer.add_callback`` need nothing more.
        """
        if not isinstance(trainer, Trainer):
            raise ValueError(f"Invalid trainer ({type(trainer).__name__}): must be a transformers.Trainer.")
        if not _holds(trainer, self):
            trainer.add_callback(self)
        self._trainer_ref = weakref.ref(trainer)
        _ORIGINALS.setdefault(trainer, self)
        return self

    @property
    def trainer(self) -> Trainer | None:
        """The Trainer this callback belongs to (known from ``on_init_end`` / ``on_train_begin``)."""
        t = self._trainer_ref() if self._trainer_ref is not None else None
        return t if t is not None and _holds(t, self) else None

    @property
    def records(self) -> list[dict]:
        if self._engine is not None:
            return self._engine.records
        return list((self._pending_state or {}).get("records", []))

    @property
    def in_fork(self) -> bool:
        return self._in_fork

    # -- ExportableState ---------------------------------------------------------------------
    @property
    def fork_state(self) -> dict:
        """JSON-friendly fork history (completed forks and their records)."""
        if self._engine is not None:
            return self._engine.state_dict()
        return dict(self._pending_state or {})

    @fork_state.setter
    def fork_state(self, value: dict) -> None:  # set by the Trainer when it re-creates the callback
        self._pending_state = dict(value or {})
        if self._engine is not None:
            self._engine.load_state_dict(self._pending_state)

    def state(self) -> dict:
        return {
            "args": {
                "schedule": self.schedule.to_dict() if self.schedule is not None else None,
                "plan": _plan_to_json(self.plan, self._data_missing),
                "dirpath": self.dirpath,
                "filename": self.filename,
                "metric_key_prefix": self.metric_key_prefix,
                "snapshot_storage": self.snapshot_storage,
                "save_format": self.save_format,
                "verbose": self.verbose,
                "final_model": self.final_model,
                "trainer_attributes": list(self.trainer_attributes) if self.trainer_attributes is not None else None,
            },
            "attributes": {"fork_state": self.fork_state},
        }

    # -- events ------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        trainer = self._find_trainer()
        if trainer is not None:
            self._trainer_ref = weakref.ref(trainer)
            _ORIGINALS.setdefault(trainer, self)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._find_trainer()
        if trainer is None:
            raise ValueError("CooldownTrainerCallback could not find its Trainer: pass it in Trainer(callbacks=[...]) "
                             "or trainer.add_callback(...), or call callback.attach(trainer) before train().")
        self._trainer_ref = weakref.ref(trainer)
        self._setup(trainer, args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if self._engine is None or self._in_fork:
            return control
        self._after_step(state.global_step, evaluating=bool(control.should_evaluate),
                         stopping=bool(control.should_training_stop), control=control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # Epoch-based evaluation is decided here; so is a stop requested after on_step_end
        # (e.g. EarlyStoppingCallback in on_evaluate).
        if self._engine is None or self._in_fork:
            return control
        self._after_step(state.global_step, evaluating=bool(control.should_evaluate),
                         stopping=bool(control.should_training_stop), control=control, continue_check=False)
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # The main branch's evaluation at a fork step goes into that fork's record (with what a subclass's log
        # adds to it, e.g. TRL's eval_entropy): main eval_<name> pairs with the cooled <prefix>_<name>.
        if self._engine is None or self._in_fork or not metrics:
            return control
        step = self._eval_record_step.get(state.global_step)
        if step is not None:
            self._engine.note_main_metrics(step, {k: v for k, v in metrics.items() if k.startswith("eval_")
                                                  and isinstance(v, (int, float))})
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._engine is not None and not self._in_fork and logs and "grad_norm" in logs:
            try:
                self._engine.record_grad_norm(float(logs["grad_norm"]))
            except (TypeError, ValueError):
                pass
        return control

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if self._engine is not None and trainer is not None:
            # Last resort for ForkPlan(at_end=True): a stop no earlier event saw.
            if self._should_fork_at_end(state.global_step, True):
                self._run(trainer, control, state.global_step, keep_cooled=self.final_model == "cooled")
            if self.final_model == "cooled":
                end_on_cooled(self, trainer, state.global_step)
        if trainer is not None:
            _stream.uninstall(trainer, self)
        return control

    # -- setup -------------------------------------------------------------------------------
    def _find_trainer(self) -> Trainer | None:
        t = self.trainer
        if t is not None:
            return t
        frame = inspect.currentframe()
        try:
            f = frame.f_back if frame is not None else None
            for _ in range(32):
                if f is None:
                    break
                cand = f.f_locals.get("self")
                if isinstance(cand, Trainer) and _holds(cand, self):
                    return cand
                f = f.f_back
        finally:
            del frame
        return None

    def _setup(self, trainer: Trainer, args: Any, state: Any) -> None:
        if getattr(trainer, "is_deepspeed_enabled", False):  # ZeRO-0/1/2 exact; ZeRO-3 and offload refused
            sharding.check_zero(trainer.model_wrapped, "CooldownTrainerCallback")
        check_fsdp(trainer, args)
        check_launch(trainer)
        dirpath = Path(self.dirpath) if self.dirpath is not None else Path(args.output_dir) / "cooldowns"
        check_siblings(self, trainer)
        if trainer.eval_dataset is None:
            raise ValueError("CooldownTrainerCallback needs eval_dataset=... on the Trainer: every cooled model is "
                             "evaluated with trainer.evaluate().")
        plan = self.plan
        if self._data_missing:
            orig = _ORIGINALS.get(trainer)
            if orig is None or orig is self or orig._data_missing:
                raise ValueError("Invalid plan: the checkpoint's ForkPlan used data=<iterable>, which cannot be "
                                 "restored from JSON; pass the callback in Trainer(callbacks=[...]) so its data is "
                                 "reused, or set restore_callback_states_from_checkpoint=False.")
            plan = self.plan = dataclasses.replace(plan, data=orig.plan.data)
            self._data_missing = False
        strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
        if plan.on_eval and strategy == "no":
            raise ValueError("Invalid plan: ForkPlan(on_eval=True) forks at the Trainer's evaluations, but "
                             "eval_strategy='no'; set eval_strategy='steps' (and eval_steps) or give every=/at=.")
        if plan.mode == "continue" and plan.on_eval and strategy != "steps":
            raise ValueError("Invalid plan: ForkPlan(mode='continue', on_eval=True) needs eval_strategy='steps' so the "
                             "cooldowns can end at each evaluation; or give every=/at=.")
        if self.final_model == "cooled" and args.load_best_model_at_end:
            raise ValueError("Invalid final_model ('cooled') with load_best_model_at_end=True: the Trainer would end "
                             "on two different models; choose one.")
        if self.final_model == "cooled" and scheduler_name(args.save_strategy) == "no":
            logger.warning("CooldownTrainerCallback(final_model='cooled') with save_strategy='no': train() ends on the "
                           "cooled model and the main branch's final weights are saved nowhere (no checkpoint to "
                           "resume the main branch from). Set save_strategy='steps' to keep them.")
        missing = [n for n in (self.trainer_attributes or ()) if not hasattr(trainer, n)]
        if missing:
            raise ValueError(f"Invalid trainer_attributes ({list(self.trainer_attributes)!r}): the "
                             f"{type(trainer).__name__} has no attribute {missing[0]!r}.")
        loader = getattr(trainer.callback_handler, "train_dataloader", None)
        self._data_kind = _data_kind(plan.data, trainer, loader)
        is_zero = trainer.is_world_process_zero()
        if is_zero:
            check_writable_dir(dirpath, "dirpath")
        eval_every = state.eval_steps if strategy == "steps" else None
        engine = ForkEngine(plan, self.schedule, dirpath, filename=self.filename, is_global_zero=is_zero,
                            eval_every=eval_every, rank=args.process_index, world_size=args.world_size)
        resumed = self._resumed_state(trainer, state)
        if resumed:
            engine.load_state_dict(resumed)
        claim_dirpath(self, trainer, engine)  # a fresh run never writes over another run's cooled models
        self._engine = engine
        self._pending_state = None
        self._eval_record_step = {}
        self._final_cooled = None
        cost = engine.cost_line(state.max_steps, eval_every)
        if cost is not None:
            logger.info(f"CooldownTrainerCallback: {cost}")
            if self.verbose and is_zero:
                write(trainer, f"[cooldown] {cost}")
        if self.schedule is not None:
            self._drive_lr(trainer, state)
        elif scheduler_name(args.lr_scheduler_type) in DECAYING_SCHEDULERS:
            logger.warning(f"CooldownTrainerCallback(schedule=None) keeps lr_scheduler_type="
                           f"'{scheduler_name(args.lr_scheduler_type)}', which decays to max_steps: the main branch "
                           "is not an indefinite run. Pass schedule=WSD(...) or RSqrt(...), or use "
                           "'constant_with_warmup', 'inverse_sqrt' or 'warmup_stable_decay'.")
        if self._data_kind == "peek-stream":
            _stream.install(trainer, self)
        else:
            _stream.uninstall(trainer, self)

    def _isolated_attributes(self, trainer: Trainer) -> list[str]:
        """Trainer attributes a fork deep-copies and puts back (``trainer_attributes``)."""
        if self.trainer_attributes is not None:
            return list(self.trainer_attributes)
        return [n for n in TRL_ATTRIBUTES if hasattr(trainer, n)]

    def _resumed_state(self, trainer: Trainer, state: Any) -> dict | None:
        if self._pending_state is not None:  # re-created from the checkpoint by the Trainer
            return self._pending_state
        if state.global_step <= 0:
            return None
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            mine = [cb for cb in trainer.callback_handler.callbacks if type(cb) is type(self)]
            idx = next((i for i, cb in enumerate(mine) if cb is self), 0)
            saved = saved[idx] if idx < len(saved) else None
        if isinstance(saved, dict):
            return (saved.get("attributes") or {}).get("fork_state")
        return None

    def _drive_lr(self, trainer: Trainer, state: Any) -> None:
        """Replace the Trainer's scheduler by ``LambdaLR(schedule)`` positioned at ``state.global_step``."""
        note_schedule(self, trainer, state.max_steps)
        fn = functools.partial(_main_multiplier, self)
        sched = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, fn, last_epoch=state.global_step - 1)
        trainer.lr_scheduler = sched
        trainer.callback_handler.lr_scheduler = sched

    # -- forking -----------------------------------------------------------------------------
    def _should_fork_at_end(self, step: int, stopping: bool) -> bool:
        e = self._engine
        return bool(e.plan.at_end and stopping and step > 0 and step not in e.completed
                    and step not in self._eval_record_step)

    def _after_step(self, step: int, *, evaluating: bool, stopping: bool, control: TrainerControl,
                    continue_check: bool = True) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        e = self._engine
        keep = stopping and self.final_model == "cooled"  # the cooled final model becomes the Trainer's at the end
        if e.should_fork(step, evaluating=evaluating):
            self._run(trainer, control, step, keep_cooled=keep)
        elif continue_check and (start := e.continue_due(step)) is not None:
            self._run(trainer, control, step, continue_start=start)
        if self._should_fork_at_end(step, stopping):
            self._run(trainer, control, step, keep_cooled=keep)

    def _run(self, trainer: Trainer, control: TrainerControl, step: int, *,
             continue_start: int | None = None, keep_cooled: bool = False) -> ForkRecord:
        e = self._engine
        runner = _TrainerRunner(self, trainer, keep_cooled=keep_cooled)
        flags = [(c, dataclasses.asdict(c)) for c in {id(control): control, id(trainer.control): trainer.control}.values()]
        rng = capture_rng() if continue_start is not None else None
        p = self.metric_key_prefix
        self._in_fork = True
        try:
            if continue_start is None:
                recs = e.fork_point(step, runner)
            else:
                recs = [e.finish_continue(continue_start, step, runner)]
            for rec in recs:
                self._eval_record_step[step] = rec.step
                prefix = p + (f"_{rec.label}" if rec.label else "")
                if rec.status == "skipped":
                    continue
                if rec.restored:  # finished before a crash: its metrics reach log_history and report_to once more
                    rec = restored_record(self, trainer, rec)
                    logs = {prefix + k[len(p):]: v for k, v in rec.metrics.items() if k.startswith(p + "_")}
                    logs.update({f"{prefix}_steps": float(rec.cooldown_steps), f"{prefix}_restored": 1.0})
                elif rec.status == "ok":
                    logs = {f"{prefix}_steps": float(rec.cooldown_steps), f"{prefix}_seconds": round(rec.seconds, 4)}
                else:
                    logs = {f"{prefix}_steps": float(rec.cooldown_steps), f"{prefix}_failed": 1.0}
                # the base Trainer's log: a subclass's log (TRL's) would move the main branch's accumulated
                # metrics into this row
                Trainer.log(trainer, logs)
        finally:
            self._in_fork = False
            if rng is not None:
                restore_rng(rng)
            for c, saved in flags:
                for k, v in saved.items():
                    setattr(c, k, v)
        kept = runner.cooled  # final_model="cooled": the last cooldown of this fork point that was saved
        if keep_cooled and kept is not None:
            rec = next((r for r in recs if r.label == kept[0] and r.status == "ok"), None)
            if rec is not None:
                self._final_cooled = (rec.step, kept[1])
        for rec in recs:
            report(self, trainer, rec)
        if self._data_kind == "peek-stream":
            _stream.stop_if_disturbed(trainer, self, runner.any_rank, step)
        return recs[-1]


def _plan_to_json(plan: ForkPlan, data_missing: bool = False) -> dict:
    d = plan.to_dict()
    if data_missing:
        d["data"] = {"custom": "iterable"}
    return d


def _plan_from_json(d: dict) -> tuple[ForkPlan, bool]:
    """Rebuild a ForkPlan from ``_plan_to_json``; the second value is True when its data iterable was lost."""
    return ForkPlan.from_dict(d), plan_lost_data(d)

