"""The ``report`` command: a run's fork records as a table of its budget curve, optionally fitted and drawn.

The budget axis is ``T = S + c`` (the fork step plus the cooldown steps: what the cooled model
trained for; see :mod:`cooldown_callbacks.records`). The main branch is shown at its fork step
``S``. A cooled metric is paired with the main branch's metric of the same name, or of the same
name without its prefix (:func:`main_key_for`; HF: ``cooldown_loss`` with ``eval_loss``; Lightning
records keep plain names).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..records import RECORDS_NAME, read_records
from .output import fmt, pyplot, save, table
from .parsing import MissingExtra, UsageError, nonneg_int

__all__ = ["add_parser", "find_records", "main_key_for"]

# where each framework's default puts the records, relative to the folder users know
_KNOWN_SUBDIRS = ("cooldowns", "cooled")  # HF: <output_dir>/cooldowns; Lightning and the hook: .../cooled
_SEARCH_DEPTH = 5


def find_records(path: str | Path) -> tuple[Path, str]:
    """The records file for a path a user gives, and how it was found.

    Accepts the file, the folder holding it (``dirpath``), HF's ``output_dir`` (its ``cooldowns/``),
    Lightning's ``default_root_dir`` or a logger's version folder (the cooled folder below it).
    Several records files below a folder: the most recently written one, and the note says so.
    """
    p = Path(path)
    if p.is_file():
        return p, ""
    if not p.exists():
        raise UsageError(f"{p}: no such file or folder; give a run directory (HF output_dir, Lightning "
                         f"default_root_dir or log dir, the cooled models' dirpath) or its {RECORDS_NAME}")
    if (p / RECORDS_NAME).is_file():
        return p / RECORDS_NAME, ""
    for sub in _KNOWN_SUBDIRS:
        if (p / sub / RECORDS_NAME).is_file():
            return p / sub / RECORDS_NAME, ""
    found = [f for f in p.rglob(RECORDS_NAME) if f.is_file() and len(f.relative_to(p).parts) <= _SEARCH_DEPTH]
    if not found:
        raise UsageError(f"{p}: no {RECORDS_NAME} in it or below it; give a run directory holding {RECORDS_NAME} "
                         f"(HF output_dir, Lightning default_root_dir or log dir) or the file itself")
    found.sort(key=lambda f: (f.stat().st_mtime, str(f)))
    if len(found) == 1:
        return found[0], ""
    return found[-1], f"the newest of {len(found)} records files below {p}; give one of them to choose"


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def main_key_for(metric: str, main_keys: list[str]) -> str | None:
    """The main-branch metric to show beside the cooled ``metric``: the same name; else the name without
    a ``prefix/`` (Lightning's logged ``cooldown/val_loss``); else HF's convention, ``eval_<rest>`` for
    ``<prefix>_<rest>`` (``cooldown_loss`` -> ``eval_loss``). ``None`` when none of them was recorded."""
    for k in (metric, metric.rsplit("/", 1)[-1]):
        if k in main_keys:
            return k
    name = metric.rsplit("/", 1)[-1]
    if "_" in name:
        k = "eval_" + name.split("_", 1)[1]
        if k in main_keys:
            return k
    return None


def _pick_metric(records: list[dict], wanted: str | None, path: str) -> str:
    keys: list[str] = []
    for r in records:
        for k in list((r.get("metrics") or {})) + list((r.get("main_metrics") or {})):
            if k not in keys:
                keys.append(k)
    if wanted is not None:
        if wanted not in keys:
            raise UsageError(f"{path}: no metric {wanted!r} in the records; choose --metric from: "
                             f"{', '.join(keys) or '(none recorded)'}")
        return wanted
    for k in keys:
        if "loss" in k:
            return k
    raise UsageError(f"{path}: no metric name contains 'loss'; choose --metric from: {', '.join(keys) or '(none)'}")


def _variant(r: dict, shapes_differ: bool) -> str | None:
    """What tells a record's cooldown apart from the others of its fork point (its label, or its shape)."""
    return r.get("label") or (r.get("shape") if shapes_differ else None)


def _status(r: dict) -> str:
    st = r.get("status", "ok")
    if st == "failed":
        return "failed" + (f": {str(r.get('error'))[:60]}" if r.get("error") else "")
    if st == "skipped":
        return "skipped" + (f": {str(r.get('reason'))[:80]}" if r.get("reason") else "")
    return str(st)


def _cmd_report(args: argparse.Namespace) -> int:
    if args.fit:
        try:
            from ..budget import _scipy

            _scipy()
        except ImportError as e:
            raise MissingExtra(f"--fit {e}") from None
    target, how = find_records(args.run)
    records = sorted(read_records(target), key=lambda r: (r.get("step", 0), r.get("cooldown_steps", 0)))
    print(f"records: {target}" + (f" ({how})" if how else ""))
    if not records:
        raise UsageError(f"{target}: no fork records yet")
    metric = _pick_metric(records, args.metric, str(target))
    main_keys: list[str] = []
    for r in records:
        main_keys += [k for k in (r.get("main_metrics") or {}) if k not in main_keys]
    main_key = main_key_for(metric, main_keys)
    shapes_differ = len({r.get("shape") for r in records}) > 1
    variants = [_variant(r, shapes_differ) for r in records]
    show_variant = any(v is not None for v in variants)
    vname = "label" if any(r.get("label") for r in records) else "shape"
    rows, groups, main_pts = [], {}, {}
    for r, v in zip(records, variants):
        step, c = int(r.get("step", 0)), int(r.get("cooldown_steps", 0))
        ok = r.get("status", "ok") == "ok"
        m = _num((r.get("metrics") or {}).get(metric)) if ok else None
        mm = _num((r.get("main_metrics") or {}).get(main_key)) if main_key else None
        row = [str(step), str(c)] + ([v or "-"] if show_variant else []) + \
              [str(step + c), fmt(m), fmt(mm), f"{_num(r.get('seconds')) or 0.0:.1f}", _status(r)]
        rows.append(row)
        if ok and m is not None:
            groups.setdefault(v, []).append((step + c, m, r))
        if mm is not None:
            main_pts[step] = mm
    headers = ["step", "cooldown"] + ([vname] if show_variant else []) + \
              ["total", metric, f"main {main_key or metric}", "seconds", "status"]
    print(table(headers, rows))
    counts = {st: sum(r.get("status", "ok") == st for r in records) for st in ("failed", "skipped")}
    print(f"{len(records)} forks, {counts['failed']} failed" + (f", {counts['skipped']} skipped" if counts["skipped"]
                                                              else "") + f" (metric: {metric}; total = step + cooldown)")
    best = min((p for pts in groups.values() for p in pts), key=lambda p: p[1], default=None)
    if best is not None:
        T, val, r = best
        ck = r.get("checkpoint")
        where = f": {ck}" + ("" if Path(ck).exists() else " (missing)") if ck else ""
        print(f"lowest cooled {metric}: {val:.6g} at total {T}" + (f" ({_variant(r, shapes_differ)})"
                                                                  if _variant(r, shapes_differ) else "") + where)
    fits = _fits(groups, metric, args.level, args.fit_from) if args.fit else {}
    if args.plot:
        _plot(groups, main_pts, fits, metric, main_key, target, args.plot)
    return 0


def _fits(groups: dict, metric: str, level: float, fit_from: int) -> dict:
    """Fit and print the budget curve of each cooldown variant (cooled models of total >= ``fit_from``)."""
    from ..budget import fit_budget_curve

    out = {}
    for v, pts in groups.items():
        name = f"budget curve of {metric}" + (f" [{v}]" if v else "") + (f", totals >= {fit_from}" if fit_from else "")
        T = np.array([p[0] for p in pts if p[0] >= fit_from], dtype=np.float64)
        y = np.array([p[1] for p in pts if p[0] >= fit_from], dtype=np.float64)
        if np.unique(T).size < 3:
            print(f"\n{name}: no fit - it needs cooled losses at 3 or more budgets (has {np.unique(T).size})")
            continue
        fit = fit_budget_curve(T, y, level=level)
        out[v] = fit
        print(f"\n{name}, fitted:\n" + "\n".join("  " + line for line in fit.summary().splitlines()))
    return out


def _plot(groups: dict, main_pts: dict, fits: dict, metric: str, main_key: str | None, target: Path,
          out: str) -> None:
    if not groups and not main_pts:
        raise UsageError(f"nothing to plot: no successful fork has {metric!r}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (v, pts) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        color = colors[i % len(colors)]
        x, y = zip(*sorted((p[0], p[1]) for p in pts))
        ax.plot(x, y, "o-", lw=1.8, color=color, label=f"cooled ({metric} at T = S + c)" + (f" [{v}]" if v else ""))
        fit = fits.get(v)
        if fit is not None:
            last = max(x)
            ts = np.linspace(min(fit.steps), 4 * last, 200)
            ax.plot(ts, fit.predict(ts), lw=1.2, ls="--", color=color,
                    label=f"fit {fit.E:.3g} + {fit.A:.3g} T^-{fit.alpha:.3g}" + ("" if fit.supported
                                                                                  else " (not supported)"))
            lo, hi = fit.band(ts)
            if np.isfinite(lo).all() and np.isfinite(hi).all():
                ax.fill_between(ts, lo, hi, color=color, alpha=0.15, lw=0, label=f"{fit.level:.0%} band")
            ax.axvline(last, color="0.8", lw=0.8, zorder=0)
    if main_pts:
        x, y = zip(*sorted(main_pts.items()))
        ax.plot(x, y, "s--", lw=1.2, color="0.45", label=f"main branch ({main_key or metric} at fork step S)")
    ax.set(xlabel="steps (cooled: total T = S + c; main branch: S)", ylabel=metric,
           title=f"budget curve: {target.parent.name or target.name}")
    ax.grid(lw=0.3, ls="--")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out)


def _level(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < x < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a probability in (0, 1), e.g. 0.9")
    return x


def add_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("report", "budget curve of a run's cooldown forks",
            "Table of a run's fork records (step, cooldown steps, total T = S + c, cooled metric, main-branch "
            "metric, seconds, status); failed and skipped forks are listed, not plotted or fitted. RUN is the "
            f"run's folder (HF output_dir, Lightning default_root_dir or log dir, the dirpath) or its "
            f"{RECORDS_NAME}.\n--fit fits L(T) = E + A T^-alpha to the cooled metric (the 'fit' extra: scipy) and "
            "predicts it at 2x and 4x the last budget.\nexample: cooldown-callbacks report runs/exp1 --fit "
            "--plot budget.png", specs=False)
    p.add_argument("run", metavar="RUN", help=f"run folder or {RECORDS_NAME}")
    p.add_argument("--metric", help="metric key (default: the first key containing 'loss')")
    p.add_argument("--fit", action="store_true", help="fit the budget curve and predict 2x, 4x and +10%% steps")
    p.add_argument("--level", type=_level, default=0.9, help="probability of the fit's band (default: %(default)s)")
    p.add_argument("--fit-from", type=nonneg_int, default=0, metavar="T",
                   help="fit only cooled models of total T >= this: early in training the loss falls faster than "
                        "a power law (default: all)")
    p.add_argument("--plot", metavar="PNG", help="draw cooled and main-branch metric against steps (and the fit)")
    p.set_defaults(func=_cmd_report)
