"""The engine's view of a :class:`CooldownHook` for one fork: the loop body repeated on cooldown batches."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from cooldown_callbacks import sharding
from cooldown_callbacks.data import cooldown_batches
from cooldown_callbacks.snapshot import Snapshot

if TYPE_CHECKING:
    from .hook import CooldownHook


_inner = sharding.torch_optimizer  # behind AcceleratedOptimizer and/or DeepSpeed's ZeRO optimizer


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class _HookRunner:
    """The engine's view of this hook for one fork."""

    def __init__(self, hook: "CooldownHook") -> None:
        self.h = hook
        self._it: Iterable | None = None
        self._micro = 0
        self._gs_saved: dict | None = None
        self._acc_step: int | None = None

    def snapshot(self) -> Snapshot:
        h = self.h
        extras = []
        acc = h.accelerator
        if acc is not None:
            gs = acc.gradient_state
            extras.append((lambda: dict(gs.__dict__), lambda d: (gs.__dict__.clear(), gs.__dict__.update(d))))
            extras.append((lambda: acc.step, lambda v: setattr(acc, "step", v)))
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
        self._it = cooldown_batches(plan.data, loader=h.train_loader, step=step, seed=plan.seed,
                                    rank=h.rank, world_size=h.world_size)
        base, at_fork = self.base_lrs(), self.current_lrs()
        h._fork_lrs = lambda k: h.engine.fork_lrs(step, k, cooldown_steps, base, at_fork)
        h._fork_groups = h._groups
        h._fork_k = 0
        h._fork_step, h._fork_bad_grad = step, None
        self._micro = 0
        if h.accelerator is not None:
            gs = h.accelerator.gradient_state
            gs.__dict__["_dataloader_references_ref"] = [None]  # no active main loader inside the fork
            h.accelerator.step = 0
        h.model.train()
        # A loop that zeroes gradients at the start of a step still holds the last step's gradients here: the
        # first cooldown update must not add them in (the snapshot puts them back for the main branch).
        # A DeepSpeed engine owns its gradients (zeroed in its step).
        if h._ds_engine is None:
            h.model.zero_grad(set_to_none=True)

    def train_step(self, lrs: Sequence[float]) -> float | None:
        h = self.h
        loss_val = None
        for _ in range(h.gradient_accumulation_steps):
            batch = next(self._it)
            h._fork_k = self._micro // h.gradient_accumulation_steps
            self._micro += 1
            if h.step_fn is not None:
                out = h.step_fn(batch)
                loss_val = out if out is None else float(out.detach() if torch.is_tensor(out) else out)
            else:
                loss_val = self._micro_step(batch)
        return loss_val

    def _micro_step(self, batch: Any) -> float:
        h = self.h
        acc = h.accelerator
        ga = h.gradient_accumulation_steps
        ds = h._ds_engine
        if ds is not None and acc is None:  # DeepSpeed owns accumulation, clipping, loss scaling and zero_grad
            loss = h.loss_fn(h.model, _to_device(batch, ds.device))
            ds.backward(loss)
            if getattr(ds, "managed_gradient_accumulation", lambda: True)() or self._micro % ga == 0:
                ds.step()
            return float(loss.detach())
        if acc is not None:
            batch = _to_device(batch, acc.device)
            with acc.accumulate(h.model):
                with acc.autocast():
                    loss = h.loss_fn(h.model, batch)
                acc.backward(loss)
                if acc.sync_gradients and h.max_grad_norm is not None:
                    acc.clip_grad_norm_(h.model.parameters(), h.max_grad_norm)
                for o in h.optimizers:
                    o.step()
                for o in h.optimizers:
                    o.zero_grad()
            return float(loss.detach())
        last = self._micro % ga == 0
        model = h.model
        # non-final micro-batches without gradient communication, as users accumulate: DDP/FSDP1 no_sync(),
        # FSDP2 set_requires_gradient_sync(False)
        with sharding.no_gradient_sync(model, enabled=not last):
            loss = h.loss_fn(model, _to_device(batch, next(model.parameters()).device))
            (loss / ga if ga > 1 else loss).backward()
        if last:
            if h.max_grad_norm is not None:
                sharding.clip_grad_norm(model, h.max_grad_norm)  # FSDP1: its own clip_grad_norm_
            for o in h.optimizers:
                o.step()
            for o in h.optimizers:
                o.zero_grad()
        return float(loss.detach())

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
        if isinstance(out, dict):
            return {k: float(v) for k, v in out.items()}
        return {"val_loss": float(out)}

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
            state = h.accelerator.get_state_dict(h.model)
            if h.accelerator.is_main_process:
                torch.save(state, path)
        elif h.rank == 0:
            torch.save(_unwrap(h.model).state_dict(), path)

    def end(self) -> None:
        h = self.h
        h._fork_lrs = None
        h._fork_groups = []
        self._it = None

    def nonfinite_grad_step(self) -> int | None:
        return self.h._fork_bad_grad

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


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
