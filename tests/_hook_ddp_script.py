"""Run under ``torchrun --nproc_per_node 2``: a DDP loop with or without forks.

argv: OUT_DIR MODE ; MODE is forks|none|fail|nosave0|oneval0 (plain PyTorch DDP; nosave0: a save_fn that
writes nothing on rank 0; oneval0: ForkPlan(on_eval=True) with evaluating=True on rank 0 only, as nanoGPT
evaluates on its master process) or accel-forks|accel-none (an
Accelerate loop: prepared model, optimizer and loader, ``accelerator.accumulate``);
writes rank-<r>.pt with the final main-branch state.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(__file__))
from _torchrun import leave  # noqa: E402
from _loops import X, Y, eval_fn, full_state, loss_fn, make_model_opt, make_loader, train, train_accelerate  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.integrations.accelerate import CooldownHook  # noqa: E402


def main_accelerate(out: str, mode: str) -> None:
    from accelerate import Accelerator

    acc = Accelerator(gradient_accumulation_steps=2, cpu=True)
    rank = acc.process_index
    model, opt = make_model_opt()
    loader = make_loader()
    model, opt, loader = acc.prepare(model, opt, loader)
    torch.manual_seed(100 + rank)
    sched = WSD(warmup_steps=2)
    if mode == "accel-none":
        ls = sched.lambda_lr(opt.optimizer)
        train_accelerate(acc, model, opt, loader, 16, lambda t: ls.step())
    else:
        def ev(m):
            t = torch.tensor([eval_fn(m)["val_loss"]])
            return {"val_loss": acc.reduce(t, reduction="mean").item(), "rank": float(rank)}  # the hook averages
        hook = CooldownHook(model, opt, schedule=sched, plan=ForkPlan(every=5, cooldown=Cooldown(steps=3), data="fresh"),
                            loss_fn=loss_fn, eval_fn=ev, train_loader=loader, accelerator=acc, max_grad_norm=0.5,
                            dirpath=os.path.join(out, "cooled"), verbose=rank == 0)
        train_accelerate(acc, model, opt, loader, 16, lambda t: hook.step())
    torch.save(full_state(acc.unwrap_model(model), opt.optimizer), os.path.join(out, f"rank-{rank}.pt"))
    acc.wait_for_everyone()
    acc.end_training()


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    if mode.startswith("accel-"):
        return main_accelerate(out, mode)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = make_model_opt()
    model = DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if False else model)
    sampler = DistributedSampler(torch.utils.data.TensorDataset(X, Y), shuffle=True, seed=3)
    loader = make_loader(sampler=sampler)
    torch.manual_seed(100 + rank)
    sched = WSD(warmup_steps=2)
    if mode == "none":
        ls = sched.lambda_lr(opt)
        train(model, opt, loader, 16, ga=2, after_step=ls.step)
    else:
        def ev(m):
            if mode == "fail" and rank == 1:
                raise RuntimeError("injected failure in the eval function")
            t = torch.tensor([eval_fn(m)["val_loss"]])
            dist.all_reduce(t)
            return {"val_loss": t.item() / dist.get_world_size(), "rank": float(rank)}  # the hook averages
        def save_fn(m, path):
            if rank != 0:  # a user save that only some ranks carry out: rank 0 finds no checkpoint
                torch.save(m.module.state_dict(), str(path) + ".rank1")
        plan = ForkPlan(every=5, cooldown=Cooldown(steps=3), data="fresh") if mode != "oneval0" else \
            ForkPlan(on_eval=True, cooldown=Cooldown(steps=3), data="fresh")
        hook = CooldownHook(model, opt, schedule=sched, plan=plan,
                            loss_fn=loss_fn, eval_fn=ev, train_loader=loader, gradient_accumulation_steps=2,
                            max_grad_norm=0.5, dirpath=os.path.join(out, "cooled"), verbose=rank == 0,
                            save_fn=save_fn if mode == "nosave0" else None)
        if mode == "oneval0":  # the loop evaluates every 5 steps, on rank 0 only
            train(model, opt, loader, 16, ga=2,
                  after_step=lambda: hook.step(evaluating=rank == 0 and (hook.step_count + 1) % 5 == 0))
        else:
            train(model, opt, loader, 16, ga=2, after_step=hook.step)
    torch.save(full_state(model.module, opt), os.path.join(out, f"rank-{rank}.pt"))
    leave()  # barrier, then exit without gloo's teardown (see tests/_torchrun.py)


if __name__ == "__main__":
    main()
