"""The engine's view of the Trainer: one fork through the Trainer's own training step and evaluation."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from transformers import Trainer

from cooldown_callbacks import sharding
from cooldown_callbacks.engine import ForkError
from cooldown_callbacks.snapshot import Snapshot

from ._data import DATA_SOURCES, _cooldown_groups

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
    (``set_initial_training_values``, ``_init_training_state``); for a streaming ``train_dataset`` what
    ``_stream.py`` lists. The cooled evaluation wraps ``trainer.callback_handler.on_log`` (an instance
    attribute, removed after) to give a subclass's ``eval_*`` additions the cooled prefix; TRL's
    ``_metrics``/``_total_train_tokens`` are the default ``trainer_attributes`` (tests in
    tests/test_transformers_scripts.py).
    """

    def __init__(self, cb: CooldownTrainerCallback, trainer: Trainer, *, keep_cooled: bool = False) -> None:
        self.cb, self.t = cb, trainer
        self.opt = _inner(trainer.optimizer)
        self._groups: Iterator | None = None
        self._modes: list = []
        self.data_source: str | None = None
        self.keep_cooled = keep_cooled  # final_model="cooled": keep a copy of the cooled weights after saving
        self.cooled: tuple[str | None, list[torch.Tensor]] | None = None

    def snapshot(self) -> Snapshot:
        t = self.t
        gs = t.accelerator.gradient_state
        extras = [
            (lambda: getattr(t, "current_gradient_accumulation_steps", None),
             lambda v: setattr(t, "current_gradient_accumulation_steps", v)),
            (lambda: (list(gs._dataloader_references_ref), gs.sync_gradients),
             lambda v: (setattr(gs, "_dataloader_references_ref", list(v[0])), gs._set_sync_gradients(v[1]))),
        ]
        # what the Trainer (subclass) accumulates in compute_loss, e.g. TRL's _metrics and _total_train_tokens
        extras += [(functools.partial(getattr, t, name), functools.partial(setattr, t, name))
                   for name in self.cb._isolated_attributes(t)]
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
        t, cb = self.t, self.cb
        self._modes = [(m, m.training) for m in t.model.modules()]
        self.data_source = DATA_SOURCES[cb._data_kind]
        if cb._data_kind == "peek-stream":
            moved = cb._stream.rng_moved_at if cb._stream is not None else None
            if self.any_rank(moved is not None):
                where = f"at step {moved}" if moved is not None else "on another rank"
                raise ForkError(_RNG_STREAM.format(where=where))
        self._groups = _cooldown_groups(cb, t, step, self.any_rank)

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
        """``trainer.evaluate(metric_key_prefix=...)``, logged (log_history, TensorBoard) with the cooldown's label
        when the plan has several (``cooldown_<label>_loss``) and recorded under the plain prefix (the record's
        ``label`` tells them apart). What a Trainer subclass adds to that evaluation's metrics under the main
        evaluation's ``eval_`` prefix (TRL's ``log`` adds ``eval_entropy``, ``eval_mean_token_accuracy``, ...)
        describes the cooled model: it is renamed to the logged prefix (in place, so ``log_history``,
        ``report_to`` integrations, ``on_evaluate`` and the record agree)."""
        prefix = self.cb.metric_key_prefix
        label = self.cb._engine.active_label
        logged = f"{prefix}_{label}" if label else prefix
        handler, state = self.t.callback_handler, self.t.state
        on_log, own = handler.on_log, handler.__dict__.get("on_log")

        def rename(d: dict) -> None:
            for k in [k for k in d if k.startswith("eval_")]:
                d[logged + k[4:]] = d.pop(k)

        def on_log_cooled(args, st, control, logs=None, **kwargs):
            last = state.log_history[-1] if state.log_history else {}
            if logs and set(last) - {"step"} == set(logs):  # the entry Trainer.log appended for these logs
                rename(last)
            rename(logs or {})  # the dict Trainer.evaluate then passes to on_evaluate and returns
            return on_log(args, st, control, logs, **kwargs)

        handler.on_log = on_log_cooled
        try:
            metrics = self.t.evaluate(metric_key_prefix=logged)
        finally:
            if own is None:
                del handler.on_log
            else:
                handler.on_log = own
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
        if self.keep_cooled:  # this rank's part of the cooled weights (local shards under FSDP), with its label
            self.cooled = (self.cb._engine.active_label,
                           [sharding.local(x).detach().to("cpu", copy=True) for x in _weights(t.model)])

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


_RNG_STREAM = ("data='peek' on a streaming train_dataset: producing a batch drew from the global random number "
               "generator ({where}; e.g. a masking collator or a random crop in the dataset's __iter__), so batches "
               "drawn ahead for a cooldown would differ from the main branch's; no fork cools on them. Use "
               "ForkPlan(data='fresh') or an iterable of cooldown batches, or draw that randomness in DataLoader "
               "workers (dataloader_num_workers > 0).")


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, in a fixed order (a cooled copy is loaded back in the same order)."""
    return [*model.parameters(), *model.buffers()]


def _holds(trainer: Any, cb: Any) -> bool:
    handler = getattr(trainer, "callback_handler", None)
    return any(c is cb for c in getattr(handler, "callbacks", ()))


_inner = sharding.torch_optimizer  # behind AcceleratedOptimizer (and DeepSpeed's ZeRO optimizer)


