"""Shared plumbing of the benchmarks: the results header, tables, result files, timing helpers.

Every benchmark writes ``<out>/<name>.json`` (header + table + ratios), ``<out>/<name>.md`` (the same
as a markdown table under the header) and its PNG plots. The header records the exact command, the
date, the machine, the library versions, the torch thread count and the load average at the start
and at the end of the run (the machine may be shared: read timings with the load in mind), the full git
commit and whether the tree was clean (``git_clean``; ``git_uncommitted`` lists what was not committed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES = ROOT / "examples"

__all__ = ["ROOT", "RESULTS", "EXAMPLES", "base_parser", "setup", "environment", "git_dirty", "finish", "table",
           "median", "iqr", "bootstrap_ci", "interleaved", "pyplot", "rss_bytes", "reset_peak_rss", "peak_rss_bytes",
           "Timer"]


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny run for the smoke test (no meaningful numbers)")
    ap.add_argument("--out", default=None, help="where the JSON/markdown/PNG results go (default: benchmarks/results "
                    "for a full run, a temporary directory with --quick so committed results are never overwritten)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable timings)")
    ap.add_argument("--allow-dirty", action="store_true", help="write benchmarks/results even from a tree with "
                    "uncommitted changes (recorded in the header; such results must not be committed)")
    return ap


def setup(args: argparse.Namespace, name: str, argv: Sequence[str] | None,
          script: str | None = None) -> tuple[Path, dict]:
    """Threads, output directory and the header (with the start load average) of one benchmark run.

    A full run into ``benchmarks/results`` (the committed results) needs a clean tree: results are
    only committed for the exact code of a commit. ``--allow-dirty`` overrides (the header then lists
    the uncommitted files); ``--out DIR`` and ``--quick`` runs write elsewhere and only record it."""
    torch.set_num_threads(args.threads)
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) if args.quick else RESULTS
    else:
        out = Path(args.out)
    env = environment(name, argv, script)
    if out.resolve() == RESULTS.resolve() and not env["git_clean"] and not getattr(args, "allow_dirty", False):
        raise SystemExit(f"{name}: refusing to write benchmarks/results from a tree that is not a clean commit "
                         f"({_tree_state(env)}). Commit first, or pass --out DIR (or --allow-dirty).")
    if not env["git_clean"]:
        print(f"[{name}] WARNING: {_tree_state(env)}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    return out, env


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The full hash of the checked-out commit (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty() -> list[str] | None:
    """Files that differ from the commit: modified, staged, deleted or untracked (not ignored), anywhere in
    the repository except ``benchmarks/results`` (the outputs). Empty: the commit is exactly the code
    that ran. ``None``: not a git checkout (cleanliness unknown)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return sorted(path for path in (line[3:].split(" -> ")[-1] for line in out.stdout.splitlines())
                  if path and not path.startswith("benchmarks/results/"))


def _mem_total() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(name: str, argv: Sequence[str] | None, script: str | None = None) -> dict:
    """The results header of benchmark ``name`` (results file name; ``script``: the script's name if it differs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    dirty = git_dirty()
    script = f"benchmarks/{script or name}.py"
    return {
        "benchmark": name,
        "command": " ".join([".venv/bin/python", script, *map(shlex.quote, args)]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "memory_gib": round((_mem_total() or 0) / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "lightning", "transformers", "accelerate", "numpy",
                                              "matplotlib", "cooldown-callbacks")},
        "git_commit": _git_commit(),
        "git_clean": dirty == [] if dirty is not None else None,
        "git_uncommitted": dirty,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown pipe table (numbers formatted by the caller)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, width)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in width) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def _header_md(env: dict) -> str:
    m, v = env["machine"], env["versions"]
    lines = [
        f"# {env['benchmark']}",
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date']}; code: git {env.get('git_commit')}, " + _tree_state(env),
        f"- machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, "
        f"GPU: {m['gpu'] or 'none'}",
        f"- python {env['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- torch threads: {env['torch_threads']}; load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in env['loadavg_start'])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in env.get('loadavg_end', []))}",
    ]
    return "\n".join(lines)


def _tree_state(env: dict) -> str:
    if env.get("git_clean"):
        return "clean tree (the commit is the code that ran)"
    if env.get("git_clean") is None:
        return "tree state unknown (not a git checkout)"
    files = env.get("git_uncommitted") or []
    return (f"UNCOMMITTED CHANGES in {len(files)} file(s): {', '.join(files[:10])}"
            + (", ..." if len(files) > 10 else "") + " (these numbers are not those of the commit)")


def finish(out: Path, env: dict, result: dict, tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
           notes: Sequence[str] = (), echo: bool = True) -> dict:
    """Write ``<name>.json`` and ``<name>.md``; print the tables. ``tables``: ``(title, headers, rows)``."""
    env["loadavg_end"] = list(os.getloadavg())
    name = env["benchmark"]
    result = {"header": env, **result,
              "tables": [{"title": t, "columns": list(h), "rows": [list(r) for r in rows]} for t, h, rows in tables]}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    parts = [_header_md(env)]
    for title, headers, rows in tables:
        parts += ["", f"## {title}", "", table(headers, rows)]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md = "\n".join(parts) + "\n"
    (out / f"{name}.md").write_text(md)
    if echo:
        print(md)
        print(f"results written to {out}/{name}.json, .md", flush=True)
    return result


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def iqr(xs: Sequence[float]) -> tuple[float, float]:
    """(25th, 75th) percentiles."""
    if len(xs) < 2:
        return (float(xs[0]), float(xs[0]))
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return float(q[0]), float(q[2])


def bootstrap_ci(rounds: Sequence[Any], statistic: Callable[[Sequence[Any]], float], level: float = 0.95,
                 resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``rounds`` resampled with replacement.

    A round is whatever one interleaved round measured (e.g. the pair ``(adapter_s, baseline_s)``): pairs are
    resampled together, so the interval of a paired ratio keeps the pairing. Seeded, so a JSON file's
    interval can be recomputed from its raw numbers. With fewer than 2 rounds the interval is the point."""
    import random

    n = len(rounds)
    if n < 2:
        v = statistic(rounds)
        return v, v
    rng = random.Random(seed)
    vals = sorted(statistic([rounds[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    lo = vals[int((1.0 - level) / 2.0 * resamples)]
    hi = vals[min(resamples - 1, int((1.0 + level) / 2.0 * resamples))]
    return float(lo), float(hi)


def interleaved(fns: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Call each function once per round, alternating the order every round (ABAB.., then BABA..),
    so slow drifts of the shared machine's load hit every variant alike. Returns the values per name."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            out[n].append(float(fns[n]()))
    return out


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- memory (resident set size; tracemalloc does not see torch's allocations) -----------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    return _status("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    return _status("VmHWM")


class Timer:
    """``with Timer() as t: ...``; then ``t.s`` seconds."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.t0
