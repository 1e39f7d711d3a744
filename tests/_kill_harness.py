"""Kill-and-resume harness: SIGKILL a training run at a seeded point, resume it, compare bit for bit.

One trial = (adapter script, phase, seed):

1. the uninterrupted reference run of the script (once per adapter; it also counts how often each
   kill phase occurs, see ``_kill_points.PHASES``);
2. a run killed with SIGKILL at event ``n`` of ``phase`` (:func:`kill_point`: the seeds of one
   script and phase take distinct events, a seeded permutation of the ``count`` events); the child
   writes a marker just before the kill and :func:`check_marker` proves from it and from the files
   that the run died at that event of that phase (not earlier, not elsewhere); right after the
   kill, every file under a final name must already be complete (it loads and equals the
   reference's, bit for bit) and ``forks.jsonl`` must hold only complete records;
3. the same script started again in the same folder: it resumes from its latest complete main
   checkpoint. At the end the main branch (``final.pt``) equals the reference's with ``torch.equal``,
   the cooled checkpoints are the same set with the same tensors, ``forks.jsonl`` has exactly the
   reference's successful forks (no step twice, same metrics bit for bit) and no torn line, and no
   ``*.tmp`` is left anywhere.

Runs are child processes forked from a ``multiprocessing`` fork server that has imported the heavy
modules once (``PRELOAD``), so a run costs its training time, not a Python + torch start-up.

Adding an adapter (Lightning, HF Trainer): write ``tests/_kill_script_<name>.py`` with

- ``main(out: str) -> None``: train (or resume from the newest complete main checkpoint under
  ``out``) with forks in the middle of the run, cooled checkpoints and ``forks.jsonl`` in
  ``out/<COOLED>``, and at the end ``out/final.pt``: a dict of every main-branch tensor
  (parameters, buffers, optimizer state; ``_loops.full_state`` does this for one optimizer).
  Main checkpoints must be written atomically (temporary name, then rename) and announced with
  ``_kill_points.main_checkpoint_written(tmp)`` just before the rename; the framework's own
  ``save_checkpoint`` / ``save_state`` are not atomic.
  Seed everything inside ``main`` (two calls of ``main`` in fresh processes must be identical).
- ``COOLED`` (folder name), ``PRELOAD`` (modules to import once in the fork server),
  ``load_cooled(path) -> dict[str, Tensor]`` (a cooled checkpoint's tensors; ``path`` may be a
  folder for ``save_pretrained``-style checkpoints).

and the trials in ``tests/test_reliability.py`` pick it up (``ADAPTERS`` there lists the names
``hook``, ``lightning``, ``transformers`` and keeps those whose script exists): they are
parametrised over adapters x phases x seeds. Kill points come from ``tests/_kill_points.py`` and
need no adapter code beyond ``main_checkpoint_written``. Keep the script small (tens of steps,
a tiny model, seconds per run): each trial runs it twice.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import traceback
from pathlib import Path

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import _kill_points  # noqa: E402
from cooldown_callbacks.records import RECORDS_NAME, read_records  # noqa: E402

# fields of a record that legitimately differ between two runs
VOLATILE = ("time", "seconds", "run")

_ctx: mp.context.BaseContext | None = None


def _preloads() -> list[str]:
    """``PRELOAD`` of every ``tests/_kill_script_*.py``: the fork server imports them all once."""
    mods = ["_kill_points", "_kill_harness"]
    for f in sorted(Path(TESTS).glob("_kill_script_*.py")):
        mods += [m for m in getattr(importlib.import_module(f.stem), "PRELOAD", []) if m not in mods]
    return mods


def _context() -> mp.context.BaseContext:
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(_preloads())
    return _ctx


def marker_path(out: Path) -> Path:
    """Where a killed run's child writes what it was doing when it died (next to ``out``)."""
    return Path(out).parent / f"{Path(out).name}-kill.json"


def _child(script: str, out: str, kill: str | None, counts_path: str | None) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        _kill_points.install(kill, marker=marker_path(Path(out)) if kill else None)
        importlib.import_module(script).main(out)
        if counts_path:
            _kill_points.dump_counts(counts_path)
    except BaseException:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "error.txt").write_text(traceback.format_exc())
        raise


def run(script: str, out: Path, kill: str | None = None, counts_path: Path | None = None,
        timeout: float = 120) -> int:
    """Run ``script.main(out)`` in a fresh child process; returns its exit code (-9 when killed).
    With ``kill`` the child writes :func:`marker_path` just before it kills itself."""
    marker_path(out).unlink(missing_ok=True)
    proc = _context().Process(target=_child, args=(script, str(out), kill, str(counts_path) if counts_path else None))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"{script} ({kill}) did not finish in {timeout} s")
    return proc.exitcode


def _call(module: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    importlib.import_module(module).main(*args)


def spawn(module: str, *args) -> mp.process.BaseProcess:
    """Start ``module.main(*args)`` in a child process of the fork server (not joined)."""
    proc = _context().Process(target=_call, args=(module, args))
    proc.start()
    return proc


def main(what: str, path: str) -> None:
    """Small child-process jobs for the tests: ``atomic-write-then-die`` dies inside ``atomic_save``."""
    from cooldown_callbacks.records import atomic_save

    if what == "atomic-write-then-die":
        def writer(p):
            p.write_bytes(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGKILL)  # dies between writing and renaming
        atomic_save(path, writer)


def _error(out: Path) -> str:
    f = out / "error.txt"
    return f.read_text()[-3000:] if f.exists() else ""


class Reference:
    """The uninterrupted run of one adapter script, and the kill-phase counts it saw."""

    def __init__(self, script: str, out: Path):
        self.script, self.out = script, out
        self.mod = importlib.import_module(script)
        code = run(script, out, counts_path=out.parent / f"{out.name}-counts.json")
        assert code == 0, f"reference run of {script} failed ({code}):\n{_error(out)}"
        self.counts = json.loads((out.parent / f"{out.name}-counts.json").read_text())
        self.final = torch.load(out / "final.pt", weights_only=True)
        self.cooled_dir = out / self.mod.COOLED
        self.cooled = {p.name: self.mod.load_cooled(p) for p in final_checkpoints(self.cooled_dir)}
        self.records = _ok(read_records(self.cooled_dir))
        assert self.cooled and self.records, "the reference run made no forks"


def final_checkpoints(d: Path) -> list[Path]:
    """Everything under a final name in a cooled folder (no dot-files: temporaries are hidden)."""
    return sorted(p for p in d.iterdir() if not p.name.startswith(".") and p.name != RECORDS_NAME) if d.exists() else []


def _ok(recs: list[dict]) -> list[dict]:
    """Successful records without the fields that differ between runs; checkpoints by file name."""
    out = []
    for r in recs:
        if r.get("status") == "ok":
            r = {k: v for k, v in r.items() if k not in VOLATILE}
            r["checkpoint"] = Path(r["checkpoint"]).name
            out.append(r)
    return out


def _equal_tensors(a: dict, b: dict) -> list[str]:
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(set(a) ^ set(b))}"]
    return [k for k in a if not torch.equal(a[k], b[k])]


def check_files(ref: Reference, out: Path, when: str) -> None:
    """Every cooled checkpoint under a final name is complete and equals the reference's;
    ``forks.jsonl`` holds only complete lines apart from (before resume) a torn last one."""
    cooled_dir = out / ref.mod.COOLED
    for p in final_checkpoints(cooled_dir):
        assert p.name in ref.cooled, f"{when}: unexpected file under a final name: {p.name}"
        try:
            got = ref.mod.load_cooled(p)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{when}: {p.name} under its final name does not load: {e}") from e
        bad = _equal_tensors(ref.cooled[p.name], got)
        assert not bad, f"{when}: {p.name} differs from the uninterrupted run: {bad}"
    recs = _ok(read_records(cooled_dir))
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"{when}: a successful fork recorded twice: {steps}"
    for r in recs:
        assert r in ref.records, f"{when}: record differs from the uninterrupted run: {r}"
        assert r["checkpoint"] in ref.cooled and (cooled_dir / r["checkpoint"]).exists(), \
            f"{when}: record without its checkpoint: {r}"


def kill_point(script: str, phase: str, seed: int, count: int) -> int:
    """The event of ``phase`` (0-based, of ``count``) at which trial ``seed`` (0, 1, ...) kills.

    The events are shuffled once per script and phase and seed ``i`` takes the ``i``-th, so the
    trials of one script never repeat a kill point; there must be at least ``seed + 1`` events."""
    assert 0 <= seed < count, (f"{script}: phase {phase} occurs {count} time(s), too few for a distinct kill point "
                               f"per seed (seed {seed}): use fewer seeds or make the script reach it more often")
    order = list(range(count))
    random.Random(f"{script}-{phase}").shuffle(order)
    return order[seed]


def check_marker(out: Path, phase: str, n: int, cooled_dir: Path) -> dict:
    """Prove that the killed run died at event ``n`` of ``phase``: the child's marker names them,
    says whether a fork was running, and what the phase left on disk is there."""
    m = marker_path(out)
    assert m.exists(), f"{phase}:{n}: the run was killed without writing its marker (not by the chosen kill point)"
    got = json.loads(m.read_text())
    where = f"{phase}:{n} (marker {got})"
    assert (got["phase"], got["n"]) == (phase, n), f"died at {got['phase']}:{got['n']}, not {where}"
    assert got["in_fork"] == (phase in _kill_points.FORK_PHASES), f"{where}: inside a fork? {got['in_fork']}"
    if phase in ("save_partial", "main_ckpt_partial"):  # the half-written temporary is there, cut short
        assert Path(got["tmp"]).exists(), where
        assert phase != "save_partial" or Path(got["tmp"]).parent == cooled_dir, where  # the cooled model's temporary
        assert got["cut"] and Path(got["cut"]).stat().st_size == got["size_after"] < got["size_before"], where
    elif phase == "main_ckpt_before_rename":
        assert Path(got["tmp"]).exists(), where
    elif phase == "before_rename":  # complete under its temporary name, nothing under the final one yet
        assert Path(got["src"]).exists() and not Path(got["dst"]).exists(), where
    elif phase == "after_rename":
        assert Path(got["dst"]).exists() and not Path(got["src"]).exists(), where
    elif phase in ("record_torn", "after_record"):  # the fork's record: torn, or complete as the last line
        raw = Path(got["records"]).read_bytes()
        assert Path(got["records"]).parent == cooled_dir and len(raw) == got["size_after"], where
        if phase == "record_torn":
            assert got["size_before"] > got["size_after"] and not raw.endswith(b"\n"), where
        else:
            assert raw.endswith(b"\n") and json.loads(raw.splitlines()[-1])["step"] == got["step"], where
    elif phase == "snapshot":
        assert got["snapshot_bytes"] > 0, where
    elif phase == "forward":
        assert got["module"], where
    return got


def trial(ref: Reference, out: Path, phase: str, seed: int) -> dict:
    """Kill at the ``seed``-th kill point of ``phase``, prove where it died, check, resume, compare.
    Returns what happened."""
    count = ref.counts.get(phase, 0)
    assert count > 0, f"phase {phase} never occurs in {ref.script} (counts: {ref.counts})"
    n = kill_point(ref.script, phase, seed, count)
    kill = f"{phase}:{n}"
    code = run(ref.script, out, kill=kill)
    assert code == -signal.SIGKILL, f"{kill}: expected a SIGKILL, got exit code {code}:\n{_error(out)}"
    marker = check_marker(out, phase, n, out / ref.mod.COOLED)
    check_files(ref, out, f"after kill at {kill}")
    killed_with = sorted(p.name for p in final_checkpoints(out / ref.mod.COOLED))
    code = run(ref.script, out)
    assert code == 0, f"resume after {kill} failed ({code}):\n{_error(out)}"
    check_files(ref, out, f"after resume from kill at {kill}")
    final = torch.load(out / "final.pt", weights_only=True)
    bad = _equal_tensors(ref.final, final)
    assert not bad, f"resume after {kill}: main branch differs from the uninterrupted run: {bad}"
    got = sorted(p.name for p in final_checkpoints(out / ref.mod.COOLED))
    assert got == sorted(ref.cooled), f"resume after {kill}: cooled checkpoints {got} != {sorted(ref.cooled)}"
    recs = _ok(read_records(out / ref.mod.COOLED))
    assert sorted(recs, key=lambda r: r["step"]) == ref.records, f"resume after {kill}: records differ"
    raw = (out / ref.mod.COOLED / RECORDS_NAME).read_bytes()
    assert raw.endswith(b"\n") and all(json.loads(line) for line in raw.splitlines()), \
        f"resume after {kill}: forks.jsonl has a torn line"
    leftovers = [str(p.relative_to(out)) for p in out.rglob("*.tmp")]
    assert not leftovers, f"resume after {kill}: temporaries left: {leftovers}"
    return {"kill": kill, "cooled_at_kill": killed_with, "marker": marker}
