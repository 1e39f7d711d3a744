#!/usr/bin/env python3
"""Mutation check: deliberate faults in a temporary copy of the repository; the tests must catch each.

For every fault of ``FAULTS`` the script applies its edits to a copy of the repository's files
(tracked plus untracked-but-not-ignored, so uncommitted work is checked too), runs only that fault's
tests there with pytest, and puts the file back. A fault is *caught* when its tests fail. The script
exits non-zero, naming the fault, when

- a fault survives (its tests pass with the fault in place),
- a fault's edit no longer applies: its line is not in the source exactly once (someone changed that
  code: update the fault; a fault is never skipped silently),
- a fault's tests are not found, or they already fail on the unmodified copy (baseline), or the
  copy would import the package from somewhere else than the copy.

Run from the repository root (``bash scripts/test.sh`` runs it through ``tests/test_mutants.py``)::

    .venv/bin/python scripts/mutants.py                      # every fault (a few minutes on 2 cores)
    .venv/bin/python scripts/mutants.py --list               # the faults and their tests
    .venv/bin/python scripts/mutants.py --check-patterns     # only: does every fault still apply? (instant)
    .venv/bin/python scripts/mutants.py skip-rng-restore no-signal-guard   # some faults
    .venv/bin/python scripts/mutants.py --each               # every named test must catch its fault (slower)

Adding a fault (do it with every bug fix: the fault is the bug, the tests are the ones that now
catch it): append a :class:`Fault` to ``FAULTS``::

    Fault("skip-rng-restore", "Snapshot.restore leaves the RNGs where the fork left them",
          [Edit("cooldown_callbacks/snapshot.py", "restore_rng(self._rng, self._generators)", "pass")],
          ["tests/test_snapshot.py::test_restore_then_continue_equals_never_forked"]),

- ``Edit(path, old, new)``: ``old`` is one whole line of ``path`` without its indentation, and must
  occur exactly once there; ``new`` replaces it (one or more lines, re-indented like ``old``; the
  result must compile). A fault may have several edits (e.g. a leak in memory and on disk).
- ``tests``: pytest node ids (``file::test`` or ``file::test[param]``) or files; the fewest, fastest
  tests that must catch the fault (they run with ``-x``, so order them fastest first). Every fault
  needs at least one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Edit", "Fault", "FAULTS", "apply_edit", "check_patterns", "main"]


@dataclass(frozen=True)
class Edit:
    """Replace the one line of ``path`` whose text (indentation ignored) is ``old`` by ``new``."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    edits: list[Edit]
    tests: list[str] = field(default_factory=list)


SNAPSHOT, ENGINE = "cooldown_callbacks/snapshot.py", "cooldown_callbacks/engine.py"
SCHEDULES, SIGNALS = "cooldown_callbacks/schedules.py", "cooldown_callbacks/signals.py"
SHARDING = "cooldown_callbacks/sharding.py"
HOOK_IDENTITY = "tests/test_accelerate_hook.py::test_branch_mode_main_branch_is_bit_identical"

FAULTS: list[Fault] = [
    Fault("leaked-snapshots", "every snapshot's tensor copies stay alive after close(), and disk snapshots keep "
          "their file",
          [Edit(SNAPSHOT, "self._copies = None",
                'type(self).leaked = [*getattr(type(self), "leaked", []), self._copies]\nself._copies = None'),
           Edit(SNAPSHOT, "self.path.unlink()", "pass  # the snapshot file is never deleted")],
          ["tests/test_soak.py"]),
    Fault("off-by-one-cooldown-lr", "every cooldown LR (schedules and forks) is the next step's",
          [Edit(SCHEDULES, "p = float(k) / float(max(1, c))", "p = float(k + 1) / float(max(1, c))")],
          ["tests/test_properties.py::test_cooled_schedule_equals_the_documented_formula",
           "tests/test_schedules.py::test_cooled_wsd_equals_transformers_get_wsd_schedule"]),
    Fault("off-by-one-fork-lr", "a fork's cooldown LRs are one step ahead of the fixed-budget schedule's",
          [Edit(ENGINE, "mult = self.schedule(step) * cd.factor(k, c)", "mult = self.schedule(step) * cd.factor(k + 1, c)")],
          ["tests/test_properties.py::test_cooled_schedule_equals_the_documented_formula",
           "tests/test_accelerate_hook.py::test_peek_fork_equals_fixed_budget_run"]),
    Fault("off-by-one-wsds", "continue mode (WSD-S) decays one step ahead",
          [Edit(SCHEDULES, "k = t - start", "k = t - start + 1")],
          ["tests/test_properties.py::test_fork_plan_triggers_and_engine_decisions_follow_the_documented_rules",
           "tests/test_accelerate_hook.py::test_continue_mode_follows_the_wsds_schedule"]),
    Fault("skip-rng-restore", "Snapshot.restore leaves the global RNGs where the fork left them",
          [Edit(SNAPSHOT, "restore_rng(self._rng, self._generators)", "pass  # RNGs not restored")],
          ["tests/test_snapshot.py::test_restore_then_continue_equals_never_forked", HOOK_IDENTITY]),
    Fault("skip-buffer-restore", "a snapshot captures parameters only: buffers (BatchNorm statistics) keep the "
          "fork's values",
          [Edit(SNAPSHOT, "for t in list(m.parameters()) + list(m.buffers()):", "for t in list(m.parameters()):")],
          ["tests/test_snapshot.py::test_restore_then_continue_equals_never_forked", HOOK_IDENTITY]),
    Fault("skip-optimizer-state-restore", "Snapshot.restore does not write the optimizer's tensor state back",
          [Edit(SNAPSHOT, "put(cur, src)", "pass  # optimizer state not restored")],
          ["tests/test_snapshot.py::test_restore_then_continue_equals_never_forked", HOOK_IDENTITY]),
    Fault("skip-param-group-restore", "Snapshot.restore does not put the param groups' settings back",
          [Edit(SNAPSHOT, "g.update(copy.deepcopy(saved))", "pass  # param groups not restored")],
          ["tests/test_snapshot.py::test_restore_then_continue_equals_never_forked",
           # with schedule=WSD(...) the hook sets the LR before every step anyway; the user's own scheduler does not
           "tests/test_accelerate_hook.py::test_schedule_none_keeps_user_scheduler_and_forks_decay_from_current_lr"]),
    Fault("no-signal-guard", "the engine's signal guard does nothing: SIGTERM handlers run inside the fork",
          [Edit(SIGNALS, "if threading.current_thread() is not threading.main_thread():",
                "if True:  # the guard never holds a handler")],
          ["tests/test_reliability.py::test_sigterm_during_a_fork_is_handled_after_the_main_branch_is_restored",
           "tests/test_lightning.py::test_sigterm_during_fork_restores_first_then_cools_the_final_model"]),
    Fault("rerun-finished-forks", "after a resume, forks this run finished after its checkpoint are run again",
          [Edit(ENGINE, "if not self._resumed:", "if True:  # never look for finished forks")],
          ["tests/test_reliability.py::test_resumed_run_does_not_redo_forks_it_finished_and_a_new_run_is_refused"]),
    # faults of bugs fixed after the first set
    Fault("eval-rng-after-cooldown", "the cooled model is evaluated from the RNG state its cooldown left, so an "
          "eval_fn that samples batches sees other batches than the main evaluation at that step",
          [Edit(ENGINE, "restore_rng(rng)", "pass  # evaluate from wherever the cooldown left the RNGs")],
          ["tests/test_engine.py::test_cooled_evaluation_sees_the_main_evaluations_random_draws"]),
    Fault("skip-reshard-on-restore", "FSDP: the restore writes the shards but leaves the unsharded parameters the "
          "fork's evaluation gathered, so the next forward trains on the cooled weights",
          [Edit(SNAPSHOT, "reshard(self._modules)  # the next forward must gather the restored shards, not reuse "
                "unsharded copies", "pass  # no reshard after the restore")],
          ["tests/test_sharded_hook.py::test_every_rank_local_shards_equal_the_run_without_forks[fsdp2-cpu-fn]"]),
    Fault("skip-zero-engine-counters", "DeepSpeed: the engine's step counters (global_steps, micro_steps, ...) keep "
          "the fork's values after the restore",
          [Edit(SHARDING, "fields(engine, _ZERO_ENGINE_FIELDS)", "pass  # engine counters not snapshotted")],
          ["tests/test_deepspeed.py::test_hook_forks_keep_every_rank_exact[1]"]),
]


# -- applying edits ---------------------------------------------------------------------------------
class PatternLost(Exception):
    """A fault's line is not in the source exactly once."""


def apply_edit(source: str, edit: Edit) -> str:
    """``source`` with the line ``edit.old`` (indentation ignored) replaced by ``edit.new``, re-indented."""
    lines = source.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == edit.old.strip()]
    if len(hits) != 1:
        raise PatternLost(f"{edit.path}: the line {edit.old.strip()!r} occurs {len(hits)} times (expected exactly "
                          "once): the code changed; update this fault in scripts/mutants.py")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    end = "\n" if lines[i].endswith("\n") else ""
    lines[i] = "".join(indent + new_line + "\n" for new_line in edit.new.splitlines())[: None if end else -1]
    return "".join(lines)


def mutated_sources(root: Path, fault: Fault) -> dict[str, tuple[str, str]]:
    """``{path: (original, mutated)}`` for the files of ``fault``; raises PatternLost or SyntaxError."""
    out: dict[str, tuple[str, str]] = {}
    for edit in fault.edits:
        path = root / edit.path
        if not path.exists():
            raise PatternLost(f"{edit.path}: file not found; update this fault in scripts/mutants.py")
        original = out[edit.path][0] if edit.path in out else path.read_text()
        current = out[edit.path][1] if edit.path in out else original
        out[edit.path] = (original, apply_edit(current, edit))
    for rel, (_, text) in out.items():
        try:
            compile(text, rel, "exec")
        except SyntaxError as e:
            raise PatternLost(f"{rel}: the fault's replacement does not compile ({e}); fix this fault") from e
    return out


def _test_exists(root: Path, node: str) -> bool:
    """Whether a node id's file exists and defines its test function (parameters not checked)."""
    file, _, rest = node.partition("::")
    path = root / file
    if not path.exists():
        return False
    if not rest:
        return True
    name = rest.split("::")[-1].split("[")[0]
    return re.search(rf"^\s*def {re.escape(name)}\(", path.read_text(), re.M) is not None


def check_patterns(root: Path = ROOT, faults: list[Fault] | None = None) -> list[str]:
    """Problems with the fault definitions against the source under ``root`` (empty: all apply)."""
    problems = []
    for fault in faults if faults is not None else FAULTS:
        if not fault.tests:
            problems.append(f"{fault.name}: no tests named")
        try:
            mutated_sources(root, fault)
        except PatternLost as e:
            problems.append(f"{fault.name}: {e}")
        for node in fault.tests:
            if not _test_exists(root, node):
                problems.append(f"{fault.name}: test {node} not found")
    return problems


# -- the copy ---------------------------------------------------------------------------------------
def make_copy(root: Path, dest: Path) -> None:
    """Copy the repository's files (tracked, and untracked but not ignored) to ``dest``; map the
    setuptools ``package-dir`` entries (e.g. ``cooldown_callbacks.integrations`` -> ``integrations/``)
    with symlinks, so ``PYTHONPATH=dest`` imports the whole package from the copy."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True)
    if listed.returncode != 0:
        raise SystemExit(f"mutants: cannot list the repository's files with git ({listed.stderr.decode().strip()}); "
                         "run it from a git checkout")
    files = listed.stdout.decode().split("\0")
    for rel in filter(None, files):
        src = root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    pyproject = dest / "pyproject.toml"
    package_dir = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {}).get("package-dir", {}) \
        if pyproject.exists() else {}
    for pkg, folder in sorted(package_dir.items(), key=lambda kv: kv[0].count(".")):
        target = dest / pkg.replace(".", "/")
        if not target.exists() and (dest / folder).is_dir():
            target.symlink_to((dest / folder).resolve(), target_is_directory=True)


def _env(copy: Path) -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def check_imports(copy: Path) -> None:
    code = ("import cooldown_callbacks, cooldown_callbacks.engine, cooldown_callbacks.integrations.accelerate as a\n"
            "print(cooldown_callbacks.__file__); print(a.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode != 0 or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(copy.resolve())
                                                          for p in paths):
        raise SystemExit(f"mutants: the copy does not import its own package (got {paths or out.stderr[-2000:]}); "
                         "a fault there would go unseen")


def run_pytest(copy: Path, tests: list[str], timeout: float, stop_first: bool = True) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           "-rf", *(["-x"] if stop_first else []), *tests]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, text, time.perf_counter() - t0
    return out.returncode, out.stdout + out.stderr, time.perf_counter() - t0


def _failed_tests(output: str) -> list[str]:
    return [line.split(" - ")[0].removeprefix("FAILED ").removeprefix("ERROR ").strip()
            for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]


def _run_fault(copy: Path, fault: Fault, each: bool, timeout: float) -> tuple[bool, str, float]:
    """Apply ``fault`` to ``copy``, run its tests (one run, or one per test with ``each``), put the files back."""
    sources = mutated_sources(copy, fault)
    groups = [[t] for t in fault.tests] if each else [fault.tests]
    verdicts, secs = [], 0.0
    try:
        for rel, (_, text) in sources.items():
            (copy / rel).write_text(text)
        for group in groups:
            code, output, s = run_pytest(copy, group, timeout)
            secs += s
            verdicts.append(_verdict(code, output, s, group))
    finally:
        for rel, (original, _) in sources.items():
            (copy / rel).write_text(original)
    return all(ok for ok, _ in verdicts), "; ".join(v for _, v in verdicts), secs


def _verdict(code: int | None, output: str, secs: float, tests: list[str]) -> tuple[bool, str]:
    """(caught?, what happened) for one pytest run of a fault's tests."""
    if code is None:
        return True, f"caught (timeout after {secs:.0f}s)"
    if code in (1, 2):  # failed tests, or errors during collection/setup
        return True, "caught by " + (", ".join(_failed_tests(output)) or f"pytest exit {code}")
    print(output[-3000:], file=sys.stderr)
    if code == 0:
        return False, f"SURVIVED {' '.join(tests)}"
    return False, f"ERROR: pytest exit {code} for {' '.join(tests)} (tests not found or not collected?)"


# -- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("faults", nargs="*", help="names of the faults to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the faults and their tests")
    ap.add_argument("--check-patterns", action="store_true", help="only check that every fault still applies")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per pytest run (default 300)")
    ap.add_argument("--each", action="store_true", help="run every named test of a fault on its own; each must "
                    "catch it (default: the fault is caught when its first failing test fails)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="faults run in parallel, each in its own copy (default: the CPU count, at most 4)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies (their path is printed)")
    args = ap.parse_args(argv)
    known = {f.name: f for f in FAULTS}
    unknown = [n for n in args.faults if n not in known]
    if unknown:
        ap.error(f"unknown fault(s) {unknown}; choose from {sorted(known)}")
    faults = [known[n] for n in args.faults] if args.faults else FAULTS
    if args.list:
        for f in faults:
            print(f"{f.name}: {f.what}")
            for e in f.edits:
                print(f"    {e.path}: {e.old.strip()!r} -> {e.new!r}")
            for t in f.tests:
                print(f"    test: {t}")
        return 0
    problems = check_patterns(ROOT, faults)
    if problems:
        print("mutants: FAULT DEFINITIONS NO LONGER APPLY (no fault is skipped silently):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    if args.check_patterns:
        print(f"mutants: all {len(faults)} faults apply to the current source")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="cooldown-mutants-"))
    jobs = max(1, min(args.jobs, len(faults)))
    copies = [tmp / f"repo{i}" for i in range(jobs)]  # one copy per worker: a fault is applied in place
    t_all = time.perf_counter()
    rows: dict[str, tuple[str, float]] = {}
    survived: list[str] = []
    try:
        for copy in copies:
            make_copy(ROOT, copy)
            check_imports(copy)
        tests = list(dict.fromkeys(t for f in faults for t in f.tests))
        print(f"mutants: {len(faults)} faults, {jobs} worker(s), copies in {tmp}; baseline: {len(tests)} test nodes "
              "on the unmodified copies ...", flush=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            baseline = list(pool.map(lambda i: run_pytest(copies[i], tests[i::jobs], args.timeout * 2, False),
                                     range(jobs)))
        for code, output, _ in baseline:
            if code != 0:
                print(output[-6000:], file=sys.stderr)
                print(f"mutants: the baseline (the faults' tests on the unmodified copy) did not pass (exit {code}): "
                      "a failing test catches nothing", file=sys.stderr)
                return 1
        print(f"mutants: baseline passed in {time.perf_counter() - t0:.0f}s", flush=True)
        free: Queue = Queue()
        for copy in copies:
            free.put(copy)

        def run_fault(fault: Fault) -> None:
            copy = free.get()
            try:
                caught, verdict, secs = _run_fault(copy, fault, args.each, args.timeout)
            finally:
                free.put(copy)
            rows[fault.name] = (verdict, secs)
            if not caught:
                survived.append(fault.name)
            print(f"  {fault.name:<30} {verdict}  [{secs:.0f}s]", flush=True)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(run_fault, faults))
    finally:
        if args.keep:
            print(f"mutants: copies kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"mutants: {len(rows) - len(survived)} of {len(rows)} faults caught in {time.perf_counter() - t_all:.0f}s")
    if survived:
        print(f"mutants: NOT CAUGHT: {', '.join(f.name for f in faults if f.name in survived)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
