"""The engine's view of a :class:`CooldownHook` for one fork: the loop body repeated on cooldown batches."""

from __future__ import annotations

import contextlib
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from cooldown_callbacks.data import CooldownBatches, cooldown_batches
from cooldown_callbacks.engine import ForkError
from cooldown_callbacks.snapshot import Snapshot

from ._loaders import shield_prepared_loaders, to_device

if TYPE_CHECKING:
    from .hook import CooldownHook

# step_fn without gradient_accumulation_steps: micro-batches fed until the optimizer steps, at most this many
MAX_MICRO_BATCHES = 1024


def _inner(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind an accelerate ``AcceleratedOptimizer`` (or the optimizer itself)."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):  # AcceleratedOptimizer & co
        opt = opt.optimizer
    return opt


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
        self._steps: dict[int, int] = {}  # optimizer id -> optimizer steps taken in this fork
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
        self._steps = {id(_inner(o)): 0 for o in h.optimizers}
        self._bad_grad = None
        if h.accelerator is not None:
            gs = h.accelerator.gradient_state
            gs.__dict__["_dataloader_references_ref"] = [None]  # no active main loader inside the fork
            h.accelerator.step = 0
        h._active = self
        h.model.train()

    def pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A fork's optimizer step is about to run: this optimizer's LRs for its next cooldown step."""
        h = self.h
        key = id(optimizer)
        k = self._steps.get(key, 0)
        lrs = self._lrs(min(k, self._c - 1))
        offset = 0
        for o in h.optimizers:
            inner = _inner(o)
            if inner is optimizer:
                for g, lr in zip(inner.param_groups, lrs[offset:]):
                    g["lr"] = lr
                break
            offset += len(inner.param_groups)
        if self._bad_grad is None and not _grads_finite(optimizer):
            self._bad_grad = self._step + k
        self._steps[key] = k + 1

    def _opt_steps(self) -> int:
        return self._steps[id(_inner(self.h.optimizers[0]))]

    def train_step(self, lrs: Sequence[float]) -> float | None:
        """One cooldown step: micro-batches until every optimizer has stepped once more."""
        h = self.h
        k, loss_val = self._k, None
        self._k += 1
        if h.step_fn is None:
            for _ in range(h.gradient_accumulation_steps):
                loss_val = self._micro_step(next(self._batches))
            self._check_steps(k)
            return loss_val
        # step_fn: micro-batches until the optimizer has stepped (with gradient_accumulation_steps given, at
        # least that many): a step_fn that keeps its own micro-batch counter ends the fork at a step boundary,
        # so the main branch's accumulation goes on in phase even when the fork fails
        ga, fixed, n = h.gradient_accumulation_steps, h._ga_given, 0
        while n < MAX_MICRO_BATCHES and ((fixed and n < ga) or self._opt_steps() <= k):
            out = h.step_fn(next(self._batches))
            n += 1
            if out is not None:
                loss_val = float(out.detach() if torch.is_tensor(out) else out)
        if fixed and n != ga and self._opt_steps() == k + 1:
            raise ForkError(f"cooldown step {k + 1} of {self._c}: your step_fn stepped the optimizer after {n} "
                            f"micro-batches, not every gradient_accumulation_steps={ga}; give the value your loop "
                            "uses, or leave it out and the hook feeds micro-batches until the optimizer steps")
        self._check_steps(k)
        return loss_val

    def _check_steps(self, k: int) -> None:
        """Every optimizer has stepped exactly once more in cooldown step ``k``, or the fork fails with why."""
        h = self.h
        bad = [(i, s) for i, s in enumerate(self._steps.values()) if s != k + 1]
        if not bad:
            return
        i, s = bad[0]
        got = s - k
        what = f"optimizer {i}" if len(self._steps) > 1 else "the optimizer"
        if h.step_fn is not None and got <= 0:
            why = (f"step_fn ran {MAX_MICRO_BATCHES} micro-batches without an optimizer step (a GradScaler skipping "
                   "every step, or a step_fn that never steps)")
        elif h.step_fn is not None:
            why = (f"your step_fn steps the optimizer more often than every gradient_accumulation_steps="
                   f"{h.gradient_accumulation_steps} micro-batches; give the value your loop uses, or leave it out")
        elif got <= 0 and h._scaler_in_use():
            why = "the GradScaler skipped the step (non-finite scaled gradients)"
        else:
            why = "the optimizer was stepped outside the hook's loop body"
        raise ForkError(f"cooldown step {k + 1} of {self._c}: {max(got, 0)} optimizer steps of {what} instead of 1 "
                        f"({why}); a cooled model must have run exactly its cooldown")

    def _micro_step(self, batch: Any) -> float:
        """One micro-batch of the built-in loop body (``loss_fn``); the update at accumulation boundaries."""
        h = self.h
        acc = h.accelerator
        self._micro += 1
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
        if isinstance(h.model, torch.nn.parallel.DistributedDataParallel):
            return h.model.no_sync()
        return contextlib.nullcontext()

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
                torch.nn.utils.clip_grad_norm_(h.model.parameters(), h.max_grad_norm)
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

    def _device(self) -> torch.device:
        h = self.h
        return h.accelerator.device if h.accelerator is not None else next(h.model.parameters()).device

    def save(self, path: Path) -> None:
        h = self.h
        if h.save_fn is not None:
            h.save_fn(h.model, path)
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
        h = self.h
        if h.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        h = self.h
        if h.world_size > 1:
            if h.accelerator is not None:
                h.accelerator.wait_for_everyone()
            else:
                torch.distributed.barrier()


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer is about to apply is finite (one max-norm, one sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))
