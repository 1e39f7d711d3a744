r"""Uses of the bound: the base LR for another cooldown (LR transfer) and continuing a finished run
to a longer budget (Schaipp et al. 2025)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from ..schedules import WSD, Cooldown, Cooled, Schedule
from ._common import _check_positive_int, _check_positive_real
from .bounds import _terms, optimal_base_lr

__all__ = ["Extension", "cooled_run", "transfer_lr", "extend", "CRITERIA"]

CRITERIA = ("minimize", "match")


def _cooldown_steps_for_total(cooldown: Cooldown, T: int) -> int:
    c = int(cooldown.steps) if cooldown.steps is not None else max(1, int(round(cooldown.fraction * T)))
    if c > T:
        raise ValueError(f"Invalid cooldown ({cooldown.steps} steps): longer than the run (T = {T}); use steps <= T.")
    return c


def cooled_run(T: int, cooldown: Cooldown, main: Schedule | None = None) -> Cooled:
    """The cooled schedule of total length ``T``: ``main`` (``WSD()`` by default) cooled at ``T - c``.

    ``c`` is ``cooldown.steps``, or ``max(1, round(fraction * T))`` for a fractional cooldown.

    >>> run = cooled_run(1000, Cooldown(fraction=0.2, shape="linear"))
    >>> run.at, run.cooldown_steps, run.total_steps
    (800, 200, 1000)
    """
    T = _check_positive_int("T", T)
    if not isinstance(cooldown, Cooldown):
        raise ValueError(f"Invalid cooldown ({cooldown!r}): must be a Cooldown(steps=... or fraction=...).")
    main = WSD() if main is None else main
    if not isinstance(main, Schedule):
        raise ValueError(f"Invalid main ({main!r}): must be a Schedule such as WSD(...) or RSqrt(...).")
    c = _cooldown_steps_for_total(cooldown, T)
    return main.cooled(at=T - c, cooldown=dataclasses.replace(cooldown, steps=c, fraction=None))


def _as_run(name: str, spec: Cooldown | Schedule, T: int, main: Schedule | None) -> Schedule:
    if isinstance(spec, Cooldown):
        return cooled_run(T, spec, main)
    if isinstance(spec, Schedule):
        return spec
    raise ValueError(f"Invalid {name} ({spec!r}): must be a Cooldown(...) or a full Schedule such as cosine(T).")


def transfer_lr(lr: float, from_cooldown: Cooldown | Schedule, to_cooldown: Cooldown | Schedule, T: int,
                schedule: Schedule | None = None) -> float:
    r"""The base LR for ``to_cooldown`` that is as good (for the bound) as ``lr`` is for ``from_cooldown``.

    Returns ``lr * γ*(to) / γ*(from)`` over ``T`` updates. A :class:`~cooldown_callbacks.Cooldown`
    means ``schedule`` (``WSD()`` by default) cooled to total length ``T`` (:func:`cooled_run`); a
    full :class:`~cooldown_callbacks.Schedule` (e.g. ``cosine(T)``) is used as it is. The ratio does
    not depend on ``D`` or a constant ``G``.

    >>> from cooldown_callbacks import cosine
    >>> round(transfer_lr(1e-3, Cooldown(fraction=0.2, shape="linear"), cosine(1000), T=1000), 6)
    0.001895
    """
    lr = _check_positive_real("lr", lr)
    T = _check_positive_int("T", T)
    g_from, _ = optimal_base_lr(_as_run("from_cooldown", from_cooldown, T, schedule), T)
    g_to, _ = optimal_base_lr(_as_run("to_cooldown", to_cooldown, T, schedule), T)
    return lr * g_to / g_from


@dataclass(frozen=True)
class Extension:
    r"""How to continue a run from ``T1`` to ``T2`` updates (:func:`extend`).

    The first run kept its base LR ``lr`` constant until ``fork_step`` (``T1 - c1``) and cooled down
    there. Two ways to reach ``T2`` from the constant-LR checkpoint at ``fork_step``:

    - **(i) scale the LR**: ``lr`` up to ``fork_step``, ``rho * lr`` from there on, and a cooldown
      of ``rho_cooldown_steps`` (same spec, for ``T2``) at the end; bound ``rho_bound``.
    - **(ii) longer cooldown**: keep ``lr`` and cool down over the last ``cooldown_steps`` updates;
      bound ``cooldown_bound``.

    ``naive_bound``: same LR and same cooldown spec at ``T2``; ``tuned_bound``: the cooled run of
    ``T2`` trained from scratch at its own optimal LR (for reference). Bounds are in the units of
    ``D`` and ``G``; ``lr`` is taken as the optimal base LR of the first run.
    """

    T1: int
    T2: int
    lr: float
    criterion: str
    cooldown: Cooldown
    fork_step: int
    rho: float
    rho_cooldown_steps: int
    rho_bound: float
    cooldown_steps: int
    cooldown_bound: float
    naive_bound: float
    tuned_bound: float

    @property
    def rho_lr(self) -> float:
        """The LR of option (i) after ``fork_step``: ``rho * lr``."""
        return self.rho * self.lr

    def rates(self, option: Literal["rho", "cooldown", "naive"]) -> np.ndarray:
        """The ``T2`` LR multipliers of ``lr`` for option ``"rho"`` (i), ``"cooldown"`` (ii) or ``"naive"``."""
        if option == "rho":
            return _rho_rates(self.fork_step, self.T2, self.rho, _factors(self.cooldown, self.rho_cooldown_steps))
        if option == "cooldown":
            return _cooldown_rates(self.T2, self.cooldown, self.cooldown_steps)
        if option == "naive":
            return _cooldown_rates(self.T2, self.cooldown, _cooldown_steps_for_total(self.cooldown, self.T2))
        raise ValueError(f"Invalid option ({option!r}): choose one of ('rho', 'cooldown', 'naive').")


def _factors(cooldown: Cooldown, c: int) -> np.ndarray:
    return np.fromiter((cooldown.factor(k, c) for k in range(c)), dtype=np.float64, count=c)


def _rho_rates(fork_step: int, T2: int, rho: float, factors: np.ndarray) -> np.ndarray:
    c = factors.shape[0]
    return np.concatenate([np.ones(fork_step), np.full(T2 - c - fork_step, rho), rho * factors])


def _cooldown_rates(T2: int, cooldown: Cooldown, c: int) -> np.ndarray:
    return np.concatenate([np.ones(T2 - c), _factors(cooldown, c)])


def _golden_min(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-7) -> float:
    """Minimiser of a unimodal ``f`` on ``[lo, hi]`` by golden-section search."""
    inv = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    x1, x2 = b - inv * (b - a), a + inv * (b - a)
    f1, f2 = f(x1), f(x2)
    while b - a > tol:
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - inv * (b - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + inv * (b - a)
            f2 = f(x2)
    return (a + b) / 2.0


def _scalar_search(objective: Callable[[float], float], lo: float, hi: float, n_grid: int = 41) -> float:
    """Grid search on ``[lo, hi]``, then golden-section refinement between the best point's neighbours."""
    grid = np.linspace(lo, hi, n_grid)
    vals = np.array([objective(float(x)) for x in grid])
    i = int(np.argmin(vals))
    a, b = grid[max(0, i - 1)], grid[min(n_grid - 1, i + 1)]
    x = _golden_min(objective, float(a), float(b))
    return x if objective(x) <= vals[i] else float(grid[i])


def _int_search(objective: Callable[[int], float], lo: int, hi: int, n_grid: int = 41) -> int:
    """Integer minimiser on ``[lo, hi]``: a grid, then ternary search between the best point's neighbours."""
    grid = np.unique(np.linspace(lo, hi, min(n_grid, hi - lo + 1)).round().astype(int))
    vals = [objective(int(c)) for c in grid]
    i = int(np.argmin(vals))
    a, b = int(grid[max(0, i - 1)]), int(grid[min(len(grid) - 1, i + 1)])
    cache: dict[int, float] = {}

    def f(c: int) -> float:
        if c not in cache:
            cache[c] = objective(c)
        return cache[c]

    while b - a > 2:
        m1 = a + (b - a) // 3
        m2 = b - (b - a) // 3
        if f(m1) <= f(m2):
            b = m2
        else:
            a = m1
    return min(range(a, b + 1), key=f)


def extend(T1: int, T2: int, lr: float = 1.0, cooldown: Cooldown = Cooldown(fraction=0.2, shape="linear"),
           criterion: Literal["minimize", "match"] = "minimize", D: float = 1.0, G: float = 1.0) -> Extension:
    r"""Continue a finished run of ``T1`` updates to ``T2`` (Schaipp et al. 2025, continued training).

    The first run: constant base LR ``γ`` up to ``fork_step = T1 - c1``, then ``cooldown``. ``γ`` is
    taken to be optimal for it, i.e. ``γ = γ*`` of :func:`cooled_run` ``(T1, cooldown)``; ``lr`` is
    the same LR in the user's units. From the constant-LR checkpoint at ``fork_step``:

    - (i) use ``ρ γ`` from ``fork_step`` on, with the same cooldown spec at the end of ``T2``;
    - (ii) keep ``γ`` and choose the cooldown length ``c`` in ``[1, T2 - fork_step]``.

    ``criterion="minimize"`` picks ``ρ`` (resp. ``c``) minimising :math:`\Omega_{T_2}` at the base
    LR ``γ`` already used (a 41-point grid on ``ρ ∈ [0.01, 1]`` refined by golden-section search;
    resp. a grid + ternary search over integers). ``criterion="match"`` picks the value for which
    ``γ`` is exactly the optimal base LR of the extended schedule (bisection), the rule of the
    paper's experiments. At ``T1 = 4000``, 20% linear cooldown: ``match`` gives ρ = 0.533 (2×) and
    0.375 (4×), the paper's 0.525 and 0.375 on its 0.025 grid; ``minimize`` gives 0.480 (2×) and
    0.398 (4×), with bounds within 0.3% of each other. For (ii) the bound usually prefers the longest
    cooldown allowed, ``c = T2 - fork_step`` (a linear decay from the checkpoint), which beats (i).

    >>> e = extend(4000, 8000, lr=1e-3, criterion="match")
    >>> round(e.rho, 2), e.fork_step, e.rho_cooldown_steps
    (0.53, 3200, 1600)
    """
    T1 = _check_positive_int("T1", T1, 2)
    T2 = _check_positive_int("T2", T2, 2)
    if T2 <= T1:
        raise ValueError(f"Invalid T2 ({T2}): must be > T1 ({T1}) to extend the run.")
    lr = _check_positive_real("lr", lr)
    if not isinstance(cooldown, Cooldown):
        raise ValueError(f"Invalid cooldown ({cooldown!r}): must be a Cooldown(steps=... or fraction=...).")
    if criterion not in CRITERIA:
        raise ValueError(f"Invalid criterion ({criterion!r}): choose one of {CRITERIA}.")
    D = _check_positive_real("D", D)
    G = _check_positive_real("G", G)

    first = cooled_run(T1, cooldown)
    fork = first.at
    gamma, _ = optimal_base_lr(first, T1, D=D, G=G)

    def terms(eta: np.ndarray) -> tuple[float, float]:
        a, v, tl = _terms(eta, G * G, D * D)
        return a, v + tl

    def omega(eta: np.ndarray) -> float:
        a, b = terms(eta)
        return a / gamma + gamma * b

    def log_gap(eta: np.ndarray) -> float:  # log(γ*(eta) / γ)
        a, b = terms(eta)
        return 0.5 * math.log(a / b) - math.log(gamma)

    # (i) scale the LR after the fork step
    c2 = _cooldown_steps_for_total(cooldown, T2)
    if T2 - c2 < fork:
        raise ValueError(f"Invalid cooldown ({cooldown}): at T2 = {T2} it would start before the first run's fork "
                         f"step {fork}; use a shorter cooldown or a larger T2.")
    fac = _factors(cooldown, c2)

    def rho_eta(r: float) -> np.ndarray:
        return _rho_rates(fork, T2, r, fac)

    if criterion == "minimize":
        rho = _scalar_search(lambda r: omega(rho_eta(r)), 0.01, 1.0)
    else:
        rho = _bisect_decreasing(lambda r: log_gap(rho_eta(r)), 0.01, 1.0)

    # (ii) keep the LR, choose the cooldown length
    c_max = T2 - fork

    def cd_eta(c: int) -> np.ndarray:
        return _cooldown_rates(T2, cooldown, c)

    if criterion == "minimize":
        c_best = _int_search(lambda c: omega(cd_eta(c)), 1, c_max)
    else:
        c_best = _int_match(lambda c: log_gap(cd_eta(c)), 1, c_max)

    naive = omega(_cooldown_rates(T2, cooldown, c2))
    _, tuned = optimal_base_lr(_cooldown_rates(T2, cooldown, c2), D=D, G=G)
    return Extension(T1=T1, T2=T2, lr=lr, criterion=criterion, cooldown=cooldown, fork_step=fork, rho=float(rho),
                     rho_cooldown_steps=c2, rho_bound=omega(rho_eta(rho)), cooldown_steps=int(c_best),
                     cooldown_bound=omega(cd_eta(c_best)), naive_bound=naive, tuned_bound=tuned)


def _bisect_decreasing(h: Callable[[float], float], lo: float, hi: float, tol: float = 1e-9) -> float:
    """Root of ``h`` on ``[lo, hi]`` (``h`` decreasing); the end closest to a root if there is none."""
    h_lo, h_hi = h(lo), h(hi)
    if h_hi >= 0:
        return hi
    if h_lo <= 0:
        return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if h(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _int_match(h: Callable[[int], float], lo: int, hi: int) -> int:
    """Integer ``c`` in ``[lo, hi]`` with ``|h(c)|`` smallest, ``h`` increasing (bisection)."""
    if h(lo) >= 0:
        return lo
    if h(hi) <= 0:
        return hi
    a, b = lo, hi  # h(a) < 0 < h(b)
    while b - a > 1:
        m = (a + b) // 2
        if h(m) < 0:
            a = m
        else:
            b = m
    return a if abs(h(a)) <= abs(h(b)) else b
