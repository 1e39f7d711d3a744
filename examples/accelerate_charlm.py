"""Train a byte-level transformer on the Python standard library's sources with Accelerate, forking
cooldowns along the way, and print the budget table: step, main-branch val loss, cooled val loss.

    python examples/accelerate_charlm.py              # ~3 minutes on 2 CPU cores
    python examples/accelerate_charlm.py --quick      # ~20 seconds
    torchrun --nproc_per_node 2 examples/accelerate_charlm.py   # two processes (on a machine without GPUs,
                                                                # `accelerate launch --num_processes 2 --cpu`
                                                                # starts only one)

The fork records land in ``--out/forks.jsonl``; ``cooldown-callbacks report --out`` plots them.

Run it again with another ``--out`` (or remove the old one): a new run refuses a folder that holds
another run's cooled models and records.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from charlm import TinyGPT, splits  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.integrations.accelerate import CooldownHook  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=1200, help="main-branch optimizer steps")
    ap.add_argument("--fork-every", type=int, default=200, help="fork a cooldown every N steps")
    ap.add_argument("--cooldown-fraction", type=float, default=0.2, help="cooldown length as a fraction of the cooled run")
    ap.add_argument("--shape", default="1-sqrt", help="cooldown shape")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="runs/accelerate_charlm", help="where cooled checkpoints and forks.jsonl go")
    ap.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_steps, args.fork_every = 60, 20

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    block = 64
    train_ds, val_ds = splits(block_size=block, max_bytes=400_000 if args.quick else None)
    val_ds = Subset(val_ds, range(min(len(val_ds), 64 if args.quick else 256)))
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(val_ds, batch_size=64)
    model = TinyGPT(d_model=64 if args.quick else 128, n_layer=2, n_head=4, block_size=block)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    model, opt, train_loader = accelerator.prepare(model, opt, train_loader)

    def evaluate(m: torch.nn.Module) -> dict:
        loss = accelerator.unwrap_model(m).evaluate(val_loader)
        t = accelerator.reduce(torch.tensor([loss], device=accelerator.device), reduction="mean")
        return {"val_loss": t.item()}

    hook = CooldownHook(
        model, opt,
        schedule=WSD(warmup_steps=max(10, args.max_steps // 20)),
        plan=ForkPlan(every=args.fork_every, cooldown=Cooldown(fraction=args.cooldown_fraction, shape=args.shape),
                      data="fresh", at_end=True),
        loss_fn=_loss,
        eval_fn=evaluate, train_loader=train_loader, accelerator=accelerator, max_grad_norm=1.0,
        dirpath=args.out,
    )
    accelerator.register_for_checkpointing(hook)

    main_losses: dict[int, float] = {}
    step, t0 = 0, time.time()
    model.train()
    while step < args.max_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = _loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                evaluating = step % args.fork_every == 0
                metrics = None
                if evaluating:
                    model.eval()
                    with torch.no_grad():
                        metrics = evaluate(model)
                    model.train()
                    main_losses[step] = metrics["val_loss"]
                hook.step(metrics=metrics)
                if step >= args.max_steps:
                    break
    model.eval()
    with torch.no_grad():
        main_losses[step] = evaluate(model)["val_loss"]
    hook.finish(metrics={"val_loss": main_losses[step]})
    if accelerator.is_main_process:
        print_table(hook.records, main_losses, time.time() - t0)
    return hook.records


def _loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def print_table(records: list[dict], main_losses: dict[int, float], seconds: float) -> None:
    print()
    print(f"{'step':>6} {'cooldown':>8} {'total':>6} {'main val loss':>14} {'cooled val loss':>16} {'bits/byte':>10} {'fork s':>7}")
    for r in records:
        cooled = r["metrics"].get("val_loss", float("nan")) if r["status"] == "ok" else float("nan")
        main_l = main_losses.get(r["step"], float("nan"))
        print(f"{r['step']:>6} {r['cooldown_steps']:>8} {r['step'] + r['cooldown_steps']:>6} {main_l:>14.4f} "
              f"{cooled:>16.4f} {cooled / math.log(2):>10.3f} {r['seconds']:>7.1f}")
    print(f"total wall time {seconds:.0f}s")


if __name__ == "__main__":
    main()
