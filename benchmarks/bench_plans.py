"""Benchmark 6: fork plans on the same run - what each costs, the budget curve it yields, how well it predicts.

Task: byte-level language modelling of the Python standard library's sources (``examples/charlm.py``),
TinyGPT, AdamW (betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0, WSD main branch, one
seeded data order (a ``StatefulDataLoader``; forks cool on the main branch's upcoming batches,
``data="peek"``). The user's loop evaluates the main branch every ``--every`` steps in every run.
Every cooldown is 20% of its cooled run, 1-sqrt (``c = S / 4``), so a fork at ``S`` trains to
``T = S + c = 1.25 S``.

Runs, all with the same main branch (``--steps`` N):

- **reference**: ``ForkPlan(at=[N])`` - the main branch alone (its wall time, less the one fork's,
  is the baseline) and the *truth*: the cooled loss at ``T* = 1.25 N``;
- **on_eval**: a fork at every evaluation (``ForkPlan(on_eval=True)``, every ``--every`` steps);
- **geometric**: ``ForkPlan(geometric=(--every, --ratio))`` (default ratio 1.5);
- **capped**: ``ForkPlan(on_eval=True, max_overhead=--cap)`` (default 0.6).

Reported per plan: fork points run and skipped, cooldown steps (and the ratio to the main steps,
checked against ``ForkPlan.cost``), wall and CPU time against the reference, and its budget curve:
``fit_budget_curve`` on the plan's forks with ``--fit-from * N <= S < N`` (all but the last) predicts
the cooled loss at ``T*``, compared with the truth (error, inside the 90% band or not). Forks in the
first ``--fit-from`` (30%) of the run are left out: early in training the cooled loss falls faster
than a power law (a row shows the on_eval fit with them). Predict-then-measure on the on_eval run:
the fit of its forks at ``--fit-from * N <= S <= --fit-until * N`` predicts each later fork's cooled
loss, compared with what that fork measured. The main branch's final validation loss must be the
same in every run (a fork never changes it).

    .venv/bin/python benchmarks/bench_plans.py            # ~10-15 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_plans.py --quick    # seconds; numbers meaningless
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, finish, pyplot, setup  # noqa: E402
import bench_budgets  # noqa: E402
from bench_budgets import _loss, train_steps  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan, fit_budget_curve  # noqa: E402
from cooldown_callbacks.integrations.accelerate import CooldownHook  # noqa: E402

NAME = "bench_plans"
COOLDOWN = Cooldown(fraction=0.2, shape="1-sqrt")
LEVEL = 0.9


def plans(args) -> dict[str, ForkPlan]:
    kw = dict(cooldown=COOLDOWN, data="peek")
    return {
        "reference": ForkPlan(at=[args.steps], **kw),
        "on_eval": ForkPlan(on_eval=True, **kw),
        "geometric": ForkPlan(geometric=(args.every, args.ratio), **kw),
        "capped": ForkPlan(on_eval=True, max_overhead=args.cap, **kw),
    }


class Task(bench_budgets.Task):
    """The budgets benchmark's task (data, model, optimizer, loader, evaluation); ``run`` trains it under a plan."""

    def run(self, plan: ForkPlan, dirpath: Path) -> dict:
        """One main branch of ``--steps`` steps under ``plan``; the loop evaluates every ``--every`` steps."""
        a = self.args
        model, opt = self.model_opt(a.lr)
        loader = self.loader()
        hook = CooldownHook(model, opt, schedule=WSD(warmup_steps=a.warmup), plan=plan, loss_fn=_loss,
                            eval_fn=lambda m: {"val_loss": self.evaluate(m)}, train_loader=loader, max_grad_norm=1.0,
                            dirpath=dirpath, verbose=False)
        main_val: dict[int, float] = {}
        fork_cpu = [0.0]

        def after_step(t: int) -> None:
            evaluating = t % a.every == 0 or t == a.steps
            metrics = None
            if evaluating:
                main_val[t] = self.evaluate(model)
                metrics = {"val_loss": main_val[t]}
            n, f0 = len(hook.records), time.process_time()
            hook.step(evaluating=evaluating, metrics=metrics)
            if len(hook.records) > n:
                fork_cpu[0] += time.process_time() - f0

        w0, c0 = time.perf_counter(), time.process_time()
        train_steps(model, opt, loader, a.steps, after_step)  # the user's loop (the budgets benchmark's)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        hook.close()
        recs = hook.records
        bad = [r for r in recs if r["status"] == "failed"]
        if bad:
            raise RuntimeError(f"fork failed: {bad[0]}")
        ok = [r for r in recs if r["status"] == "ok"]
        return {
            "wall_s": wall, "cpu_s": cpu, "fork_wall_s": sum(r["seconds"] for r in ok), "fork_cpu_s": fork_cpu[0],
            "forks": [r["step"] for r in ok], "skipped": [r["step"] for r in recs if r["status"] == "skipped"],
            "cooldown_steps": sum(r["cooldown_steps"] for r in ok),
            "curve": [(r["step"] + r["cooldown_steps"], r["metrics"]["val_loss"], r["step"]) for r in ok],
            "main_final": main_val[a.steps], "main_val": main_val,
        }


def _fit(points: list, first: int, last: int):
    """Fit the forks at ``first <= S <= last``; ``None`` with fewer than three."""
    pts = [(T, v) for T, v, S in points if first <= S <= last]
    if len({T for T, _ in pts}) < 3:
        return None, pts
    T, y = zip(*pts)
    return fit_budget_curve(T, y, level=LEVEL), pts


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--steps", type=int, default=1000, help="main-branch steps N (a multiple of --every)")
    ap.add_argument("--every", type=int, default=100, help="evaluation interval (and first geometric fork)")
    ap.add_argument("--ratio", type=float, default=1.5, help="ratio of the geometric plan")
    ap.add_argument("--cap", type=float, default=0.6, help="max_overhead of the capped plan")
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--val-seqs", type=int, default=512, help="validation sequences")
    ap.add_argument("--max-bytes", type=int, default=None, help="truncate the text (default: all of it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-from", type=float, default=0.3, help="fit forks from this fraction of the run on")
    ap.add_argument("--fit-until", type=float, default=0.6, help="predict-then-measure: fit forks up to this fraction")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.warmup, args.d_model, args.n_layer = 48, 4, 3, 16, 1
        args.block, args.batch, args.val_seqs, args.max_bytes = 16, 8, 16, 60_000
    if args.steps % args.every:
        ap.error("--steps must be a multiple of --every")
    out, env = setup(args, NAME, argv)
    task = Task(args)
    N, T_star = args.steps, args.steps + COOLDOWN.length(args.steps)
    first, until = int(round(args.fit_from * N)), int(round(args.fit_until * N))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in plans(args).items():
            results[name] = task.run(plan, Path(tmp) / name)
            r = results[name]
            print(f"{name}: {len(r['forks'])} forks, {r['cooldown_steps']} cooldown steps, {r['wall_s']:.1f}s",
                  flush=True)
    ref = results["reference"]
    truth = ref["curve"][-1][1]
    base_wall, base_cpu = ref["wall_s"] - ref["fork_wall_s"], ref["cpu_s"] - ref["fork_cpu_s"]
    same_main = len({r["main_final"] for r in results.values()}) == 1
    rows_cost, rows_fit, summary = [], [], {}
    variants = [(name, plan, first) for name, plan in plans(args).items()] + \
        [("on_eval, all forks", plans(args)["on_eval"], 1)]
    for name, plan, lo in variants:
        r = results[name.split(",")[0]]
        cost = plan.cost(N, eval_every=args.every)
        assert cost.cooldown_steps == r["cooldown_steps"] and list(cost.fork_steps) == r["forks"], (name, cost, r)
        fit, pts = _fit(r["curve"], lo, N - 1)
        pred = band = None
        if fit is not None:
            pred, band = fit.predict(T_star), fit.band(T_star)
        err = None if pred is None else pred - truth
        inside = None if band is None or not all(map(math.isfinite, band)) else band[0] <= truth <= band[1]
        summary[name] = {"fork_points": len(r["forks"]), "skipped": len(r["skipped"]),
                         "cooldown_steps": r["cooldown_steps"], "ratio": r["cooldown_steps"] / N,
                         "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "wall_vs_main": r["wall_s"] / base_wall,
                         "cpu_vs_main": r["cpu_s"] / base_cpu, "fit_points": len(pts),
                         "fit": None if fit is None else {"E": fit.E, "A": fit.A, "alpha": fit.alpha,
                                                          "supported": fit.supported, "sigma": fit.sigma},
                         "predicted": pred, "band": band, "error": err, "inside_band": inside, "curve": r["curve"]}
        if name == "reference":
            continue
        rows_fit.append([name, len(pts), _f(fit.E if fit else None), _f(fit.A if fit else None, 2),
                         _f(fit.alpha if fit else None, 3), _f(pred),
                         "-" if band is None else f"{_f(band[0])} .. {_f(band[1])}", _f(truth),
                         "-" if err is None else f"{err:+.4f} ({100 * err / truth:+.2f}%)",
                         "-" if inside is None else ("yes" if inside else "no"),
                         "-" if fit is None else ("yes" if fit.supported else f"no: {fit.reason}")])
        if "," in name:
            continue
        rows_cost.append([name, len(r["forks"]), len(r["skipped"]), r["cooldown_steps"], f"{r['cooldown_steps'] / N:.2f}",
                          f"{cost.ratio:.2f}", f"{r['wall_s']:.1f}", f"{r['wall_s'] / base_wall:.2f}",
                          f"{r['cpu_s'] / base_cpu:.2f}"])
    # predict, then measure: the on_eval run's forks up to --fit-until predict its later forks
    oe = results["on_eval"]["curve"]
    fit, _ = _fit(oe, first, until)
    rows_pm, pm = [], []
    if fit is not None:
        for T, v, S in oe:
            if S <= until:
                continue
            p, (lo, hi) = fit.predict(T), fit.band(T)
            pm.append({"step": S, "T": T, "predicted": p, "band": [lo, hi], "measured": v, "error": p - v,
                       "inside_band": lo <= v <= hi})
            rows_pm.append([S, T, _f(p), f"{_f(lo)} .. {_f(hi)}", _f(v), f"{p - v:+.4f} ({100 * (p - v) / v:+.2f}%)",
                            "yes" if lo <= v <= hi else "no"])
    plots = _plot(out, summary, T_star, truth, first)
    tables = [
        (f"Cost of each plan over N = {N} main steps (evaluation every {args.every}; cooldowns 20%, c = S/4)",
         ["plan", "fork points", "skipped", "cooldown steps", "cooldown / main steps", "ForkPlan.cost ratio",
          "wall s", "wall / main only", "CPU / main only"], rows_cost),
        (f"Budget curve of each plan: fit of its forks at {first} <= S < {N}, predicting the cooled loss at "
         f"T* = {T_star}",
         ["plan", "points", "E", "A", "alpha", f"predicted L({T_star})", f"{LEVEL:.0%} band", "measured (truth)",
          "error", "in band", "fit supported"], rows_fit),
        (f"Predict, then measure: the on_eval run's forks at {first} <= S <= {until} predict its later forks",
         ["fork step S", "T = S + c", "predicted", f"{LEVEL:.0%} band", "measured", "error", "in band"], rows_pm),
    ]
    notes = [f"main-branch val loss after {N} steps identical in every run: {'yes' if same_main else 'NO'} "
             "(" + ", ".join(f"{k} {v['main_final']:.6f}" for k, v in results.items()) + ")",
             f"main only (reference run less its one fork): {base_wall:.1f} s wall, {base_cpu:.1f} s CPU; the runs "
             "are sequential, so on a shared machine wall-time ratios follow its load: read the CPU-time ratios "
             "(one torch thread: CPU time is the work)",
             "ForkPlan.cost(N, eval_every) gave each plan's fork points and cooldown steps exactly (checked)."]
    return finish(out, env, {"config": {k: v for k, v in vars(args).items() if k not in ("out",)},
                             "truth": {"T": T_star, "val_loss": truth}, "main_identical": same_main,
                             "plans": summary, "predict_then_measure": pm, "plots": plots}, tables, notes)


def _plot(out: Path, summary: dict, T_star: int, truth: float, first: int) -> list[str]:
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(["on_eval", "geometric", "capped"]):
        color = colors[i % len(colors)]
        pts = sorted(summary[name]["curve"])
        T, y = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(T, y, "o", color=color, ms=5 - i, label=f"{name}: {summary[name]['fork_points']} forks, "
                                                          f"{summary[name]['cooldown_steps']} cooldown steps")
        f = summary[name]["fit"]
        if f is not None:
            ts = np.linspace(1.25 * first, T_star * 1.05, 200)
            ax.plot(ts, f["E"] + f["A"] * ts ** -f["alpha"], "--", lw=1.1, color=color,
                    label=f"{name} fit (S >= {first}) -> {summary[name]['predicted']:.3f}")
    ax.plot([T_star], [truth], "k*", ms=12, label=f"measured at T* = {T_star}: {truth:.3f}")
    ax.axvline(1.25 * first, color="0.8", lw=0.8, zorder=0)
    ax.set(xlabel="total steps T = S + c", ylabel="cooled val loss (nats/byte)",
           title="budget curves of three fork plans on one run")
    ax.grid(lw=0.3, ls="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"{NAME}_curves.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


if __name__ == "__main__":
    main()
