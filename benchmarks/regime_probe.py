"""Library-free probe of a training setting's regime: cosine-to-0 vs. constant LR vs. WSD + cooldown.

The papers' claims (a cooldown matches cosine; constant LR without cooldown is clearly worse) hold where
the loss curve flattens and the gradient noise, not the distance to travel, limits the final loss. This
probe tells whether a setting of the headline benchmark (``bench_budgets.py``) is in that regime,
without the library (plain ``LambdaLR`` over hand-written schedules, so it cannot be confused by it):

- cosine to 0 over ``T`` steps (after a linear warmup);
- constant LR for ``T`` steps (no cooldown);
- WSD: the constant run's state at ``0.8 T``, cooled to 0 over ``0.2 T`` steps (1-sqrt).

Each over an LR grid; printed: the best val loss of each (and its LR), the gaps, and whether the best
LR lies strictly inside the grid.

    .venv/bin/python benchmarks/regime_probe.py --d-model 64 --n-layer 2 --batch 32 --steps 500 --lrs 2e-3,4e-3,8e-3
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from charlm import TinyGPT, splits  # noqa: E402


def train(model, opt, loader, steps: int, lr_at, start: int = 0, on_step=None) -> None:
    sched = LambdaLR(opt, lambda t: lr_at(t + start))
    t = 0
    model.train()
    while t < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            sched.step()
            t += 1
            if on_step is not None:
                on_step(start + t)
            if t == steps:
                return


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500, help="T")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--lrs", default="2e-3,4e-3,8e-3")
    ap.add_argument("--max-bytes", type=int, default=None)
    ap.add_argument("--val-seqs", type=int, default=0, help="validation sequences (0: the whole split)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    train_ds, val_ds = splits(block_size=args.block, max_bytes=args.max_bytes)
    val = DataLoader(Subset(val_ds, range(min(len(val_ds), args.val_seqs))) if args.val_seqs else val_ds, batch_size=64)
    T, W = args.steps, args.warmup
    S = int(round(0.8 * T))

    def loader():
        return DataLoader(train_ds, batch_size=args.batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(args.seed))

    def fresh(lr):
        torch.manual_seed(args.seed)
        m = TinyGPT(d_model=args.d_model, n_layer=args.n_layer, n_head=4, block_size=args.block)
        return m, torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))

    warm = lambda t: t / W if t < W else 1.0  # noqa: E731
    cos = lambda t: warm(t) if t < W else 0.5 * (1 + math.cos(math.pi * (t - W) / (T - W)))  # noqa: E731
    wsd = lambda t: warm(t) if t < S else 1.0 - math.sqrt((t - S) / (T - S))  # noqa: E731
    n_params = sum(p.numel() for p in fresh(1e-3)[0].parameters())
    print(f"d_model {args.d_model}, {args.n_layer} layers: {n_params} params; T={T}, batch {args.batch}x{args.block} "
          f"= {T * args.batch * args.block / 1e6:.1f}M tokens ({T * args.batch * args.block / n_params:.0f} per "
          f"parameter, {T * args.batch / len(train_ds):.2f} epochs)", flush=True)
    res: dict = {"cosine": {}, "constant": {}, "wsd": {}}
    t0 = time.perf_counter()
    for lr in sorted(float(x) for x in args.lrs.split(",")):
        m, o = fresh(lr)
        train(m, o, loader(), T, cos)
        res["cosine"][lr] = m.evaluate(val)
        m, o = fresh(lr)
        it = loader()
        saved = {}

        def keep(t, m=m, o=o):
            if t == S:
                saved["m"], saved["o"] = copy.deepcopy(m.state_dict()), copy.deepcopy(o.state_dict())
        train(m, o, it, T, warm, on_step=keep)
        res["constant"][lr] = m.evaluate(val)
        # WSD: from the constant run at S, cool down over T - S steps on the batches a fixed run would see
        m2, o2 = fresh(lr)
        m2.load_state_dict(saved["m"])
        o2.load_state_dict(saved["o"])
        it2 = loader()
        skip = 0
        batches = iter(it2)
        while skip < S:  # the fixed-budget run's data position at S (same seeded order)
            try:
                next(batches)
            except StopIteration:
                batches = iter(it2)
                continue
            skip += 1

        def rest():
            nonlocal batches
            while True:
                for b in batches:
                    yield b
                batches = iter(it2)
        cool = list(b for _, b in zip(range(T - S), rest()))
        train(m2, o2, cool, T - S, wsd, start=S)
        res["wsd"][lr] = m2.evaluate(val)
        print(f"lr {lr:g}: cosine {res['cosine'][lr]:.4f}  constant {res['constant'][lr]:.4f}  "
              f"wsd {res['wsd'][lr]:.4f}  ({time.perf_counter() - t0:.0f}s wall, {time.process_time():.0f}s CPU)",
              flush=True)
    best = {k: min(v.items(), key=lambda kv: kv[1]) for k, v in res.items()}
    lrs = sorted(res["cosine"])
    for k, (lr, v) in best.items():
        inside = lrs[0] < lr < lrs[-1]
        print(f"best {k:<8} {v:.4f} at lr {lr:g}{'' if inside else '  (AT THE GRID EDGE)'}")
    c = best["cosine"][1]
    print(f"constant vs cosine {100 * (best['constant'][1] / c - 1):+.2f}%; wsd vs cosine "
          f"{100 * (best['wsd'][1] / c - 1):+.2f}%; {time.perf_counter() - t0:.0f}s", flush=True)
    return res


if __name__ == "__main__":
    main()
