"""The engine's view of the Trainer: one fork through the Trainer's own training step and evaluation."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from transformers import Trainer

from cooldown_callbacks.snapshot import Snapshot
from ._data import _cooldown_groups

if TYPE_CHECKING:
    from .callback import CooldownTrainerCallback


class _TrainerRunner:
    """Implements the engine's ``ForkRunner`` with the Trainer's own training step and evaluation.

    One cooldown step repeats the body of ``Trainer._run_epoch`` for one optimizer step:
    ``get_batch_samples``, per micro-batch ``_set_sync_gradients`` + ``no_sync`` (all but the last) +
    ``training_step`` on ``model_wrapped``, then ``_clip_grad_norm``, ``optimizer.step()`` and
    ``zero_grad``. Other callbacks' step events are not called during a fork.

    Private internals used (pinned: transformers 5.23, accelerate 1.15; the tests in
    tests/test_transformers.py fail if they move): ``Trainer._clip_grad_norm``,
    ``Trainer.current_gradient_accumulation_steps``, ``Trainer.save_model(_internal_call=True)`` (no
    Hub push per fork), accelerate's ``GradientState._set_sync_gradients``,
    ``GradientState._dataloader_references_ref`` and ``plugin_kwargs["sync_each_batch"]``; for
    ``data="peek"`` the batch-sampler chain of accelerate's prepared loader (``.batch_sampler``,
    ``.sampler``, ``SeedableRandomSampler``) and the Trainer's epoch arithmetic
    (``set_initial_training_values``, ``_init_training_state``).
    """

    def __init__(self, cb: CooldownTrainerCallback, trainer: Trainer) -> None:
        self.cb, self.t = cb, trainer
        self.opt = _inner(trainer.optimizer)
        self._groups: Iterator | None = None
        self._modes: list = []

    def snapshot(self) -> Snapshot:
        t = self.t
        gs = t.accelerator.gradient_state
        extras = [
            (lambda: getattr(t, "current_gradient_accumulation_steps", None),
             lambda v: setattr(t, "current_gradient_accumulation_steps", v)),
            (lambda: (list(gs._dataloader_references_ref), gs.sync_gradients),
             lambda v: (setattr(gs, "_dataloader_references_ref", list(v[0])), gs._set_sync_gradients(v[1]))),
        ]
        stateful = [t.lr_scheduler]
        scaler = getattr(t.accelerator, "scaler", None)
        if scaler is not None:
            stateful.append(scaler)
        # the wrapped (DDP) model too: its buffer/grad sync flags are main-branch state (deduplicated tensors)
        modules = [t.model] if t.model_wrapped is t.model else [t.model, t.model_wrapped]
        return Snapshot.take(modules=modules, optimizers=[self.opt], stateful=stateful, extras=extras,
                             storage=self.cb.snapshot_storage, directory=self.cb._engine.dirpath)

    def base_lrs(self) -> list[float]:
        base = getattr(self.t.lr_scheduler, "base_lrs", None)
        if base is not None and len(base) == len(self.opt.param_groups):
            return [float(b) for b in base]
        return [float(g.get("initial_lr", g["lr"])) for g in self.opt.param_groups]

    def current_lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.opt.param_groups]

    def begin(self, step: int, cooldown_steps: int) -> None:
        t = self.t
        self._modes = [(m, m.training) for m in t.model.modules()]
        self._groups = _cooldown_groups(self.cb, t, step)

    def train_step(self, lrs: Sequence[float]) -> float | None:
        t, args = self.t, self.t.args
        batch_samples, num_items = t.get_batch_samples(iter(next(self._groups)), args.gradient_accumulation_steps,
                                                       args.device)
        t.current_gradient_accumulation_steps = len(batch_samples)
        model = t.model_wrapped
        gs = t.accelerator.gradient_state
        total = 0.0
        for i, inputs in enumerate(batch_samples):
            last = i == len(batch_samples) - 1
            gs._set_sync_gradients(last)
            sync_each = gs.plugin_kwargs.get("sync_each_batch", False)
            ctx = contextlib.nullcontext() if (last or sync_each) else t.accelerator.no_sync(model=model)
            with ctx:
                loss = t.training_step(model, inputs, num_items)
            total += float(loss.detach().float().sum()) if torch.is_tensor(loss) else float(loss)
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            t._clip_grad_norm(model)
        for g, lr in zip(self.opt.param_groups, lrs):
            g["lr"] = lr
        t.optimizer.step()
        model.zero_grad()
        return total

    def evaluate(self) -> dict:
        # logged (log_history, TensorBoard) with the cooldown's label when the plan has several; recorded
        # under the plain prefix (the record's ``label`` tells them apart)
        prefix = self.cb.metric_key_prefix
        label = self.cb._engine.active_label
        logged = f"{prefix}_{label}" if label else prefix
        metrics = self.t.evaluate(metric_key_prefix=logged)
        out = {}
        for k, v in metrics.items():
            if not k.startswith(logged + "_"):
                continue
            k = prefix + k[len(logged):]
            try:
                out[k] = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError):
                out[k] = v
        return out

    def save(self, path: Path) -> None:
        self.t.save_model(str(path), _internal_call=True)

    def end(self) -> None:
        for m, mode in self._modes:
            m.training = mode
        self._modes = []
        self._groups = None

    def any_rank(self, flag: bool) -> bool:
        if self.t.args.world_size <= 1 or not torch.distributed.is_initialized():
            return flag
        x = torch.tensor([1.0 if flag else 0.0], device=self.t.args.device)
        torch.distributed.all_reduce(x)
        return bool(x.item() > 0)

    def barrier(self) -> None:
        if self.t.args.world_size > 1:
            self.t.accelerator.wait_for_everyone()


def _holds(trainer: Any, cb: Any) -> bool:
    handler = getattr(trainer, "callback_handler", None)
    return any(c is cb for c in getattr(handler, "callbacks", ()))


def _inner(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


