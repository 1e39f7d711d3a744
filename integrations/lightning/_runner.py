"""The engine's view of one fork inside a running ``fit`` (the ``ForkRunner`` protocol) and the cooldown's progress bar."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset

from cooldown_callbacks import sharding
from cooldown_callbacks.data import cooldown_batches, is_stateful_loader
from cooldown_callbacks.engine import ForkError
from cooldown_callbacks.snapshot import Snapshot, capture_rng, restore_rng

from ._internals import (RunningStage, _auto_micro_step, _checkpoint_layout, _cooled_validation, _ddp_extras,
                         _discarded_train_logging, _MainStreamPeek, _manual_micro_step, _metric_extras, _module_hook,
                         _module_train_modes, _next_batch_idx, _prefetched_batches, _progress_extras, _to_device,
                         _val_batches)

if TYPE_CHECKING:
    from .callback import CooldownCallback


class _CooldownBar:
    """The cooldown's progress, nested under Lightning's TQDM bar or as a task of its Rich bar."""

    def __init__(self, trainer: pl.Trainer, desc: str, total: int) -> None:
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        self._tqdm = self._rich = self._task = None
        self._trainer = trainer
        pb = trainer.progress_bar_callback
        if pb is None or not pb.is_enabled or not trainer.is_global_zero:
            return
        if isinstance(pb, TQDMProgressBar):
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            pos = 2 * pb.process_position + (2 if trainer.validating else 1)
            self._tqdm = Tqdm(desc=desc, total=total, position=pos, leave=False, dynamic_ncols=True, file=sys.stdout)
        elif isinstance(pb, RichProgressBar) and pb.progress is not None:
            self._rich = pb.progress
            self._task = self._rich.add_task(desc, total=total)

    def advance(self) -> None:
        if self._tqdm is not None:
            self._tqdm.update(1)
        elif self._rich is not None:
            self._rich.update(self._task, advance=1)
            if self._trainer.progress_bar_callback is not None:  # hidden during the cooled validation
                self._rich.refresh()  # (its columns look it up while rendering)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._rich is not None:
            self._rich.remove_task(self._task)
            if self._trainer.progress_bar_callback is not None:
                self._rich.refresh()  # or the last frame keeps the removed task's line
        self._tqdm = self._rich = None


class _Runner:
    """The engine's view of one fork (the ``ForkRunner`` protocol) inside a running ``fit``."""

    def __init__(self, cb: CooldownCallback, trainer: pl.Trainer, step: int, from_validation: bool = False) -> None:
        self.cb, self.trainer = cb, trainer
        self.module = trainer.lightning_module
        self.from_validation = from_validation
        self._stack = contextlib.ExitStack()
        self._it: Iterator | None = None
        self._peek: _MainStreamPeek | None = None
        self._batch_idx = 0
        self._step, self._k = step, 0
        self.data_source: str | None = None  # kept in the fork's record by the engine
        self.prog_bar_keys: set = set()  # cooled metrics the user logged with prog_bar=True

    # snapshot / LRs
    def snapshot(self) -> Snapshot:
        tr = self.trainer
        stateful = [c.scheduler for c in tr.lr_scheduler_configs] + [tr.precision_plugin]
        extras = _progress_extras(tr) + _ddp_extras(tr) + _metric_extras(self.module)
        return Snapshot.take(modules=[self.module], optimizers=list(tr.optimizers), stateful=stateful, extras=extras,
                             storage=self.cb.snapshot_storage, directory=self.cb.engine.dirpath)

    def base_lrs(self) -> list[float]:
        return [g.get("initial_lr", g["lr"]) for g in self.cb._groups(self.trainer)]

    def current_lrs(self) -> list[float]:
        return [g["lr"] for g in self.cb._groups(self.trainer)]

    # the cooldown
    def begin(self, step: int, cooldown_steps: int) -> None:
        cb, tr = self.cb, self.trainer
        stack = self._stack
        cb._forking = True
        stack.callback(setattr, cb, "_forking", False)
        stack.callback(setattr, cb, "_fork_lrs", None)
        prev_grad = torch.is_grad_enabled()
        stack.callback(torch.set_grad_enabled, prev_grad)
        torch.set_grad_enabled(True)
        if self.from_validation:  # inside the main validation: back to training stage and modes
            stage = tr.state.stage
            eval_modes = {n: m.training for n, m in self.module.named_modules()}
            stack.callback(self._set_modes, eval_modes)
            stack.callback(setattr, tr.state, "stage", stage)
            tr.state.stage = RunningStage.TRAINING
            _module_train_modes(tr).restore(self.module)
        stack.enter_context(_discarded_train_logging(tr))
        if cb.progress_bar:
            label = cb.engine.active_label
            cb._bar = _CooldownBar(tr, f"Cooldown @ {step}" + (f" ({label})" if label else ""), cooldown_steps)
            stack.callback(self._close_bar)
        self._step, self._k = step, 0
        self._it = self._batches(step, cooldown_steps)
        self._batch_idx = _next_batch_idx(tr)
        cb._fork_bad_grad = None

    def _batches(self, step: int, cooldown_steps: int) -> Iterator:
        """The cooldown's batch source per ``ForkPlan.data``; sets ``data_source`` (see ``is_stream``)."""
        cb, tr = self.cb, self.trainer
        data = cb.plan.data
        loader = tr.train_dataloader
        if not isinstance(data, str):
            self.data_source = "callable" if callable(data) and not hasattr(data, "__iter__") else "iterable"
            return cooldown_batches(data, step=step, seed=cb.plan.seed, rank=tr.global_rank, world_size=tr.world_size)
        stateful = is_stateful_loader(loader)
        if data in ("peek", "auto") and is_stream(loader) and not stateful:
            self.data_source = "peek"
            return self._stream_peek(cooldown_steps)
        if data == "peek" or (data == "auto" and stateful):
            self.data_source = "peek"
            pending = _prefetched_batches(tr)
            return _chain(pending, cooldown_batches("peek", loader=loader, step=step))
        self.data_source = "fresh (stream restarted from its beginning)" if is_stream(loader) else "fresh"
        cb._note_data_source(self.data_source)
        return cooldown_batches("fresh", loader=loader, step=step, seed=cb.plan.seed, rank=tr.global_rank,
                                world_size=tr.world_size)

    def _stream_peek(self, cooldown_steps: int) -> Iterator:
        """Draw the main branch's next batches from Lightning's fetcher; ``end()`` hands them back."""
        tr = self.trainer
        if self.cb._stream_rng_moved:
            raise ForkError("not run: the train stream uses the main process's global RNG (see the first failed "
                            "fork's record); peeking at it again would change the main branch's batches again")
        self._peek = peek = _MainStreamPeek(tr)
        self._stack.callback(peek.hand_back)
        need = cooldown_steps * (tr.accumulate_grad_batches if self.module.automatic_optimization else 1)
        have = peek.draw(need)
        if self.any_rank(peek.rng_moved):  # every rank agrees, so later forks skip the stream on every rank
            self.cb._stream_rng_moved = True
            raise ForkError(self._stream_problem(need, have))
        if self.any_rank(have < need):
            raise ForkError(self._stream_problem(need, have))
        return self._checked(peek, need)

    def _checked(self, peek: _MainStreamPeek, need: int) -> Iterator:
        """``peek``'s batches; past the ``need`` drawn ahead (manual optimization that did not step an
        optimizer on every call) a missing batch fails the fork on this rank."""
        n = 0
        for batch in peek:
            n += 1
            yield batch
        raise ForkError(self._stream_problem(max(need, n + 1), n))

    def _stream_problem(self, need: int, have: int) -> str:
        peek = self._peek
        if peek is not None and peek.rng_moved:
            return ("the train loader used the main process's global RNG while its next batch was drawn (a dataset "
                    "that shuffles or augments with random/numpy/torch and num_workers=0): the main branch's upcoming "
                    "batches got other random numbers than in a run without forks, so the main branch is no longer "
                    "bit-identical from here on. Use num_workers>0 (workers have their own RNG), a stateful loader "
                    "(torchdata's StatefulDataLoader), ForkPlan(data='fresh') or an iterable of cooldown batches")
        if peek is not None and have < need:
            return (f"the train stream ends {have} batches from here and the cooldown needs {need}: a fork cools on "
                    "the main branch's upcoming batches only. Fork earlier, or pass ForkPlan(data='fresh') (restarts "
                    "the stream from its beginning) or an iterable of cooldown batches")
        return "the train stream could not supply the cooldown's batches, or used the global RNG, on another rank"

    def _set_modes(self, modes: dict) -> None:
        for n, m in self.module.named_modules():
            if n in modes:
                m.training = modes[n]

    def _close_bar(self) -> None:
        if self.cb._bar is not None:
            self.cb._bar.close()
            self.cb._bar = None

    def train_step(self, lrs: Sequence[float]) -> float | None:
        cb, tr = self.cb, self.trainer
        cb._fork_lrs = list(lrs)
        cb._fork_step = self._step + self._k
        self._k += 1
        worst: float | None = None
        if self.module.automatic_optimization:
            ga = tr.accumulate_grad_batches
            for j in range(ga):
                loss = self._micro(first=j == 0, last=j == ga - 1)
                worst = _worse(worst, loss)
        else:
            start = tr.global_step
            for _ in range(1000):
                worst = _worse(worst, self._micro(first=True, last=True))
                if tr.global_step > start:
                    break
            else:
                raise ForkError("manual optimization: 1000 calls of training_step never stepped an optimizer")
        if cb._bar is not None:
            cb._bar.advance()
        return worst

    def _micro(self, first: bool, last: bool) -> float | None:
        tr = self.trainer
        batch = _to_device(tr, next(self._it))
        idx = self._batch_idx
        self._batch_idx += 1
        _module_hook(tr, "on_train_batch_start", batch, idx)
        if self.module.automatic_optimization:
            loss, out = _auto_micro_step(tr, batch, idx, first, last)
        else:
            loss, out = _manual_micro_step(tr, batch, idx)
        _module_hook(tr, "on_train_batch_end", out, batch, idx)
        return _float(loss)

    def evaluate(self) -> dict:
        cb, tr = self.cb, self.trainer
        if cb._bar is not None:
            cb._bar.close()
            cb._bar = None
        # In continue mode no snapshot surrounds this: keep the main branch's RNG stream untouched.
        rng, forking = capture_rng(), cb._forking
        if self.from_validation and cb._rng_before_validation is not None:
            # forking after the main validation: evaluate from the RNG state that validation started from
            restore_rng(cb._rng_before_validation)
        cb._forking = True
        if cb.progress_bar:  # Lightning's bar is hidden (it would label cooled metrics as the main branch's)
            cb._bar = _CooldownBar(tr, f"Cooled validation @ {self._step}", _val_batches(tr))
        try:
            metrics, self.prog_bar_keys = _cooled_validation(tr, keep_callbacks=[cb])
        finally:
            cb._forking = forking
            self._close_bar()
            restore_rng(rng)
        if tr.world_size > 1 and metrics:
            keys = sorted(metrics)
            t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=tr.strategy.root_device)
            t = tr.strategy.reduce(t, reduce_op="mean")
            metrics = {k: float(v) for k, v in zip(keys, t.tolist())}
        return metrics

    def save(self, path: Path) -> None:
        # every rank calls (the strategy gathers or writes shards); ModelParallelStrategy writes one full file
        # (save_format="full") or a DCP folder ("dcp"), whatever it was created with
        with _checkpoint_layout(self.trainer.strategy, distributed=self.cb.save_format == "dcp"):
            self.trainer.save_checkpoint(path, weights_only=self.cb.save_weights_only)

    def end(self) -> None:
        self._it = None
        self._stack.close()

    def nonfinite_grad_step(self) -> int | None:
        return self.cb._fork_bad_grad

    def any_rank(self, flag: bool) -> bool:
        return sharding.any_rank(flag, device=self.trainer.strategy.root_device)

    def barrier(self) -> None:
        sharding.barrier(device=self.trainer.strategy.root_device)

def _float(x: Any) -> float | None:
    if x is None:
        return None
    if torch.is_tensor(x):
        return float(x.detach().float().item()) if x.numel() == 1 else None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None



_grads_finite = sharding.grads_finite  # this rank's (local) gradients; the engine combines the ranks


def _worse(a: float | None, b: float | None) -> float | None:
    if b is None:
        return a
    if a is None or not math.isfinite(b):
        return b
    return a if not math.isfinite(a) else b


def is_stream(loader: Any) -> bool:
    """A train loader that can only be read forward: not a DataLoader over a map-style dataset."""
    if isinstance(loader, DataLoader):
        return isinstance(loader.dataset, IterableDataset)
    return getattr(loader, "batch_sampler", None) is None and getattr(loader, "sampler", None) is None


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest

