"""The engine's view of a :class:`CooldownHook` for one fork: the loop body repeated on cooldown batches."""

from __future__ import annotations

import contextlib
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from cooldown_callbacks import sharding
from cooldown_callbacks.data import CooldownBatches, cooldown_batches
from cooldown_callbacks.engine import ForkError
from cooldown_callbacks.snapshot import Snapshot

from ._loaders import shield_prepared_loaders, to_device

if TYPE_CHECKING:
    from .hook import CooldownHook

# step_fn without gradient_accumulation_steps: micro-batches fed until the optimizer steps, at most this many
MAX_MICRO_BATCHES = 1024


_inner = sharding.torch_optimizer  # behind AcceleratedOptimizer and/or DeepSpeed's ZeRO optimizer


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP and ``torch.compile`` wrappers (in any order)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


_COMPILED = re.compile(r"(^|\.)_orig_mod\.")


def plain_keys(state: dict) -> dict:
    """A state dict whose keys load into the uncompiled model: ``torch.compile`` prefixes (also of
    compiled submodules) removed."""
    return {_COMPILED.sub(r"\1", k): v for k, v in state.items()}


class _HookRunner:
    """The engine's view of this hook for one fork.

    The hook's optimizer pre-step hook hands each optimizer step of the fork to :meth:`pre_step`,
    which sets that optimizer's LRs for its ``k``-th step of the cooldown (``k`` counted per optimizer,
    so the LR follows the optimizer steps actually taken, whatever the loop body does); each cooldown
    step must end with exactly one more step of every optimizer, or the fork fails with the reason.
    """

    def __init__(self, hook: "CooldownHook") -> None:
        self.h = hook
        self._source: str | None = None
        self._batches: CooldownBatches | None = None
        self._micro = 0
        self._k = 0
        self._c = 0
        self._steps: dict[int, int] = {}  # optimizer id -> its steps in the current cooldown step
        self._groups_of: dict[int, list] = {}  # optimizer id -> its param groups at the fork's start
        self._offset: dict[int, int] = {}  # optimizer id -> index of its first group in the fork's LR list
        self._bad_grad: int | None = None  # first fork step with a non-finite gradient
        self._lrs: Any = None
        self._step = 0

    @property
    def data_source(self) -> str | None:
        """Where this fork's batches come from (it can change mid-fork: the main branch's data may end)."""
        return self._batches.source if self._batches is not None else self._source

    def snapshot(self) -> Snapshot:
        h = self.h
        extras = []
        acc = h.accelerator
        if acc is not None:
            gs = acc.gradient_state
            extras.append((lambda: dict(gs.__dict__), lambda d: (gs.__dict__.clear(), gs.__dict__.update(d))))
            extras.append((lambda: acc.step, lambda v: setattr(acc, "step", v)))
            extras.extend(shield_prepared_loaders(acc, skip=h.train_loader))
        # a DeepSpeed engine as the model: Snapshot adds its counters, loss scaler and LR scheduler, and the
        # inner torch optimizer's params are its fp32 master partitions
        return Snapshot.take(modules=[h.model], optimizers=[_inner(o) for o in h.optimizers],
                             stateful=[*h._schedulers, *h._scalers, *h._stateful], generators=h._generators,
                             extras=extras, storage=h.snapshot_storage, directory=h.engine.dirpath)

    def base_lrs(self) -> list[float]:
        return [g["initial_lr"] for g in self.h._groups]

    def current_lrs(self) -> list[float]:
        return [g["lr"] for g in self.h._groups]

    def begin(self, step: int, cooldown_steps: int) -> None:
        h = self.h
        plan = h.engine.plan
        self._batches = cooldown_batches(plan.data, loader=h.train_loader, step=step, seed=plan.seed,
                                         rank=h.rank, world_size=h.world_size)
        base, at_fork = self.base_lrs(), self.current_lrs()
        self._lrs = lambda k: h.engine.fork_lrs(step, k, cooldown_steps, base, at_fork)
        self._step, self._c, self._k, self._micro = step, cooldown_steps, 0, 0
        self._groups_of, self._offset, offset = {}, {}, 0
        for o in h.optimizers:
            inner = _inner(o)
            self._groups_of[id(inner)] = list(inner.param_groups)
            self._offset[id(inner)] = offset
            offset += len(inner.param_groups)
        self._steps = dict.fromkeys(self._groups_of, 0)
        self._bad_grad = None
        if h.accelerator is not None:
            gs = h.accelerator.gradient_state
            gs.__dict__["_dataloader_references_ref"] = [None]  # no active main loader inside the fork
            h.accelerator.step = 0
        h._active = self
        h.model.train()
        # A loop that zeroes gradients at the start of a step still holds the last step's gradients here: the
        # first cooldown update must not add them in (the snapshot puts them back for the main branch).
        # A DeepSpeed engine owns its gradients (zeroed in its step).
        if h._ds_engine is None:
            h.model.zero_grad(set_to_none=True)

    def pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A fork's optimizer step is about to run: the LRs of the cooldown step being run (``_k``), for the
        param groups in this call (DeepSpeed's ZeRO steps one group per call); counted once per step."""
        key = id(optimizer)
        full = self._groups_of.get(key, [])
        index = {id(g): i for i, g in enumerate(full)}
        lrs, offset = self._lrs(min(self._k, self._c - 1)), self._offset.get(key, 0)
        for g in optimizer.param_groups:
            if id(g) in index:
                g["lr"] = lrs[offset + index[id(g)]]
        if not full or optimizer.param_groups[0] is full[0]:
            self._steps[key] = self._steps.get(key, 0) + 1
        if self._bad_grad is None and not _grads_finite(optimizer):
            self._bad_grad = self._step + self._k

    def _skip_marks(self) -> tuple:
        """What moves when a loss scaler skips a step: GradScaler scales (they shrink), DeepSpeed's count."""
        h = self.h
        scales = tuple(s.get_scale() for s in h._scalers
                       if callable(getattr(s, "get_scale", None)) and (not callable(getattr(s, "is_enabled", None))
                                                                       or s.is_enabled()))
        return scales, getattr(h._ds_engine, "skipped_steps", 0)

    def _skipped(self, marks: tuple) -> bool:
        now = self._skip_marks()
        return any(b < a for a, b in zip(marks[0], now[0])) or now[1] > marks[1]

    def train_step(self, lrs: Sequence[float]) -> float | None:
        """One cooldown step: micro-batches until every optimizer has stepped once (or a loss scaler skipped
        the step on non-finite scaled gradients: a step for the schedule, as in the main loop)."""
        h = self.h
        loss_val = None
        self._steps = dict.fromkeys(self._steps, 0)
        marks = self._skip_marks()
        if h.step_fn is None:
            for _ in range(h.gradient_accumulation_steps):
                loss_val = self._micro_step(next(self._batches))
        else:
            # step_fn: micro-batches until the optimizer has stepped (with gradient_accumulation_steps given, at
            # least that many): a step_fn that keeps its own micro-batch counter ends the fork at a step boundary,
            # so the main branch's accumulation goes on in phase even when the fork fails
            ga, fixed, n = h.gradient_accumulation_steps, h._ga_given, 0
            first = next(iter(self._steps))
            while n < MAX_MICRO_BATCHES and ((fixed and n < ga)
                                             or (self._steps[first] == 0 and not self._skipped(marks))):
                out = h.step_fn(next(self._batches))
                n += 1
                if out is not None:
                    loss_val = float(out.detach() if torch.is_tensor(out) else out)
            if fixed and n != ga and self._steps[first] == 1:
                raise ForkError(f"cooldown step {self._k + 1} of {self._c}: your step_fn stepped the optimizer after "
                                f"{n} micro-batches, not every gradient_accumulation_steps={ga}; give the value your "
                                "loop uses, or leave it out and the hook feeds micro-batches until the optimizer steps")
        self._check_steps(marks)
        self._k += 1
        return loss_val

    def _check_steps(self, marks: tuple) -> None:
        """Every optimizer stepped exactly once in this cooldown step (or a loss scaler skipped it), or the
        fork fails with why."""
        h = self.h
        skipped = self._skipped(marks)
        bad = [(i, s) for i, s in enumerate(self._steps.values()) if s > 1 or (s == 0 and not skipped)]
        if not bad:
            return
        i, s = bad[0]
        what = f"optimizer {i}" if len(self._steps) > 1 else "the optimizer"
        if h.step_fn is not None and s == 0:
            why = (f"step_fn ran {MAX_MICRO_BATCHES} micro-batches without an optimizer step (a step_fn that never "
                   "steps?)")
        elif h.step_fn is not None:
            why = (f"your step_fn steps the optimizer more often than every gradient_accumulation_steps="
                   f"{h.gradient_accumulation_steps} micro-batches; give the value your loop uses, or leave it out")
        else:
            why = "the optimizer was stepped outside the hook's loop body" if s > 1 else \
                "the loop body did not reach an optimizer step"
        raise ForkError(f"cooldown step {self._k + 1} of {self._c}: {s} optimizer steps of {what} instead of 1 "
                        f"({why}); a cooled model must have run exactly its cooldown")

    def _micro_step(self, batch: Any) -> float:
        """One micro-batch of the built-in loop body (``loss_fn``); the update at accumulation boundaries."""
        h = self.h
        acc = h.accelerator
        self._micro += 1
        ds = h._ds_engine
        if ds is not None and acc is None:  # DeepSpeed owns accumulation, clipping, loss scaling and zero_grad
            loss = h.loss_fn(h.model, to_device(batch, ds.device))
            ds.backward(loss)
            if getattr(ds, "managed_gradient_accumulation", lambda: True)() or \
                    self._micro % h.gradient_accumulation_steps == 0:
                ds.step()
            return float(loss.detach())
        if acc is not None and acc.gradient_accumulation_steps > 1:  # the accelerator accumulates (accumulate())
            with acc.accumulate(h.model):
                loss = self._backward(batch, 1)
                if acc.sync_gradients:
                    self._update()
            return float(loss.detach())
        # hand-written accumulation (also with an Accelerator left at 1, as Accelerate's own examples do)
        ga = h.gradient_accumulation_steps
        last = self._micro % ga == 0
        with self._no_sync(not last):
            loss = self._backward(batch, ga)
        if last:
            self._update()
        return float(loss.detach())

    def _no_sync(self, enabled: bool) -> Any:
        """No gradient communication on a non-final micro-batch, as users accumulate."""
        h = self.h
        if not enabled:
            return contextlib.nullcontext()
        if h.accelerator is not None:
            return h.accelerator.no_sync(h.model)
        # DDP/FSDP1 no_sync(), FSDP2 set_requires_gradient_sync(False)
        return sharding.no_gradient_sync(h.model, enabled=True)

    def _backward(self, batch: Any, ga: int) -> torch.Tensor:
        """``loss_fn`` on ``batch`` and backward of ``loss / ga`` (scaled by the plain loop's GradScaler)."""
        h = self.h
        acc = h.accelerator
        if acc is not None:
            with acc.autocast():
                loss = h.loss_fn(h.model, to_device(batch, acc.device, acc))
            acc.backward(loss / ga if ga > 1 else loss)
            return loss
        loss = h.loss_fn(h.model, to_device(batch, next(h.model.parameters()).device))
        scaled = loss / ga if ga > 1 else loss
        (h._grad_scaler.scale(scaled) if h._grad_scaler is not None else scaled).backward()
        return loss

    def _update(self) -> None:
        """Clip (after unscaling), step every optimizer (through the GradScaler), zero the gradients."""
        h = self.h
        acc, scaler = h.accelerator, h._grad_scaler
        if h.max_grad_norm is not None:
            if acc is not None:
                acc.clip_grad_norm_(h.model.parameters(), h.max_grad_norm)
            else:
                if scaler is not None:
                    for o in h.optimizers:
                        scaler.unscale_(o)
                sharding.clip_grad_norm(h.model, h.max_grad_norm)  # FSDP1: its own clip_grad_norm_
        for o in h.optimizers:
            scaler.step(o) if scaler is not None else o.step()
        if scaler is not None:
            scaler.update()
        for o in h.optimizers:
            o.zero_grad()

    def evaluate(self) -> dict:
        h = self.h
        modes = [(m, m.training) for m in h.model.modules()]
        h.model.eval()
        try:
            with torch.no_grad():
                out = h.eval_fn(h.model)
        finally:
            for m, mode in modes:
                m.training = mode
        metrics = {k: float(v) for k, v in out.items()} if isinstance(out, dict) else {"val_loss": float(out)}
        return self._mean_over_ranks(metrics) if h.world_size > 1 else metrics

    def _mean_over_ranks(self, metrics: dict) -> dict:
        """Each metric's mean over the ranks (every rank gets the same values, so every rank decides alike)."""
        names = sorted(metrics)
        tag = float(zlib.crc32("\0".join(names).encode()))
        dev = self._device()
        check = torch.tensor([tag, -tag], dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(check, op=torch.distributed.ReduceOp.MAX)
        if check[0].item() != -check[1].item():
            raise ForkError(f"eval_fn returned different metric names on different ranks (this rank: {names})")
        vals = torch.tensor([metrics[k] for k in names], dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(vals)
        return {k: v / self.h.world_size for k, v in zip(names, vals.tolist())}

    def save(self, path: Path) -> None:
        h = self.h
        if h.save_fn is not None:
            h.save_fn(h.model, path)
            return
        if h.save_format == "dcp":  # a sharded folder, written by every rank
            sharding.save_dcp(h.model, path)
            return
        if sharding.is_sharded(h.model):  # gathered on every rank (FSDP, DeepSpeed fp32 masters), written by rank 0
            sharding.save_full(h.model, path)
            return
        if h.accelerator is not None:
            state = plain_keys(h.accelerator.get_state_dict(h.model))
            if h.accelerator.is_main_process:
                torch.save(state, path)
        elif h.rank == 0:
            torch.save(plain_keys(_unwrap(h.model).state_dict()), path)

    def end(self) -> None:
        h = self.h
        h._active = None
        self._lrs = None
        if self._batches is not None:
            self._source = self._batches.source
            self._batches.close()
            self._batches = None

    def nonfinite_grad_step(self) -> int | None:
        return self._bad_grad

    def any_rank(self, flag: bool) -> bool:
        return sharding.any_rank(flag, device=self._device()) if self.h.world_size > 1 else flag

    def barrier(self) -> None:
        if self.h.world_size > 1:
            sharding.barrier(device=self._device())

    def _device(self) -> torch.device:
        h = self.h
        if h.accelerator is not None:
            return h.accelerator.device
        return sharding.local(next(h.model.parameters())).device


_grads_finite = sharding.grads_finite  # this rank's (local) gradients; the engine combines the ranks
