r"""Learning-rate schedules as pure functions of the step.

Every schedule is a frozen dataclass ``s`` with ``s(t) -> float``: the multiplier of each param
group's base LR for optimizer update number ``t + 1``, where ``t`` counts *completed* optimizer
steps (the convention of ``torch.optim.lr_scheduler.LambdaLR`` and of transformers' schedule
helpers). The only state is the step: a schedule is rebuilt from its config (:meth:`to_dict` /
:func:`schedule_from_dict`), never pickled with hidden counters.

Indefinite main branches:

- :class:`WSD` - warmup, then constant forever: :math:`s(t) = 1` for :math:`t \ge W`.
- :class:`RSqrt` - warmup, then :math:`s(t) = 1/\sqrt{(t + \tau - W)/\tau}`.
- :class:`Noam` - :math:`s(t) = \min(t/W, \sqrt{W/t})`.

Finite schedules are built by joining pieces, not by new classes per combination:

- ``s.cooled(at=S, cooldown=Cooldown(...))`` (:class:`Cooled`): ``s`` up to step ``S``, then a
  decay from ``s(S)`` over ``c`` steps, then ``final_ratio * s(S)`` forever.
- ``s.with_cooldowns(at=[...], cooldown=...)`` (:class:`WithCooldowns`): WSD-S, the main branch
  decays at each point, keeps the decayed weights and jumps back (optionally re-warms) to ``s``.
- :func:`cosine` and :func:`linear`: the fixed-horizon baselines, i.e. ``WSD(W).cooled(at=W, ...)``.

Warmup (``t < W``): ``q = t / max(1, W)``, value ``max(0, f(q) * (1 - m0) + m0)`` where ``f`` is the
warmup shape and ``m0`` is ``warmup_start``; step 0 has value ``warmup_start`` (0 by default).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from .shapes import (
    DecayShape,
    check_decay_shape,
    check_warmup_shape,
    decay_factor,
    shape_from_json,
    shape_to_json,
    warmup_factor,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Schedule",
    "WSD",
    "RSqrt",
    "Noam",
    "Cooldown",
    "Cooled",
    "WithCooldowns",
    "Tabulated",
    "cosine",
    "linear",
    "schedule_from_dict",
]

from .shapes import Tabulated  # noqa: E402  (re-exported)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name} ({value!r}): must be an integer >= {minimum}.")
    if value < minimum:
        raise ValueError(f"Invalid {name} ({value}): must be an integer >= {minimum}.")


def _as_steps(name: str, value: object, minimum: int) -> int:
    """A step count as an ``int``; an integral float (``20.0``) is accepted, ``20.5`` is refused.

    transformers 5 types ``TrainingArguments.warmup_steps`` as a float, so
    ``WSD(warmup_steps=training_args.warmup_steps)`` must work.
    """
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    _check_int(name, value, minimum)
    return int(value)  # type: ignore[call-overload]


def _steps_field(obj: object, name: str, minimum: int, label: str | None = None) -> None:
    """Check a step-count field of a frozen dataclass and store it as an ``int``."""
    object.__setattr__(obj, name, _as_steps(label or name, getattr(obj, name), minimum))


def _check_ratio(name: str, value: object, *, low: float = 0.0, high: float = 1.0, open_low: bool = False,
                 open_high: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    if not ok:
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        raise ValueError(f"Invalid {name} ({value!r}): must be a number in {lo}{low}, {high}{hi}.")


_REGISTRY: dict[str, type] = {}


class Schedule:
    """Base of all schedules: ``s(t)`` is the LR multiplier at completed-step count ``t``."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __call__(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- composition -------------------------------------------------------------------------
    def cooled(self, at: int, cooldown: "Cooldown") -> "Cooled":
        """This schedule up to step ``at``, then ``cooldown`` from its value there."""
        return Cooled(main=self, at=at, cooldown=cooldown)

    def with_cooldowns(self, at: Sequence[int], cooldown: "Cooldown", rewarm_steps: int = 0) -> "WithCooldowns":
        """WSD-S: decay at each step of ``at`` and continue from the decayed weights."""
        return WithCooldowns(main=self, at=tuple(at), cooldown=cooldown, rewarm_steps=rewarm_steps)

    # -- bridges -----------------------------------------------------------------------------
    def lambda_lr(self, optimizer: "torch.optim.Optimizer", last_epoch: int = -1):
        """A ``torch.optim.lr_scheduler.LambdaLR`` driven by this schedule (picklable)."""
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, self, last_epoch=last_epoch)

    def values(self, n: int, start: int = 0) -> list[float]:
        """``[s(start), ..., s(start + n - 1)]``."""
        return [self(t) for t in range(start, start + n)]

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, (Schedule, Cooldown)):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def schedule_from_dict(d: dict) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict` output."""
    if not isinstance(d, dict) or d.get("type") not in _REGISTRY:
        raise ValueError(f"Invalid schedule dict {d!r}: 'type' must be one of {sorted(_REGISTRY)}.")
    cls = _REGISTRY[d["type"]]
    kwargs = {}
    for k, v in d.items():
        if k == "type":
            continue
        if isinstance(v, dict) and v.get("type") == "Cooldown":
            v = Cooldown.from_dict(v)
        elif isinstance(v, dict) and "type" in v:
            v = schedule_from_dict(v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def _warmup(t: int, warmup_steps: int, shape: str, start: float) -> float:
    q = float(t) / float(max(1, warmup_steps))
    return max(0.0, warmup_factor(shape, q) * (1.0 - start) + start)


@dataclass(frozen=True)
class WSD(Schedule):
    r"""Warmup, then constant forever: the main branch of warmup-stable-decay.

    .. math:: s(t) = \max(0, f(t/W)(1 - m_0) + m_0) \text{ for } t < W, \quad s(t) = 1 \text{ for } t \ge W.

    >>> s = WSD(warmup_steps=4)
    >>> [s(t) for t in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """

    warmup_steps: int = 0
    warmup_shape: str = "linear"
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        _steps_field(self, "warmup_steps", 0)
        check_warmup_shape(self.warmup_shape)
        _check_ratio("warmup_start", self.warmup_start)

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return _warmup(t, self.warmup_steps, self.warmup_shape, self.warmup_start)
        return 1.0


@dataclass(frozen=True)
class RSqrt(Schedule):
    r"""Warmup, then inverse square root (Zhai et al. 2022; transformers' ``get_inverse_sqrt_schedule``).

    .. math:: s(t) = 1 / \sqrt{(t + \tau - W) / \tau} \quad (t \ge W),

    with timescale :math:`\tau` defaulting to :math:`W` (then :math:`s(t) = \sqrt{W/t}`), or to
    10 000 when ``warmup_steps == 0`` (transformers' and big_vision's default).

    >>> s = RSqrt(warmup_steps=100)
    >>> s(100), s(400)
    (1.0, 0.5)
    """

    warmup_steps: int = 0
    timescale: int | None = None
    warmup_shape: str = "linear"
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        _steps_field(self, "warmup_steps", 0)
        if self.timescale is not None:
            _steps_field(self, "timescale", 1)
        check_warmup_shape(self.warmup_shape)
        _check_ratio("warmup_start", self.warmup_start)

    @property
    def tau(self) -> int:
        return self.timescale if self.timescale is not None else (self.warmup_steps or 10_000)

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return _warmup(t, self.warmup_steps, self.warmup_shape, self.warmup_start)
        tau = self.tau
        return 1.0 / math.sqrt((t + (tau - self.warmup_steps)) / tau)


@dataclass(frozen=True)
class Noam(Schedule):
    r"""The Transformer schedule (Vaswani et al. 2017), normalised to peak 1 at ``t = W``.

    .. math:: s(t) = \min(t / W, \sqrt{W / t}), \quad s(0) = 0.
    """

    warmup_steps: int = 4000

    def __post_init__(self) -> None:
        _steps_field(self, "warmup_steps", 1)

    def __call__(self, t: int) -> float:
        if t <= 0:
            return 0.0
        return min(t / self.warmup_steps, math.sqrt(self.warmup_steps / t))


@dataclass(frozen=True)
class Cooldown:
    r"""A decay to ``final_ratio`` (0 by default) of the LR at the fork step.

    Give exactly one of ``steps`` (the cooldown length ``c``) or ``fraction``: ``c`` is that fraction
    of the cooled run's total length ``S + c``, i.e. ``c = round(fraction * S / (1 - fraction))``
    (at least 1). With progress ``p = k / c`` for the ``k``-th cooldown step (``k = 0..c-1``) the
    multiplier relative to the LR at the fork is

    .. math:: \max(0, f(p)(1 - m) + m),

    so the first cooldown step still uses the full LR and the last one (``p = (c-1)/c``) a positive
    LR for linear decay; the value ``m`` is reached at ``k = c`` (transformers' convention).

    >>> Cooldown(fraction=0.2).length(800)
    200
    """

    steps: int | None = None
    fraction: float | None = None
    shape: DecayShape = "1-sqrt"
    final_ratio: float = 0.0
    half_life: float = 0.1

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.fraction is None):
            raise ValueError(
                f"Invalid Cooldown(steps={self.steps!r}, fraction={self.fraction!r}): give exactly one of "
                "steps (a number of optimizer steps) or fraction (of the cooled run's length)."
            )
        if self.steps is not None:
            _steps_field(self, "steps", 1, "Cooldown steps")
        if self.fraction is not None:
            _check_ratio("Cooldown fraction", self.fraction, open_low=True, open_high=True)
        check_decay_shape(self.shape, "Cooldown shape")
        _check_ratio("Cooldown final_ratio", self.final_ratio)
        _check_ratio("Cooldown half_life", self.half_life, open_low=True)

    def length(self, at: int) -> int:
        """Number of cooldown steps for a fork after ``at`` completed steps."""
        if self.steps is not None:
            return int(self.steps)
        return max(1, int(round(self.fraction * at / (1.0 - self.fraction))))

    def factor(self, k: int, c: int) -> float:
        """Multiplier (relative to the LR at the fork) of the ``k``-th of ``c`` cooldown steps."""
        if k >= c:
            return float(self.final_ratio)
        p = float(k) / float(max(1, c))
        f = decay_factor(self.shape, p, self.half_life)
        return max(0.0, f * (1.0 - self.final_ratio) + self.final_ratio)

    @property
    def shape_name(self) -> str:
        return self.shape if isinstance(self.shape, str) else type(self.shape).__name__

    def to_dict(self) -> dict:
        return {"type": "Cooldown", "steps": self.steps, "fraction": self.fraction,
                "shape": shape_to_json(self.shape), "final_ratio": self.final_ratio, "half_life": self.half_life}

    @classmethod
    def from_dict(cls, d: dict) -> "Cooldown":
        d = {k: v for k, v in d.items() if k != "type"}
        if "shape" in d:
            d["shape"] = shape_from_json(d["shape"])
        return cls(**d)


@dataclass(frozen=True)
class Cooled(Schedule):
    r"""``main`` up to step ``at``, then ``cooldown`` from ``main(at)``, then ``final_ratio * main(at)``.

    ``WSD(W).cooled(at=S, cooldown=Cooldown(steps=c, shape=k))(t)`` equals transformers'
    ``get_wsd_schedule(opt, W, num_stable_steps=S - W, num_decay_steps=c, decay_type=k)``.
    """

    main: Schedule
    at: int
    cooldown: Cooldown

    def __post_init__(self) -> None:
        if not isinstance(self.main, Schedule):
            raise ValueError(f"Invalid main ({self.main!r}): must be a Schedule such as WSD(...) or RSqrt(...).")
        _check_int("at", self.at, 0)
        if not isinstance(self.cooldown, Cooldown):
            raise ValueError(f"Invalid cooldown ({self.cooldown!r}): must be a Cooldown(steps=... or fraction=...).")

    @property
    def cooldown_steps(self) -> int:
        return self.cooldown.length(self.at)

    @property
    def total_steps(self) -> int:
        """Length of the cooled run: the number of optimizer steps ``at + c``."""
        return self.at + self.cooldown_steps

    def __call__(self, t: int) -> float:
        if t < self.at:
            return self.main(t)
        return self.main(self.at) * self.cooldown.factor(t - self.at, self.cooldown_steps)


@dataclass(frozen=True)
class WithCooldowns(Schedule):
    r"""WSD-S (Wen et al. 2024): one branch that decays at each step of ``at`` and goes on.

    For each ``s`` in ``at``: steps ``s .. s+c-1`` decay from ``main(s)`` (``c = cooldown.length(s)``,
    the decay steps are main-branch steps); then ``rewarm_steps`` steps ramp linearly from
    ``final_ratio`` back to ``main(t)``; then ``main(t)``.
    """

    main: Schedule
    at: tuple[int, ...]
    cooldown: Cooldown
    rewarm_steps: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.main, Schedule):
            raise ValueError(f"Invalid main ({self.main!r}): must be a Schedule such as WSD(...) or RSqrt(...).")
        if not isinstance(self.cooldown, Cooldown):
            raise ValueError(f"Invalid cooldown ({self.cooldown!r}): must be a Cooldown(steps=... or fraction=...).")
        _check_int("rewarm_steps", self.rewarm_steps, 0)
        at = tuple(self.at)
        object.__setattr__(self, "at", at)
        for s in at:
            _check_int("at", s, 0)
        for a, b in zip(at, at[1:]):
            end = a + self.cooldown.length(a) + self.rewarm_steps
            if b < end:
                raise ValueError(
                    f"Invalid at ({list(at)}): the cooldown (and re-warm) started at {a} lasts until step {end}, "
                    f"after the next fork at {b}; space the forks further apart or shorten the cooldown."
                )

    def windows(self) -> list[tuple[int, int]]:
        """``(start, c)`` of every cooldown."""
        return [(s, self.cooldown.length(s)) for s in self.at]

    def __call__(self, t: int) -> float:
        for s in reversed(self.at):
            if t >= s:
                return wsds_value(self.main, self.cooldown, s, self.cooldown.length(s), self.rewarm_steps, t)
        return self.main(t)


def wsds_value(main: Schedule, cooldown: Cooldown, start: int, c: int, rewarm_steps: int, t: int) -> float:
    """Multiplier at step ``t >= start`` of a WSD-S branch whose latest cooldown began at ``start``
    and lasts ``c`` steps (shared by :class:`WithCooldowns` and the continue-mode fork engine)."""
    k = t - start
    if k < c:
        return main(start) * cooldown.factor(k, c)
    r = k - c
    if r < rewarm_steps:
        m = cooldown.final_ratio
        q = (r + 1) / (rewarm_steps + 1)
        return main(t) * (q * (1.0 - m) + m)
    return main(t)


def cosine(total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0, warmup_shape: str = "linear") -> Cooled:
    """Fixed-horizon baseline: warmup, then cosine to ``final_ratio`` at ``total_steps``.

    Equals transformers' ``get_cosine_schedule_with_warmup`` for ``t < total_steps``.
    """
    total_steps, warmup_steps = _as_steps("total_steps", total_steps, 1), _as_steps("warmup_steps", warmup_steps, 0)
    if warmup_steps >= total_steps:
        raise ValueError(f"Invalid warmup_steps ({warmup_steps}): must be < total_steps ({total_steps}).")
    return WSD(warmup_steps, warmup_shape).cooled(
        at=warmup_steps, cooldown=Cooldown(steps=total_steps - warmup_steps, shape="cosine", final_ratio=final_ratio))


def linear(total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0, warmup_shape: str = "linear") -> Cooled:
    """Fixed-horizon baseline: warmup, then linear to ``final_ratio`` at ``total_steps``.

    Equals transformers' ``get_linear_schedule_with_warmup`` for ``final_ratio = 0``.
    """
    total_steps, warmup_steps = _as_steps("total_steps", total_steps, 1), _as_steps("warmup_steps", warmup_steps, 0)
    if warmup_steps >= total_steps:
        raise ValueError(f"Invalid warmup_steps ({warmup_steps}): must be < total_steps ({total_steps}).")
    return WSD(warmup_steps, warmup_shape).cooled(
        at=warmup_steps, cooldown=Cooldown(steps=total_steps - warmup_steps, shape="linear", final_ratio=final_ratio))
