"""When to fork, how long to cool, and what to do with the cooled weights."""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Iterable, Literal, Sequence

from .schedules import Cooldown, _check_int

__all__ = ["ForkPlan", "PlanCost", "plan_lost_data", "cooldown_labels", "MODES", "DATA_SOURCES", "ON_FORK_ERROR"]

MODES = ("branch", "continue")
DATA_SOURCES = ("auto", "peek", "fresh")
ON_FORK_ERROR = ("record", "raise")
_DEFAULT_COOLDOWN = Cooldown(fraction=0.2, shape="1-sqrt")


@dataclass(frozen=True)
class ForkPlan:
    """When to fork a cooldown, and how.

    Triggers (give at most one of ``every``, ``at``, ``geometric``; with none of them, and without
    ``at_end=True``, the plan forks at the framework's own evaluation points, ``on_eval=True``):

    - ``every=N``: after every ``N`` completed optimizer steps (``N, 2N, ...``).
    - ``at=[s1, s2, ...]``: after exactly these step counts.
    - ``geometric=(first, ratio)``: ``first, first*ratio, first*ratio^2, ...`` (rounded, distinct).
    - ``on_eval=True``: whenever the framework evaluates the main branch (adapters only).

    ``cooldown`` is the decay (default ``None``: 20% of the cooled run, 1-sqrt, Hägele et al.'s recipe), or a
    list of decays to compare from the same point (``mode="branch"`` only): one snapshot per fork
    point, each cooldown runs from the restored main branch and gets its own record, checkpoint and
    metric names, labelled by what tells them apart (:func:`cooldown_labels`: ``"50steps"``,
    ``"20pct_linear"``, ...).

    ``max_overhead=r`` caps the cost: a fork point runs (all of its cooldowns) only if the cooldown
    steps of the forks run so far plus its own stay ``<= r * S``, ``S`` its step; otherwise it is
    recorded with status ``"skipped"`` and the reason. :meth:`cost` says what a plan adds up to a step.

    ``mode="branch"`` (WSD): snapshot, cool, evaluate, save, restore - the main branch goes on as if
    the fork had not happened. ``mode="continue"`` (WSD-S): the decay steps are main-branch steps, the
    main branch keeps the cooled weights and the LR returns to the schedule (after ``rewarm_steps``).

    ``data``: where cooldown batches come from: ``"peek"`` (the next batches the main branch will
    see, from a clone of a stateful loader), ``"fresh"`` (a separate loader over the training data
    with its own seeded sampler), ``"auto"`` (peek if the loader is stateful, else fresh), or any
    iterable of batches (e.g. a high-quality anneal mix); it is cycled if it runs out.

    ``at_end=True`` also cools the final model when training stops (max steps, time limit,
    ``should_stop``, preemption). ``on_fork_error``: ``"record"`` marks a failed fork in the records
    and goes on with the intact main branch; ``"raise"`` restores the main branch, then re-raises.

    >>> ForkPlan(every=1000).fork_steps(3500)
    [1000, 2000, 3000]
    >>> ForkPlan(geometric=(100, 2)).fork_steps(1000)
    [100, 200, 400, 800]
    >>> ForkPlan(at_end=True).on_eval, ForkPlan().on_eval
    (False, True)
    >>> ForkPlan(every=500).cost(10_000).cooldown_steps  # 20% cooldowns at every 500 steps to 10,000
    26250
    >>> ForkPlan(every=100, cooldown=[Cooldown(steps=50), Cooldown(steps=50, shape="linear")]).cooldown_labels
    ('1-sqrt', 'linear')
    """

    every: int | None = None
    at: Sequence[int] | None = None
    geometric: tuple[int, float] | None = None
    on_eval: bool | None = None
    cooldown: Cooldown | Sequence[Cooldown] | None = None
    mode: Literal["branch", "continue"] = "branch"
    data: Any = "auto"
    at_end: bool = False
    rewarm_steps: int = 0
    seed: int = 0
    on_fork_error: Literal["record", "raise"] = "record"
    record_grad_norms: bool = False
    max_overhead: float | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("every", "at", "geometric") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"Invalid ForkPlan: give at most one of every, at, geometric (got {', '.join(given)}).")
        if self.on_eval is None:
            # at_end=True alone means only the end: on_eval is the default trigger only when no other is given
            object.__setattr__(self, "on_eval", not given and not self.at_end)
        elif self.on_eval and given:
            raise ValueError(f"Invalid ForkPlan: on_eval=True cannot be combined with {given[0]}=; pick one trigger.")
        elif not self.on_eval and not given and not self.at_end:
            raise ValueError("Invalid ForkPlan: no trigger; give every=, at=, geometric=, on_eval=True or at_end=True.")
        if self.every is not None:
            _check_int("every", self.every, 1)
        if self.at is not None:
            if isinstance(self.at, (str, bytes)) or not isinstance(self.at, Iterable):
                raise ValueError(f"Invalid at ({self.at!r}): must be a list of step counts, e.g. at=[1000, 2000].")
            at = tuple(self.at)
            if not at:
                raise ValueError("Invalid at ([]): give at least one step count, or use on_eval=True.")
            for s in at:
                _check_int("at", s, 1)
            object.__setattr__(self, "at", tuple(sorted(set(at))))
        if self.geometric is not None:
            if not isinstance(self.geometric, (tuple, list)) or len(self.geometric) != 2:
                raise ValueError(f"Invalid geometric ({self.geometric!r}): must be (first, ratio), e.g. (1000, 2).")
            first, ratio = self.geometric
            _check_int("geometric first", first, 1)
            if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio <= 1:
                raise ValueError(f"Invalid geometric ratio ({ratio!r}): must be a number > 1.")
            object.__setattr__(self, "geometric", (int(first), float(ratio)))
        if self.cooldown is None:
            # the default is resolved here, not in the field: a config system that merges user values into
            # the field's default (jsonargparse / LightningCLI) would otherwise add fraction=0.2 to steps=...
            object.__setattr__(self, "cooldown", _DEFAULT_COOLDOWN)
        if self.mode not in MODES:
            raise ValueError(f"Invalid mode ({self.mode!r}): choose one of {MODES}.")
        self._check_cooldowns()
        if self.max_overhead is not None:
            r = self.max_overhead
            if not isinstance(r, numbers.Real) or isinstance(r, bool) or not math.isfinite(r) or r <= 0:
                raise ValueError(f"Invalid max_overhead ({r!r}): must be a number > 0 (cooldown steps per main-branch "
                                 "step, e.g. 0.5), or None for no cap.")
            if self.mode == "continue":
                raise ValueError("Invalid max_overhead: in mode='continue' (WSD-S) the cooldowns are main-branch steps "
                                 "and add none; drop max_overhead or use mode='branch'.")
            object.__setattr__(self, "max_overhead", float(r))
        if isinstance(self.data, str):
            if self.data not in DATA_SOURCES:
                raise ValueError(f"Invalid data ({self.data!r}): choose one of {DATA_SOURCES} or pass an iterable of batches.")
        elif not isinstance(self.data, Iterable) and not callable(self.data):
            raise ValueError(f"Invalid data ({self.data!r}): choose one of {DATA_SOURCES} or pass an iterable of batches.")
        _check_int("rewarm_steps", self.rewarm_steps, 0)
        if self.rewarm_steps and self.mode != "continue":
            raise ValueError("Invalid rewarm_steps: re-warming only applies to mode='continue' (WSD-S).")
        _check_int("seed", self.seed, 0)
        if self.on_fork_error not in ON_FORK_ERROR:
            raise ValueError(f"Invalid on_fork_error ({self.on_fork_error!r}): choose one of {ON_FORK_ERROR}.")
        if self.mode == "continue" and self.every is not None and self.cooldown.steps is not None:
            if self.cooldown.steps + self.rewarm_steps > self.every:
                raise ValueError(
                    f"Invalid ForkPlan: in mode='continue' the cooldown ({self.cooldown.steps} steps) plus re-warm "
                    f"({self.rewarm_steps}) must fit between forks (every={self.every}); shorten it or fork less often."
                )

    def _check_cooldowns(self) -> None:
        cd = self.cooldown
        if isinstance(cd, Cooldown):
            return
        if isinstance(cd, (str, bytes)) or not isinstance(cd, Iterable):
            raise ValueError(f"Invalid cooldown ({cd!r}): must be a Cooldown(steps=... or fraction=...) or a list "
                             "of them.")
        cds = tuple(cd)
        if not cds:
            raise ValueError("Invalid cooldown ([]): give a Cooldown(...) or a non-empty list of them.")
        for c in cds:
            if not isinstance(c, Cooldown):
                raise ValueError(f"Invalid cooldown ({c!r}) in the list: every item must be a Cooldown(steps=... or "
                                 "fraction=...).")
        dup = next((c for i, c in enumerate(cds) if c in cds[:i]), None)
        if dup is not None:
            raise ValueError(f"Invalid cooldown list: {dup!r} is listed twice; each cooldown of a fork point must "
                             "differ (length, shape or final_ratio).")
        if len(cds) > 1 and self.mode == "continue":
            raise ValueError(f"Invalid cooldown: mode='continue' (WSD-S) keeps the cooled weights, so it takes one "
                             f"Cooldown, not a list of {len(cds)}; compare cooldowns with mode='branch'.")
        object.__setattr__(self, "cooldown", cds[0] if len(cds) == 1 else cds)

    @property
    def cooldowns(self) -> tuple[Cooldown, ...]:
        """The cooldowns of each fork point, in order (one for a plan with a single ``Cooldown``)."""
        return self.cooldown if isinstance(self.cooldown, tuple) else (self.cooldown,)

    @property
    def cooldown_labels(self) -> tuple[str | None, ...]:
        """The label of each cooldown (``None`` for a plan with one): see :func:`cooldown_labels`."""
        return cooldown_labels(self.cooldowns)

    def fork_cost(self, step: int) -> int:
        """Cooldown steps a fork after ``step`` completed steps adds (all of its cooldowns)."""
        return sum(cd.length(step) for cd in self.cooldowns)

    def admits(self, step: int, spent: int) -> bool:
        """Whether ``max_overhead`` lets a fork at ``step`` run after ``spent`` cooldown steps of earlier forks."""
        return self.max_overhead is None or spent + self.fork_cost(step) <= self.max_overhead * step

    def skip_reason(self, step: int, spent: int) -> str:
        """Why :meth:`admits` refused a fork at ``step`` (for the record)."""
        cost = self.fork_cost(step)
        return (f"max_overhead={self.max_overhead:g}: {spent} cooldown steps so far + {cost} for this fork = "
                f"{spent + cost} > {self.max_overhead:g} x {step} = {self.max_overhead * step:g}")

    def cost(self, until: int, eval_every: int | None = None) -> "PlanCost":
        """What the plan adds to a main branch of ``until`` steps, fork by fork (``max_overhead`` applied).

        ``eval_every``: the evaluation interval in steps, needed for ``on_eval`` plans (forks at
        ``eval_every, 2 * eval_every, ...``). ``at_end=True`` adds a fork at ``until``. Failed forks are
        not foreseen (they count as run). In ``mode="continue"`` the cooldowns are main-branch steps:
        ``cooldown_steps`` is 0.

        >>> str(ForkPlan(every=500).cost(10_000))
        'ForkPlan cost to step 10000: 20 fork points x 1 cooldown = 26250 cooldown steps, 2.62x the 10000 main steps'
        """
        _check_int("until", until, 1)
        if self.on_eval:
            if eval_every is None:
                raise ValueError("Invalid eval_every (None): an on_eval plan forks at each evaluation; give the "
                                 "evaluation interval in steps to know its cost.")
            _check_int("eval_every", eval_every, 1)
            points = list(range(eval_every, until + 1, eval_every))
        else:
            points = self.fork_steps(until)
        if self.at_end and (not points or points[-1] != until):
            points.append(until)
        run, skipped, spent = [], [], 0
        for s in points:
            if self.mode == "branch" and not self.admits(s, spent):
                skipped.append(s)
                continue
            run.append(s)
            if self.mode == "branch":
                spent += self.fork_cost(s)
        return PlanCost(until=until, fork_steps=tuple(run), skipped_steps=tuple(skipped),
                        cooldowns_per_fork=len(self.cooldowns), cooldown_steps=spent, mode=self.mode,
                        max_overhead=self.max_overhead)

    # -- triggers ----------------------------------------------------------------------------
    def is_fork_step(self, step: int) -> bool:
        """Whether a step-based trigger fires after ``step`` completed steps (not ``on_eval``)."""
        if step <= 0:
            return False
        if self.every is not None:
            return step % self.every == 0
        if self.at is not None:
            return step in self.at
        if self.geometric is not None:
            steps = self._geometric_until(step)
            return bool(steps) and steps[-1] == step
        return False

    def _geometric_until(self, limit: int) -> list[int]:
        # The sequence is extended lazily and cached on the instance: each step costs O(log n), also for
        # ratios close to 1 (where rebuilding it from ``first`` on every step would be quadratic).
        cache = self.__dict__.get("_geo")
        if cache is None:
            cache = {"steps": [], "x": float(self.geometric[0])}  # type: ignore[index]
            object.__setattr__(self, "_geo", cache)
        steps, x, ratio = cache["steps"], cache["x"], self.geometric[1]  # type: ignore[index]
        while round(x) <= limit:
            s = int(round(x))
            if not steps or s != steps[-1]:
                steps.append(s)
            x *= ratio
        cache["x"] = x
        return steps[: bisect.bisect_right(steps, limit)]

    def fork_steps(self, until: int) -> list[int]:
        """Step-triggered fork points ``<= until``."""
        if self.every is not None:
            return list(range(self.every, until + 1, self.every))
        if self.at is not None:
            return [s for s in self.at if s <= until]
        if self.geometric is not None:
            return self._geometric_until(until)
        return []

    def window(self, t: int, eval_every: int | None = None) -> tuple[int, int] | None:
        """``mode="continue"``: ``(start, c)`` of the latest cooldown window that started at or before ``t``.

        Step triggers start a window at each fork step; ``on_eval`` windows *end* at each evaluation
        (every ``eval_every`` steps; ``None`` without it).
        """
        cd = self.cooldowns[0]
        if self.on_eval:
            if not eval_every:
                return None
            e_next = (t // eval_every + 1) * eval_every
            c = _length_ending_at(cd, e_next)
            if e_next - c <= t:
                return e_next - c, c
            e_prev = (t // eval_every) * eval_every
            if e_prev <= 0:
                return None
            c = _length_ending_at(cd, e_prev)
            return e_prev - c, c
        if self.every is not None:
            s = (t // self.every) * self.every
        else:
            starts = self.fork_steps(t)
            if not starts:
                return None
            s = starts[-1]
        if s <= 0:
            return None
        return s, cd.length(s)

    def to_dict(self) -> dict:
        """JSON-friendly config. A ``data`` iterable cannot be serialised: it is written as
        ``{"custom": "<type name>"}`` and :meth:`from_dict` gives it back as ``"auto"``."""
        return {
            "every": self.every, "at": list(self.at) if self.at is not None else None,
            "geometric": list(self.geometric) if self.geometric is not None else None,
            "on_eval": self.on_eval, "mode": self.mode,
            "cooldown": self.cooldown.to_dict() if isinstance(self.cooldown, Cooldown) else
            [c.to_dict() for c in self.cooldowns],
            "data": self.data if isinstance(self.data, str) else {"custom": type(self.data).__name__},
            "at_end": self.at_end, "rewarm_steps": self.rewarm_steps, "seed": self.seed,
            "on_fork_error": self.on_fork_error, "record_grad_norms": self.record_grad_norms,
            "max_overhead": self.max_overhead,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ForkPlan":
        """Rebuild a plan from :meth:`to_dict` (a custom data iterable comes back as ``"auto"``;
        :func:`plan_lost_data` tells whether that happened)."""
        d = dict(d)
        if not isinstance(d.get("data", "auto"), str) or d.get("data") not in (None, *DATA_SOURCES):
            d["data"] = "auto"
        if isinstance(d.get("cooldown"), dict):
            d["cooldown"] = Cooldown.from_dict(d["cooldown"])
        elif isinstance(d.get("cooldown"), list):
            d["cooldown"] = tuple(Cooldown.from_dict(c) if isinstance(c, dict) else c for c in d["cooldown"])
        for k in ("at", "geometric"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def plan_lost_data(d: dict) -> bool:
    """Whether a :meth:`ForkPlan.to_dict` output had a custom data iterable (not serialisable)."""
    data = d.get("data", "auto")
    return not isinstance(data, str) or data not in DATA_SOURCES


@dataclass(frozen=True)
class PlanCost:
    """What a :class:`ForkPlan` adds to a main branch of ``until`` steps (:meth:`ForkPlan.cost`).

    ``fork_steps``: the fork points that run; ``skipped_steps``: those ``max_overhead`` skips;
    ``cooldown_steps``: the optimizer steps of all their cooldowns (0 in ``mode="continue"``, where
    the cooldowns are main-branch steps); ``ratio``: ``cooldown_steps / until``.
    """

    until: int
    fork_steps: tuple[int, ...]
    skipped_steps: tuple[int, ...]
    cooldowns_per_fork: int
    cooldown_steps: int
    mode: str = "branch"
    max_overhead: float | None = None

    @property
    def ratio(self) -> float:
        return self.cooldown_steps / self.until

    def __str__(self) -> str:
        n, k = len(self.fork_steps), self.cooldowns_per_fork
        forks = f"{n} fork point{'s' if n != 1 else ''} x {k} cooldown{'s' if k != 1 else ''}"
        if self.mode == "continue":
            return (f"ForkPlan cost to step {self.until}: {forks} in mode='continue' (WSD-S): the cooldowns are "
                    f"main-branch steps, no steps added")
        text = (f"ForkPlan cost to step {self.until}: {forks} = {self.cooldown_steps} cooldown steps, "
                f"{self.ratio:.2f}x the {self.until} main steps")
        if self.max_overhead is not None:
            text += (f" (max_overhead={self.max_overhead:g}: {len(self.skipped_steps)} of "
                     f"{len(self.skipped_steps) + n} fork points skipped)")
        return text


def _length_ending_at(cd: Cooldown, end: int) -> int:
    """Cooldown length for a continue-mode window that must end at step ``end``."""
    if cd.steps is not None:
        return min(cd.steps, end)
    return max(1, min(end, int(round(cd.fraction * end))))


def _length_token(cd: Cooldown) -> str:
    if cd.steps is not None:
        return f"{cd.steps}steps"
    return f"{round(cd.fraction * 100, 6):g}pct"


def _shape_token(cd: Cooldown) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in cd.shape_name)


def cooldown_labels(cooldowns: Sequence[Cooldown]) -> tuple[str | None, ...]:
    """Names that tell a fork point's cooldowns apart in metric names, file names and records.

    One cooldown has no label (``None``: names as without a list). Several are labelled by what
    differs between them: the length (``"50steps"``, ``"20pct"`` of the cooled run) and/or the
    shape (``"linear"``, ``"1-sqrt"``), joined by ``_``; cooldowns that differ in neither (e.g.
    only in ``final_ratio``) get their position appended (``"linear_2"``).

    >>> cooldown_labels([Cooldown(steps=50), Cooldown(steps=100)])
    ('50steps', '100steps')
    >>> cooldown_labels([Cooldown(fraction=0.2, shape="linear"), Cooldown(fraction=0.1, shape="1-sqrt")])
    ('20pct_linear', '10pct_1-sqrt')
    """
    cds = list(cooldowns)
    if len(cds) <= 1:
        return (None,) * len(cds)
    lengths, shapes = [_length_token(c) for c in cds], [_shape_token(c) for c in cds]
    use_len, use_shape = len(set(lengths)) > 1, len(set(shapes)) > 1
    labels = []
    for ln, sh in zip(lengths, shapes):
        parts = ([ln] if use_len else []) + ([sh] if use_shape else [])
        labels.append("_".join(parts) or sh)
    if len(set(labels)) < len(labels):
        labels = [f"{lab}_{i + 1}" for i, lab in enumerate(labels)]
    return tuple(labels)
