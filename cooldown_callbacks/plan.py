"""When to fork, how long to cool, and what to do with the cooled weights."""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Iterable, Literal, Sequence

from .schedules import Cooldown, _check_int

__all__ = ["ForkPlan", "plan_lost_data", "MODES", "DATA_SOURCES", "ON_FORK_ERROR"]

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

    ``cooldown`` is the decay (default ``None``: 20% of the cooled run, 1-sqrt, Hägele et al.'s recipe).

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
    """

    every: int | None = None
    at: Sequence[int] | None = None
    geometric: tuple[int, float] | None = None
    on_eval: bool | None = None
    cooldown: Cooldown | None = None
    mode: Literal["branch", "continue"] = "branch"
    data: Any = "auto"
    at_end: bool = False
    rewarm_steps: int = 0
    seed: int = 0
    on_fork_error: Literal["record", "raise"] = "record"
    record_grad_norms: bool = False

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
        if not isinstance(self.cooldown, Cooldown):
            raise ValueError(f"Invalid cooldown ({self.cooldown!r}): must be a Cooldown(steps=... or fraction=...).")
        if self.mode not in MODES:
            raise ValueError(f"Invalid mode ({self.mode!r}): choose one of {MODES}.")
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

    def to_dict(self) -> dict:
        """JSON-friendly config. A ``data`` iterable cannot be serialised: it is written as
        ``{"custom": "<type name>"}`` and :meth:`from_dict` gives it back as ``"auto"``."""
        return {
            "every": self.every, "at": list(self.at) if self.at is not None else None,
            "geometric": list(self.geometric) if self.geometric is not None else None,
            "on_eval": self.on_eval, "cooldown": self.cooldown.to_dict(), "mode": self.mode,
            "data": self.data if isinstance(self.data, str) else {"custom": type(self.data).__name__},
            "at_end": self.at_end, "rewarm_steps": self.rewarm_steps, "seed": self.seed,
            "on_fork_error": self.on_fork_error, "record_grad_norms": self.record_grad_norms,
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
        for k in ("at", "geometric"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def plan_lost_data(d: dict) -> bool:
    """Whether a :meth:`ForkPlan.to_dict` output had a custom data iterable (not serialisable)."""
    data = d.get("data", "auto")
    return not isinstance(data, str) or data not in DATA_SOURCES
