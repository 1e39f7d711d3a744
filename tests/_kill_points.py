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


def _hit(phase: str) -> bool:
    """Count one event of ``phase``; True if it is the chosen kill point."""
    n = _counts[phase]
    _counts[phase] += 1
    return _kill is not None and _kill == (phase, n)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate_half(path: Path, keep_from: int = 0) -> None:
    """Cut ``path`` (the largest file if it is a folder) to ``keep_from`` plus half of the rest."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        if not files:
            return
        path = max(files, key=lambda p: p.stat().st_size)
    size = path.stat().st_size
    with open(path, "rb+") as f:
        f.truncate(keep_from + (size - keep_from) // 2)
        f.flush()
        os.fsync(f.fileno())


class _Runner:
    """Forwards to the adapter's runner; kills at the snapshot / evaluation / save points."""

    def __init__(self, runner):
        self._r = runner

    def __getattr__(self, name):
        return getattr(self._r, name)

    def snapshot(self):
        snap = self._r.snapshot()
        if _hit("snapshot"):
            _die()
        return snap

    def evaluate(self):
        if _hit("evaluate"):
            _die()
        return self._r.evaluate()

    def save(self, path):
        self._r.save(path)
        if _hit("save_partial") and Path(path).exists():
            _truncate_half(Path(path))
            _die()


def install(kill: str | None = None) -> None:
    """Install the kill points; ``kill="phase:n"`` kills at the ``n``-th (0-based) event of ``phase``."""
    global _kill
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
            _truncate_half(path, keep_from=before)
            _die()
        if _hit("after_record"):
            _die()

    eng.append_record = append_record

    orig_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if not (_in_fork and str(src).endswith(".tmp")):
            return orig_replace(src, dst, *args, **kwargs)
        if _hit("before_rename"):
            _die()
        orig_replace(src, dst, *args, **kwargs)
        if _hit("after_rename"):
            _die()

    os.replace = replace

    def on_forward(module, args):
        if _in_fork and _hit("forward"):
            _die()

    torch.nn.modules.module.register_module_forward_pre_hook(on_forward)

    def on_step(optimizer, args, kwargs):
        if _hit("opt_step" if _in_fork else "main_step"):
            _die()

    register_optimizer_step_pre_hook(on_step)


def main_checkpoint_written(tmp_dir: str | os.PathLike) -> None:
    """Called by a training script after writing a main checkpoint to ``tmp_dir``, before renaming it."""
    if _hit("main_ckpt_partial"):
        _truncate_half(Path(tmp_dir))
        _die()
    if _hit("main_ckpt_before_rename"):
        _die()


def counts() -> dict:
    return dict(_counts)


def dump_counts(path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(counts(), sort_keys=True))
