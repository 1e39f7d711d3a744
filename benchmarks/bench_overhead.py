"""Benchmark 1: per-step overhead of each adapter between forks, vs. a plain ``LambdaLR``.

The same training loop (TinyGPT from ``examples/charlm.py`` on the stdlib text, AdamW, clipping)
runs ``--steps`` optimizer steps twice per round, interleaved (A B, then B A, ...):

- ``hook``: the adapter drives the LR from ``WSD(warmup_steps=...)`` with a plan whose only fork
  lies beyond the run (``ForkPlan(at=[10**9])``), i.e. the cost of the adapter *between* forks;
- ``lambdalr``: the same loop with ``WSD(...).lambda_lr(optimizer)`` stepped after each optimizer step
  (through ``accelerator.prepare`` for Accelerate, ``configure_optimizers`` for Lightning,
  ``Trainer(optimizers=(opt, sched))`` for HF), no adapter.

Reported: median seconds per step of each variant, the ratio of medians and the median of the
per-round ratios, each with a 95% bootstrap confidence interval over the paired rounds (the rounds are
resampled with their pairs kept together), for wall and process-CPU time. The target (<= 1.02) counts
as met only when the upper end of the paired wall-time ratio's interval is <= 1.02; otherwise the
table says what was measured (median and interval). The adapter's own per-step work is also timed in isolation
(``hook.step()`` + its optimizer pre-hook vs. ``LambdaLR.step()``, 20k calls) to say how much of any
measured difference can be the adapter at all.

Adapters are entries of ``ADAPTERS`` (name -> runner); a runner ``run(variant, steps, warmup, cfg)``
returns ``(wall, cpu, own)``: the wall and process-CPU seconds of the ``steps`` timed optimizer steps
after ``warmup`` untimed ones, and (for ``variant="hook"``) the seconds per step spent inside the
adapter's own methods. The
Lightning and HF runners are added only if their adapter module imports (``--adapters`` picks).

    .venv/bin/python benchmarks/bench_overhead.py                       # all available adapters
    .venv/bin/python benchmarks/bench_overhead.py --adapters accelerate,plain
    .venv/bin/python benchmarks/bench_overhead.py --quick
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EXAMPLES, base_parser, bootstrap_ci, finish, iqr, median, setup  # noqa: E402

sys.path.insert(0, str(EXAMPLES))
from charlm import TinyGPT, splits  # noqa: E402

from cooldown_callbacks import WSD, ForkPlan  # noqa: E402

NAME = "bench_overhead"
NEVER = ForkPlan(at=[10**9])  # the hook is live, but no fork happens inside the measured steps
TARGET = 1.02  # per-step time with the adapter / with LambdaLR


@dataclass
class Config:
    d_model: int = 64
    n_layer: int = 2
    block: int = 64
    batch: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    tmp: str = ""

    @property
    def schedule(self) -> WSD:
        return WSD(warmup_steps=self.warmup_steps)


_DATA: dict = {}


def data(cfg: Config):
    key = cfg.block
    if key not in _DATA:
        train, _ = splits(block_size=cfg.block, max_bytes=600_000)
        _DATA[key] = train
    return _DATA[key]


def make(cfg: Config):
    torch.manual_seed(0)
    model = TinyGPT(d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=4, block_size=cfg.block)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    loader = DataLoader(data(cfg), batch_size=cfg.batch, shuffle=True, generator=torch.Generator().manual_seed(0),
                        drop_last=True)
    return model, opt, loader


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _no_eval(model):
    return {"val_loss": 0.0}


def _loop(model, opt, loader, steps: int, warmup: int, after_step: Callable[[], None], acc=None) -> float:
    """The user's loop; returns (wall, CPU) seconds of the last ``steps`` optimizer steps."""
    total = steps + warmup
    t, t0, c0 = 0, None, None
    model.train()
    while t < total:
        for batch in loader:
            if t == warmup:
                t0, c0 = time.perf_counter(), time.process_time()
            if acc is not None:
                with acc.accumulate(model):
                    loss = _loss(model, batch)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
            else:
                loss = _loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
            after_step()
            t += 1
            if t == total:
                break
    return time.perf_counter() - t0, time.process_time() - c0


# -- adapters ---------------------------------------------------------------------------------
class Own:
    """Time spent inside an adapter's own per-step methods during a real run (wrapped on the instance)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, obj: object, names: Sequence[str]) -> None:
        for name in names:
            fn = getattr(obj, name)

            def timed(*a, __fn=fn, __name=name, **kw):
                t0 = time.perf_counter()
                try:
                    return __fn(*a, **kw)
                finally:
                    self.seconds[__name] = self.seconds.get(__name, 0.0) + time.perf_counter() - t0
                    self.calls[__name] = self.calls.get(__name, 0) + 1

            setattr(obj, name, timed)

    def per_step(self, total_steps: int) -> float:
        """Seconds per optimizer step in the methods called at least once per step (setup hooks excluded)."""
        return sum(s for n, s in self.seconds.items() if self.calls[n] >= total_steps) / total_steps


def _callback_hooks(cb: object) -> list[str]:
    return [n for n in dir(type(cb)) if n.startswith("on_") and callable(getattr(cb, n))]


def run_plain(variant: str, steps: int, warmup: int, cfg: Config) -> float:
    from cooldown_callbacks.integrations.accelerate import CooldownHook

    model, opt, loader = make(cfg)
    if variant == "lambdalr":
        sched = cfg.schedule.lambda_lr(opt)
        return (*_loop(model, opt, loader, steps, warmup, sched.step), None)
    hook = CooldownHook(model, opt, schedule=cfg.schedule, plan=NEVER, loss_fn=_loss, eval_fn=_no_eval,
                        train_loader=loader, max_grad_norm=1.0, dirpath=cfg.tmp, verbose=False)
    own = Own()
    own.wrap(hook, ["step"])  # the optimizer pre-hook is timed separately (micro_costs)
    try:
        return (*_loop(model, opt, loader, steps, warmup, hook.step), own.per_step(steps + warmup))
    finally:
        hook.close()


def run_accelerate(variant: str, steps: int, warmup: int, cfg: Config) -> float:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from cooldown_callbacks.integrations.accelerate import CooldownHook

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    model, opt, loader = make(cfg)
    try:
        if variant == "lambdalr":
            sched = cfg.schedule.lambda_lr(opt)
            model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
            return (*_loop(model, opt, loader, steps, warmup, sched.step, acc), None)
        model, opt, loader = acc.prepare(model, opt, loader)
        hook = CooldownHook(model, opt, schedule=cfg.schedule, plan=NEVER, loss_fn=_loss, eval_fn=_no_eval,
                            train_loader=loader, accelerator=acc, max_grad_norm=1.0, dirpath=cfg.tmp, verbose=False)
        own = Own()
        own.wrap(hook, ["step"])
        try:
            return (*_loop(model, opt, loader, steps, warmup, hook.step, acc), own.per_step(steps + warmup))
        finally:
            hook.close()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _lightning_available() -> bool:
    try:
        from cooldown_callbacks.integrations.lightning import CooldownCallback  # noqa: F401
    except Exception:  # noqa: BLE001 - the adapter may not exist yet
        return False
    return True


def run_lightning(variant: str, steps: int, warmup: int, cfg: Config) -> float:
    import lightning.pytorch as pl

    from cooldown_callbacks.integrations.lightning import CooldownCallback

    class Module(pl.LightningModule):
        def __init__(self, use_sched: bool) -> None:
            super().__init__()
            self.model, self._opt, _ = make(cfg)
            self.use_sched = use_sched

        def training_step(self, batch, batch_idx):
            return _loss(self.model, batch)

        def configure_optimizers(self):
            if not self.use_sched:
                return self._opt
            return {"optimizer": self._opt,
                    "lr_scheduler": {"scheduler": cfg.schedule.lambda_lr(self._opt), "interval": "step"}}

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.t0 = self.t1 = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup and self.t0 is None:
                self.t0 = (time.perf_counter(), time.process_time())

        def on_train_end(self, trainer, pl_module):
            self.t1 = (time.perf_counter(), time.process_time())

    clock = Clock()
    callbacks = [clock]
    own = None
    if variant == "hook":
        cb = CooldownCallback(schedule=cfg.schedule, plan=NEVER, dirpath=cfg.tmp)
        own = Own()
        own.wrap(cb, _callback_hooks(cb))
        callbacks.insert(0, cb)
    _, _, loader = make(cfg)
    with _quiet():  # Lightning prints its device summary and tips when the Trainer is built
        trainer = pl.Trainer(max_steps=steps + warmup, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, callbacks=callbacks,
                             default_root_dir=cfg.tmp)
        trainer.fit(Module(use_sched=variant == "lambdalr"), train_dataloaders=loader)
    return clock.t1[0] - clock.t0[0], clock.t1[1] - clock.t0[1], own.per_step(steps + warmup) if own else None


def _transformers_available() -> bool:
    try:
        from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback  # noqa: F401
    except Exception:  # noqa: BLE001 - the adapter may not exist yet
        return False
    return True


class _HFWrap(torch.nn.Module):
    """TinyGPT with the HF calling convention: ``forward(input_ids, labels) -> {"loss": ...}``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels=None):
        logits = self.model(input_ids)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


class _HFData(torch.utils.data.Dataset):
    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return {"input_ids": x, "labels": y}


def run_hf(variant: str, steps: int, warmup: int, cfg: Config) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = self.t1 = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and self.t0 is None:
                self.t0 = (time.perf_counter(), time.process_time())

        def on_train_end(self, args, state, control, **kw):
            self.t1 = (time.perf_counter(), time.process_time())

    model, opt, _ = make(cfg)
    args = TrainingArguments(output_dir=cfg.tmp, max_steps=steps + warmup, per_device_train_batch_size=cfg.batch,
                             learning_rate=cfg.lr, max_grad_norm=1.0, logging_strategy="no", save_strategy="no",
                             eval_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True)
    clock = Clock()
    callbacks = [clock]
    sched, own = None, None
    if variant == "hook":
        cb = CooldownTrainerCallback(schedule=cfg.schedule, plan=NEVER, dirpath=cfg.tmp)
        own = Own()
        own.wrap(cb, _callback_hooks(cb))
        callbacks.insert(0, cb)
    else:
        sched = cfg.schedule.lambda_lr(opt)
    train = _HFData(data(cfg))
    # the callback requires an eval set (cooled models are evaluated with trainer.evaluate()); never used here
    trainer = Trainer(model=_HFWrap(model), args=args, train_dataset=train, eval_dataset=Subset(train, range(8)),
                      optimizers=(opt, sched), callbacks=callbacks)
    with _quiet():
        trainer.train()
    return clock.t1[0] - clock.t0[0], clock.t1[1] - clock.t0[1], own.per_step(steps + warmup) if own else None


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        prev = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(prev)


ADAPTERS: dict[str, tuple[Callable[..., float], Callable[[], bool]]] = {
    "accelerate": (run_accelerate, lambda: True),
    "plain": (run_plain, lambda: True),
    "lightning": (run_lightning, _lightning_available),
    "hf": (run_hf, _transformers_available),
}


def summarise(times: dict[str, list[float]], cpu: dict[str, list[float]], own_s: list[float]) -> dict:
    """Ratios of the hook's per-step time to LambdaLR's, each with a bootstrap interval over the paired rounds,
    and the verdict on the target."""
    wall = list(zip(times["hook"], times["lambdalr"]))
    cpus = list(zip(cpu["hook"], cpu["lambdalr"]))

    def paired(rounds):
        return median([h / b for h, b in rounds])

    def of_medians(rounds):
        return median([h for h, _ in rounds]) / median([b for _, b in rounds])

    def stat(rounds, fn):
        lo, hi = bootstrap_ci(rounds, fn)
        return {"value": fn(rounds), "ci95": [lo, hi]}

    a, b = median(times["hook"]), median(times["lambdalr"])
    ratios = [h / l for h, l in wall]
    pr = stat(wall, paired)
    met = pr["ci95"][1] <= TARGET
    verdict = "yes" if met else (f"not shown: {pr['value']:.3f} measured, 95% CI up to {pr['ci95'][1]:.3f}")
    own = median(own_s) if own_s else float("nan")
    return {"hook_s_per_step": times["hook"], "lambdalr_s_per_step": times["lambdalr"],
            "hook_cpu_s_per_step": cpu["hook"], "lambdalr_cpu_s_per_step": cpu["lambdalr"],
            "hook_ms": a * 1e3, "lambdalr_ms": b * 1e3, "per_round_ratios": ratios,
            "ratio_of_medians": stat(wall, of_medians), "paired_ratio": pr, "paired_ratio_iqr": list(iqr(ratios)),
            "cpu_ratio_of_medians": stat(cpus, of_medians), "cpu_paired_ratio": stat(cpus, paired),
            f"meets_{TARGET}": met, "verdict": verdict,
            "adapter_own_s_per_step": own, "adapter_own_fraction": own / b}


def _with_ci(s: dict) -> str:
    return f"{s['value']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


# -- the adapter's own per-step work, in isolation --------------------------------------------
def micro_costs(cfg: Config, calls: int) -> dict:
    """Seconds per call of ``hook.step()`` + the LR pre-hook vs. ``LambdaLR.step()`` (no training)."""
    from cooldown_callbacks.integrations.accelerate import CooldownHook

    model, opt, loader = make(cfg)
    sched = cfg.schedule.lambda_lr(opt)
    hook_model, hook_opt, _ = make(cfg)
    hook = CooldownHook(hook_model, hook_opt, schedule=cfg.schedule, plan=NEVER, loss_fn=_loss, eval_fn=_no_eval,
                        train_loader=loader, dirpath=cfg.tmp, verbose=False)
    pre = hook._pre_step  # what the optimizer step pre-hook runs before every step

    def time_calls(fn: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls

    def hook_call() -> None:
        pre(hook_opt, (), {})
        hook.step()

    res = {"hook.step + pre-hook": [], "LambdaLR.step": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LambdaLR warns when stepped without an optimizer step
        for r in range(5):
            pairs = [("hook.step + pre-hook", hook_call), ("LambdaLR.step", sched.step)]
            for name, fn in (pairs if r % 2 == 0 else pairs[::-1]):
                res[name].append(time_calls(fn))
    hook.close()
    return {k: median(v) for k, v in res.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--adapters", default=",".join(ADAPTERS), help=f"comma-separated subset of {list(ADAPTERS)}")
    ap.add_argument("--steps", type=int, default=60, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    ap.add_argument("--reps", type=int, default=16, help="interleaved rounds (each runs both variants); the "
                    "confidence intervals narrow with more")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.reps, args.d_model, args.batch = 3, 1, 1, 16, 4
    out, env = setup(args, NAME, argv)
    cfg = Config(d_model=args.d_model, batch=args.batch, tmp=tempfile.mkdtemp(prefix="bench-overhead-"))
    wanted = [a.strip() for a in args.adapters.split(",") if a.strip()]
    for a in wanted:
        if a not in ADAPTERS:
            raise ValueError(f"Invalid --adapters entry {a!r}: choose from {list(ADAPTERS)}.")
    rows, per_adapter, skipped = [], {}, {}
    for name in wanted:
        run, available = ADAPTERS[name]
        if not available():
            skipped[name] = "adapter module not importable"
            continue
        times: dict[str, list[float]] = {"hook": [], "lambdalr": []}
        cpu: dict[str, list[float]] = {"hook": [], "lambdalr": []}
        own_s: list[float] = []
        try:
            for r in range(args.reps):
                order = ["hook", "lambdalr"] if r % 2 == 0 else ["lambdalr", "hook"]
                for v in order:
                    secs, cpu_secs, own = run(v, args.steps, args.warmup, cfg)
                    times[v].append(secs / args.steps)
                    cpu[v].append(cpu_secs / args.steps)
                    if own is not None:
                        own_s.append(own)
        except Exception as e:  # noqa: BLE001 - an adapter in progress must not sink the others
            skipped[name] = f"{type(e).__name__}: {e}"
            print(f"[{name}] failed: {skipped[name]}", file=sys.stderr, flush=True)
            continue
        per_adapter[name] = summarise(times, cpu, own_s)
        d = per_adapter[name]
        rows.append([name, f"{d['hook_ms']:.2f}", f"{d['lambdalr_ms']:.2f}", _with_ci(d["ratio_of_medians"]),
                     _with_ci(d["paired_ratio"]), f"{d['paired_ratio_iqr'][0]:.3f}-{d['paired_ratio_iqr'][1]:.3f}",
                     d["verdict"], _with_ci(d["cpu_paired_ratio"]), f"{d['adapter_own_s_per_step'] * 1e6:.1f}",
                     f"{d['adapter_own_fraction'] * 100:.3f}%"])
        print(f"[{name}] hook {d['hook_ms']:.2f} ms/step, LambdaLR {d['lambdalr_ms']:.2f} ms/step, paired ratio "
              f"{_with_ci(d['paired_ratio'])}: {d['verdict']}", flush=True)
    micro = micro_costs(cfg, 2000 if args.quick else 20000)
    step_ms = min((median(v["lambdalr_s_per_step"]) for v in per_adapter.values()), default=float("nan")) * 1e3
    micro_rows = [[k, f"{v * 1e6:.2f}"] for k, v in micro.items()]
    extra_us = (micro["hook.step + pre-hook"] - micro["LambdaLR.step"]) * 1e6
    result = {"config": {**{k: v for k, v in vars(cfg).items() if k != "tmp"}, "steps": args.steps,
                         "warmup": args.warmup, "reps": args.reps, "schedule": cfg.schedule.to_dict(),
                         "plan": NEVER.to_dict()},
              "adapters": per_adapter, "skipped": skipped, "micro_s_per_call": micro,
              "hook_extra_us_per_step": extra_us}
    headers = ["adapter", "hook ms/step (median)", "LambdaLR ms/step (median)", "ratio of medians [95% CI]",
               "ratio, paired median [95% CI]", "paired IQR", f"<= {TARGET}", "CPU-time ratio, paired median [95% CI]",
               "adapter's own us/step", "own / step"]
    notes = [f"TinyGPT d_model={cfg.d_model}, 2 layers, block {cfg.block}, batch {cfg.batch}; {args.reps} interleaved "
             f"rounds of {args.warmup}+{args.steps} steps per variant; torch threads {torch.get_num_threads()}.",
             f"The hook's own work per step is {micro['hook.step + pre-hook'] * 1e6:.1f} us vs "
             f"{micro['LambdaLR.step'] * 1e6:.1f} us for LambdaLR.step(): {extra_us:+.1f} us per step, "
             f"{extra_us / 1e3 / step_ms * 100:+.3f}% of a {step_ms:.1f} ms step; measured ratios beyond that are "
             "the shared machine's noise. CPU-time ratios (process CPU time, one torch thread) are less sensitive "
             "to the machine's load than wall-time ratios.",
             f"Target: the per-step time ratio <= {TARGET}, counted as met only when the upper end of the 95% "
             "bootstrap interval of the paired wall-time ratio (rounds resampled with their pairs) is <= "
             f"{TARGET}; otherwise the column gives the median and interval measured (a wide interval means too "
             "few rounds or a noisy machine, not necessarily an overhead).",
             "adapter's own us/step: time inside the adapter's per-step methods during the hook runs "
             "(CooldownHook.step; "
             "the callbacks' on_* hooks called every step); for the Accelerate/plain hook add the optimizer pre-hook "
             "(in the isolated table)."]
    if skipped:
        notes.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    return finish(out, env, result, [("Per-step time, adapter vs. LambdaLR", headers, rows),
                                     ("The adapter's own per-step work (isolated, microseconds per call)",
                                      ["call", "us per call"], micro_rows)], notes)


if __name__ == "__main__":
    main()
