r"""The last-iterate bound of SGD for a schedule (Schaipp et al. 2025): its value, its optimal base LR,
the predicted loss curve. Formula and rate convention: :mod:`cooldown_callbacks.theory`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..schedules import Cooled, Schedule
from ._common import Rates, _check_array, _check_positive_int, _check_positive_real, _rev_cumsum

__all__ = ["Bound", "bound", "optimal_base_lr", "bound_curve"]


def _rates(schedule_or_rates: Rates, T: int | None, name: str = "schedule_or_rates") -> np.ndarray:
    """The rates ``η_1 .. η_T`` as a float64 array (the convention is in :mod:`cooldown_callbacks.theory`)."""
    if isinstance(schedule_or_rates, Schedule):
        if T is None:
            if not isinstance(schedule_or_rates, Cooled):
                raise ValueError(
                    f"Missing T for {type(schedule_or_rates).__name__}: it has no end, so give the number of "
                    "updates T (or cool it down with .cooled(at=..., cooldown=...))."
                )
            T = schedule_or_rates.total_steps
        T = _check_positive_int("T", T)
        s = schedule_or_rates
        rates = np.fromiter((s(t) for t in range(T)), dtype=np.float64, count=T)
        rates = _check_array(name, rates)
    else:
        rates = _check_array(name, schedule_or_rates)
        if rates.shape[0] == 0:
            raise ValueError(f"Invalid {name} (empty): give at least one rate.")
        if T is None:
            T = rates.shape[0]
        T = _check_positive_int("T", T)
        if T > rates.shape[0]:
            raise ValueError(f"Invalid T ({T}): only {rates.shape[0]} rates were given; use T <= {rates.shape[0]}.")
        rates = rates[:T]
    if rates[-1] <= 0:
        raise ValueError(
            f"Invalid {name}: the rate of the last update (index T-1 = {T - 1}) is 0, but the bound needs eta_T > 0. "
            "For a cooled schedule use T = schedule.total_steps (S + c, whose last rate is > 0); for an array "
            "drop the trailing zeros."
        )
    return rates


def _grad_sq(T: int, G: float, grad_norms: object) -> np.ndarray | float:
    if grad_norms is None:
        return _check_positive_real("G", G) ** 2
    return _check_array("grad_norms", grad_norms, length=T) ** 2


def _terms(eta: np.ndarray, g2: np.ndarray | float, D2: float) -> tuple[float, float, float]:
    """``(distance, variance, tail)`` of the bound for rates ``eta`` (all in one O(T) pass)."""
    S = _rev_cumsum(eta)
    Q = _rev_cumsum(eta * eta * g2)
    distance = D2 / (2.0 * S[0])
    variance = Q[0] / (2.0 * S[0])
    # eta_k / S_{k+1} * Q_k / S_k for k = 1..T-1; S_{k+1} >= eta_T > 0
    tail = 0.5 * float(np.sum((eta[:-1] / S[1:]) * (Q[:-1] / S[:-1])))
    return float(distance), float(variance), tail


@dataclass(frozen=True)
class Bound:
    r"""The bound :math:`\Omega_T` at base LR ``base_lr`` split into its three terms.

    ``distance`` :math:`= D^2 / (2\gamma S_1)`, ``variance`` :math:`= \gamma Q_1 / (2 S_1)`,
    ``tail`` :math:`= \frac{\gamma}{2}\sum_{k<T} \frac{\eta_k Q_k}{S_{k+1} S_k}` (see :mod:`cooldown_callbacks.theory`).
    """

    T: int
    base_lr: float
    distance: float
    variance: float
    tail: float

    @property
    def value(self) -> float:
        """:math:`\\Omega_T` = distance + variance + tail."""
        return self.distance + self.variance + self.tail

    @property
    def optimal_base_lr(self) -> float:
        """:math:`\\gamma^\\star = \\gamma\\sqrt{\\text{distance} / (\\text{variance} + \\text{tail})}`."""
        return self.base_lr * math.sqrt(self.distance / (self.variance + self.tail))

    @property
    def optimal_value(self) -> float:
        """:math:`\\Omega^\\star = 2\\sqrt{\\text{distance}\\,(\\text{variance} + \\text{tail})}`."""
        return 2.0 * math.sqrt(self.distance * (self.variance + self.tail))


def bound(schedule_or_rates: Rates, T: int | None = None, D: float = 1.0, G: float = 1.0,
          grad_norms: Sequence[float] | np.ndarray | None = None, base_lr: float = 1.0) -> Bound:
    r"""The last-iterate bound :math:`\Omega_T` of SGD with rates ``base_lr * η_t`` (O(T)).

    ``schedule_or_rates`` is a :class:`~cooldown_callbacks.Schedule` (rates ``s(0) .. s(T-1)``;
    ``T`` defaults to ``total_steps`` of a :class:`~cooldown_callbacks.Cooled`) or an array of rates
    (``T`` defaults to its length; a shorter ``T`` uses the first ``T``). ``grad_norms`` (length ``T``)
    replaces the constant ``G`` by :math:`G_t`.

    >>> b = bound([1.0, 1.0, 1.0, 1.0])
    >>> b.distance, b.variance, round(b.tail, 6)
    (0.125, 0.5, 0.916667)
    >>> round(b.value, 6) == round(0.125 + 0.5 + (1 + 1/2 + 1/3) / 2, 6)
    True
    """
    eta = _rates(schedule_or_rates, T)
    T = eta.shape[0]
    D = _check_positive_real("D", D)
    base_lr = _check_positive_real("base_lr", base_lr)
    g2 = _grad_sq(T, G, grad_norms)
    a, v, tl = _terms(eta, g2, D * D)
    return Bound(T=T, base_lr=base_lr, distance=a / base_lr, variance=v * base_lr, tail=tl * base_lr)


def optimal_base_lr(schedule_or_rates: Rates, T: int | None = None, D: float = 1.0, G: float = 1.0,
                    grad_norms: Sequence[float] | np.ndarray | None = None) -> tuple[float, float]:
    r"""``(γ*, Ω*)``: the base LR minimising :math:`\Omega_T` and the minimum, in closed form.

    With :math:`a` the distance term and :math:`b` = variance + tail at :math:`\gamma = 1`:
    :math:`\gamma^\star = \sqrt{a/b}`, :math:`\Omega^\star = 2\sqrt{ab}`. For a constant schedule
    (``G = D = 1``) :math:`\Omega^\star\sqrt{T} = \sqrt{1 + H_{T-1}}`:

    >>> g, omega = optimal_base_lr([1.0] * 4)
    >>> round(omega * 2, 12) == round(math.sqrt(1 + 1 + 1/2 + 1/3), 12)
    True
    """
    b = bound(schedule_or_rates, T, D=D, G=G, grad_norms=grad_norms)
    if b.variance + b.tail <= 0:
        raise ValueError("Invalid grad_norms: all are 0 on the steps that count, so the bound has no optimal base LR; "
                         "pass the measured gradient norms.")
    return b.optimal_base_lr, b.optimal_value


def bound_curve(schedule_or_rates: Rates, T: int | None = None, D: float = 1.0, G: float = 1.0,
                grad_norms: Sequence[float] | np.ndarray | None = None, base_lr: float = 1.0,
                at: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    r"""The predicted loss curve: :math:`\Omega_t` for ``t = 1 .. T`` (or for each ``t`` in ``at``).

    :math:`\Omega_t` is the bound of a run stopped after ``t`` updates (the first ``t`` rates and
    gradient norms), at base LR ``base_lr``. Entries where :math:`\eta_t = 0` (e.g. ``t = 1`` with a
    warmup from 0) are ``nan``: the bound does not apply there. Each entry is an exact O(t) pass,
    so the whole curve costs O(T²) elementwise work (about 0.5 s at ``T = 10**4``); pass ``at`` (a
    few hundred steps) for longer runs.

    >>> bound_curve([1.0, 1.0, 0.5]).round(4).tolist()
    [1.0, 1.25, 1.7833]
    >>> bound_curve([1.0, 1.0, 0.5], base_lr=0.5).round(4).tolist()
    [1.25, 1.0, 1.1917]
    """
    eta_all = _rates_unchecked(schedule_or_rates, T)
    T = eta_all.shape[0]
    D = _check_positive_real("D", D)
    base_lr = _check_positive_real("base_lr", base_lr)
    g2 = _grad_sq(T, G, grad_norms)
    g2_arr = np.broadcast_to(np.asarray(g2, dtype=np.float64), (T,))
    if at is None:
        ts = np.arange(1, T + 1)
    else:
        ts = np.asarray(at)
        if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer) or ts.min() < 1 or ts.max() > T:
            raise ValueError(f"Invalid at ({at!r}): must be a non-empty 1-D sequence of integers in [1, T = {T}].")
    out = np.full(ts.shape[0], np.nan)
    D2 = D * D
    for i, t in enumerate(ts):
        t = int(t)
        if eta_all[t - 1] <= 0:
            continue
        a, v, tl = _terms(eta_all[:t], g2_arr[:t], D2)
        out[i] = a / base_lr + (v + tl) * base_lr
    return out


def _rates_unchecked(schedule_or_rates: Rates, T: int | None) -> np.ndarray:
    """Like :func:`_rates` but without the ``η_T > 0`` check (used by :func:`bound_curve`)."""
    if isinstance(schedule_or_rates, Schedule):
        if T is None and isinstance(schedule_or_rates, Cooled):
            T = schedule_or_rates.total_steps
        if T is None:
            raise ValueError(f"Missing T for {type(schedule_or_rates).__name__}: give the number of updates T.")
        T = _check_positive_int("T", T)
        s = schedule_or_rates
        return _check_array("schedule_or_rates", np.fromiter((s(t) for t in range(T)), dtype=np.float64, count=T))
    rates = _check_array("schedule_or_rates", schedule_or_rates)
    if T is None:
        T = rates.shape[0]
    T = _check_positive_int("T", T)
    if T > rates.shape[0]:
        raise ValueError(f"Invalid T ({T}): only {rates.shape[0]} rates were given; use T <= {rates.shape[0]}.")
    return rates[:T]
