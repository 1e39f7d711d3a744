"""The Accelerate / plain-PyTorch :class:`CooldownHook`: one call after each optimizer step."""

from __future__ import annotations

import numbers
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from cooldown_callbacks import sharding
from cooldown_callbacks.data import RESTARTED, PeekableLoader, resolve_source
from cooldown_callbacks.engine import ForkEngine, check_writable_dir
from cooldown_callbacks.plan import ForkPlan
from cooldown_callbacks.records import ForkRecord
from cooldown_callbacks.schedules import Schedule
from cooldown_callbacks.sharding import SAVE_FORMATS
from cooldown_callbacks.snapshot import STORAGES

from ._loaders import add_bookkeeping, peekable
from ._runner import _HookRunner, _inner

__all__ = ["CooldownHook"]

DEFAULT_FILENAME = "cooled-step{step:08d}-cd{cooldown}"  # no '=': command-line configurators split on it
# packages between the user's line and the hook's warnings (optimizer.step wrappers, scaler.step, this library)
_INTERNAL_PACKAGES = ("cooldown_callbacks", "torch", "accelerate", "deepspeed")

# optimizer -> the hook that drives its LR (weak both ways: the optimizer stays picklable, nothing is kept alive)
_DRIVEN: "weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.ref]" = weakref.WeakKeyDictionary()


def _user_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` (seen from the function calling it, the caller of this one) of the
    first frame outside this library and the packages that call the hook's optimizer pre-step hook: the
    user's line - their ``hook.step()``, ``optimizer.step()`` or ``scaler.step(optimizer)`` - whatever the
    depth of torch's or Accelerate's wrappers in between."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_back is not None:
        name = frame.f_globals.get("__name__", "")
        if not any(name == p or name.startswith(p + ".") for p in _INTERNAL_PACKAGES):
            break
        frame, level = frame.f_back, level + 1
    return level


def _inert(optimizer: torch.optim.Optimizer) -> bool:
    """A step at LR 0 on zero gradients: how ``torch.distributed.checkpoint.state_dict.get_state_dict``
    creates an empty optimizer's state (before a resume loads into it, and before the hook's state is)."""
    groups = optimizer.param_groups
    return all(float(g.get("lr", 1.0)) == 0.0 for g in groups) and not any(
        bool(sharding.local(p.grad).any()) for g in groups for p in g["params"] if p.grad is not None)


class CooldownHook:
    """Runs the main branch from ``schedule`` and forks cooldowns per ``plan`` in a hand-written loop.

    Call ``hook.step()`` once after each optimizer step (see the package docstring for the loop).

    Args:
        model: the (prepared) model, or a ``deepspeed.DeepSpeedEngine`` (ZeRO stage 0, 1 or 2; the fork's
            steps then go through ``engine.backward`` / ``engine.step``, which own accumulation,
            clipping and loss scaling; see :mod:`cooldown_callbacks.sharding`). A ``torch.compile``d or
            DDP-wrapped model is saved with the plain module's keys.
        optimizer: the (prepared) optimizer, or a list of them (``None`` with a DeepSpeed engine: its own).
            One hook per optimizer: a second hook on the same optimizer is refused (several cooldowns
            per fork point go in one plan).
        schedule: main-branch schedule (``WSD``, ``RSqrt``, ...); ``None`` keeps the user's scheduler
            and forks decay from the current LR. With a schedule, an LR scheduler of your own that also
            steps is overridden (a warning says so once).
        plan: when and how to fork (``ForkPlan``; ``on_eval`` plans need ``hook.step(evaluating=True)``).
        loss_fn: ``loss_fn(model, batch) -> loss``; the hook then runs the loop body: backward (loss
            divided by ``gradient_accumulation_steps``), accumulation, clipping (``max_grad_norm``), the
            optimizer step and, without an accelerator, the ``torch.amp.GradScaler`` given in
            ``scalers`` (scale, unscale before clipping, step, update). In a plain loop put your
            ``torch.autocast`` inside ``loss_fn``. Give this or ``step_fn``.
        step_fn: ``step_fn(batch)`` that runs one micro-batch of *your* loop body (forward, backward,
            and the optimizer step at accumulation boundaries). Without ``gradient_accumulation_steps``
            the hook feeds it micro-batches until the optimizer has stepped; with it, exactly that many
            per cooldown step. Counters it keeps outside the model and optimizer are not restored.
        eval_fn: ``eval_fn(model) -> dict | float`` - metrics of the cooled model (a float is recorded
            as ``val_loss``), called on every rank in eval mode under ``torch.no_grad``; the hook takes
            each metric's mean over the ranks (reducing inside ``eval_fn`` as well does no harm). It runs
            from the fork point's random state, so an ``eval_fn`` that samples random batches sees
            the ones your own evaluation right after ``hook.step`` sees. Build its data from objects the
            main branch does not iterate (a plain ``DataLoader`` over the eval set); prepared loaders
            are kept as they were, other objects of yours are not.
        train_loader: the main training loader, for ``ForkPlan(data="peek" | "fresh" | "auto")``; to
            cool on the main branch's upcoming batches of any loader (a stream included) iterate
            ``train_loader = hook.wrap(train_loader)`` in your loop.
        accelerator: an ``accelerate.Accelerator``, or ``None`` for a plain PyTorch loop.
        schedulers, scalers, generators, stateful: extra objects whose state the fork must not
            change (the accelerator's own scaler is added automatically).
        gradient_accumulation_steps: micro-batches per optimizer step. Default: the accelerator's, the
            DeepSpeed engine's, or 1. With an Accelerator left at 1 and hand-written accumulation, give
            your loop's value; a value that contradicts an accelerator's own accumulation is refused.
        max_grad_norm: clip value for the built-in ``loss_fn`` path (``None`` or ``0``: no clipping, as
            nanoGPT's ``grad_clip=0.0`` and ``TrainingArguments(max_grad_norm=0)`` mean, so
            ``max_grad_norm=grad_clip`` passes a script's setting as it is; with DeepSpeed, clipping is its
            ``gradient_clipping`` config).
        dirpath: where cooled checkpoints and ``forks.jsonl`` go; one run per folder: before its first
            step, a new run refuses a folder holding another run's records (a resumed run, with the
            hook's state loaded, continues there).
        filename: checkpoint name with ``{step}`` and ``{cooldown}`` (default without ``=``).
        save_fn: ``save_fn(model, path)`` writing the cooled model, called on every rank (default: the
            unwrapped ``state_dict`` with ``torch.save``, ``.pt``; for a sharded model the full state
            gathered on every rank and written by rank 0, see ``save_format``).
        save_format: ``"full"`` (default: one ``.pt`` file that loads with
            ``model.load_state_dict(torch.load(path))``) or ``"dcp"`` (a folder of
            ``torch.distributed.checkpoint`` shards written by every rank, for models too large to
            gather; convert with ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``).
        snapshot_storage: ``"cpu"`` (default), ``"device"`` or ``"disk"``. Sharded (FSDP2) state is
            copied per rank, local shards only.
        max_steps, eval_every: the run's horizon and (for ``on_eval`` plans) evaluation interval, if
            known: the hook then prints what the plan adds (:meth:`ForkPlan.cost`) on rank 0.

    Sharded models (FSDP2 ``fully_shard``, Accelerate's FSDP2 plugin, FSDP1 ``FullyShardedDataParallel``)
    fork exactly: see :mod:`cooldown_callbacks.sharding`. In the ``loss_fn`` path non-final micro-batches
    skip gradient communication as users do (DDP/FSDP1 ``no_sync()``, FSDP2
    ``set_requires_gradient_sync(False)``) and FSDP1 clips with its own ``clip_grad_norm_``.

    A plan with several cooldowns runs each from the restored main branch at every fork point;
    ``step()`` returns the last one's record, ``records`` has all of them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        *,
        schedule: Schedule | None,
        plan: ForkPlan,
        eval_fn: Callable[[torch.nn.Module], Any],
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        step_fn: Callable[[Any], Any] | None = None,
        train_loader: Any = None,
        accelerator: Any = None,
        schedulers: Sequence[Any] = (),
        scalers: Sequence[Any] = (),
        generators: Sequence[torch.Generator] = (),
        stateful: Sequence[Any] = (),
        gradient_accumulation_steps: int | None = None,
        max_grad_norm: float | None = None,
        dirpath: str | os.PathLike = "cooled",
        filename: str = DEFAULT_FILENAME,
        save_fn: Callable[[torch.nn.Module, Path], None] | None = None,
        save_format: Literal["full", "dcp"] = "full",
        snapshot_storage: str = "cpu",
        verbose: bool = True,
        max_steps: int | None = None,
        eval_every: int | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"Invalid model ({type(model).__name__}): must be a torch.nn.Module.")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not max_grad_norm >= 0):
            raise ValueError(f"Invalid max_grad_norm ({max_grad_norm!r}): must be a number > 0, or 0 / None for no "
                             "clipping.")
        if max_grad_norm == 0:  # nanoGPT's grad_clip=0.0 and TrainingArguments(max_grad_norm=0): no clipping
            max_grad_norm = None
        ds_engine = model if sharding.is_zero(model) else None
        if ds_engine is not None:
            sharding.check_zero(ds_engine, "CooldownHook")
            if optimizer is None:
                optimizer = ds_engine.optimizer
            ds_ga = int(ds_engine.gradient_accumulation_steps())
            if gradient_accumulation_steps not in (None, ds_ga):
                raise ValueError(f"Invalid gradient_accumulation_steps ({gradient_accumulation_steps!r}): the "
                                 f"DeepSpeed engine accumulates {ds_ga} micro-batches per step; leave it None.")
            gradient_accumulation_steps = ds_ga
            if max_grad_norm is not None:
                raise ValueError(f"Invalid max_grad_norm ({max_grad_norm!r}) with a DeepSpeed engine: DeepSpeed clips "
                                 "in engine.step(); set its 'gradient_clipping' config and leave max_grad_norm None.")
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        if not optimizers or not all(isinstance(_inner(o), torch.optim.Optimizer) for o in optimizers):
            raise ValueError("Invalid optimizer: pass the torch (or accelerate-prepared) optimizer, or a list of them.")
        if (loss_fn is None) == (step_fn is None):
            raise ValueError("Give exactly one of loss_fn (model, batch) -> loss, or step_fn(batch) that runs one "
                             "micro-batch of your loop body.")
        if not callable(eval_fn):
            raise ValueError("Invalid eval_fn: must be a callable eval_fn(model) -> dict of metrics or a float loss.")
        if plan.mode == "continue" and schedule is None:
            raise ValueError("ForkPlan(mode='continue') needs schedule=...: the WSD-S schedule is built from it.")
        if plan.mode == "continue" and plan.on_eval:
            raise ValueError("ForkPlan(mode='continue', on_eval=True) is not available in a hand-written loop: "
                             "give every=, at= or geometric= so the cooldown windows are known in advance.")
        if isinstance(plan.data, str) and train_loader is None:
            raise ValueError(f"ForkPlan(data={plan.data!r}) needs train_loader=...; or give ForkPlan(data=<iterable>) "
                             "or ForkPlan(data=<callable step -> iterable>).")
        acc_ga = accelerator.gradient_accumulation_steps if accelerator is not None else 1
        ga = acc_ga if gradient_accumulation_steps is None else gradient_accumulation_steps
        if isinstance(ga, bool) or not isinstance(ga, int) or ga < 1:
            raise ValueError(f"Invalid gradient_accumulation_steps ({ga!r}): must be an integer >= 1.")
        if acc_ga > 1 and ga != acc_ga:
            raise ValueError(
                f"Invalid gradient_accumulation_steps ({ga}): the Accelerator accumulates {acc_ga} micro-batches per "
                f"optimizer step (Accelerator(gradient_accumulation_steps={acc_ga})); leave the hook's argument out "
                "to use the Accelerator's, or set both to what your loop does.")
        if max_grad_norm is not None and step_fn is not None:
            raise ValueError("max_grad_norm applies to the loss_fn path; with step_fn, clip inside your step_fn.")
        if snapshot_storage not in STORAGES:
            raise ValueError(f"Invalid snapshot_storage ({snapshot_storage!r}): choose one of {STORAGES}.")
        if save_format not in SAVE_FORMATS:
            raise ValueError(f"Invalid save_format ({save_format!r}): choose one of {SAVE_FORMATS}.")
        if save_fn is not None and save_format != "full":
            raise ValueError("save_format applies to the default save; with save_fn, write the format you want there.")
        if ds_engine is not None and save_format != "full":
            raise ValueError(f"Invalid save_format ({save_format!r}) with a DeepSpeed engine: ZeRO-1/2 hold the full "
                             "module on every rank; use save_format='full'.")
        grad_scaler = self._pick_scaler(scalers, accelerator, loss_fn is not None)
        for o in optimizers:
            other = _DRIVEN.get(_inner(o), lambda: None)()
            if other is not None and other._handles:
                raise ValueError(
                    "Invalid optimizer: another CooldownHook already drives its learning rate; two hooks would "
                    "overwrite each other's LRs (a fork would run at the other hook's LR). Put several cooldowns in "
                    "one plan (ForkPlan(cooldown=[...])), or call close() on the other hook first.")
        self.model = model
        self.optimizers = optimizers
        self._ds_engine = ds_engine
        self.accelerator = accelerator
        self.loss_fn, self.step_fn, self.eval_fn, self.save_fn = loss_fn, step_fn, eval_fn, save_fn
        self.train_loader = train_loader
        if isinstance(train_loader, PeekableLoader):
            add_bookkeeping(train_loader)
        self.gradient_accumulation_steps = ga
        self._ga_given = gradient_accumulation_steps is not None
        self.max_grad_norm = max_grad_norm
        self.snapshot_storage = snapshot_storage
        self.save_format = save_format
        self.verbose = verbose
        self.rank, self.world_size = self._dist_info()
        self.engine = ForkEngine(plan, schedule, check_writable_dir(dirpath) if self.rank == 0 else Path(dirpath),
                                 filename=filename, is_global_zero=self.rank == 0, rank=self.rank,
                                 world_size=self.world_size)
        self._schedulers = list(schedulers)
        self._scalers = list(scalers)
        if accelerator is not None and getattr(accelerator, "scaler", None) is not None:
            self._scalers.append(accelerator.scaler)
        self._grad_scaler = grad_scaler
        self._generators = list(generators)
        self._stateful = list(stateful)
        self.step_count = 0
        self._active: _HookRunner | None = None  # the fork in progress
        self._started = False
        self._warned: set[str] = set()
        self._set_lrs: dict[int, float] = {}  # id(param group) -> the main-branch LR the hook set last
        self._forwards = 0  # training forward passes before the first optimizer step (accumulation check)
        for g in self._groups:
            g.setdefault("initial_lr", g["lr"])
        self._handles = [_inner(o).register_step_pre_hook(self._pre_step) for o in optimizers]
        self._count_handle = model.register_forward_pre_hook(self._count_forward) if loss_fn is not None else None
        for o in optimizers:
            _DRIVEN[_inner(o)] = weakref.ref(self)
        self._apply_main_lr()
        cost = self.engine.cost_line(max_steps, eval_every)
        if cost is not None and self.verbose and self.rank == 0:
            print(f"[cooldown] {cost}", flush=True)

    @staticmethod
    def _pick_scaler(scalers: Sequence[Any], accelerator: Any, loss_path: bool) -> Any:
        """The enabled GradScaler the ``loss_fn`` path steps itself (plain loops), or ``None``."""
        enabled = [s for s in scalers
                   if all(callable(getattr(s, n, None)) for n in ("scale", "unscale_", "step", "update"))
                   and (not callable(getattr(s, "is_enabled", None)) or s.is_enabled())]
        if not loss_path or not enabled:
            return None
        if accelerator is not None:
            if any(s is not getattr(accelerator, "scaler", None) for s in enabled):
                raise ValueError("Invalid scalers: with an accelerator the loss_fn path scales losses with the "
                                 "Accelerator's own scaler (Accelerator(mixed_precision='fp16')); a GradScaler of "
                                 "your own is not stepped there. Let the Accelerator scale, or use step_fn.")
            return None
        if len(enabled) > 1:
            raise ValueError(f"Invalid scalers: {len(enabled)} enabled GradScalers; the loss_fn path steps one. "
                             "Use step_fn for a loop with several.")
        return enabled[0]

    # -- the training loader -----------------------------------------------------------------
    def wrap(self, loader: Any = None) -> PeekableLoader:
        """The training loader to iterate in your loop, so forks cool on the main branch's upcoming batches.

        ``train_loader = hook.wrap(train_loader)``: the loop sees the same batches as before; a fork
        takes the next ones from the loop's own iterator and hands them back (:class:`PeekableLoader`),
        which works for any loader - streams (``IterableDataset``) and Accelerate-prepared loaders
        included (their end-of-dataloader bookkeeping is replayed). Handed-back batches stay in memory
        until the main branch uses them (``c`` x accumulation per fork). A fork that needs more batches
        than the current pass has left goes on with ``"fresh"`` batches for a map-style dataset and fails
        for a stream (the record and a warning say so).
        """
        loader = self.train_loader if loader is None else loader
        if isinstance(loader, PeekableLoader):
            add_bookkeeping(loader)
            self.train_loader = loader
            return loader
        if loader is None:
            raise ValueError("hook.wrap(): give the training loader (or pass train_loader= to the hook).")
        current = self.train_loader.loader if isinstance(self.train_loader, PeekableLoader) else self.train_loader
        if current is not None and loader is not current:
            raise ValueError("hook.wrap(loader): not the train_loader given to the hook; wrap that one, or pass "
                             "train_loader=hook.wrap(loader) when you build the hook.")
        self.train_loader = peekable(loader)
        return self.train_loader

    # -- LR ----------------------------------------------------------------------------------
    @property
    def _groups(self) -> list[dict]:
        # looked up each time: optimizer.load_state_dict (accelerator.load_state) replaces the group dicts
        return [g for o in self.optimizers for g in _inner(o).param_groups]

    def _apply_main_lr(self) -> None:
        mult = self.engine.main_multiplier(self.step_count)
        if mult is not None:
            for g in self._groups:  # inside a DeepSpeed ZeRO step: the one group being stepped
                g["lr"] = g["initial_lr"] * mult
                self._set_lrs[id(g)] = g["lr"]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._active is not None:
            self._active.pre_step(optimizer)
            return
        if not optimizer.state and _inert(optimizer):
            return  # a step that only creates the optimizer's state (torch DCP's get_state_dict): not training
        if not self._started:
            self._start()
        self._check_foreign_lr()
        self._apply_main_lr()

    def _check_foreign_lr(self) -> None:
        if any(self._set_lrs.get(id(g), g["lr"]) != g["lr"] for g in self._groups):
            self._warn("scheduler", "The learning rate was changed between two optimizer steps by something other than "
                       "the CooldownHook (an LR scheduler of yours that also steps, or a loop that sets "
                       "param_group['lr'] itself, as nanoGPT's train.py does?). With schedule=... the hook sets the "
                       "LR before every step, so your scheduler's get_last_lr() (or your loop's lr variable) no longer "
                       "reports the LR used. Remove your scheduler (or those lines), or pass schedule=None to keep it "
                       "driving the main branch.")

    def _count_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self._active is None and torch.is_grad_enabled() and module.training:
            self._forwards += 1

    # -- checks before the first optimizer step ----------------------------------------------
    def _start(self) -> None:
        """Refuse what cannot work, and warn about what looks wrong, before the first update."""
        self._started = True
        if self._count_handle is not None:
            self._count_handle.remove()
            self._count_handle = None
        resumed = self.step_count == 0 and any(_inner(o).state for o in self.optimizers)
        error = None
        if self.rank == 0:
            try:
                self.engine.claim_dirpath()
            except ValueError as e:
                # a script resumed from its checkpoint (nanoGPT's init_from='resume') without the hook's state
                error = ValueError(f"{e} This run looks resumed (the optimizer has state, the CooldownHook is at step "
                                   "0): load the hook's state before training - hook.load_state_dict(...) with what "
                                   "hook.state_dict() gave when you saved the checkpoint, or "
                                   "accelerator.register_for_checkpointing(hook) before accelerator.load_state - and "
                                   "the run continues in this folder.") if resumed else e
        if _HookRunner(self).any_rank(error is not None):
            raise error or ValueError(f"Invalid dirpath ({str(self.engine.dirpath)!r}): rank 0 refused it (it holds "
                                      "another run's records); see rank 0's error.")
        resolve_source(self.engine.plan.data, self.train_loader)
        if resumed:
            self._warn("resume", "The optimizer has state but the CooldownHook is at step 0: a resumed run? Load the "
                       "hook's state too (hook.load_state_dict(...), or accelerator.register_for_checkpointing(hook) "
                       "before accelerator.load_state), or the schedule restarts from step 0 (warmup) and forks "
                       "repeat; hook.step(step=iter_num) takes the step from your loop.")
        n, ga = self._forwards, self.gradient_accumulation_steps
        if self.loss_fn is not None and n > 0 and n != ga:
            self._warn("accumulation", f"Your loop ran {n} training forward passes before its first optimizer step, "
                       f"but a fork's cooldown step runs {ga} micro-batch(es) (gradient_accumulation_steps={ga}). If "
                       f"your loop accumulates {n} micro-batches per step, pass "
                       f"CooldownHook(gradient_accumulation_steps={n}) "
                       "(the hook then divides the loss and steps every "
                       f"{n} micro-batches, also with an Accelerator left at 1).")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned and self.rank == 0:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())  # the user's line

    def _note_source(self, source: str | None) -> None:
        """Warn once per kind when a fork did not cool on the main branch's upcoming batches unasked."""
        data = self.engine.plan.data
        if source is None or source == "peek" or source in ("iterable", "callable"):
            return
        if source == RESTARTED:
            self._warn(source, "Forks cool on the training stream restarted from its beginning (data='fresh'): on "
                       "batches the main branch has already trained on. To cool on its upcoming batches iterate "
                       "train_loader = hook.wrap(train_loader) and use data='auto'.")
        elif source.startswith("peek"):
            self._warn("ran out", f"A fork needed more batches than the main branch's current pass had left and went "
                       f"on with a separately shuffled pass ({source!r}, kept in the record's data field).")
        elif data != "fresh":
            self._warn("fresh", "ForkPlan(data='auto'): the training loader cannot show the main branch's upcoming "
                       "batches, so forks cool on a separately shuffled pass over the dataset ('fresh'). To cool on "
                       "the batches the main branch sees next, iterate train_loader = hook.wrap(train_loader); "
                       "data='fresh' says this is what you want.")

    # -- the per-step call -------------------------------------------------------------------
    def step(self, step: int | None = None, *, evaluating: bool = False, metrics: dict | None = None
             ) -> ForkRecord | None:
        """Call once after each optimizer step. Returns the fork's record if one ran.

        ``step``: your loop's count of completed optimizer steps, this one included (nanoGPT's
        ``iter_num`` after ``iter_num += 1``); default: the hook's own count plus one.
        Call it right after the optimizer step and *before* your own evaluation of that step: a fork
        then cools the model and evaluates it from the state your evaluation starts from.
        ``evaluating=True`` marks a step where your loop evaluates the main branch (for
        ``ForkPlan(on_eval=True)``; with several processes every rank forks when any rank passes it, so a
        loop that evaluates on rank 0 only may say so on rank 0 only - at the cost of one one-flag
        all-reduce per step for ``on_eval`` plans: on a host tensor unless the process group is NCCL
        alone, where it waits for the device; a step trigger such as ``ForkPlan(every=eval_interval)``
        needs none); ``metrics`` are main-branch metrics known now, kept in the record (later ones:
        :meth:`log_main_metrics`).
        """
        if not self._started:
            self._start()
        if step is None:
            t = self.step_count + 1
        else:
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
                raise ValueError(f"Invalid step ({step!r}): the number of completed optimizer steps, an integer >= 1.")
            t = int(step)
            if t <= self.step_count:
                raise ValueError(f"Invalid step ({t}): the hook is already at step {self.step_count}; pass the count "
                                 "of completed optimizer steps, which grows by one per call.")
            if t != self.step_count + 1:
                self._warn("step jump", f"hook.step(step={t}) after step {self.step_count}: call it after every "
                           "optimizer step; on resume, load the hook's state (hook.load_state_dict) before training.")
        self._check_foreign_lr()
        self.step_count = t
        if self.world_size > 1 and self.engine.plan.on_eval:
            # every rank forks when one evaluates: a loop that evaluates on rank 0 only (nanoGPT's `iter_num %
            # eval_interval == 0 and master_process`) must not send rank 0 into the fork's collectives alone.
            # A host tensor where the process group reduces them (gloo, or torch's default cpu:gloo,cuda:nccl),
            # so the per-step flag does not wait for the accelerator's queue; pure NCCL needs a device tensor
            evaluating = sharding.any_rank(bool(evaluating))
        rec = None
        suffix = self._suffix()
        if self.engine.should_fork(t, evaluating=evaluating):
            for rec in self.engine.fork_point(t, _HookRunner(self), suffix=suffix, main_metrics=metrics):
                self._report(rec)
        else:
            start = self.engine.continue_due(t)
            if start is not None:
                rec = self.engine.finish_continue(start, t, _HookRunner(self), suffix=suffix, main_metrics=metrics)
                self._report(rec)
        self._apply_main_lr()
        return rec

    def finish(self, metrics: dict | None = None) -> ForkRecord | None:
        """End of training: cool the final model if ``ForkPlan(at_end=True)`` and not yet done.

        ``metrics``: the main branch's own final metrics, kept in the record."""
        t = self.step_count
        plan = self.engine.plan
        if not plan.at_end or t <= 0 or t in self.engine.completed:
            return None
        rec = None
        for rec in self.engine.fork_point(t, _HookRunner(self), suffix=self._suffix(), main_metrics=metrics):
            self._report(rec)
        return rec

    def log_main_metrics(self, step: int, metrics: dict) -> None:
        """Main-branch metrics at ``step`` that arrive after ``hook.step`` (e.g. your evaluation right
        after it): kept in that step's fork record and in ``forks.jsonl``, so ``cooldown-callbacks report``
        shows them beside the cooled ones. Steps without a fork are ignored."""
        self.engine.note_main_metrics(int(step), metrics)

    def record_grad_norm(self, norm: float | torch.Tensor) -> None:
        """Optional: record the main branch's gradient norm of this step (``ForkPlan(record_grad_norms=True)``)."""
        if self.engine.plan.record_grad_norms:
            self.engine.record_grad_norm(float(norm))

    @property
    def records(self) -> list[dict]:
        return self.engine.records

    def close(self) -> None:
        """Stop driving the optimizer (removes the hook's optimizer and model hooks)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._count_handle is not None:
            self._count_handle.remove()
            self._count_handle = None
        for o in self.optimizers:
            ref = _DRIVEN.get(_inner(o))
            if ref is not None and ref() is self:
                del _DRIVEN[_inner(o)]

    # -- checkpointing (accelerator.register_for_checkpointing) ------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step_count, "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.engine.load_state_dict(state["engine"])
        self._apply_main_lr()

    # -- internals ---------------------------------------------------------------------------
    def _suffix(self) -> str:
        """``.pt`` for the default full save; a DCP folder or the user's ``save_fn`` get the bare name."""
        return ".pt" if self.save_fn is None and self.save_format == "full" else ""

    def _dist_info(self) -> tuple[int, int]:
        if self.accelerator is not None:
            return self.accelerator.process_index, self.accelerator.num_processes
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _report(self, rec: ForkRecord) -> None:
        if rec.mode == "branch" and not rec.restored:
            self._note_source(rec.data)
        if self.verbose and self.rank == 0:
            if rec.status == "skipped":
                print(f"[cooldown] step {rec.step}: skipped ({rec.reason})", flush=True)
                return
            m = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.metrics.items())
            status = m if rec.status == "ok" else f"FAILED ({rec.error})"
            label = f" [{rec.label}]" if rec.label else ""
            when = "restored from the records (it finished before the restart)" if rec.restored else \
                f"in {rec.seconds:.1f}s"
            print(f"[cooldown] step {rec.step}{label}: {rec.cooldown_steps} cooldown steps ({rec.shape}) -> {status} "
                  f"{when}", flush=True)

    _Runner = _HookRunner  # the engine's view of this hook for one fork
