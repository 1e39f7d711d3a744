"""The fork engine: decides when to fork and runs a fork through an adapter's :class:`ForkRunner`.

An adapter translates its framework's events into three calls:

- ``engine.main_multiplier(t)``: the LR multiplier of the main branch for update ``t + 1``
  (``None`` when the user's own scheduler drives it);
- ``engine.should_fork(step, evaluating=...)`` after each optimizer step, then
  ``engine.fork_point(step, runner)`` (branch mode) - snapshot, then for each of the plan's
  cooldowns: ``c`` cooldown steps, evaluate, save atomically, record, restore - one record per
  cooldown (``engine.fork`` returns the last one);
- in continue mode (WSD-S) the decay steps are main-branch steps: ``engine.continue_due(step)``
  tells when a cooldown window has just ended, and ``engine.finish_continue(step, runner)``
  evaluates and saves the cooled model without any snapshot.

The engine holds no framework object; its state (completed forks and their records) is a plain
dict for the adapter's checkpoint mechanism.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from .plan import ForkPlan
from .records import RECORDS_NAME, ForkRecord, append_record, read_records, relative_checkpoint
from .runner import ForkRunner, check_writable_dir, checkpoint_pattern, save_cooled
from .schedules import Cooldown, Schedule, wsds_value
from .signals import _Interrupted, _SignalGuard
from .snapshot import capture_rng, restore_rng

__all__ = ["ForkEngine", "ForkRunner", "ForkError", "check_writable_dir"]


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return True


class ForkError(RuntimeError):
    """A fork failed (non-finite loss or metric, or an error inside the fork)."""


class ForkEngine:
    """Plan-driven fork logic shared by every adapter.

    Args:
        plan: the :class:`~cooldown_callbacks.ForkPlan`.
        schedule: the main-branch schedule, or ``None`` when the user's scheduler drives the LR
            (forks then decay from the current LR of each param group).
        dirpath: where cooled checkpoints and ``forks.jsonl`` go.
        filename: checkpoint name pattern with the fields ``{step}``, ``{cooldown}`` (its length) and,
            optionally, ``{shape}`` and ``{label}`` (see :func:`~cooldown_callbacks.plan.cooldown_labels`).
            A plan with several cooldowns whose names the pattern would not tell apart gets
            ``-{shape}`` (when the shapes differ) or else ``-{label}`` appended; one cooldown keeps
            the pattern as it is.
        is_global_zero: whether this process writes files.
        eval_every: evaluation interval in steps, used to place continue-mode windows for
            ``on_eval`` plans (the cooldown then *ends* at each evaluation step).
    """

    def __init__(self, plan: ForkPlan, schedule: Schedule | None = None, dirpath: str | os.PathLike = "cooled",
                 *, filename: str = "cooled-step={step:08d}-cd={cooldown}", is_global_zero: bool = True,
                 eval_every: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        if not isinstance(plan, ForkPlan):
            raise ValueError(f"Invalid plan ({plan!r}): must be a ForkPlan(...).")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ValueError(f"Invalid schedule ({schedule!r}): must be a Schedule such as WSD(...) or RSqrt(...), "
                             "or None to keep your own scheduler.")
        try:
            filename.format(step=1, cooldown=1, shape="linear", label="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"Invalid filename ({filename!r}): may use only the fields {{step}}, {{cooldown}}, "
                             f"{{shape}} and {{label}}.") from e
        self.plan = plan
        self.schedule = schedule
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.is_global_zero = is_global_zero
        self.eval_every = eval_every
        self.rank, self.world_size = rank, world_size
        self.records: list[dict] = []
        self.completed: set[int] = set()
        self.grad_norms: list[float] = []
        self.run_id = uuid.uuid4().hex  # tags this run's records; kept across resumes (state_dict)
        self._resumed = False
        self._on_disk: dict[tuple[int, str | None], dict] | None = None
        self._active: tuple[Cooldown, str | None] | None = None  # the cooldown a fork is running now

    # -- LR ----------------------------------------------------------------------------------
    def main_multiplier(self, t: int) -> float | None:
        """LR multiplier of the main branch for update ``t + 1`` (``None``: leave the LR alone)."""
        if self.plan.mode == "continue":
            w = self.window(t)
            if w is not None:
                start, c = w
                if self.schedule is None:
                    return None  # handled by continue_lrs (decay from the LR at the window start)
                return wsds_value(self.schedule, self.plan.cooldowns[0], start, c, self.plan.rewarm_steps, t)
        if self.schedule is None:
            return None
        return self.schedule(t)

    def fork_lrs(self, step: int, k: int, c: int, base_lrs: Sequence[float], lrs_at_fork: Sequence[float],
                 cooldown: Cooldown | None = None) -> list[float]:
        """Per-group LRs of the ``k``-th of ``c`` cooldown steps of a fork after ``step`` steps.

        With a schedule: ``base * schedule.cooled(at=step, ...)(step + k)``, the same float expression
        as a ``LambdaLR`` over the cooled schedule, so a fork equals a fixed-budget run bit for bit.
        Without: ``lr_at_fork * cooldown.factor(k, c)``. ``cooldown``: default the one running now
        (the plan's first outside a fork).
        """
        cd = cooldown if cooldown is not None else self.active_cooldown
        if self.schedule is not None:
            mult = self.schedule(step) * cd.factor(k, c)
            return [b * mult for b in base_lrs]
        f = cd.factor(k, c)
        return [lr * f for lr in lrs_at_fork]

    @property
    def active_cooldown(self) -> Cooldown:
        """The cooldown a fork is running now (outside a fork: the plan's first)."""
        return self._active[0] if self._active is not None else self.plan.cooldowns[0]

    @property
    def active_label(self) -> str | None:
        """The label of the cooldown running now (``None`` for a plan with one cooldown, or outside a
        fork): adapters put it into the cooled metrics' names."""
        return self._active[1] if self._active is not None else None

    # -- triggers ----------------------------------------------------------------------------
    def cooldown_steps(self, step: int) -> int:
        """Cooldown steps a fork after ``step`` adds (all of the plan's cooldowns)."""
        return self.plan.fork_cost(step)

    def spent(self) -> int:
        """Cooldown steps of this run's branch forks so far (run, failed or taken back; not skipped)."""
        return sum(int(r.get("cooldown_steps", 0)) for r in self.records
                   if r.get("mode") == "branch" and r.get("status") in ("ok", "failed"))

    def cost_line(self, max_steps: int | None, eval_every: int | None = None) -> str | None:
        """One line saying what the plan adds up to ``max_steps`` (``None`` when the horizon or, for an
        ``on_eval`` plan, the evaluation interval is unknown): adapters log it at the start of training."""
        horizon, every = _whole(max_steps), _whole(eval_every if eval_every is not None else self.eval_every)
        if horizon is None or (self.plan.on_eval and every is None):
            return None
        return str(self.plan.cost(horizon, eval_every=every if self.plan.on_eval else None))

    def should_fork(self, step: int, evaluating: bool = False) -> bool:
        """Branch mode: fork after ``step`` completed steps?"""
        if self.plan.mode != "branch" or step in self.completed or step <= 0:
            return False
        return self.plan.is_fork_step(step) or bool(self.plan.on_eval and evaluating)

    def window(self, t: int) -> tuple[int, int] | None:
        """Continue mode: ``(start, c)`` of the latest cooldown window that started at or before ``t``."""
        return self.plan.window(t, self.eval_every)

    def continue_due(self, step: int) -> int | None:
        """Continue mode: the start of a window whose cooldown ended exactly at ``step``, else None."""
        if self.plan.mode != "continue" or step <= 0:
            return None
        w = self.window(step - 1)
        if w is None:
            return None
        start, c = w
        if start + c == step and start not in self.completed:
            return start
        return None

    # -- running -----------------------------------------------------------------------------
    def _pattern(self) -> str:
        """The checkpoint name pattern for the current plan (see :func:`~cooldown_callbacks.runner.checkpoint_pattern`)."""
        return checkpoint_pattern(self.filename, self.plan.cooldowns)

    def checkpoint_path(self, step: int, c: int, suffix: str = "", cooldown: Cooldown | None = None,
                        label: str | None = None) -> Path:
        """Where the cooled model of a fork after ``step`` with ``c`` cooldown steps goes."""
        cd = cooldown if cooldown is not None else self.active_cooldown
        if cooldown is None and label is None:
            label = self.active_label
        name = self._pattern().format(step=step, cooldown=c, shape=cd.shape_name, label=label or "")
        return self.dirpath / (name + suffix)

    def other_runs(self) -> list[str]:
        """Ids of other runs whose records are in ``dirpath`` (rank zero reads the file)."""
        try:
            runs = {str(r.get("run")) for r in read_records(self.dirpath / RECORDS_NAME) if r.get("run")}
        except OSError:
            return []
        return sorted(runs - {self.run_id})

    def claim_dirpath(self, argument: str = "dirpath") -> None:
        """Refuse a ``dirpath`` that holds another run's records (call before the first step, on rank zero).

        A fresh run writing there would replace that run's cooled checkpoints while its records
        still describe them. A resumed run (same run id, from the checkpoint's state) continues in place.
        """
        others = self.other_runs()
        if others:
            raise ValueError(
                f"Invalid {argument} ({str(self.dirpath)!r}): it holds the cooled models and {RECORDS_NAME} of "
                f"another run (run {others[-1][:8]}); this new run would overwrite them while those records "
                f"still point at them. Give a new {argument}, resume that run from its checkpoint, or move "
                f"the folder away.")

    def fork(self, step: int, runner: ForkRunner, *, suffix: str = "", main_metrics: dict | None = None) -> ForkRecord:
        """:meth:`fork_point`, returning the record of its last cooldown (the only one for a plan with one)."""
        return self.fork_point(step, runner, suffix=suffix, main_metrics=main_metrics)[-1]

    def fork_point(self, step: int, runner: ForkRunner, *, suffix: str = "",
                   main_metrics: dict | None = None) -> list[ForkRecord]:
        """Fork every cooldown of the plan after ``step`` completed steps; the main branch is restored after.

        One snapshot; each cooldown runs from the restored main branch (the snapshot stays valid) and
        gets its own record, in the plan's order. ``main_metrics``: the main branch's own metrics at
        ``step`` (kept in each record).

        Cost: with ``ForkPlan(max_overhead=r)`` the fork point runs only if :meth:`spent` plus its
        cooldown steps stay ``<= r * step``; otherwise each cooldown is recorded ``"skipped"`` with the
        reason, and nothing runs. The decision depends only on this run's records (kept in the
        adapters' checkpoints), so a resumed run decides as the uninterrupted one did.

        Faults: an exception, a non-finite loss or gradient (``runner.nonfinite_grad_step()``, if the
        runner has it) or a non-finite metric marks that cooldown ``failed`` with the reason; the main
        branch is restored either way and the next cooldown runs. SIGTERM/SIGINT/SIGUSR1/SIGUSR2 with
        a Python handler stop the fork point (single process) and reach their handler only after the
        restore, so a preemption handler never checkpoints cooled weights. After a resume, a cooldown
        this run already finished (recorded before a crash, with its checkpoint) is taken back from
        the records instead of running again.
        """
        plan = self.plan
        cds, labels = plan.cooldowns, plan.cooldown_labels
        main = _floats(main_metrics)
        spent = self.spent()  # before taking back this step's own records
        taken = {lab: self._finished_before_restart(step, cd, lab, runner) for cd, lab in zip(cds, labels)}
        out: list[ForkRecord] = []
        if not plan.admits(step, spent):
            reason = plan.skip_reason(step, spent)
            for cd, lab in zip(cds, labels):
                rec = taken[lab] or ForkRecord(step=step, cooldown_steps=cd.length(step), shape=cd.shape_name,
                                               label=lab, mode="branch", status="skipped", reason=reason,
                                               time=time.time(), main_metrics=dict(main))
                if taken[lab] is None:
                    self._finish(rec, done=False)
                out.append(rec)
            self.completed.add(step)
            return out
        guard = _SignalGuard(enabled=self.world_size == 1)
        snap, rng_at_fork = None, None
        try:
            for cd, lab in zip(cds, labels):
                if taken[lab] is not None:
                    out.append(taken[lab])
                    continue
                if snap is None:
                    snap = runner.snapshot()
                    rng_at_fork = capture_rng()
                rec, error = self._run_one(step, cd, lab, runner, snap, guard, suffix, rng_at_fork, main)
                out.append(rec)
                if isinstance(error, _Interrupted):
                    return out  # the signal goes to its handler; the fork point is not completed
                if error is not None:
                    self.completed.add(step)
                self._raise_if_needed(error, rec, f"fork at step {step}" + (f" (cooldown {lab})" if lab else ""))
        finally:
            try:
                if snap is not None:
                    snap.close()
            finally:
                guard.release()  # held signals reach their handlers now, with the main branch restored
        self.completed.add(step)
        return out

    def _run_one(self, step: int, cd: Cooldown, label: str | None, runner: ForkRunner, snap: Any,
                 guard: _SignalGuard, suffix: str, rng_at_fork: dict, main: dict
                 ) -> tuple[ForkRecord, BaseException | None]:
        """One cooldown of a fork point, then the restore; the record is written before returning."""
        c = cd.length(step)
        rec = ForkRecord(step=step, cooldown_steps=c, shape=cd.shape_name, label=label, mode="branch",
                         time=time.time(), main_metrics=dict(main))
        t0 = time.perf_counter()
        error: BaseException | None = None

        def restore() -> None:
            try:
                runner.end()
            finally:
                self._active = None
                snap.restore()

        self._active = (cd, label)
        try:
            try:
                guard.arm()
                self._run_fork(step, c, runner, rec, suffix, rng_at_fork)
            finally:
                guard.hold()  # from here on a signal waits until the main branch is back
        except (Exception, _Interrupted) as e:  # noqa: BLE001 - recorded, then re-raised if asked
            error = e
            rec.status = "failed"
            rec.error = str(e) if isinstance(e, _Interrupted) else f"{type(e).__name__}: {e}"
        except BaseException:  # e.g. SystemExit: not a fork failure; restore and let it through
            restore()
            raise
        restore()
        rec.seconds = time.perf_counter() - t0
        self._finish(rec, done=False)
        return rec, error

    def _run_fork(self, step: int, c: int, runner: ForkRunner, rec: ForkRecord, suffix: str, rng_at_fork: dict) -> None:
        """The fork's body: cooldown steps, checks, evaluation, atomic save (the caller restores)."""
        base, at_fork = runner.base_lrs(), runner.current_lrs()
        rec.lr = float(self.fork_lrs(step, 0, c, base, at_fork)[0]) if at_fork else None
        runner.begin(step, c)
        rec.data = getattr(runner, "data_source", None)
        bad_step = None
        for k in range(c):
            loss = runner.train_step(self.fork_lrs(step, k, c, base, at_fork))
            if bad_step is None and loss is not None and not _finite(loss):
                bad_step = step + k
        bad_grad = runner.nonfinite_grad_step() if hasattr(runner, "nonfinite_grad_step") else None
        if runner.any_rank(bad_step is not None or bad_grad is not None):
            raise ForkError(_nonfinite_message(bad_step, bad_grad))
        self._evaluate_and_save(runner, rec, suffix, rng_at_fork)

    def _evaluate_and_save(self, runner: ForkRunner, rec: ForkRecord, suffix: str, rng: dict | None = None) -> None:
        """Evaluate the cooled model, refuse non-finite metrics, save it atomically, fill ``rec``.

        The evaluation draws its random numbers from ``rng`` (a branch fork: the RNG state at the fork
        point, so an evaluation that samples random batches sees the same ones as the main branch's
        evaluation at that step), or from the current state (continue mode); either way the RNG state
        after it is the one before it, so the evaluation never moves the training's random stream.
        """
        after = capture_rng()
        if rng is not None:
            restore_rng(rng)
        try:
            metrics = runner.evaluate()
        finally:
            restore_rng(after)
        bad = [k for k, v in metrics.items() if not _finite(v)]
        if bad:
            raise ForkError(f"non-finite evaluation metric(s) of the cooled model: {', '.join(bad)}")
        rec.metrics = metrics
        path = self.checkpoint_path(rec.step, rec.cooldown_steps, suffix)
        self._save(runner, path)
        rec.checkpoint = str(path)

    def _finished_before_restart(self, step: int, cd: Cooldown, label: str | None,
                                 runner: ForkRunner) -> ForkRecord | None:
        """After a resume: this run's record of the cooldown ``label`` at ``step`` if it was written before a crash.

        A cooldown that completed after the checkpoint we resumed from (recorded ``ok`` by this run,
        its checkpoint in place) is not run again: the main branch does not depend on it, and running
        it again would record it twice. A ``skipped`` record is taken back too (not written twice).
        Rank zero reads the records; every rank follows its answer.
        """
        if not self._resumed:
            return None
        found = None
        if self.is_global_zero:
            if self._on_disk is None:
                self._on_disk = {}
                try:
                    for r in read_records(self.dirpath / RECORDS_NAME):
                        if r.get("run") == self.run_id and r.get("mode") == "branch" and (
                                r.get("status") == "skipped" or r.get("status") == "ok" and r.get("checkpoint")):
                            self._on_disk[(int(r["step"]), r.get("label"))] = r
                except OSError:
                    pass
            r = self._on_disk.get((step, label))
            if r is not None and (r.get("status") == "skipped" or
                                  (self.dirpath / Path(r["checkpoint"]).name).exists()):
                found = r
        if not runner.any_rank(found is not None):
            return None
        obj = dict(found) if found is not None else ForkRecord(
            step=step, cooldown_steps=cd.length(step), shape=cd.shape_name, label=label, run=self.run_id,
            error="finished before the restart (see rank 0's records)").to_json()
        if obj.get("checkpoint"):
            obj["checkpoint"] = str(self.dirpath / Path(obj["checkpoint"]).name)
        obj["restored"] = True  # in memory only: adapters report it as taken back, and publish its metrics once
        self.records.append(obj)
        if obj.get("status") != "skipped":
            self.grad_norms = []
        return ForkRecord.from_json(obj)

    def _raise_if_needed(self, error: BaseException | None, rec: ForkRecord, what: str) -> None:
        if error is None:
            return
        if self.plan.on_fork_error == "raise":
            raise ForkError(f"{what} failed on rank {self.rank}: {rec.error}") from error
        if self.world_size > 1 and not isinstance(error, ForkError):
            # A failure on one rank only: the other ranks are inside the fork's collectives, so going on
            # here would hang them. Fail this rank (the launcher then stops the others), saying why.
            raise ForkError(f"{what} failed on rank {self.rank} of {self.world_size}: {rec.error}; the main "
                            "branch was restored, all ranks stop (on_fork_error='record' cannot keep ranks in "
                            "step after a failure on one rank only)") from error

    def finish_continue(self, start: int, step: int, runner: ForkRunner, *, suffix: str = "",
                        main_metrics: dict | None = None) -> ForkRecord:
        """Continue mode: the cooldown that began at ``start`` ended at ``step``; evaluate and save."""
        c = step - start
        rec = ForkRecord(step=start, cooldown_steps=c, shape=self.plan.cooldowns[0].shape_name, mode="continue",
                         time=time.time(), main_metrics=_floats(main_metrics))
        t0 = time.perf_counter()
        error = None
        try:
            self._evaluate_and_save(runner, rec, suffix)
        except Exception as e:  # noqa: BLE001
            error = e
            rec.status = "failed"
            rec.error = f"{type(e).__name__}: {e}"
        rec.seconds = time.perf_counter() - t0
        self._finish(rec)
        self._raise_if_needed(error, rec, f"cooled evaluation at step {step}")
        return rec

    def _save(self, runner: ForkRunner, path: Path) -> None:
        save_cooled(runner, path, self.is_global_zero)

    def _finish(self, rec: ForkRecord, done: bool = True) -> None:
        """Keep ``rec`` (in memory with the checkpoint's path, in the file relative to the file)."""
        if self.grad_norms:
            rec.grad_norms = self.grad_norms
            self.grad_norms = []
        if done:
            self.completed.add(rec.step)
        rec.run = self.run_id
        obj = rec.to_json()
        self.records.append(obj)
        if self.is_global_zero:
            line = dict(obj)
            if line.get("checkpoint"):  # cooled checkpoints sit beside forks.jsonl: a name resolves from there
                line["checkpoint"] = relative_checkpoint(self.dirpath, line["checkpoint"])
            try:
                append_record(self.dirpath / RECORDS_NAME, line)
            except OSError as e:  # the run goes on; the record stays in the engine's state
                obj["error"] = (obj.get("error") or "") + f" (records file not written: {e})"

    # -- optional inputs ---------------------------------------------------------------------
    def record_grad_norm(self, norm: float) -> None:
        if self.plan.record_grad_norms:
            self.grad_norms.append(float(norm))

    def note_main_metrics(self, step: int, metrics: dict) -> None:
        """Attach the main branch's metrics at ``step`` to that step's records (every cooldown of the
        fork point), for adapters whose main evaluation runs after the fork. The records file gets an
        addendum line that :func:`~cooldown_callbacks.records.read_records` merges into them."""
        vals = _floats(metrics)
        mine = [r for r in self.records if r["step"] == step]
        if not vals or not mine:
            return
        for r in mine:
            r.setdefault("main_metrics", {}).update(vals)
        if self.is_global_zero:
            try:
                append_record(self.dirpath / RECORDS_NAME, {"type": "main_metrics", "step": step, "run": self.run_id,
                                                            "main_metrics": vals})
            except OSError:
                pass

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"completed": sorted(self.completed), "records": list(self.records),
                "grad_norms": list(self.grad_norms),
                "schedule": self.schedule.to_dict() if self.schedule is not None else None,
                "plan": self.plan.to_dict(), "run": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.completed = set(int(s) for s in state.get("completed", []))
        self.records = list(state.get("records", []))
        self.grad_norms = list(state.get("grad_norms", []))
        if state.get("run"):  # a resumed run keeps its id: forks it finished after that checkpoint are not redone
            self.run_id = str(state["run"])
            self._resumed = True
            self._on_disk = None


def _whole(x: Any) -> int | None:
    """A positive whole number of steps (``20.0`` counts), else ``None``."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return int(v) if math.isfinite(v) and v >= 1 and v.is_integer() and not isinstance(x, bool) else None


def _floats(metrics: dict | None) -> dict:
    out = {}
    for k, v in (metrics or {}).items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _nonfinite_message(loss_step: int | None, grad_step: int | None) -> str:
    if grad_step is not None and (loss_step is None or grad_step < loss_step):
        return f"non-finite gradient in the cooldown (first at step {grad_step} on this rank)"
    if loss_step is not None:
        return f"non-finite training loss in the cooldown (first at step {loss_step} on this rank)"
    return "non-finite training loss or gradient in the cooldown on another rank"

