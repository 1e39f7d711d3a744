"""Seeded SIGKILL points for the kill-and-resume trials, installed inside a child process.

What is simulated is the kill itself: :func:`install` wraps a few library seams (the engine's
``fork``, the runner it is given, ``os.replace``, the records writer, torch's global forward and
optimizer-step hooks) so that the ``n``-th event of one *phase* sends ``SIGKILL`` to the process.
Nothing else changes: the training, the fork, the saves and renames all run the real code. The
wrappers are framework-free (every adapter goes through ``ForkEngine.fork_point`` with a runner), so the
same phases apply to the Accelerate hook, the Lightning callback and the HF callback.

Phases (``PHASES``), in the order they happen:

- inside a fork: ``snapshot`` (just taken), ``forward`` (any module forward: cooldown micro-steps
  and the evaluation), ``opt_step`` (before a cooldown optimizer update), ``evaluate`` (as the
  evaluation starts), ``save_partial`` (the cooled checkpoint half-written at its temporary name),
  ``before_rename`` / ``after_rename`` (around the rename to the final name), ``record_torn`` (the
  record line half-written), ``after_record`` (the record written, the main branch not yet
  restored);
- outside a fork (the user's side, reported by the training script): ``main_step`` (before a
  main-branch optimizer update), ``main_ckpt_partial`` (a main checkpoint half-written in its
  temporary folder), ``main_ckpt_before_rename`` (complete, not yet renamed into place).

A partial write is produced by writing the real bytes and cutting the file back before the kill:
on disk this is exactly what a kill in the middle of the write leaves behind.

Proof of the phase: just before the kill the child writes a marker file (``install(marker=...)``):
the phase, the event number, whether a fork was running and what the phase left on disk (the
half-written file, the rename's source and target, the records file's size). The harness checks it
against the kill it asked for and against the files it finds (``_kill_harness.check_marker``).
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

__all__ = ["PHASES", "FORK_PHASES", "install", "main_checkpoint_written", "counts", "dump_counts"]

FORK_PHASES = ("snapshot", "forward", "opt_step", "evaluate", "save_partial", "before_rename", "after_rename",
               "record_torn", "after_record")
PHASES = FORK_PHASES + ("main_step", "main_ckpt_partial", "main_ckpt_before_rename")

_counts: Counter = Counter()
_kill: tuple[str, int] | None = None
_in_fork = False
_marker: Path | None = None


def _hit(phase: str) -> bool:
    """Count one event of ``phase``; True if it is the chosen kill point."""
    n = _counts[phase]
    _counts[phase] += 1
    return _kill is not None and _kill == (phase, n)


def _die(**evidence) -> None:
    """SIGKILL this process, after writing the marker that names the kill point and its evidence."""
    if _marker is not None:
        phase, n = _kill
        data = json.dumps({"phase": phase, "n": n, "in_fork": _in_fork, "pid": os.getpid(),
                           **{k: str(v) if isinstance(v, Path) else v for k, v in evidence.items()}})
        with open(_marker, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate_half(path: Path, keep_from: int = 0) -> dict:
    """Cut ``path`` (the largest file if it is a folder) to ``keep_from`` plus half of the rest.
    Returns the evidence: the file cut, its size before and after."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        if not files:
            return {"cut": None}
        path = max(files, key=lambda p: p.stat().st_size)
    size = path.stat().st_size
    with open(path, "rb+") as f:
        f.truncate(keep_from + (size - keep_from) // 2)
        f.flush()
        os.fsync(f.fileno())
    return {"cut": str(path), "size_before": size, "size_after": path.stat().st_size}


class _Runner:
    """Forwards to the adapter's runner; kills at the snapshot / evaluation / save points."""

    def __init__(self, runner):
        self._r = runner

    def __getattr__(self, name):
        return getattr(self._r, name)

    def snapshot(self):
        snap = self._r.snapshot()
        if _hit("snapshot"):
            _die(snapshot_bytes=snap.nbytes)
        return snap

    def evaluate(self):
        if _hit("evaluate"):
            _die()
        return self._r.evaluate()

    def save(self, path):
        self._r.save(path)
        if _hit("save_partial") and Path(path).exists():
            _die(tmp=path, **_truncate_half(Path(path)))


def install(kill: str | None = None, marker: str | os.PathLike | None = None) -> None:
    """Install the kill points; ``kill="phase:n"`` kills at the ``n``-th (0-based) event of ``phase``,
    after writing the marker file ``marker`` (if given)."""
    global _kill, _marker
    _marker = Path(marker) if marker is not None else None
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from cooldown_callbacks import engine as eng

    if kill:
        phase, n = kill.split(":")
        if phase not in PHASES:
            raise ValueError(f"unknown kill phase {phase!r}; choose one of {PHASES}")
        _kill = (phase, int(n))

    orig_fork = eng.ForkEngine.fork_point  # every fork goes through it (ForkEngine.fork too)

    def fork_point(self, step, runner, **kwargs):
        global _in_fork
        _in_fork = True
        try:
            return orig_fork(self, step, _Runner(runner), **kwargs)
        finally:
            _in_fork = False

    eng.ForkEngine.fork_point = fork_point

    orig_append = eng.append_record

    def append_record(path, record):
        if not _in_fork:
            return orig_append(path, record)
        path = Path(path)
        before = path.stat().st_size if path.exists() else 0
        orig_append(path, record)
        if _hit("record_torn"):
            _die(records=path, step=record.get("step"), **_truncate_half(path, keep_from=before))
        if _hit("after_record"):
            _die(records=path, step=record.get("step"), size_after=path.stat().st_size)

    eng.append_record = append_record

    orig_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if not (_in_fork and str(src).endswith(".tmp")):
            return orig_replace(src, dst, *args, **kwargs)
        if _hit("before_rename"):
            _die(src=src, dst=dst)
        orig_replace(src, dst, *args, **kwargs)
        if _hit("after_rename"):
            _die(src=src, dst=dst)

    os.replace = replace

    def on_forward(module, args):
        if _in_fork and _hit("forward"):
            _die(module=type(module).__name__)

    torch.nn.modules.module.register_module_forward_pre_hook(on_forward)

    def on_step(optimizer, args, kwargs):
        if _hit("opt_step" if _in_fork else "main_step"):
            _die()

    register_optimizer_step_pre_hook(on_step)


def main_checkpoint_written(tmp_dir: str | os.PathLike) -> None:
    """Called by a training script after writing a main checkpoint to ``tmp_dir``, before renaming it."""
    if _hit("main_ckpt_partial"):
        _die(tmp=tmp_dir, **_truncate_half(Path(tmp_dir)))
    if _hit("main_ckpt_before_rename"):
        _die(tmp=tmp_dir)


def counts() -> dict:
    return dict(_counts)


def dump_counts(path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(counts(), sort_keys=True))
