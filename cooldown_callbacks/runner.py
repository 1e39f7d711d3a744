"""What an adapter provides to run a fork (the :class:`ForkRunner` protocol), and where a fork's
cooled model goes: its name (:func:`checkpoint_pattern`) and its atomic save by all ranks
(:func:`save_cooled`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, Sequence

from .records import aside_path, fsync_path, remove_path, replace_path
from .schedules import Cooldown

__all__ = ["ForkRunner", "check_writable_dir", "checkpoint_pattern", "save_cooled"]


class ForkRunner(Protocol):
    """What an adapter provides to run one branch-mode fork.

    Optional: ``nonfinite_grad_step() -> int | None``, the first fork step whose gradients were not
    finite (checked before each cooldown update), so the fork fails with that reason and step; a
    ``data_source`` attribute (set by ``begin``) saying where the cooldown batches come from, kept in
    the record (see :class:`~cooldown_callbacks.records.ForkRecord`).
    """

    def snapshot(self) -> Any: ...  # noqa: D102 - an object with .restore() and .close()
    def current_lrs(self) -> list[float]: ...  # noqa: D102 - LR of every param group, all optimizers
    def base_lrs(self) -> list[float]: ...  # noqa: D102 - the base LR of every param group
    def begin(self, step: int, cooldown_steps: int) -> None: ...  # noqa: D102
    def train_step(self, lrs: Sequence[float]) -> float | None: ...  # noqa: D102 - one optimizer step
    def evaluate(self) -> dict: ...  # noqa: D102 - metrics of the cooled model (reduced over ranks)
    def save(self, path: Path) -> None: ...  # noqa: D102 - write the cooled model to `path` (all ranks call)
    def end(self) -> None: ...  # noqa: D102 - undo what begin() set up
    def any_rank(self, flag: bool) -> bool: ...  # noqa: D102 - True if flag is True on some rank
    def barrier(self) -> None: ...  # noqa: D102


def check_writable_dir(dirpath: str | os.PathLike, argument: str = "dirpath") -> Path:
    """Create ``dirpath`` and prove it is writable, or raise ``ValueError`` naming ``argument``."""
    d = Path(dirpath)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ValueError(f"Invalid {argument} ({str(d)!r}): cannot write there ({e.strerror or e}); "
                         f"choose a writable directory with free space.") from e
    return d


def checkpoint_pattern(filename: str, cooldowns: Sequence[Cooldown]) -> str:
    """The name pattern of a plan's cooled checkpoints: ``filename`` (fields ``{step}``, ``{cooldown}``,
    ``{shape}``, ``{label}``), extended when several cooldowns per fork point would share names: with
    ``-{shape}`` when their shapes differ, else ``-{label}``. One cooldown keeps ``filename``; so do
    fixed lengths that differ, which ``{cooldown}`` tells apart.

    >>> checkpoint_pattern("cooled-{step}-{cooldown}", [Cooldown(steps=5), Cooldown(steps=5, shape="linear")])
    'cooled-{step}-{cooldown}-{shape}'
    """
    f = filename
    if len(cooldowns) == 1 or "{label" in f:
        return f
    shapes_differ = len({c.shape_name for c in cooldowns}) == len(cooldowns)
    if "{shape" in f and shapes_differ:
        return f
    steps = [c.steps for c in cooldowns]
    if "{cooldown" in f and None not in steps and len(set(steps)) == len(steps):
        return f  # fixed lengths that differ: the {cooldown} field tells them apart at every step
    return f + ("-{shape}" if shapes_differ else "-{label}")


def save_cooled(runner: ForkRunner, path: Path, is_global_zero: bool) -> None:
    """All ranks write to a temporary name; rank zero renames it into place.

    A failed write leaves nothing behind (the temporary is removed: a full disk stays usable);
    a finished checkpoint already under ``path`` is replaced atomically, never deleted first
    (a folder is moved aside in one rename, then removed: a kill never leaves half of it).
    """
    tmp = path.parent / f".{path.name}.tmp"
    if is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_path(tmp)
        remove_path(aside_path(path))  # left by a kill between moving a finished folder aside and replacing it
    runner.barrier()
    try:
        runner.save(tmp)
        runner.barrier()
        error: BaseException | None = None
        if is_global_zero:
            try:
                if not tmp.exists():
                    from .engine import ForkError  # its home (the name users catch); engine imports this module

                    raise ForkError(f"the cooled checkpoint was not written to {tmp}")
                fsync_path(tmp)
                replace_path(tmp, path)
                fsync_path(path.parent, files=False)
            except Exception as e:  # noqa: BLE001 - every rank learns of it below, then all raise
                error = e
        # One decision for all ranks (a collective, so it is also the final barrier): a failure seen
        # by rank zero alone must not leave it going on while the others wait for it.
        if runner.any_rank(error is not None):
            if error is not None:
                raise error
            from .engine import ForkError

            raise ForkError("the cooled checkpoint could not be put in place on rank 0 (see its records)")
    except BaseException:
        if is_global_zero:
            try:
                remove_path(tmp)
            except OSError:
                pass
        raise
