"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU): FSDP2 or FSDP1 runs with and without the hook.

argv: OUT KIND [RUN ...]; KIND is ``fsdp2`` or ``fsdp1`` (``_sharded_loops.make_model_opt``); default:
every run of ``RUNS[KIND]``. Every run trains in the same process group, one after the other, and
writes ``OUT/<run>/rank-<r>.pt`` (this rank's shards of the final main branch, from
``_sharded_loops.local_state``):

- ``ref``: the user's loop with a plain LambdaLR over the same schedule, no library; it evaluates the
  main branch at steps 4, 8 and 12;
- ``cpu-full``, ``disk-dcp``, ``device-full``: the same loop with ``CooldownHook`` forking at 4, 8, 12
  (3 cooldown steps each, peeked data), right after the user's evaluation (``evaluating=True``), with
  ``snapshot_storage`` / ``save_format`` as named; cooled models in ``OUT/<run>/cooled``; rank 0 also
  writes ``snapshot.json`` (per-rank snapshot bytes of the first fork);
- ``cpu-fn``: as ``cpu-full`` with a ``save_fn`` that writes each rank's shards to its own file in a
  folder and never calls ``state_dict()`` (which would reshard FSDP2 modules as a side effect);
- ``ref-zf``, ``cpu-zf``: as ``ref`` and ``cpu-full`` with a loop that zeroes gradients at the start of
  each step, so they exist at each fork (the fork must not add them to its first update, and the
  restore must rebuild them: the fork ends with none);
- ``budget``: a fresh run of 4 + 3 steps with ``WSD.cooled(at=4, ...)``; rank 0 writes its full
  state (``sharding.full_state_dict``) to ``OUT/budget/full.pt``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _torchrun import leave  # noqa: E402
import _sharded_loops as SL  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks import sharding  # noqa: E402

SCHED = WSD(warmup_steps=2)
CD = Cooldown(steps=3, shape="1-sqrt")
STEPS = 12  # the last fork is at the last step: the final state is the restored one (gradients included)
RUNS = {"fsdp2": ("ref", "cpu-full", "disk-dcp", "device-full", "cpu-fn", "ref-zf", "cpu-zf", "budget"),
        "fsdp1": ("ref", "cpu-full", "disk-dcp", "cpu-fn", "budget")}


def save_shards(model, path) -> None:
    """A user's save_fn: every rank writes its local shards into the folder ``path``."""
    os.makedirs(path, exist_ok=True)
    shards = {n: sharding.local(p).detach().clone() for n, p in model.named_parameters()}
    torch.save(shards, os.path.join(path, f"shards-{dist.get_rank()}.pt"))


def run(out: str, kind: str, name: str, rank: int) -> None:
    from cooldown_callbacks.integrations.accelerate import CooldownHook

    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    model, opt = SL.make_model_opt(kind)
    loader = SL.make_loader()
    torch.manual_seed(100 + rank)  # dropout differs per rank, same in every run
    if name == "budget":
        sched = SCHED.cooled(at=4, cooldown=CD).lambda_lr(opt)
        SL.train(model, opt, loader, 4 + CD.steps, after_step=lambda t, e: sched.step())
        sd = sharding.full_state_dict(model)
        if rank == 0:
            torch.save(sd, os.path.join(d, "full.pt"))
    elif name.startswith("ref"):
        sched = SCHED.lambda_lr(opt)
        SL.train(model, opt, loader, STEPS, after_step=lambda t, e: sched.step(), evaluate_at=lambda t: t % 4 == 0,
                 zero_first=name == "ref-zf")
    else:
        storage, fmt = name.split("-")
        kw = dict(save_fn=save_shards) if fmt == "fn" else dict(save_format="full" if fmt == "zf" else fmt)
        hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=4, cooldown=CD, data="peek"),
                            loss_fn=SL.loss_fn, eval_fn=SL.eval_fn, train_loader=loader, gradient_accumulation_steps=2,
                            max_grad_norm=0.5, dirpath=os.path.join(d, "cooled"), snapshot_storage=storage,
                            verbose=False, **kw)
        sizes = []
        orig = hook._Runner.snapshot

        def snapshot(runner):
            snap = orig(runner)
            sizes.append(snap.nbytes)
            return snap
        hook._Runner.snapshot = snapshot
        try:
            SL.train(model, opt, loader, STEPS, after_step=lambda t, e: hook.step(evaluating=e),
                     evaluate_at=lambda t: t % 4 == 0, zero_first=fmt == "zf")
        finally:
            hook._Runner.snapshot = orig
        state = SL.local_state(model, opt)
        local_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if k != "lrs")
        plain = SL.plain_model()  # the same state unsharded: parameters (gradients), two AdamW moments, buffers, steps
        copies = 4 if any(k.startswith("grad.") for k in state) else 3
        global_bytes = sum(copies * p.numel() * p.element_size() + 4 for p in plain.parameters()) + \
            sum(b.numel() * b.element_size() for b in plain.buffers())
        got = [None, None]
        dist.all_gather_object(got, {"snapshot": sizes[0], "local": local_bytes, "global": global_bytes})
        if rank == 0:
            with open(os.path.join(d, "snapshot.json"), "w") as f:
                json.dump(got, f)
    torch.save(SL.local_state(model, opt), os.path.join(d, f"rank-{rank}.pt"))
    dist.barrier()


def main() -> None:
    out, kind = sys.argv[1], sys.argv[2]
    runs = sys.argv[3:] or RUNS[kind]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    for name in runs:
        run(out, kind, name, rank)
    leave()  # barrier, then exit without gloo's teardown (see tests/_torchrun.py)


if __name__ == "__main__":
    main()
