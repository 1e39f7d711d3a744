"""The engine's view of the Trainer: one fork through the Trainer's own training step and evaluation."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from transformers import Trainer

from cooldown_callbacks import sharding
from cooldown_callbacks.snapshot import Snapshot
from ._data import _cooldown_groups

if TYPE_CHECKING:
    from .callback import CooldownTrainerCallback


class _TrainerRunner:
    """Implements the engine's ``ForkRunner`` with the Trainer's own training step and evaluation.

    One cooldown step repeats the body of ``Trainer._run_epoch`` for one optimizer step:
    ``get_batch_samples``, per micro-batch ``_set_sync_gradients`` + ``no_sync`` (all but the last) +
    ``training_step`` on ``model_wrapped``, then ``_clip_grad_norm``, ``optimizer.step()`` and
    ``zero_grad``. Other callbacks' step events are not called during a fork. Under DeepSpeed (ZeRO-0/1/2)
    the last micro-batch's ``accelerator.backward`` runs ``engine.step`` (DeepSpeed clips, steps and
    zeroes; ``optimizer.step()`` is a no-op), so the fork's LRs are set before the micro-batches, and
    no micro-batch runs under ``no_sync`` (as in the Trainer's own loop).

    Private internals used (pinned: transformers 5.23, accelerate 1.15; the tests in
    tests/test_transformers.py fail if they move): ``Trainer._clip_grad_norm``,
    ``Trainer.current_gradient_accumulation_steps``, ``Trainer.save_model(_internal_call=True)`` (no
    Hub push per fork), ``Trainer._save(output_dir, state_dict=...)`` (a sharded model's gathered state,
    on the main process), accelerate's ``GradientState._set_sync_gradients``,
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
        # the wrapped model too: DDP's buffer/grad sync flags, a DeepSpeed engine's counters, loss scaler and
        # LR scheduler are main-branch state (tensors are deduplicated; the fp32 masters are the optimizer's params)
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
        deepspeed = getattr(t, "is_deepspeed_enabled", False)
        if deepspeed:  # the optimizer steps inside the last micro-batch's backward
            for g, lr in zip(self.opt.param_groups, lrs):
                g["lr"] = lr
        total = 0.0
        for i, inputs in enumerate(batch_samples):
            last = i == len(batch_samples) - 1
            gs._set_sync_gradients(last)
            sync_each = gs.plugin_kwargs.get("sync_each_batch", False)
            ctx = contextlib.nullcontext() if (last or sync_each or deepspeed) else t.accelerator.no_sync(model=model)
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
        t = self.t
        if self.cb.save_format == "dcp":  # a folder of shards, written by every rank
            sharding.save_dcp(t.model, path)
        elif sharding.is_sharded(t.model):  # FSDP2: gathered on every rank, written by the main process
            state = sharding.full_state_dict(t.model)
            if t.args.should_save:
                t._save(str(path), state_dict=state)
        else:
            t.save_model(str(path), _internal_call=True)

    def end(self) -> None:
        for m, mode in self._modes:
            m.training = mode
        self._modes = []
        self._groups = None

    def any_rank(self, flag: bool) -> bool:
        return sharding.any_rank(flag, device=self.t.args.device) if self.t.args.world_size > 1 else flag

    def barrier(self) -> None:
        if self.t.args.world_size > 1:
            sharding.barrier(device=self.t.args.device)


def _holds(trainer: Any, cb: Any) -> bool:
    handler = getattr(trainer, "callback_handler", None)
    return any(c is cb for c in getattr(handler, "callbacks", ()))


_inner = sharding.torch_optimizer  # behind AcceleratedOptimizer (and DeepSpeed's ZeRO optimizer)


