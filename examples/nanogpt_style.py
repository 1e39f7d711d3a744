"""A nanoGPT-style training loop (no DataLoader: ``get_batch`` samples random windows; a GradScaler;
evaluation at the top of the loop, before the update) with cooldowns forked by ``CooldownHook``.

What the hook needs from such a loop, beside the usual arguments:

- ``ForkPlan(data=cooldown_batches)``: a callable ``step -> iterable of batches``, here the same
  random draws ``get_batch("train")`` makes (the fork's draws never move the main branch's RNG);
- ``hook.step(step=iter_num)`` right after ``iter_num += 1``: the fork point is the step count of the
  loop, and the fork runs before the evaluation at the top of the next iteration, so the cooled model
  and the main branch are evaluated on the same random batches (``estimate_loss`` samples them);
- ``hook.log_main_metrics(iter_num, ...)`` after that evaluation: the main branch's loss goes into
  the fork's record, beside the cooled one (``cooldown-callbacks report <out>/cooled``);
- ``scalers=[scaler]``: the fork's built-in loop body (``loss_fn``) scales, unscales before clipping,
  steps and updates it as the main loop does (fp16 on a GPU; disabled here on the CPU);
- on resume, ``hook.load_state_dict(checkpoint["cooldown"])`` with the model and optimizer (the hook
  warns if the optimizer has state while the hook is at step 0). Cooled files are named
  ``cooled-step00000200-cd50.pt`` (no ``=``, which nanoGPT's configurator would split on).

    python examples/nanogpt_style.py            # ~2 minutes on 2 CPU cores
    python examples/nanogpt_style.py --quick    # a few seconds
    torchrun --nproc_per_node 2 examples/nanogpt_style.py --quick   # DDP, as nanoGPT's train.py

Run it again with another ``--out`` (or remove the old one): a new run refuses a folder that holds
another run's cooled models and records.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from charlm import TinyGPT, stdlib_text  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.integrations.accelerate import CooldownHook  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-iters", type=int, default=600)
    ap.add_argument("--eval-interval", type=int, default=100)
    ap.add_argument("--eval-iters", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--out", default="runs/nanogpt_style")
    ap.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_iters, args.eval_interval, args.eval_iters = 40, 10, 4

    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = torch.distributed.get_rank() if ddp else 0
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dtype = "float16" if torch.cuda.is_available() else "float32"
    ctx = torch.autocast("cuda", dtype=torch.float16) if dtype == "float16" else contextlib.nullcontext()
    torch.manual_seed(1337 + rank)

    data = torch.frombuffer(bytearray(stdlib_text(300_000 if args.quick else None)), dtype=torch.uint8).long()
    n = int(0.95 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[split]
        ix = torch.randint(len(d) - args.block_size - 1, (args.batch_size,))
        x = torch.stack([d[i:i + args.block_size] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + args.block_size] for i in ix])
        return x.to(device), y.to(device)

    raw = TinyGPT(d_model=64 if args.quick else 128, n_layer=2, n_head=4, block_size=args.block_size).to(device)
    model = torch.nn.parallel.DistributedDataParallel(raw) if ddp else raw
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == "float16"))

    def forward(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with ctx:
            return F.cross_entropy(m(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def estimate_loss(m: torch.nn.Module) -> dict:
        was = m.training
        m.eval()
        losses = torch.stack([torch.stack([forward(m, *get_batch(split)) for _ in range(args.eval_iters)]).mean()
                              for split in ("train", "val")])
        if ddp:  # every rank sampled its own batches: the mean over ranks, as the hook reports the cooled loss
            torch.distributed.all_reduce(losses)
            losses /= torch.distributed.get_world_size()
        m.train(was)
        return {"train": float(losses[0]), "val": float(losses[1])}

    def cooldown_batches(step: int):
        while True:
            yield get_batch("train")

    hook = CooldownHook(
        model, optimizer, schedule=WSD(warmup_steps=max(10, args.max_iters // 20)),
        plan=ForkPlan(every=args.eval_interval, cooldown=Cooldown(fraction=0.2), data=cooldown_batches),
        loss_fn=lambda m, batch: forward(m, *batch),
        eval_fn=lambda m: {"val_loss": estimate_loss(m)["val"]},
        scalers=[scaler], max_grad_norm=args.grad_clip, dirpath=os.path.join(args.out, "cooled"),
        verbose=rank == 0,
    )

    iter_num = 0
    while iter_num < args.max_iters:
        if iter_num % args.eval_interval == 0:  # nanoGPT evaluates at the top of the loop, before the update
            losses = estimate_loss(model)
            hook.log_main_metrics(iter_num, {"val_loss": losses["val"]})  # beside the cooled loss of this step
            if rank == 0:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
        X, Y = get_batch("train")
        loss = forward(model, X, Y)
        scaler.scale(loss).backward()
        if args.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        hook.step(step=iter_num)  # after the update; a fork here runs before the evaluation of this step
    if ddp:
        torch.distributed.destroy_process_group()
    return hook.records


if __name__ == "__main__":
    main()
