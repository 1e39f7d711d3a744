"""Fork records and crash-safe file writes.

Every fork appends one JSON object per line (one per cooldown) to ``<dirpath>/forks.jsonl``:

``{"step": 1000, "cooldown_steps": 250, "shape": "1-sqrt", "label": null, "mode": "branch", "status": "ok",
"metrics": {"val_loss": 1.52}, "main_metrics": {"val_loss": 1.71}, "checkpoint": "cooled-...",
"seconds": 12.3, "lr": 0.001, "error": null, "reason": null, "grad_norms": null, "time": 1732300000.0,
"run": "9f1c...", "data": "peek", "restored": false}``

**The budget axis.** A cooled model of a fork after ``step`` = S completed main-branch steps with
``cooldown_steps`` = c has trained for **T = S + c** optimizer steps: that is its budget, the step
of a fixed-budget run it equals, and the one convention for a budget: the command line's ``report``
(column ``total``, plots) and :func:`~cooldown_callbacks.budget.fit_budget_curve` use T = S + c.
``step`` itself is where the main branch was when it forked. The adapters log cooled metrics to the
host's loggers (TensorBoard, W&B, CSV, HF ``log_history``) at S, on the same row as the main
branch's evaluation they were forked at, for two reasons: that row compares the two branches at one
point of the run, and loggers such as W&B drop a value logged at a step below one already logged
(S + c would be ahead of the main branch's next rows). So a logger's x-axis is the main branch's
step S; the budget of each cooled value is S + c, which ``report`` and the fit use.

``status`` is ``"ok"``, ``"failed"`` (then ``error`` says why) or ``"skipped"`` (``ForkPlan(max_overhead=...)``
did not let the fork run; ``reason`` says why; no checkpoint). ``label`` tells the cooldowns of one
fork point apart when the plan has several (:func:`~cooldown_callbacks.plan.cooldown_labels`;
``null`` for one); ``metrics`` keep the names a single cooldown's would have (the adapters' logged
names carry the label). ``checkpoint`` is written relative to the records file (the name of the
cooled checkpoint beside it); :func:`read_records` resolves it, and also reads older files whose
paths were absolute or relative to the training's working directory. ``main_metrics`` holds the main
branch's metrics at the fork step when the adapter has them (e.g. the evaluation at that step).
Main-branch metrics that become known only after the fork (the adapter's own evaluation at that step)
are appended as ``{"type": "main_metrics", "step": ..., "run": ..., "main_metrics": {...}}`` lines,
which :func:`read_records` merges into that step's records (every cooldown of the fork point). ``grad_norms`` holds the main branch's per-step gradient norms since the previous fork when
``ForkPlan(record_grad_norms=True)``. ``run`` identifies the training run (kept across resumes):
a resumed run recognises the forks it finished before a crash and does not run them again.
``data`` says where the cooldown batches came from (``"peek"``: the main branch's upcoming batches;
``"fresh"``: a separate seeded loader; ``"iterable"``/``"callable"``: the user's own stream; adapters
may add detail, e.g. ``"fresh (stream restarted from its beginning)"``). ``restored`` is true only in
memory, for a record that a resumed run took back from the file instead of running the fork again.
Lines are appended with a single ``write`` + ``fsync``; a
reader skips a torn last line. Checkpoints are written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["ForkRecord", "append_record", "read_records", "resolve_checkpoint", "relative_checkpoint", "atomic_path",
           "atomic_write_bytes", "RECORDS_NAME", "STATUSES"]

RECORDS_NAME = "forks.jsonl"
STATUSES = ("ok", "failed", "skipped")


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # tensors / numpy scalars
        try:
            return _jsonable(x.item())
        except (ValueError, RuntimeError):
            pass
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


@dataclass
class ForkRecord:
    """What one fork did. ``to_json()`` gives the JSON-lines object."""

    step: int
    cooldown_steps: int
    shape: str
    label: str | None = None
    mode: str = "branch"
    status: str = "ok"
    metrics: dict = field(default_factory=dict)
    main_metrics: dict = field(default_factory=dict)
    checkpoint: str | None = None
    seconds: float = 0.0
    lr: float | None = None
    error: str | None = None
    reason: str | None = None
    grad_norms: list | None = None
    time: float = 0.0
    run: str | None = None
    data: str | None = None
    restored: bool = False

    def to_json(self) -> dict:
        return _jsonable(asdict(self))

    @property
    def budget(self) -> int:
        """T = S + c: the optimizer steps the cooled model trained for."""
        return int(self.step) + int(self.cooldown_steps)

    @classmethod
    def from_json(cls, d: dict) -> "ForkRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def relative_checkpoint(records_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> str:
    """``checkpoint`` relative to the folder of the records file (its name when it sits there)."""
    ck, base = Path(checkpoint), Path(records_dir)
    try:
        return os.path.relpath(ck.absolute(), base.absolute())
    except ValueError:  # another drive (Windows)
        return str(ck)


def resolve_checkpoint(records_file: str | os.PathLike, checkpoint: str | None) -> str | None:
    """The path of a record's ``checkpoint``, read from ``records_file``.

    Written relative to the records file's folder; older records held absolute paths or paths
    relative to where training ran, which are kept when they exist. When nothing exists, the
    path relative to the records file is returned (what the record says).
    """
    if not checkpoint:
        return checkpoint
    p, base = Path(checkpoint), Path(records_file).parent
    if p.is_absolute():
        return str(p)
    beside = base / p
    if beside.exists():
        return str(beside)
    if p.exists():  # an older record: relative to the working directory of the training
        return str(p)
    named = base / p.name  # an older record, read from elsewhere: the checkpoint sits beside the file
    return str(named) if named.exists() else str(beside)


def append_record(path: str | os.PathLike, record: ForkRecord | dict) -> None:
    """Append one JSON line atomically enough for a crash: one ``write`` then ``fsync``.

    A torn last line (a crash mid-write) is skipped by :func:`read_records` and healed here: if the
    file does not end in a newline, the partial line is dropped before appending.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = record.to_json() if isinstance(record, ForkRecord) else _jsonable(record)
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":  # torn tail: cut back to the last complete line
                with open(path, "rb") as f:
                    data = f.read()
                os.ftruncate(fd, data.rfind(b"\n") + 1)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike) -> list[dict]:
    """All complete fork records in a JSON-lines file (or a directory holding ``forks.jsonl``).

    A torn or corrupt line is skipped. Addendum lines ``{"type": "main_metrics", "step": s, ...}``
    (main-branch metrics that became known after the fork) are merged into the records of step ``s``
    (of the addendum's run, when it names one; else the latest record of that step). ``checkpoint``
    paths are resolved with :func:`resolve_checkpoint` (usable from the current directory).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_NAME
    out: list[dict] = []
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and obj.get("type") == "main_metrics":
                _merge_main_metrics(out, obj)
                continue
            if isinstance(obj, dict) and obj.get("checkpoint"):
                obj["checkpoint"] = resolve_checkpoint(path, obj["checkpoint"])
            out.append(obj)
    return out


def _merge_main_metrics(records: list[dict], add: dict) -> None:
    vals, step, run = add.get("main_metrics", {}), add.get("step"), add.get("run")
    if run is None:  # an older addendum: the latest record of that step
        targets = [next((r for r in reversed(records) if r.get("step") == step), None)]
    else:
        targets = [r for r in records if r.get("step") == step and r.get("run") == run]
    for r in targets:
        if r is not None:
            r.setdefault("main_metrics", {}).update(vals)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` only if the block succeeds.

    A crash or exception never leaves anything under the final name; the temporary is removed on
    error. Works for files and (``is_dir=True``) directories.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)) if is_dir else \
        final.parent / f".{final.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        fsync_path(tmp)
        replace_path(tmp, final)
        fsync_path(final.parent, files=False)
    except BaseException:
        remove_path(tmp)
        raise


def aside_path(path: Path) -> Path:
    """Where :func:`replace_path` moves a finished folder while its replacement takes its name."""
    return path.parent / f".{path.name}.old.tmp"


def replace_path(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, atomically for files. A folder already at ``final`` (which
    ``os.replace`` cannot overwrite) leaves its name in one rename and is removed only after ``tmp``
    took its place, so a kill never leaves a half-removed folder under the final name."""
    final = Path(final)
    if not (final.is_dir() and not final.is_symlink()):
        os.replace(tmp, final)
        return
    old = aside_path(final)
    remove_path(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)  # put the finished folder back
        raise
    remove_path(old)


def remove_path(p: Path) -> None:
    """Remove a file or folder if it exists."""
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_save(final: str | os.PathLike, writer: Callable[[Path], Any], is_dir: bool = False) -> Path:
    """Call ``writer(tmp_path)`` and rename the result to ``final``."""
    with atomic_path(final, is_dir=is_dir) as tmp:
        writer(tmp)
    return Path(final)


def fsync_path(p: Path, files: bool = True) -> None:
    """fsync a written file; for a folder, every file in it and the folder (only the folder with
    ``files=False``). Errors are ignored: fsync is best effort on filesystems that refuse it."""
    p = Path(p)
    paths = [p] if not p.is_dir() else ([*(q for q in p.rglob("*") if q.is_file()), p] if files else [p])
    for q in paths:
        try:
            fd = os.open(q, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
