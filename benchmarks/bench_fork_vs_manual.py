"""Benchmark 3: K cooled evaluations of one run - in-process forks vs. the manual workflow.

One training run (TinyGPT on the stdlib text, plain PyTorch loop with ``CooldownHook``) reaches
``K`` fork points. At each one, both ways of getting a cooled evaluation are timed, in alternating
order (fork first at even points, manual first at odd ones):

- **fork**: ``CooldownHook`` snapshots the main branch, cools down ``c = 0.2 T`` steps (1-sqrt),
  evaluates, saves the cooled model and restores the main branch, in the same process;
- **manual** (what users do today): the run saves a checkpoint (model + optimizer + step); a *new
  process* (``benchmarks/_manual_cooldown.py``: Python start-up, imports, data, load) resumes a
  ``LambdaLR`` at step ``S``, cools down the same ``c`` steps on the same batches, evaluates and saves.

Both produce the same cooled model (their val losses are compared for equality). Reported per model
size: the wall time of both (sum over the K points), their ratio (target: manual >= 2x the fork for
small models) and the breakdown (start-up, data, load, cooldown, eval, save, snapshot/restore).

Then, at the last fork point, the cost of the fork itself: ``--overhead-rounds`` interleaved rounds of
(a) a whole fork (snapshot, ``--overhead-steps`` cooldown steps, evaluation, save, restore) and (b) the
same steps on the same batches, evaluation and save in a bare loop without the library, from the same
state (put back, untimed, after each bare run). Reported: the median of the per-round CPU-time and
wall-time ratios fork / bare, with 95% bootstrap intervals over the rounds.

    .venv/bin/python benchmarks/bench_fork_vs_manual.py            # two model sizes, ~5 min
    .venv/bin/python benchmarks/bench_fork_vs_manual.py --quick
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EXAMPLES, ROOT, base_parser, bootstrap_ci, finish, median, setup  # noqa: E402

sys.path.insert(0, str(EXAMPLES))
from charlm import TinyGPT, splits  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.data import cooldown_batches  # noqa: E402
from cooldown_callbacks.integrations.accelerate import CooldownHook  # noqa: E402
from cooldown_callbacks.snapshot import Snapshot  # noqa: E402

NAME = "bench_fork_vs_manual"
CHILD = Path(__file__).resolve().parent / "_manual_cooldown.py"
FRACTION, SHAPE, WARMUP, LR = 0.2, "1-sqrt", 20, 3e-3


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


@contextlib.contextmanager
def snapshot_timers(acc: dict):
    """Time ``Snapshot.take`` / ``Snapshot.restore`` (class-level wrappers, this process only)."""
    take, restore = Snapshot.take.__func__, Snapshot.restore

    def timed_take(cls, *a, **kw):
        t0 = time.perf_counter()
        try:
            return take(cls, *a, **kw)
        finally:
            acc["snapshot_s"] += time.perf_counter() - t0

    def timed_restore(self):
        t0 = time.perf_counter()
        try:
            return restore(self)
        finally:
            acc["restore_s"] += time.perf_counter() - t0

    Snapshot.take, Snapshot.restore = classmethod(timed_take), timed_restore
    try:
        yield
    finally:
        Snapshot.take, Snapshot.restore = classmethod(take), restore


def run_size(size: dict, args, tmp: Path) -> dict:
    d_model, n_layer = size["d_model"], size["n_layer"]
    train, val = splits(block_size=args.block, max_bytes=args.max_bytes)
    val = Subset(val, range(min(len(val), args.val_seqs)))
    val_loader = DataLoader(val, batch_size=64)
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = TinyGPT(d_model=d_model, n_layer=n_layer, n_head=4, block_size=args.block)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    forks = [args.every * (i + 1) for i in range(args.k)]
    acc = {"snapshot_s": 0.0, "restore_s": 0.0, "eval_s": 0.0, "save_s": 0.0}

    def eval_fn(m):
        t0 = time.perf_counter()
        v = m.evaluate(val_loader)
        acc["eval_s"] += time.perf_counter() - t0
        return {"val_loss": v}

    def save_fn(m, path):
        t0 = time.perf_counter()
        torch.save(m.state_dict(), path)
        acc["save_s"] += time.perf_counter() - t0

    hook = CooldownHook(model, opt, schedule=WSD(warmup_steps=WARMUP),
                        plan=ForkPlan(at=forks, cooldown=Cooldown(fraction=FRACTION, shape=SHAPE), data="fresh"),
                        loss_fn=_loss, eval_fn=eval_fn, save_fn=save_fn, train_loader=loader, max_grad_norm=1.0,
                        dirpath=tmp / "forks", verbose=False)
    points = []

    def manual(step: int) -> dict:
        ck = tmp / f"main-step={step}.pt"
        t0, c0 = time.perf_counter(), time.process_time()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, ck)
        ckpt_save, ckpt_cpu = time.perf_counter() - t0, time.process_time() - c0
        out_json = tmp / f"manual-{step}.json"
        cmd = [sys.executable, str(CHILD), "--ckpt", str(ck), "--out-json", str(out_json),
               "--save", str(tmp / f"manual-cooled-{step}.pt"), "--examples", str(EXAMPLES),
               "--d-model", str(d_model), "--n-layer", str(n_layer), "--block", str(args.block),
               "--batch", str(args.batch), "--val-seqs", str(args.val_seqs), "--warmup", str(WARMUP),
               "--fraction", str(FRACTION), "--shape", SHAPE, "--threads", str(torch.get_num_threads())]
        if args.max_bytes:
            cmd += ["--max-bytes", str(args.max_bytes)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        launched = time.time()
        t1 = time.perf_counter()
        subprocess.run(cmd + ["--launched-at", repr(launched)], check=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t1
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        rep = json.loads(out_json.read_text())
        return {"checkpoint_save_s": ckpt_save, "process_wall_s": wall, **rep,
                "process_exit_s": wall - rep["in_process_total_s"], "cpu_s": ckpt_cpu + child_cpu}

    def fork(step: int) -> dict:
        before = dict(acc)
        c0 = time.process_time()
        with snapshot_timers(acc):
            rec = hook.step()
        cpu = time.process_time() - c0
        parts = {k: acc[k] - before[k] for k in acc}
        return {"total_s": rec.seconds, "cpu_s": cpu, **parts, "val_loss": rec.metrics["val_loss"],
                "cooldown_steps": rec.cooldown_steps,
                "cooldown_s": rec.seconds - sum(parts.values())}

    t = 0
    main_s = 0.0
    t_main = time.perf_counter()
    while t < forks[-1]:
        for batch in loader:
            loss = _loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            t += 1
            if t not in forks:
                hook.step()
            else:
                main_s += time.perf_counter() - t_main
                i = forks.index(t)
                if i % 2 == 0:
                    f = fork(t)
                    m = manual(t)
                else:
                    m = manual(t)
                    f = fork(t)
                points.append({"step": t, "fork": f, "manual": m, "same_val_loss": f["val_loss"] == m["val_loss"]})
                print(f"[d={d_model} L={n_layer}] step {t}: fork {f['total_s']:.2f}s, manual "
                      f"{m['checkpoint_save_s'] + m['process_wall_s']:.2f}s, val {f['val_loss']:.4f} vs "
                      f"{m['val_loss']:.4f}", flush=True)
                t_main = time.perf_counter()
            if t >= forks[-1]:
                break
    hook.close()
    overhead = fork_overhead(hook, model, opt, loader, forks[-1], args.overhead_steps, args.overhead_rounds,
                             eval_fn, save_fn, tmp)
    print(f"[d={d_model} L={n_layer}] a fork of {args.overhead_steps} steps vs. the bare loop: CPU "
          f"{_ci(overhead['cpu_ratio'])}, wall {_ci(overhead['wall_ratio'])}", flush=True)
    fsum = {k: sum(p["fork"][k] for p in points) for k in ("total_s", "cpu_s", "snapshot_s", "restore_s",
                                                            "cooldown_s", "eval_s", "save_s")}
    msum = {k: sum(p["manual"][k] for p in points)
            for k in ("checkpoint_save_s", "process_wall_s", "interpreter_s", "startup_s", "data_s", "build_s",
                      "load_s", "cooldown_s", "eval_s", "save_s", "process_exit_s", "cpu_s")}
    manual_total = msum["checkpoint_save_s"] + msum["process_wall_s"]
    return {"d_model": d_model, "n_layer": n_layer, "params": n_params, "forks": forks,
            "cooldown_steps": [p["fork"]["cooldown_steps"] for p in points], "points": points,
            "fork": fsum, "manual": msum, "manual_total_s": manual_total, "fork_total_s": fsum["total_s"],
            "ratio": manual_total / fsum["total_s"], "cpu_ratio": msum["cpu_s"] / fsum["cpu_s"],
            "all_same_val_loss": all(p["same_val_loss"] for p in points),
            "main_train_s": main_s, "fork_overhead": overhead}


def fork_overhead(hook: CooldownHook, model, opt, loader, step: int, c: int, rounds: int, eval_fn, save_fn,
                  tmp: Path) -> dict:
    """Per-round CPU and wall seconds of a whole fork vs. the same work in a bare loop, from one state."""
    plan = hook.engine.plan
    hook.engine.plan = ForkPlan(at=[step], cooldown=Cooldown(steps=c, shape=SHAPE), data=plan.data, seed=plan.seed)
    hook.engine.dirpath = tmp / "overhead"
    lr0 = opt.param_groups[0]["initial_lr"]
    schedule = WSD(warmup_steps=WARMUP)

    def fork() -> None:
        hook._handles = [opt.register_step_pre_hook(hook._pre_step)]  # closed after the run: on for the fork only
        try:
            rec = hook.engine.fork(step, hook._Runner(hook), suffix=".pt")
        finally:
            hook.close()
        assert rec.status == "ok", rec.error

    def bare() -> None:
        model.train()
        it = cooldown_batches(plan.data, loader=loader, step=step, seed=plan.seed)  # the fork's batches
        for k in range(c):
            for g in opt.param_groups:
                g["lr"] = lr0 * schedule(step) * (1.0 - (k / c) ** 0.5)
            loss = _loss(model, next(it))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            eval_fn(model)
        model.train()
        save_fn(model, tmp / "overhead-bare.pt")

    times: dict[str, list[tuple[float, float]]] = {"fork": [], "bare": []}
    for r in range(rounds):
        for name in (("fork", "bare") if r % 2 == 0 else ("bare", "fork")):
            snap = Snapshot.take(modules=[model], optimizers=[opt])  # untimed: both start from this state
            w0, c0 = time.perf_counter(), time.process_time()
            (fork if name == "fork" else bare)()
            times[name].append((time.process_time() - c0, time.perf_counter() - w0))
            snap.restore()
            snap.close()
    hook.engine.plan = plan
    pairs = list(zip(times["fork"], times["bare"]))

    def ratio(i: int):
        return lambda rs: median([f[i] / b[i] for f, b in rs])

    return {"steps": c, "rounds": rounds, "fork_cpu_s": [t[0] for t in times["fork"]],
            "bare_cpu_s": [t[0] for t in times["bare"]], "fork_wall_s": [t[1] for t in times["fork"]],
            "bare_wall_s": [t[1] for t in times["bare"]],
            "cpu_ratio": {"value": ratio(0)(pairs), "ci95": list(bootstrap_ci(pairs, ratio(0)))},
            "wall_ratio": {"value": ratio(1)(pairs), "ci95": list(bootstrap_ci(pairs, ratio(1)))}}


def _ci(s: dict) -> str:
    return f"{s['value']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def main(argv: Sequence[str] | None = None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--sizes", default="64x2,128x4", help="model sizes d_model x n_layer, comma-separated")
    ap.add_argument("--k", type=int, default=4, help="number of cooled evaluations")
    ap.add_argument("--every", type=int, default=100, help="fork every N steps (the cooldown is 0.2 of the total)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--val-seqs", type=int, default=512)
    ap.add_argument("--max-bytes", type=int, default=None)
    ap.add_argument("--overhead-steps", type=int, default=60, help="cooldown steps of the fork-vs-bare-loop rounds")
    ap.add_argument("--overhead-rounds", type=int, default=8, help="interleaved fork-vs-bare-loop rounds per size")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.k, args.every, args.batch, args.val_seqs, args.max_bytes = "16x1", 1, 8, 4, 16, 200_000
        args.overhead_steps, args.overhead_rounds = 3, 2
    out, env = setup(args, NAME, argv)
    sizes = []
    for s in args.sizes.split(","):
        d, L = s.lower().split("x")
        sizes.append({"d_model": int(d), "n_layer": int(L)})
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fork-vs-manual-") as tmp:
        for i, size in enumerate(sizes):
            d = Path(tmp) / f"size{i}"
            d.mkdir()
            results.append(run_size(size, args, d))
    rows, brk = [], []
    for r in results:
        name = f"d={r['d_model']}, {r['n_layer']} layers ({r['params'] / 1e3:.0f}k params)"
        rows.append([name, args.k, "+".join(map(str, r["cooldown_steps"])), f"{r['fork_total_s']:.2f}",
                     f"{r['manual_total_s']:.2f}", f"{r['ratio']:.2f}", "yes" if r["ratio"] >= 2 else "NO",
                     f"{r['fork']['cpu_s']:.2f}", f"{r['manual']['cpu_s']:.2f}", f"{r['cpu_ratio']:.2f}",
                     "yes" if r["all_same_val_loss"] else "NO"])
        f, m = r["fork"], r["manual"]
        brk.append([name, "fork (in process)", "-", "-", "-", f"{f['snapshot_s']:.2f} + {f['restore_s']:.2f}",
                    f"{f['cooldown_s']:.2f}", f"{f['eval_s']:.2f}", f"{f['save_s']:.2f}", "-", f"{f['total_s']:.2f}"])
        brk.append([name, "manual (new process)", f"{m['startup_s']:.2f}", f"{m['data_s']:.2f}", f"{m['build_s']:.2f}",
                    f"{m['load_s']:.2f} (+ ckpt save {m['checkpoint_save_s']:.2f})", f"{m['cooldown_s']:.2f}",
                    f"{m['eval_s']:.2f}", f"{m['save_s']:.2f}", f"{m['process_exit_s']:.2f}",
                    f"{r['manual_total_s']:.2f}"])
    over_rows = []
    for r in results:
        o = r["fork_overhead"]
        over_rows.append([f"d={r['d_model']}, {r['n_layer']} layers ({r['params'] / 1e3:.0f}k params)", o["steps"],
                          o["rounds"], f"{median(o['fork_cpu_s']):.2f}", f"{median(o['bare_cpu_s']):.2f}",
                          _ci(o["cpu_ratio"]), f"{median(o['fork_wall_s']):.2f}", f"{median(o['bare_wall_s']):.2f}",
                          _ci(o["wall_ratio"])])
    result = {"config": {"k": args.k, "every": args.every, "fraction": FRACTION, "shape": SHAPE, "warmup": WARMUP,
                         "lr": LR, "batch": args.batch, "block": args.block, "val_seqs": args.val_seqs,
                         "sizes": sizes, "overhead_steps": args.overhead_steps,
                         "overhead_rounds": args.overhead_rounds},
              "sizes": results, "ratios": {f"{r['d_model']}x{r['n_layer']}": r["ratio"] for r in results},
              "cpu_ratios": {f"{r['d_model']}x{r['n_layer']}": r["cpu_ratio"] for r in results}}
    notes = [f"K={args.k} cooled evaluations at steps {', '.join(map(str, results[0]['forks']))}, cooldown 20% of "
             f"the cooled run ({SHAPE}), batch {args.batch}, val {args.val_seqs} sequences; torch threads "
             f"{torch.get_num_threads()} in both processes.",
             "manual start-up = from launch to after `import torch` + model code (interpreter included); build = "
             "constructing the model and AdamW (the first optimizer makes torch import torch._dynamo); "
             "exit = process wall time not covered by the parts (interpreter teardown); the checkpoint save is "
             "done by the training run.",
             "fork cooldown = fork total - snapshot - restore - eval - save (includes the engine's bookkeeping).",
             "CPU s: process CPU time (the fork's in this process; the checkpoint save plus the new process's, "
             "from getrusage) - less sensitive to the shared machine's load than wall time.",
             "both approaches train the same c steps on the same batches from the same state: 'same result' "
             "compares the two cooled val losses for equality.",
             "fork vs. bare loop: at the last fork point, interleaved rounds of one whole fork (snapshot, cooldown, "
             "eval, save, restore) and the same steps, eval and save without the library, each from the same state; "
             "ratios are medians of the per-round ratios with 95% bootstrap intervals."]
    return finish(out, env, result, [
        ("Wall time of K cooled evaluations (seconds, summed over the K points)",
         ["model", "K", "cooldown steps", "fork s", "manual s", "manual / fork", ">= 2x", "fork CPU s",
          "manual CPU s", "CPU manual / fork", "same result"], rows),
        ("Breakdown (seconds, summed over the K points)",
         ["model", "approach", "start-up (imports)", "data", "build model + optimizer",
          "load checkpoint / snapshot + restore", "cooldown", "eval", "save",
          "exit", "total"], brk),
        ("A whole fork vs. the same work in a bare loop (median seconds per round; ratio fork / bare)",
         ["model", "cooldown steps", "rounds", "fork CPU s", "bare CPU s", "CPU ratio [95% CI]", "fork wall s",
          "bare wall s", "wall ratio [95% CI]"], over_rows)], notes)


if __name__ == "__main__":
    main()
