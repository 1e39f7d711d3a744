"""Benchmark 4 (the headline): one WSD run with forks at K budgets vs. K separate cosine runs.

Task: byte-level language modelling of the Python standard library's sources (``examples/charlm.py``:
real text, offline), TinyGPT, AdamW (betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0,
fixed seeds, one data order for every run (a ``StatefulDataLoader`` with a seeded shuffle, so the
cooldown of a fork sees exactly the batches a fixed-budget run sees: ``ForkPlan(data="peek")``).

For each base LR of a small grid:

- **forked (WSD)**: one main run at constant LR after ``--warmup`` steps, driven by
  ``CooldownHook``; at ``S_i = 0.8 T_i`` it forks a cooldown of ``c_i = 0.2 T_i`` steps to zero
  (``Cooldown(fraction=0.2)``, 1-sqrt), evaluates the cooled model, restores the main branch and goes
  on. A second fork at the same step with a *linear* cooldown gives the 1-sqrt vs. linear comparison.
  The main branch is also evaluated at ``S_i`` and at ``T_i`` (same number of steps as the budget,
  no cooldown), so the run goes on to ``T_max``.
- **separate (cosine)**: one run per budget ``T_i`` with warmup + cosine to 0 over ``T_i`` steps.

Per budget, each approach's best LR is picked from the grid. The grid is extended by factors of 2 on
the side where any family's best LR (cooled 1-sqrt, cooled linear, cosine, main branch) sits at the
edge, until every best LR is strictly inside it (or ``--max-extensions`` per side are spent: then the
result says which are not bracketed). Reported: cooled (1-sqrt and linear), cosine and main-branch val
loss; best LRs; the grid's history; optimizer steps and wall time of both approaches (the forked
approach as a user runs it: main branch to ``S_max`` plus the K 1-sqrt forks - the linear forks and the
main-branch evaluations are measurement extras, timed and reported separately).

Two settings (``--setting``): ``small`` (137k parameters, T <= 1000; results ``bench_budgets.*``), far
from the papers' regime (constant LR beats cosine there), and ``regime`` (31k parameters, T <= 2000,
131 tokens per parameter; results ``bench_budgets_regime.*``), where the constant-LR curve has
flattened and constant LR ends clearly above cosine, as in the papers (see ``SETTINGS``).

    .venv/bin/python benchmarks/bench_budgets.py                    # ~20 min on one core
    .venv/bin/python benchmarks/bench_budgets.py --setting regime   # ~10-15 min on one core
    .venv/bin/python benchmarks/bench_budgets.py --quick            # seconds; numbers meaningless
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EXAMPLES, base_parser, finish, pyplot, setup  # noqa: E402

sys.path.insert(0, str(EXAMPLES))
from charlm import TinyGPT, splits  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan, cosine  # noqa: E402
from cooldown_callbacks.integrations.accelerate import CooldownHook  # noqa: E402

NAME = "bench_budgets"
FRACTION = 0.2


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


class Task:
    def __init__(self, args) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.args = args
        self.train, val = splits(block_size=args.block, max_bytes=args.max_bytes)
        self.val = Subset(val, range(min(len(val), args.val_seqs))) if args.val_seqs else val
        self.val_loader = DataLoader(self.val, batch_size=64)
        self._loader_cls = StatefulDataLoader

    def loader(self):
        return self._loader_cls(self.train, batch_size=self.args.batch, shuffle=True, drop_last=True,
                                generator=torch.Generator().manual_seed(self.args.seed))

    def model_opt(self, lr: float):
        torch.manual_seed(self.args.seed)
        a = self.args
        model = TinyGPT(d_model=a.d_model, n_layer=a.n_layer, n_head=4, block_size=a.block)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
        return model, opt

    def evaluate(self, model) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            v = model.evaluate(self.val_loader)
        model.train(was)
        return v


def train_steps(model, opt, loader, steps: int, after_step) -> None:
    """The user's loop: ``steps`` optimizer steps, ``after_step(t)`` after each (t = steps done)."""
    t = 0
    model.train()
    while t < steps:
        for batch in loader:
            loss = _loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            t += 1
            after_step(t)
            if t == steps:
                break


def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds; with one torch thread CPU time measures the work, whatever the machine's load."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    w, c = clocks()
    return w - t0[0], c - t0[1]


def run_cosine(task: Task, lr: float, T: int) -> dict:
    model, opt = task.model_opt(lr)
    sched = cosine(T, warmup_steps=task.args.warmup).lambda_lr(opt)
    t0 = clocks()
    train_steps(model, opt, task.loader(), T, lambda t: sched.step())
    val = task.evaluate(model)
    wall, cpu = since(t0)
    return {"lr": lr, "T": T, "val_loss": val, "wall_s": wall, "cpu_s": cpu}


def run_wsd_fixed(task: Task, lr: float, T: int) -> dict:
    """A fixed-budget WSD run (LambdaLR over ``WSD.cooled``): what a fork must equal, bit for bit."""
    S = int(round((1 - FRACTION) * T))
    model, opt = task.model_opt(lr)
    sched = WSD(warmup_steps=task.args.warmup).cooled(at=S, cooldown=Cooldown(fraction=FRACTION, shape="1-sqrt"))
    lam = sched.lambda_lr(opt)
    t0 = time.perf_counter()
    train_steps(model, opt, task.loader(), T, lambda t: lam.step())
    return {"lr": lr, "T": T, "val_loss": task.evaluate(model), "wall_s": time.perf_counter() - t0}


def run_forked(task: Task, lr: float, budgets: list[int], dirpath: Path) -> dict:
    """One WSD main run to max(budgets) with 1-sqrt and linear forks at 0.8 T for each budget T."""
    a = task.args
    forks = [int(round((1 - FRACTION) * T)) for T in budgets]
    for T, S in zip(budgets, forks):
        c = Cooldown(fraction=FRACTION).length(S)
        if S + c != T:
            raise ValueError(f"Invalid budget {T}: 0.8*T must give a cooldown of 0.2*T steps; use multiples of 5.")
    model, opt = task.model_opt(lr)
    loader = task.loader()
    # one plan, two cooldowns per fork point: both from the same main-branch state, the main branch
    # restored after each
    plan = ForkPlan(at=forks, cooldown=[Cooldown(fraction=FRACTION, shape="1-sqrt"),
                                        Cooldown(fraction=FRACTION, shape="linear")], data="peek")
    hook = CooldownHook(model, opt, schedule=WSD(warmup_steps=a.warmup), plan=plan, loss_fn=_loss,
                        eval_fn=lambda m: {"val_loss": task.evaluate(m)}, train_loader=loader, max_grad_norm=1.0,
                        dirpath=dirpath, verbose=False)
    main_val: dict[int, float] = {}
    clock = {"main_eval_s": 0.0, "main_eval_cpu_s": 0.0, "linear_fork_s": 0.0, "linear_fork_cpu_s": 0.0,
             "onesqrt_fork_s": 0.0, "wall_until_last_fork_s": None, "cpu_until_last_fork_s": None}
    t0 = clocks()
    lrs: list[float] = []

    def after_step(t: int) -> None:
        metrics = None
        if t in forks or t in budgets:
            te = clocks()
            main_val[t] = task.evaluate(model)
            w, c = since(te)
            clock["main_eval_s"] += w
            clock["main_eval_cpu_s"] += c
            metrics = {"val_loss": main_val[t]}
        n = len(hook.records)
        tf = clocks()
        hook.step(metrics=metrics if t in forks else None)
        w, c = since(tf)
        new = hook.records[n:]
        if new:
            # the fork point's wall/CPU time is split between its two forks in proportion to their
            # records' own seconds (each record times its fork: train, evaluate, save, restore)
            total = sum(r["seconds"] for r in new) or 1.0
            lin = sum(r["seconds"] for r in new if r["shape"] == "linear") / total
            clock["onesqrt_fork_s"] += sum(r["seconds"] for r in new if r["shape"] == "1-sqrt")
            clock["linear_fork_s"] += lin * w
            clock["linear_fork_cpu_s"] += lin * c
        if t == max(forks):
            clock["wall_until_last_fork_s"], clock["cpu_until_last_fork_s"] = since(t0)
        lrs.append(opt.param_groups[0]["lr"])

    train_steps(model, opt, loader, max(budgets), after_step)
    wall, cpu = since(t0)
    hook.close()
    recs = hook.records
    cooled = {}
    for r in recs:
        if r["status"] != "ok":
            raise RuntimeError(f"fork failed: {r}")
        cooled.setdefault(r["shape"], {})[r["step"] + r["cooldown_steps"]] = r["metrics"]["val_loss"]
    # the forked approach as a user runs it: main branch to S_max plus the 1-sqrt forks (no linear forks and
    # no main-branch evaluations, which this benchmark adds for the comparison)
    evals_before = sum(1 for t in main_val if t <= max(forks)) / max(1, len(main_val))
    forked_wall = clock["wall_until_last_fork_s"] - clock["linear_fork_s"] - evals_before * clock["main_eval_s"]
    forked_cpu = clock["cpu_until_last_fork_s"] - clock["linear_fork_cpu_s"] - evals_before * clock["main_eval_cpu_s"]
    return {"lr": lr, "budgets": budgets, "forks": forks, "cooled_1-sqrt": cooled.get("1-sqrt", {}),
            "cooled_linear": cooled.get("linear", {}), "main_val": main_val, "records": recs,
            "wall_s": wall, "cpu_s": cpu, "forked_approach_wall_s": forked_wall, "forked_approach_cpu_s": forked_cpu,
            "forked_approach_steps": max(forks) + sum(T - S for T, S in zip(budgets, forks)), **clock}


# Settings of the task.
# "small": a 137k-parameter model for T <= 1000 steps (2M tokens): far from the papers' regime; the loss still
#   falls steeply, and constant LR without any cooldown beats cosine-to-0 there.
# "regime": a 31k-parameter model (d_model 32, 1 layer) for T <= 2000 steps (4.1M tokens, 131 per parameter,
#   2.4 epochs), chosen with benchmarks/regime_probe.py (library-free, T = 2000, LRs 2e-3..3.2e-2): the
#   constant-LR curve has flattened, constant LR ends 8.2% above cosine-to-0 (1.871 vs 1.729 nats/byte, best
#   LR of each), WSD with a 20% 1-sqrt cooldown ends 0.8% below cosine (1.715), and cosine's best LR is >= 2x
#   WSD's (3.2e-2 vs 1.6e-2): the three claims of the papers, qualitatively. About 10 min per run on one core.
SETTINGS = {
    "small": dict(budgets="250,500,750,1000", lrs="2e-3,4e-3,8e-3", warmup=25, d_model=64, n_layer=2, block=64,
                  batch=32, max_bytes=None, val_seqs=0),
    "regime": dict(budgets="500,1000,1500,2000", lrs="2e-3,4e-3,8e-3,1.6e-2,3.2e-2,6.4e-2", warmup=50, d_model=32,
                   n_layer=1, block=64, batch=32, max_bytes=None, val_seqs=0),
}
QUICK = dict(budgets="10,20", lrs="2e-3,4e-3", warmup=2, d_model=16, n_layer=1, batch=4, val_seqs=16,
             max_bytes=200_000)
# The families whose best LR must lie strictly inside the grid (key in run_forked's result, or "cosine").
FAMILIES = ("cooled_1-sqrt", "cooled_linear", "cosine", "main_val")


def best_lr(values: dict[float, float]) -> tuple[float, float]:
    lr = min(values, key=lambda k: values[k])
    return lr, values[lr]


def family_values(forked: dict, cos: dict, family: str, T: int, lrs: Sequence[float]) -> dict[float, float]:
    if family == "cosine":
        return {lr: cos[(lr, T)]["val_loss"] for lr in lrs}
    return {lr: forked[lr][family][T] for lr in lrs}


def edges(forked: dict, cos: dict, budgets: Sequence[int], lrs: Sequence[float]) -> list[dict]:
    """Every (family, budget) whose best LR is the lowest or the highest of the grid (not bracketed)."""
    out = []
    for family in FAMILIES:
        for T in budgets:
            lr, _ = best_lr(family_values(forked, cos, family, T, lrs))
            if lr in (lrs[0], lrs[-1]):
                out.append({"family": family, "T": T, "lr": lr, "side": "low" if lr == lrs[0] else "high"})
    return out


def describe_grid(initial: Sequence[float], final: Sequence[float], extensions: list[dict], unbracketed: list[dict],
                  max_extensions: int) -> str:
    """One sentence on how the LR grid grew and whether every best LR ended up strictly inside it."""
    def lrs(xs: Sequence[float]) -> str:
        return ", ".join(f"{x:g}" for x in xs)

    parts = [f"LR grid: started at {lrs(initial)}"]
    for e in extensions:
        why = sorted({f"{a['family']} T={a['T']} best at the {a['side']} edge" for a in e["because"]})
        parts.append(f"added {lrs(e['added'])} ({', '.join(why)})")
    text = "; ".join(parts) + f"; final grid {lrs(final)}. "
    if not unbracketed:
        return text + ("Every best LR (cooled 1-sqrt, cooled linear, cosine, main branch; every budget) lies strictly "
                       "inside the grid.")
    return text + (f"NOT BRACKETED after {max_extensions} extension(s) per side: "
                   + ", ".join(f"{a['family']} T={a['T']} (best {a['lr']:g}, {a['side']} edge)" for a in unbracketed))


def main(argv: Sequence[str] | None = None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="small",
                    help="task preset: 'small' (137k params, T <= 1000; results bench_budgets.*) or 'regime' "
                         "(closer to the papers' regime; results bench_budgets_regime.*); options below override it")
    ap.add_argument("--budgets", default=None, help="total steps T of each cooled / cosine run")
    ap.add_argument("--lrs", default=None, help="initial base LR grid (the same for cosine and WSD); it is extended "
                    "by factors of 2 on the side where a best LR sits at the edge")
    ap.add_argument("--max-extensions", type=int, default=4, help="at most this many LR grid extensions per side "
                    "(default 4); a best LR still at an edge after that is reported as not bracketed")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--n-layer", type=int, default=None)
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--val-seqs", type=int, default=None, help="validation sequences (0: the whole split)")
    ap.add_argument("--max-bytes", type=int, default=None, help="truncate the text (default: all of it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNGs from a results JSON of this benchmark "
                    "(next to it), without training")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    preset = {**SETTINGS[args.setting], **(QUICK if args.quick else {})}
    if args.quick:
        args.max_extensions = min(args.max_extensions, 1)
    for key, value in preset.items():
        if getattr(args, key) is None or args.quick:
            setattr(args, key, value)
    budgets = sorted(int(x) for x in args.budgets.split(","))
    lrs = sorted(float(x) for x in args.lrs.split(","))
    initial_lrs = list(lrs)
    name = NAME if args.setting == "small" else f"{NAME}_{args.setting}"
    out, env = setup(args, name, argv, script=NAME)
    task = Task(args)
    n_params = sum(p.numel() for p in task.model_opt(1e-3)[0].parameters())
    tmp = Path(tempfile.mkdtemp(prefix="bench-budgets-"))

    t_all = time.perf_counter()
    forked, cos = {}, {}
    def forked_run(lr: float) -> None:
        forked[lr] = run_forked(task, lr, budgets, tmp / f"lr{lr:g}")
        print(f"[wsd lr={lr:g}] cooled 1-sqrt {forked[lr]['cooled_1-sqrt']} linear {forked[lr]['cooled_linear']} "
              f"main {forked[lr]['main_val']} ({forked[lr]['wall_s']:.0f}s)", flush=True)

    def cosine_runs(lr: float) -> None:
        for T in budgets:
            cos[(lr, T)] = run_cosine(task, lr, T)
            print(f"[cosine lr={lr:g} T={T}] val {cos[(lr, T)]['val_loss']:.4f} ({cos[(lr, T)]['wall_s']:.0f}s)",
                  flush=True)

    def run_lr(i: int, lr: float) -> None:  # alternate which approach goes first, so load drifts hit both alike
        for step in ((forked_run, cosine_runs) if i % 2 == 0 else (cosine_runs, forked_run)):
            step(lr)

    for i, lr in enumerate(lrs):
        run_lr(i, lr)
    # extend the grid until every family's best LR at every budget is strictly inside it
    extensions: list[dict] = []
    used = {"low": 0, "high": 0}
    while True:
        at_edge = edges(forked, cos, budgets, lrs)
        sides = {e["side"] for e in at_edge if used[e["side"]] < args.max_extensions}
        if not sides:
            break
        added = sorted(({lrs[0] / 2} if "low" in sides else set()) | ({lrs[-1] * 2} if "high" in sides else set()))
        for side in sides:
            used[side] += 1
        print(f"[grid] best LR at the edge for {len(at_edge)} (family, budget) pairs: adding {added}", flush=True)
        for lr in added:
            run_lr(len(forked), lr)
        extensions.append({"added": added, "because": at_edge})
        lrs = sorted(lrs + added)
    unbracketed = edges(forked, cos, budgets, lrs)
    grid_note = describe_grid(initial_lrs, lrs, extensions, unbracketed, args.max_extensions)
    print(f"[grid] {grid_note}", flush=True)
    total_s = time.perf_counter() - t_all
    # check: the fork at the smallest budget equals a separate fixed-budget WSD run (same LR, same data)
    lr_chk = initial_lrs[len(initial_lrs) // 2]
    fixed = run_wsd_fixed(task, lr_chk, budgets[0])
    fork_v = forked[lr_chk]["cooled_1-sqrt"][budgets[0]]
    check = {"lr": lr_chk, "T": budgets[0], "fork_val_loss": fork_v, "fixed_run_val_loss": fixed["val_loss"],
             "identical": fork_v == fixed["val_loss"], "fixed_run_wall_s": fixed["wall_s"]}
    print(f"[check] fork {fork_v!r} vs fixed-budget WSD run {fixed['val_loss']!r}: "
          f"{'identical' if check['identical'] else 'DIFFERENT'}", flush=True)

    def edge(lr: float) -> str:
        return "" if lrs[0] < lr < lrs[-1] else ", grid edge"

    rows, per_budget = [], []
    for T in budgets:
        c_lr, c_v = best_lr(family_values(forked, cos, "cooled_1-sqrt", T, lrs))
        l_lr, l_v = best_lr(family_values(forked, cos, "cooled_linear", T, lrs))
        k_lr, k_v = best_lr(family_values(forked, cos, "cosine", T, lrs))
        m_lr, m_v = best_lr(family_values(forked, cos, "main_val", T, lrs))
        m_same = forked[c_lr]["main_val"][T]
        d = {"T": T, "fork_step": int(round((1 - FRACTION) * T)), "cooldown_steps": T - int(round((1 - FRACTION) * T)),
             "cooled_1sqrt": c_v, "cooled_1sqrt_lr": c_lr, "cooled_linear": l_v, "cooled_linear_lr": l_lr,
             "cosine": k_v, "cosine_lr": k_lr, "main_branch_best": m_v, "main_branch_best_lr": m_lr,
             "main_branch_at_cooled_lr": m_same, "cooled_vs_cosine_pct": (c_v / k_v - 1) * 100,
             "linear_vs_1sqrt_pct": (l_v / c_v - 1) * 100, "main_vs_cosine_pct": (m_v / k_v - 1) * 100,
             "cosine_lr_over_wsd_lr": k_lr / c_lr}
        per_budget.append(d)
        d["bracketed"] = {f: not any(a["family"] == f and a["T"] == T for a in unbracketed) for f in FAMILIES}
        rows.append([T, f"{d['fork_step']}+{d['cooldown_steps']}", f"{c_v:.4f} ({c_lr:g}{edge(c_lr)})",
                     f"{l_v:.4f} ({l_lr:g}{edge(l_lr)})", f"{k_v:.4f} ({k_lr:g}{edge(k_lr)})",
                     f"{m_v:.4f} ({m_lr:g}{edge(m_lr)})", f"{d['cooled_vs_cosine_pct']:+.2f}%",
                     f"{d['linear_vs_1sqrt_pct']:+.2f}%", f"{d['main_vs_cosine_pct']:+.2f}%",
                     f"{d['cosine_lr_over_wsd_lr']:g}"])
    grid_rows = []
    for lr in lrs:
        for T in budgets:
            f = forked[lr]
            grid_rows.append([f"{lr:g}", T, f"{f['cooled_1-sqrt'][T]:.4f}", f"{f['cooled_linear'][T]:.4f}",
                              f"{cos[(lr, T)]['val_loss']:.4f}", f"{f['main_val'][T]:.4f}"])
    # cost of the two approaches (per LR of the grid, and for the whole grid)
    cos_steps = sum(budgets)
    cost_rows, cost = [], {}
    for lr in lrs:
        f = forked[lr]
        cos_wall = sum(cos[(lr, T)]["wall_s"] for T in budgets)
        cos_cpu = sum(cos[(lr, T)]["cpu_s"] for T in budgets)
        cost[lr] = {"forked_steps": f["forked_approach_steps"], "cosine_steps": cos_steps,
                    "forked_wall_s": f["forked_approach_wall_s"], "cosine_wall_s": cos_wall,
                    "forked_cpu_s": f["forked_approach_cpu_s"], "cosine_cpu_s": cos_cpu,
                    "measured_run_wall_s": f["wall_s"], "linear_fork_s": f["linear_fork_s"],
                    "main_eval_s": f["main_eval_s"]}
        cost_rows.append([f"{lr:g}", f["forked_approach_steps"], cos_steps,
                          f"{f['forked_approach_steps'] / cos_steps:.2f}", f"{f['forked_approach_wall_s']:.1f}",
                          f"{cos_wall:.1f}", f"{f['forked_approach_wall_s'] / cos_wall:.2f}",
                          f"{f['forked_approach_cpu_s']:.1f}", f"{cos_cpu:.1f}",
                          f"{f['forked_approach_cpu_s'] / cos_cpu:.2f}"])
    tot_f = sum(c["forked_wall_s"] for c in cost.values())
    tot_c = sum(c["cosine_wall_s"] for c in cost.values())
    tot_fc = sum(c["forked_cpu_s"] for c in cost.values())
    tot_cc = sum(c["cosine_cpu_s"] for c in cost.values())
    tot_fs = sum(c["forked_steps"] for c in cost.values())
    cost_rows.append(["grid total", tot_fs, cos_steps * len(lrs), f"{tot_fs / (cos_steps * len(lrs)):.2f}",
                      f"{tot_f:.1f}", f"{tot_c:.1f}", f"{tot_f / tot_c:.2f}", f"{tot_fc:.1f}", f"{tot_cc:.1f}",
                      f"{tot_fc / tot_cc:.2f}"])
    plots = _plot(out, budgets, lrs, forked, cos, per_budget, args, name=name)
    result = {
        "config": {"setting": args.setting, "budgets": budgets, "lrs": lrs, "initial_lrs": initial_lrs,
                   "max_extensions": args.max_extensions, "warmup": args.warmup, "cooldown_fraction": FRACTION,
                   "d_model": args.d_model, "n_layer": args.n_layer, "block": args.block, "batch": args.batch,
                   "params": n_params, "train_seqs": len(task.train), "val_seqs": len(task.val),
                   "tokens_per_step": args.batch * args.block, "seed": args.seed},
        "per_budget": per_budget,
        "lr_grid": {"initial": initial_lrs, "final": lrs, "extensions": extensions, "not_bracketed": unbracketed,
                    "all_bracketed": not unbracketed, "note": grid_note},
        "grid": {"forked": {f"{lr:g}": {k: v for k, v in forked[lr].items() if k != "records"} for lr in lrs},
                 "cosine": {f"{lr:g}@{T}": v for (lr, T), v in cos.items()}},
        "records": {f"{lr:g}": forked[lr]["records"] for lr in lrs},
        "cost": {f"{lr:g}": v for lr, v in cost.items()},
        "fork_equals_fixed_budget_run": check,
        "total_benchmark_s": total_s, "plots": plots,
    }
    headers = ["budget T", "fork S + cooldown c", "cooled 1-sqrt (best LR)", "cooled linear (best LR)",
               "cosine (best LR)", "main branch at T, no cooldown (best LR)", "cooled vs cosine",
               "linear vs 1-sqrt", "main vs cosine", "best cosine LR / best WSD LR"]
    tokens = max(budgets) * args.batch * args.block
    notes = [f"setting '{args.setting}': TinyGPT d_model={args.d_model}, {args.n_layer} layers ({n_params / 1e3:.0f}k "
             f"parameters), block "
             f"{args.block}, batch {args.batch} ({args.batch * args.block} tokens/step); train {len(task.train)} "
             f"sequences, val {len(task.val)} sequences (stdlib sources, byte-level); warmup {args.warmup} steps; "
             f"the same LR grid for every family; val loss in nats/byte; the largest budget is {tokens / 1e6:.1f}M "
             f"tokens, {tokens / n_params:.0f} per parameter, {max(budgets) * args.batch / len(task.train):.1f} "
             "epochs.",
             grid_note,
             f"whole benchmark {total_s / 60:.1f} min; torch threads {torch.get_num_threads()}.",
             "forked wall = main branch to S_max + the 1-sqrt forks (measured wall of the run minus the linear "
             "forks and the main-branch evaluations, which are extras of this benchmark); both approaches include "
             "one validation per budget. CPU s = process CPU time of the same parts: with one torch thread it "
             "measures the work independently of the shared machine's load, wall time does not.",
             f"check: the 1-sqrt fork for T={budgets[0]} at LR {lr_chk:g} has val loss {fork_v!r}; a separate "
             f"fixed-budget run (LambdaLR over WSD.cooled, same data) has {fixed['val_loss']!r}: "
             f"{'bit-identical' if check['identical'] else 'DIFFERENT'}.",
             "Both forks of a budget run from one plan, ForkPlan(at=..., cooldown=[Cooldown(0.2, '1-sqrt'), "
             "Cooldown(0.2, 'linear')]); the linear forks' share of a fork point's time is taken from the "
             "records' seconds."]
    return finish(out, env, result, [
        ("Per budget: best over the LR grid (val loss, nats/byte)", headers, rows),
        ("Every run of the grid (val loss)", ["LR", "T", "cooled 1-sqrt", "cooled linear", "cosine",
                                              "main branch at T"], grid_rows),
        ("Cost: one forked WSD run vs. one cosine run per budget",
         ["LR", "forked steps", "cosine steps", "step ratio", "forked wall s", "cosine wall s", "wall ratio",
          "forked CPU s", "cosine CPU s", "CPU ratio"],
         cost_rows)], notes)


def replot(path: Path) -> dict:
    """Redraw the plots of a finished run from its JSON (no training)."""
    import argparse
    import json

    data = json.loads(path.read_text())
    cfg = data["config"]
    budgets, lrs = cfg["budgets"], cfg["lrs"]
    forked = {lr: {k: {int(T): v for T, v in data["grid"]["forked"][f"{lr:g}"][k].items()}
                   for k in ("cooled_1-sqrt", "cooled_linear", "main_val")} for lr in lrs}
    cos = {(lr, T): data["grid"]["cosine"][f"{lr:g}@{T}"] for lr in lrs for T in budgets}
    plots = _plot(path.parent, budgets, lrs, forked, cos, data["per_budget"], argparse.Namespace(warmup=cfg["warmup"]),
                  name=path.stem)
    if data.get("plots") != plots:  # results of a version that named every setting's plots bench_budgets_*
        data["plots"] = plots
        path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"redrew {', '.join(plots)} in {path.parent}")
    return data


def _plot(out: Path, budgets, lrs, forked, cos, per_budget, args, name: str = NAME) -> list[str]:
    """The two figures, named after the result (``name``): one setting's plots never replace another's."""
    plt = pyplot()
    names = []
    # 1. budget curve
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    Ts = [d["T"] for d in per_budget]
    ax.plot(Ts, [d["cosine"] for d in per_budget], "o-", label="cosine to 0, one run per budget (best LR)")
    ax.plot(Ts, [d["cooled_1sqrt"] for d in per_budget], "s-", label="WSD fork, 1-sqrt cooldown (best LR)")
    ax.plot(Ts, [d["cooled_linear"] for d in per_budget], "^--", label="WSD fork, linear cooldown (best LR)")
    ax.plot(Ts, [d["main_branch_best"] for d in per_budget], "x:", label="WSD main branch at T, no cooldown")
    ax.set_xlabel("budget T (optimizer steps)")
    ax.set_ylabel("val loss (nats/byte)")
    ax.set_title("One forked run vs. separate cosine runs")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, T in enumerate(budgets):
        col = f"C{i}"
        ax.plot(lrs, [cos[(lr, T)]["val_loss"] for lr in lrs], "o-", color=col, label=f"cosine T={T}")
        ax.plot(lrs, [forked[lr]["cooled_1-sqrt"][T] for lr in lrs], "s--", color=col, label=f"WSD fork T={T}")
    ax.set_xscale("log")
    ax.set_xticks(lrs)
    ax.set_xticklabels([f"{x:g}" for x in lrs])
    ax.set_xlabel("base LR")
    ax.set_ylabel("val loss (nats/byte)")
    ax.set_title("LR sensitivity per budget")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = out / f"{name}_curve.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    names.append(p.name)
    # 2. schedule shapes at the best LRs of the largest budget
    d = per_budget[-1]
    T_max = budgets[-1]
    fig, ax = plt.subplots(figsize=(9, 5.2))
    wsd = WSD(warmup_steps=args.warmup)
    lr_w = d["cooled_1sqrt_lr"]
    ax.plot(range(T_max), [lr_w * wsd(t) for t in range(T_max)], color="k", lw=1,
            label=f"WSD main branch (LR {lr_w:g})")
    for i, T in enumerate(budgets):
        S = int(round((1 - FRACTION) * T))
        for shape, ls in (("1-sqrt", "-"), ("linear", "--")):
            s = wsd.cooled(at=S, cooldown=Cooldown(fraction=FRACTION, shape=shape))
            ax.plot(range(S, T + 1), [lr_w * s(t) for t in range(S, T + 1)], ls=ls, color=f"C{i}",
                    label=f"forks at 0.8 T: {shape} cooldown" if i == 0 else None)
        lr_c = per_budget[i]["cosine_lr"]
        c = cosine(T, warmup_steps=args.warmup)
        ax.plot(range(T + 1), [lr_c * c(t) for t in range(T + 1)], ls=":", color=f"C{i}",
                label=f"cosine T={T} (LR {lr_c:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Schedules: one WSD main branch with forks vs. one cosine run per budget")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    p = out / f"{name}_schedules.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    names.append(p.name)
    return names


if __name__ == "__main__":
    main()
