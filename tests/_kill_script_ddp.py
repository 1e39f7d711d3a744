"""Two-rank DDP (gloo, CPU) plain-PyTorch loop with a fault injected on one rank inside a fork.

``main(out, rank, world_size, port, fault)`` runs one rank (the test starts both as separate
processes, without a launcher that would stop the survivors for us). ``fault`` on rank 1 only:

- ``"train"``: the loss function raises at the 2nd cooldown micro-batch;
- ``"save"``: the user's ``save_fn`` raises while the cooled model is written;
- ``"kill"``: the process SIGKILLs itself at the 2nd cooldown micro-batch.

Cooldown batches come from a user stream whose batches carry a third element, so the loss function
knows it is inside a fork. A rank that fails writes its traceback to ``out/rank-<r>.err``.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _torchrun import leave  # noqa: E402
from _loops import X, Y, eval_fn, loss_fn, make_loader, make_model_opt, train  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402

PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.nn.parallel",
           "cooldown_callbacks.integrations.accelerate"]


def main(out: str, rank: int, world_size: int, port: int, fault: str) -> None:
    from cooldown_callbacks.integrations.accelerate import CooldownHook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    out = Path(out)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
        model, opt = make_model_opt()
        model = DDP(model)
        loader = make_loader(sampler=DistributedSampler(torch.utils.data.TensorDataset(X, Y), shuffle=True, seed=3))
        g = torch.Generator().manual_seed(10 + rank)
        stream = [(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g), "cooldown") for _ in range(4)]
        calls = [0]

        def lf(m, batch):
            if len(batch) == 3:
                calls[0] += 1
                if rank == 1 and calls[0] == 2:
                    if fault == "train":
                        raise RuntimeError("injected failure in a cooldown step")
                    if fault == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                batch = batch[:2]
            return loss_fn(m, batch)

        def save_fn(m, path):
            if fault == "save" and rank == 1:
                raise OSError(28, "injected: no space left on device")
            if rank == 0:
                torch.save(m.module.state_dict(), path)

        hook = CooldownHook(model, opt, schedule=WSD(warmup_steps=2),
                            plan=ForkPlan(every=5, cooldown=Cooldown(steps=3), data=stream), loss_fn=lf,
                            eval_fn=eval_fn, gradient_accumulation_steps=2, max_grad_norm=0.5,
                            dirpath=out / "cooled", save_fn=save_fn, verbose=False)
        train(model, opt, loader, 12, ga=2, after_step=hook.step)
        leave()  # barrier, then exit without gloo's teardown (see tests/_torchrun.py)
    except BaseException:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{rank}.err").write_text(traceback.format_exc())
        raise
