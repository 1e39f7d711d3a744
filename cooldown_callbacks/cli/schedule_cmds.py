"""The schedule commands: ``plot`` (draw schedules and cooldowns), ``bound`` (optimal base LR and
bound, Schaipp et al. 2025), ``transfer`` (an LR for another cooldown), ``extend`` (continue a
finished run) and ``refine`` (a schedule from gradient norms, Defazio et al. 2023)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from .. import theory
from ..records import atomic_path, read_records
from ..schedules import WSD, Cooldown, Schedule
from ..shapes import Tabulated, shape_to_json
from .output import curve_steps, finish_figure, fmt, pyplot, save, table, values
from .parsing import (DEFAULT_COOLDOWN, ScheduleSpec, UsageError, nonneg_int, parse_cooldown, positive_float,
                      positive_int)

__all__ = ["add_parsers"]


def _cmd_plot(args: argparse.Namespace) -> int:
    specs: list[ScheduleSpec] = args.schedule
    totals = [s.kwargs["total_steps"] for s in specs if s.finite and "total_steps" in s.kwargs]
    at = sorted(args.cooldown_at or [])
    steps = args.steps
    if steps is None:
        ends = totals + [a + args.cooldown.length(a) for a in at]
        if not ends:
            raise UsageError("give --steps N (how many steps to draw)")
        steps = max(ends)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, spec in enumerate(specs):
        color = colors[i % len(colors)]
        s = spec.build(total=steps)
        if spec.finite or not at:
            x = np.arange(steps)
            ax.plot(x, args.lr * values(s, 0, steps), color=color, lw=1.8, label=spec.text)
            continue
        if args.mode == "wsd-s":
            try:
                s = s.with_cooldowns(at=at, cooldown=args.cooldown, rewarm_steps=args.rewarm)
            except ValueError as e:
                raise UsageError(f"--cooldown-at: {e}") from None
            x = np.arange(steps)
            ax.plot(x, args.lr * values(s, 0, steps), color=color, lw=1.8, label=f"{spec.text} (WSD-S)")
            continue
        x = np.arange(steps)
        ax.plot(x, args.lr * values(s, 0, steps), color=color, lw=1.8, label=f"{spec.text} (main)")
        for j, a in enumerate(at):
            cooled = s.cooled(at=a, cooldown=args.cooldown)
            c = cooled.cooldown_steps
            xb = np.arange(a, a + c + 1)
            ax.plot(xb, args.lr * values(cooled, a, a + c + 1), color=color, lw=1.4, ls="--",
                    label="cooldowns" if (i == 0 and j == 0) else None)
    for a in at:
        ax.axvline(a, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("step t (completed optimizer steps)")
    ax.set_ylabel("learning rate" if args.lr != 1.0 else "LR multiplier")
    ax.set_xlim(0, steps)
    ax.set_ylim(bottom=0)
    ax.set_title(args.title or f"schedules, cooldown {_cooldown_text(args.cooldown)}")
    ax.grid(lw=0.3, ls="--")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, args.out)
    return 0


def _cooldown_text(cd: Cooldown) -> str:
    size = f"{cd.steps} steps" if cd.steps is not None else f"{cd.fraction:g} of the run"
    return f"{size}, {cd.shape_name}" + (f" to {cd.final_ratio:g}" if cd.final_ratio else "")


# --------------------------------------------------------------------------------------------
# bound / transfer / extend
# --------------------------------------------------------------------------------------------
def _run_for(spec: ScheduleSpec | Cooldown, T: int | None, cooldown: Cooldown,
             main: ScheduleSpec | None = None) -> tuple[Schedule, int, str]:
    """The finite run a spec stands for: ``(schedule, T, label)``."""
    if isinstance(spec, Cooldown):
        if T is None:
            raise UsageError("give --steps T")
        base = main.build() if main is not None else WSD()
        label = f"{main.text if main else 'wsd'} + cooldown {_cooldown_text(spec)}"
        try:
            return theory.cooled_run(T, spec, base), T, label
        except ValueError as e:
            raise UsageError(str(e)) from None
    if spec.finite:
        s = spec.build(total=T)
        return s, s.total_steps, spec.text
    if T is None:
        raise UsageError(f"schedule {spec.text!r} has no end: give --steps T")
    try:
        return theory.cooled_run(T, cooldown, spec.build()), T, f"{spec.text} + cooldown {_cooldown_text(cooldown)}"
    except ValueError as e:
        raise UsageError(str(e)) from None


def _cmd_bound(args: argparse.Namespace) -> int:
    runs = [_run_for(spec, args.steps, args.cooldown) for spec in args.schedule]
    rows, results = [], []
    g_first = None
    for s, T, label in runs:
        g, om = theory.optimal_base_lr(s, T, D=args.D, G=args.G)
        g_first = g if g_first is None else g_first
        results.append((s, T, label, g, om))
        row = [label, str(T), fmt(g), fmt(om), f"{g / g_first:.3f}", fmt(om * math.sqrt(T), 5)]
        if args.lr is not None:
            row.append(fmt(args.lr * g / g_first, 4))
        rows.append(row)
    headers = ["schedule", "T", "gamma*", "Omega*", "gamma*/first", "Omega*·sqrt(T)"]
    if args.lr is not None:
        headers.append("lr")
    print(table(headers, rows))
    print(f"(D = {args.D:g}, G = {args.G:g}; "
          + ("lr: --lr for the first schedule, transferred to the others)" if args.lr is not None
             else "pass --lr to transfer a tuned LR of the first schedule to the others)"))
    if args.plot:
        plt = pyplot()
        fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
        for s, T, label, g, om in results:
            eta = values(s, 0, T)
            axs[0].plot(np.arange(1, T + 1), g * eta, lw=1.6, label=label)
            ts = curve_steps(T)
            axs[1].plot(ts, theory.bound_curve(eta, D=args.D, G=args.G, base_lr=g, at=ts), lw=1.6, label=label)
        axs[0].set(xlabel="update t", ylabel=r"$\gamma^\star\eta_t$", title="schedules at their optimal base LR")
        axs[1].set(xlabel="update t", ylabel=r"$\Omega_t$", yscale="log", title="predicted loss curve (bound)")
        finish_figure(fig, axs, args.plot)
    return 0




def _cmd_transfer(args: argparse.Namespace) -> int:
    s_from, T_from, l_from = _run_for(args.source, args.steps, args.cooldown, args.main)
    s_to, T_to, l_to = _run_for(args.target, args.steps, args.cooldown, args.main)
    g_from, _ = theory.optimal_base_lr(s_from, T_from)
    g_to, _ = theory.optimal_base_lr(s_to, T_to)
    lr = args.lr * g_to / g_from
    print(table(["", "schedule", "T", "gamma*", "lr"],
                 [["from", l_from, str(T_from), fmt(g_from), fmt(args.lr, 4)],
                  ["to", l_to, str(T_to), fmt(g_to), fmt(lr, 4)]]))
    print(f"lr for the target: {lr:.4g}  (x{g_to / g_from:.4f})")
    return 0


def _cmd_extend(args: argparse.Namespace) -> int:
    try:
        e = theory.extend(args.from_steps, args.to_steps, lr=args.lr, cooldown=args.cooldown,
                          criterion=args.criterion, D=args.D, G=args.G)
    except ValueError as err:
        raise UsageError(str(err)) from None
    cd = _cooldown_text(args.cooldown)
    longest = " (the longest that reuses the checkpoint)" if e.cooldown_steps == e.T2 - e.fork_step else ""
    print(f"first run: T1 = {e.T1} updates, lr {e.lr:.4g} constant to step {e.fork_step}, then cooldown {cd}")
    print(f"extend to T2 = {e.T2} from the constant-LR checkpoint at step {e.fork_step} "
          f"(criterion: {e.criterion}):")
    rows = [
        ["(i) scale lr", f"rho = {e.rho:.4f}: lr {e.rho_lr:.4g} from step {e.fork_step}, "
                         f"cooldown of the last {e.rho_cooldown_steps} steps", fmt(e.rho_bound)],
        ["(ii) longer cooldown", f"lr {e.lr:.4g}, cooldown from step {e.T2 - e.cooldown_steps} "
                                 f"({e.cooldown_steps} steps){longest}", fmt(e.cooldown_bound)],
        ["naive", f"lr {e.lr:.4g}, same cooldown spec ({e.rho_cooldown_steps} steps)", fmt(e.naive_bound)],
        ["from scratch", "cooled run of T2 at its own optimal lr", fmt(e.tuned_bound)],
    ]
    print(table(["option", "recipe", "bound"], rows))
    if args.plot:
        plt = pyplot()
        fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
        gamma, _ = theory.optimal_base_lr(theory.cooled_run(e.T1, args.cooldown), D=args.D, G=args.G)
        ts = curve_steps(e.T2)
        for name, label in [("rho", f"(i) rho = {e.rho:.3f}"), ("cooldown", f"(ii) cooldown {e.cooldown_steps}"),
                            ("naive", "naive")]:
            eta = e.rates(name)
            axs[0].plot(np.arange(1, e.T2 + 1), e.lr * eta, lw=1.6, label=label)
            axs[1].plot(ts, theory.bound_curve(eta, D=args.D, G=args.G, base_lr=gamma, at=ts), lw=1.6, label=label)
        for ax in axs:
            ax.axvline(e.fork_step, color="0.7", lw=0.8, ls=":")
            ax.grid(lw=0.3, ls="--")
            ax.legend(fontsize=8)
        axs[0].set(xlabel="update t", ylabel="learning rate", title=f"extending {e.T1} -> {e.T2}")
        axs[1].set(xlabel="update t", ylabel=r"$\Omega_t$", yscale="log", title="predicted loss curve (bound)")
        fig.tight_layout()
        save(fig, args.plot)
    return 0


# --------------------------------------------------------------------------------------------
# refine
# --------------------------------------------------------------------------------------------
def _read_grad_norms(path: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file; give a CSV of gradient norms or a forks.jsonl / run directory")
    if p.is_dir() or p.suffix in (".jsonl", ".json"):
        records = sorted(read_records(p), key=lambda r: r.get("step", 0))
        norms: list = []
        for r in records:
            if r.get("grad_norms"):
                norms.extend(r["grad_norms"])
        if not norms:
            raise UsageError(f"{path}: no record has grad_norms; run with ForkPlan(record_grad_norms=True) "
                             f"or give a CSV of gradient norms")
        try:
            return np.asarray([float(x) for x in norms], dtype=np.float64)
        except (TypeError, ValueError):
            raise UsageError(f"{path}: grad_norms must be numbers") from None
    text = p.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UsageError(f"{path}: empty file; give one gradient norm per line or a column named grad_norm")
    first = lines[0].strip()
    try:
        float(first.split(",")[0])
        has_header = False
    except ValueError:
        has_header = True
    if has_header:
        reader = csv.DictReader(io.StringIO("\n".join(lines)))
        cols = [c.strip() for c in (reader.fieldnames or [])]
        col = next((c for c in reader.fieldnames or [] if c.strip() in ("grad_norm", "grad_norms")), None)
        if col is None:
            raise UsageError(f"{path}: no column named grad_norm (columns: {', '.join(cols)})")
        values = [row[col] for row in reader]
    else:
        if "," in first:
            raise UsageError(f"{path}: several columns but no header; name the column grad_norm")
        values = lines
    try:
        return np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path}: not a number ({e}); give one gradient norm per line") from None


def _cmd_refine(args: argparse.Namespace) -> int:
    norms = _read_grad_norms(args.input)
    try:
        eta = theory.refine_rates(norms, optimizer=args.optimizer, smoothing=args.smoothing)
    except ValueError as e:
        raise UsageError(str(e)) from None
    N = eta.shape[0]
    shape = Tabulated(tuple(eta.tolist()))
    ps = np.linspace(0.0, 1.0, args.points)
    rows = [[f"{p:.3f}", f"{shape(float(p)):.4f}", f"{1.0 - p:.4f}"] for p in ps]
    print(f"refined schedule from {N} gradient norms ({args.optimizer}, smoothing {args.smoothing:g}), "
          "as a cooldown shape f(p), p = progress:")
    print(table(["p", "refined", "linear"], rows))
    if args.save:
        data = (json.dumps(shape_to_json(shape)) + "\n").encode()
        with atomic_path(args.save) as tmp:
            tmp.write_bytes(data)
        print(f"wrote {args.save} (load with cooldown_callbacks.shapes.shape_from_json, "
              "use as Cooldown(steps=c, shape=...))")
    if args.plot:
        plt = pyplot()
        fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
        x = np.arange(N)
        axs[0].plot(x, norms, lw=0.8, alpha=0.5, label="gradient norm")
        axs[0].plot(x, theory.smooth_grad_norms(norms, args.smoothing), lw=1.8, label="median-smoothed")
        axs[0].set(xlabel="step", ylabel="gradient norm", title="input")
        p = x / max(1, N - 1)
        axs[1].plot(p, np.asarray(shape.values), lw=1.8, label="refined")
        axs[1].plot(p, 1.0 - p, lw=1.2, ls="--", label="linear")
        axs[1].set(xlabel="progress p", ylabel="LR / LR at start", title="refined schedule")
        finish_figure(fig, axs, args.plot)
    return 0



def add_parsers(add: Callable[..., argparse.ArgumentParser], schedule_t: Callable, cooldown_t: Callable,
                spec_t: Callable) -> None:
    """Register plot, bound, transfer, extend and refine (``add(name, help, description, specs=True)``)."""
    p = add("plot", "draw schedules and their cooldowns to a PNG",
            "Draw one or more schedules; indefinite ones (wsd, rsqrt, noam) with a cooldown branch at each "
            "--cooldown-at step.\nexample: cooldown-callbacks plot --schedule wsd:warmup=100 --schedule "
            "rsqrt:warmup=100 --schedule cosine:total=1000 --cooldown-at 500 800 --cooldown "
            "fraction=0.2,shape=1-sqrt --steps 1000 --out sched.png")
    p.add_argument("--schedule", type=schedule_t, action="append", required=True, metavar="SPEC",
                   help="a schedule spec (repeat for several)")
    p.add_argument("--cooldown-at", type=nonneg_int, nargs="+", metavar="STEP",
                   help="fork steps of the cooldown branches")
    p.add_argument("--cooldown", type=cooldown_t, default=parse_cooldown(DEFAULT_COOLDOWN), metavar="SPEC",
                   help=f"cooldown spec (default {DEFAULT_COOLDOWN})")
    p.add_argument("--mode", choices=("branch", "wsd-s"), default="branch",
                   help="branch: cooldowns fork off the main branch; wsd-s: the main branch itself decays and "
                        "jumps back (Wen et al. 2024) (default: %(default)s)")
    p.add_argument("--rewarm", type=nonneg_int, default=0,
                   help="re-warm steps after each decay in wsd-s mode (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, help="steps to draw (default: the longest run)")
    p.add_argument("--lr", type=positive_float, default=1.0,
                   help="peak learning rate (y axis scale) (default: %(default)s)")
    p.add_argument("--title", help="plot title")
    p.add_argument("--out", required=True, help="output PNG path")
    p.set_defaults(func=_cmd_plot)

    p = add("bound", "optimal base LR and bound of schedules at T updates",
            "Print gamma* (the optimal base LR) and Omega* (the bound at gamma*) of each schedule over T "
            "updates; indefinite schedules are cooled down to end at T.\nexample: cooldown-callbacks bound "
            "--schedule cosine --schedule wsd --cooldown fraction=0.2,shape=linear --steps 1000 --plot b.png")
    p.add_argument("--schedule", type=schedule_t, action="append", required=True, metavar="SPEC",
                   help="a schedule spec (repeat for several)")
    p.add_argument("--steps", type=positive_int, help="T, the number of updates (default: total= of the spec)")
    p.add_argument("--cooldown", type=cooldown_t, default=parse_cooldown(DEFAULT_COOLDOWN), metavar="SPEC",
                   help=f"cooldown spec for indefinite schedules (default {DEFAULT_COOLDOWN})")
    p.add_argument("-D", type=positive_float, default=1.0,
                   help="distance to the solution ||x_1 - x*|| (default: %(default)s)")
    p.add_argument("-G", type=positive_float, default=1.0, help="gradient norm bound (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, help="a tuned LR of the first schedule, to transfer to the others")
    p.add_argument("--plot", metavar="PNG", help="draw schedules at gamma* and their predicted loss curves")
    p.set_defaults(func=_cmd_bound)

    p = add("transfer", "base LR for another cooldown length or schedule",
            "Scale a tuned LR to another cooldown (or schedule) so the bound stays optimal: "
            "lr * gamma*(to) / gamma*(from).\nexample: cooldown-callbacks transfer --lr 1e-3 --from "
            "fraction=0.2,shape=linear --to cosine --steps 10000")
    p.add_argument("--lr", type=positive_float, required=True, help="the tuned LR of --from")
    p.add_argument("--from", dest="source", type=spec_t, required=True, metavar="SPEC",
                   help="cooldown spec (of --main) or schedule spec the LR was tuned for")
    p.add_argument("--to", dest="target", type=spec_t, required=True, metavar="SPEC",
                   help="cooldown spec or schedule spec to transfer to")
    p.add_argument("--steps", type=positive_int, help="T, the number of updates")
    p.add_argument("--main", type=schedule_t, default=None, metavar="SPEC",
                   help="main branch cooled by cooldown specs (default wsd)")
    p.add_argument("--cooldown", type=cooldown_t, default=parse_cooldown(DEFAULT_COOLDOWN), metavar="SPEC",
                   help="cooldown for indefinite schedule specs")
    p.set_defaults(func=_cmd_transfer)

    p = add("extend", "continue a finished run to more steps",
            "A run of T1 updates (constant LR, then a cooldown) should go on to T2. From the constant-LR "
            "checkpoint at its fork step: (i) scale the LR by rho, or (ii) keep the LR and use a longer "
            "cooldown (Schaipp et al. 2025).\nexample: cooldown-callbacks extend --from-steps 4000 "
            "--to-steps 8000 --lr 1e-3 --cooldown fraction=0.2,shape=linear")
    p.add_argument("--from-steps", type=positive_int, required=True, metavar="T1", help="length of the finished run")
    p.add_argument("--to-steps", type=positive_int, required=True, metavar="T2", help="new length, > T1")
    p.add_argument("--lr", type=positive_float, default=1.0,
                   help="the (tuned) LR of the first run (default: %(default)s)")
    p.add_argument("--cooldown", type=cooldown_t, default=parse_cooldown("fraction=0.2,shape=linear"),
                   metavar="SPEC", help="the cooldown spec of both runs (default: fraction=0.2,shape=linear)")
    p.add_argument("--criterion", choices=theory.CRITERIA, default="minimize",
                   help="minimize: lowest bound at the LR already used; match: the LR already used is optimal"
                        " (default: %(default)s)")
    p.add_argument("-D", type=positive_float, default=1.0, help="distance to the solution (default: %(default)s)")
    p.add_argument("-G", type=positive_float, default=1.0, help="gradient norm bound (default: %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="draw the options and their predicted loss curves")
    p.set_defaults(func=_cmd_extend)

    p = add("refine", "refined schedule from recorded gradient norms",
            "Refine a schedule from the per-step gradient norms of an earlier run (Defazio et al. 2023): "
            "median-smooth, weights g^-2 (sgd) or g^-1 (adam). INPUT is a CSV (one norm per line, or a "
            "column named grad_norm) or a forks.jsonl / run directory whose records' grad_norms are "
            "concatenated.\nexample: cooldown-callbacks refine norms.csv --optimizer adam --save refined.json",
            specs=False)
    p.add_argument("input", metavar="INPUT", help="CSV file, forks.jsonl or run directory")
    p.add_argument("--optimizer", choices=theory.OPTIMIZERS, default="sgd",
                   help="sgd: l2 norms; adam: l1 norms (default: %(default)s)")
    p.add_argument("--smoothing", type=positive_float, default=0.1,
                   help="median window as a fraction of the number of steps, in (0, 1] (default: %(default)s)")
    p.add_argument("--points", type=positive_int, default=11,
                   help="rows of the printed table (default: %(default)s)")
    p.add_argument("--save", metavar="JSON", help="write the shape as {\"tabulated\": [...]}")
    p.add_argument("--plot", metavar="PNG", help="draw the norms and the refined schedule")
    p.set_defaults(func=_cmd_refine)
