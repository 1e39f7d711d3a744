"""Reference schedules written from the documented formulas, sharing no code with the library.

Tests compare the library (``cooldown_callbacks.schedules``, the fork engine, the adapters) with
these functions, so a fault in the library's schedule code cannot cancel out against itself.
Sources: ``shared/REFERENCE.md`` section 1, the README's "Concepts", the docstrings of ``WSD``,
``RSqrt``, ``Noam``, ``Cooldown`` and ``WithCooldowns``.

Step convention: ``t`` counts completed optimizer steps; a value is the LR multiplier of update
``t + 1``.

- warmup (``t < W``): ``q = t / max(1, W)``; linear ``q``, cosine ``(1 - cos(pi q)) / 2``,
  1-sqrt ``1 - sqrt(1 - q)``; value ``max(0, m0 + (1 - m0) f(q))``.
- WSD: warmup, then 1. RSqrt: warmup, then ``1 / sqrt((t + tau - W) / tau)`` with ``tau`` the
  timescale, else ``W``, else 10 000. Noam: ``min(t / W, sqrt(W / t))``, 0 at ``t = 0``.
- cooldown of ``c`` steps from the LR at the fork ``S``: ``c = steps``, or
  ``max(1, round(fraction * S / (1 - fraction)))``; step ``k = t - S`` (``0 <= k < c``) has
  ``p = k / c`` and value ``main(S) * max(0, m + (1 - m) f(p))``; from ``S + c`` on ``m * main(S)``
  (``m`` = ``final_ratio``). Shapes: linear ``1 - p``, 1-sqrt ``1 - sqrt(p)``, cosine
  ``(1 + cos(pi p)) / 2``, rex ``(1 - p) / (1 - p / 2)``, square ``1 - p^2``, exponential
  ``0.5 ** (p / half_life)``; a table of samples on ``p = i / (n - 1)``, normalised to its first
  value, linearly interpolated.
- WSD-S (continue mode): at each start ``s`` the main branch itself decays over ``c`` steps as
  above, then ``R`` re-warm steps ramp linearly from ``m`` back to the main schedule (re-warm step
  ``r = 0 .. R-1`` has ``main(t) * (m + (1 - m) (r + 1) / (R + 1))``), then ``main(t)``. A later
  start cuts the previous window short.

Values agree with the library's to the last bit for the simple cases the adapter tests use (they
compare trained weights with ``torch.equal``); property tests compare with a relative tolerance of
1e-12, far below any real fault (an off-by-one step changes a value by ~1/c).
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

__all__ = ["Reference", "decay", "warmup", "main_schedule", "cooldown_length", "cooled", "wsds", "close"]


class Reference:
    """A reference function ``t -> multiplier`` that also drives a ``LambdaLR`` (where a test wants a schedule)."""

    def __init__(self, fn: Callable[[int], float]) -> None:
        self.fn = fn

    def __call__(self, t: int) -> float:
        return self.fn(t)

    def lambda_lr(self, optimizer):
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, self.fn)


def decay(shape, p: float, half_life: float = 0.1) -> float:
    """``f(p)`` of a decay shape: a name, a sequence of samples (a table), or a callable."""
    if shape == "linear":
        return 1.0 - p
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(p)
    if shape == "cosine":
        return (1.0 + math.cos(math.pi * p)) / 2.0
    if shape == "rex":
        return (1.0 - p) / (1.0 - p / 2.0)
    if shape == "square":
        return 1.0 - p * p
    if shape == "exponential":
        return 0.5 ** (p / half_life)
    if isinstance(shape, (list, tuple)):
        vals = [v / shape[0] for v in shape]
        x = min(max(p, 0.0), 1.0) * (len(vals) - 1)
        i = min(int(math.floor(x)), len(vals) - 2)
        return vals[i] + (vals[i + 1] - vals[i]) * (x - i)
    if callable(shape):
        return float(shape(p))
    raise AssertionError(f"no reference for shape {shape!r}")


def warmup(shape: str, t: int, W: int, start: float = 0.0) -> float:
    q = t / max(1, W)
    f = {"linear": q, "cosine": (1.0 - math.cos(math.pi * q)) / 2.0, "1-sqrt": 1.0 - math.sqrt(1.0 - q)}[shape]
    return max(0.0, start + (1.0 - start) * f)


def main_schedule(kind: str, warmup_steps: int, *, timescale: int | None = None, warmup_shape: str = "linear",
                  warmup_start: float = 0.0) -> Reference:
    """The indefinite main branch ``"WSD"``, ``"RSqrt"`` or ``"Noam"`` as a function of ``t``."""
    W = warmup_steps
    if kind == "Noam":
        return Reference(lambda t: 0.0 if t <= 0 else min(t / W, math.sqrt(W / t)))
    tau = timescale if timescale is not None else (W or 10_000)

    def f(t: int) -> float:
        if t < W:
            return warmup(warmup_shape, t, W, warmup_start)
        return 1.0 if kind == "WSD" else 1.0 / math.sqrt((t + tau - W) / tau)
    return Reference(f)


def cooldown_length(at: int, steps: int | None = None, fraction: float | None = None) -> int:
    if steps is not None:
        return steps
    return max(1, int(round(fraction * at / (1.0 - fraction))))


def _cooling(main_at: float, k: int, c: int, shape, m: float, half_life: float) -> float:
    if k >= c:
        return m * main_at
    return main_at * max(0.0, m + (1.0 - m) * decay(shape, k / c, half_life))


def cooled(main: Callable[[int], float], at: int, c: int, shape, m: float = 0.0,
           half_life: float = 0.1) -> Reference:
    """``main`` up to ``at``, then a cooldown of ``c`` steps from ``main(at)``, then ``m * main(at)``."""
    return Reference(lambda t: main(t) if t < at else _cooling(main(at), t - at, c, shape, m, half_life))


def wsds(main: Callable[[int], float], starts: Sequence[int], length: Callable[[int], int], shape, m: float = 0.0,
         rewarm: int = 0, half_life: float = 0.1) -> Reference:
    """WSD-S: decay at each of ``starts`` (``length(s)`` steps), keep going; see the module docstring."""
    starts = sorted(starts)

    def f(t: int) -> float:
        i = bisect.bisect_right(starts, t) - 1
        if i < 0:
            return main(t)
        s = starts[i]
        c = length(s)
        k = t - s
        if k < c:
            return _cooling(main(s), k, c, shape, m, half_life)
        r = k - c
        if r < rewarm:
            return main(t) * (m + (1.0 - m) * (r + 1) / (rewarm + 1))
        return main(t)
    return Reference(f)


def close(a: float, b: float) -> bool:
    """Equal up to float rounding (1e-12, relative or absolute: multipliers are <= 1); a fault moves values more."""
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
