"""The Accelerate / plain-PyTorch :class:`CooldownHook`: one call after each optimizer step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from cooldown_callbacks import sharding
from cooldown_callbacks.engine import ForkEngine, check_writable_dir
from cooldown_callbacks.plan import ForkPlan
from cooldown_callbacks.records import ForkRecord
from cooldown_callbacks.schedules import Schedule
from cooldown_callbacks.sharding import SAVE_FORMATS
from cooldown_callbacks.snapshot import STORAGES

from ._runner import _HookRunner, _grads_finite, _inner

__all__ = ["CooldownHook"]


class CooldownHook:
    """Runs the main branch from ``schedule`` and forks cooldowns per ``plan`` in a hand-written loop.

    Args:
        model: the (prepared) model, or a ``deepspeed.DeepSpeedEngine`` (ZeRO stage 0, 1 or 2; the fork's
            steps then go through ``engine.backward`` / ``engine.step``, which own accumulation,
            clipping and loss scaling; see :mod:`cooldown_callbacks.sharding`).
        optimizer: the (prepared) optimizer, or a list of them (``None`` with a DeepSpeed engine: its own).
        schedule: main-branch schedule (``WSD``, ``RSqrt``, ...); ``None`` keeps the user's scheduler
            and forks decay from the current LR.
        plan: when and how to fork (``ForkPlan``; ``on_eval`` plans need ``hook.step(evaluating=True)``).
        loss_fn: ``loss_fn(model, batch) -> loss``; the hook then does backward, accumulation,
            clipping (``max_grad_norm``) and the optimizer step. Give this or ``step_fn``.
        step_fn: ``step_fn(batch)`` that runs one micro-batch of *your* loop body (forward, backward,
            and the optimizer step at accumulation boundaries), called
            ``c * gradient_accumulation_steps`` times per fork.
        eval_fn: ``eval_fn(model) -> dict | float`` - metrics of the cooled model (reduced over ranks;
            a float is recorded as ``val_loss``). Called in eval mode under ``torch.no_grad``.
        train_loader: the main training loader, for ``ForkPlan(data="peek" | "fresh" | "auto")``.
        accelerator: an ``accelerate.Accelerator``, or ``None`` for a plain PyTorch loop.
        schedulers, scalers, generators, stateful: extra objects whose state the fork must not
            change (the accelerator's own scaler is added automatically).
        gradient_accumulation_steps: micro-batches per optimizer step (default: the accelerator's, or
            the DeepSpeed engine's).
        max_grad_norm: clip value for the built-in ``loss_fn`` path (``None``: no clipping; with
            DeepSpeed, clipping is its ``gradient_clipping`` config).
        dirpath: where cooled checkpoints and ``forks.jsonl`` go.
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
        filename: str = "cooled-step={step:08d}-cd={cooldown}",
        save_fn: Callable[[torch.nn.Module, Path], None] | None = None,
        save_format: Literal["full", "dcp"] = "full",
        snapshot_storage: str = "cpu",
        verbose: bool = True,
        max_steps: int | None = None,
        eval_every: int | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"Invalid model ({type(model).__name__}): must be a torch.nn.Module.")
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
            raise ValueError(f"ForkPlan(data={plan.data!r}) needs train_loader=...; or give ForkPlan(data=<iterable>).")
        ga = gradient_accumulation_steps
        if ga is None:
            ga = accelerator.gradient_accumulation_steps if accelerator is not None else 1
        if isinstance(ga, bool) or not isinstance(ga, int) or ga < 1:
            raise ValueError(f"Invalid gradient_accumulation_steps ({ga!r}): must be an integer >= 1.")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm ({max_grad_norm!r}): must be a number > 0, or None.")
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
        self.model = model
        self.optimizers = optimizers
        self._ds_engine = ds_engine
        self.accelerator = accelerator
        self.loss_fn, self.step_fn, self.eval_fn, self.save_fn = loss_fn, step_fn, eval_fn, save_fn
        self.train_loader = train_loader
        self.gradient_accumulation_steps = ga
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
        self._generators = list(generators)
        self._stateful = list(stateful)
        self.step_count = 0
        self._fork_lrs: Callable[[int], list[float]] | None = None
        self._fork_groups: list[dict] = []  # param groups at the fork's start (DeepSpeed steps one group at a time)
        self._fork_k = 0
        self._fork_step = 0
        self._fork_bad_grad: int | None = None  # first fork step with a non-finite gradient
        for g in self._groups:
            g.setdefault("initial_lr", g["lr"])
        self._handles = [_inner(o).register_step_pre_hook(self._pre_step) for o in optimizers]
        self._apply_main_lr()
        cost = self.engine.cost_line(max_steps, eval_every)
        if cost is not None and self.verbose and self.rank == 0:
            print(f"[cooldown] {cost}", flush=True)

    # -- LR ----------------------------------------------------------------------------------
    @property
    def _groups(self) -> list[dict]:
        # looked up each time: optimizer.load_state_dict (accelerator.load_state) replaces the group dicts
        return [g for o in self.optimizers for g in _inner(o).param_groups]

    def _apply_main_lr(self) -> None:
        mult = self.engine.main_multiplier(self.step_count)
        if mult is not None:
            for g in self._groups:
                g["lr"] = g["initial_lr"] * mult

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._fork_lrs is not None:
            lrs = self._fork_lrs(self._fork_k)
            for g, lr in zip(self._fork_groups, lrs):
                g["lr"] = lr
            if self._fork_bad_grad is None and not _grads_finite(optimizer):
                self._fork_bad_grad = self._fork_step + self._fork_k
        else:
            self._apply_main_lr()

    # -- the per-step call -------------------------------------------------------------------
    def step(self, *, evaluating: bool = False, metrics: dict | None = None) -> ForkRecord | None:
        """Call once after each real optimizer step. Returns the fork's record if one ran.

        ``evaluating=True`` marks a step where your loop evaluates the main branch (for
        ``ForkPlan(on_eval=True)``); ``metrics`` are those main-branch metrics, kept in the record.
        """
        self.step_count += 1
        t = self.step_count
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

    def record_grad_norm(self, norm: float | torch.Tensor) -> None:
        """Optional: record the main branch's gradient norm of this step (``ForkPlan(record_grad_norms=True)``)."""
        if self.engine.plan.record_grad_norms:
            self.engine.record_grad_norm(float(norm))

    @property
    def records(self) -> list[dict]:
        return self.engine.records

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

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
        if self.verbose and self.rank == 0:
            if rec.status == "skipped":
                print(f"[cooldown] step {rec.step}: skipped ({rec.reason})", flush=True)
                return
            m = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.metrics.items())
            status = m if rec.status == "ok" else f"FAILED ({rec.error})"
            label = f" [{rec.label}]" if rec.label else ""
            print(f"[cooldown] step {rec.step}{label}: {rec.cooldown_steps} cooldown steps ({rec.shape}) -> {status} "
                  f"in {rec.seconds:.1f}s", flush=True)

    _Runner = _HookRunner  # the engine's view of this hook for one fork
