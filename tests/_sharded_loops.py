"""FSDP2 (``fully_shard``) and FSDP1 training setups for the sharded tests, run under ``torchrun`` (gloo, CPU).

The model has dropout (RNG), BatchNorm (buffers, per rank) and two Linear layers, each its own
FSDP unit, inside an FSDP root; AdamW with two param groups at different LRs; clipping; gradient
accumulation without gradient communication on non-final micro-batches (what FSDP users do: FSDP2
``set_requires_gradient_sync(False)``, FSDP1 ``no_sync()``). FSDP2: the second Linear's weight has
one row, so rank 1's shard of it is empty. FSDP1: ``FullyShardedDataParallel(device_id=cpu,
use_orig_params=True)`` (two param groups need the original parameters), clipping with its own
``clip_grad_norm_``.

Data: the synthetic regression set of ``_loops``, through torchdata's ``StatefulDataLoader`` with a
``DistributedSampler`` (so ``ForkPlan(data="peek")`` sees the main branch's next batches).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from _loops import XV, YV, X, Y

from cooldown_callbacks import sharding
from cooldown_callbacks.sharding import local


def plain_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def make_model_opt(kind: str = "fsdp2", seed: int = 0):
    """``(model, optimizer)``: the model sharded with ``kind`` ("fsdp2" or "fsdp1")."""
    model = plain_model(seed)
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[4])
        fully_shard(model)
        inner = model
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
                                         device_id=torch.device("cpu"), use_orig_params=True)
        inner = model.module
    opt = torch.optim.AdamW([
        {"params": inner[0].parameters(), "lr": 1e-2},
        {"params": list(inner[1].parameters()) + list(inner[4].parameters()), "lr": 3e-3},
    ], weight_decay=0.01)
    return model, opt


def make_loader(batch_size: int = 8):
    from torchdata.stateful_dataloader import StatefulDataLoader

    ds = TensorDataset(X, Y)
    sampler = DistributedSampler(ds, shuffle=True, seed=3)
    return StatefulDataLoader(ds, batch_size=batch_size, sampler=sampler)


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def eval_fn(model):
    """Validation loss, averaged over ranks (every rank calls: the forward gathers parameters)."""
    with torch.no_grad():
        t = F.mse_loss(model(XV), YV).detach().reshape(1)
    dist.all_reduce(t)
    return {"val_loss": t.item() / dist.get_world_size()}


def evaluate_main(model):
    """The user's own evaluation of the main branch (leaves FSDP2's root unsharded)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return eval_fn(model)
    finally:
        for m, mode in modes:
            m.training = mode


def train(model, opt, loader, steps: int, ga: int = 2, clip: float | None = 0.5, after_step=None,
          evaluate_at=lambda t: False, start: int = 0, rng: torch.Tensor | None = None, zero_first: bool = False):
    """The user's FSDP loop. ``after_step(t, evaluating)`` after each optimizer step; at steps where
    ``evaluate_at(t)``, the main branch is evaluated first (as users do right before ``hook.step``).
    ``zero_first``: gradients are zeroed at the start of each step, not after it (so they still exist
    when ``after_step`` runs).

    A resumed run passes ``start`` and the saved ``rng``: it is re-applied after the loader's iterator
    is built (building it draws a seed from the global RNG), so dropout continues bit for bit."""
    fsdp1 = hasattr(model, "no_sync")
    t, micro = start, 0
    while t < steps:
        it = iter(loader)
        if rng is not None:
            torch.set_rng_state(rng)
            rng = None
        for batch in it:
            last = (micro + 1) % ga == 0
            if zero_first and micro % ga == 0:
                opt.zero_grad()
            if fsdp1:
                ctx = model.no_sync() if not last else contextlib.nullcontext()
            else:
                model.set_requires_gradient_sync(last)
                ctx = contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model, batch)
                (loss / ga if ga > 1 else loss).backward()
            micro += 1
            if last:
                if clip is not None and fsdp1:
                    model.clip_grad_norm_(clip)
                elif clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                if not zero_first:
                    opt.zero_grad()
                t += 1
                evaluating = evaluate_at(t)
                if evaluating:
                    evaluate_main(model)
                if after_step is not None:
                    after_step(t, evaluating)
                if t == steps:
                    break
    return model


def local_state(model, opt) -> dict:
    """This rank's shards of every main-branch tensor: parameters, gradients, buffers, optimizer state, LRs."""
    sharding.reshard([model])  # the shards, not what an evaluation left unsharded
    out = {f"param.{n}": local(p).detach().clone() for n, p in model.named_parameters()}
    out.update({f"grad.{n}": local(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None})
    out.update({f"buffer.{n}": b.detach().clone() for n, b in model.named_buffers()})
    names = {p: n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"opt.{names[p]}.{k}"] = local(torch.as_tensor(v)).clone()
    out["lrs"] = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
    return out
