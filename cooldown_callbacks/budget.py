r"""The budget curve of one run: cooled loss against total steps, fitted with a power law.

The cooled models of one run trace the loss a fixed-budget run of ``T`` steps reaches, for
``T = S + c`` (fork step plus cooldown steps, the convention of :mod:`~cooldown_callbacks.records`).
:func:`fit_budget_curve` fits

.. math:: L(T) = E + A\,T^{-\alpha}, \qquad A \ge 0,\; 0.01 \le \alpha \le 3,

by least squares, and says what another 10%, 2x or 4x of training would buy, with a band. The
data support a fit when the losses decrease with the budget beyond their noise (the slope of a
line in ``log T`` is negative at one-sided p <= 0.05) and the exponent stays inside its range;
otherwise the fit says why (``supported=False``; without a decrease the flat line is kept).

Method (variable projection): for a given ``alpha`` the model is linear in ``(E, A)``, solved
exactly; the residual sum of squares is then minimised over ``alpha`` (a grid, refined with
``scipy.optimize.minimize_scalar``). The prediction band at level ``p`` is the delta-method
interval for a *new measured* cooled loss, ``L(T) +- t_{(1+p)/2, n-3} sqrt(g' C g + s^2)``, with
``C = s^2 (J'J)^{-1}`` the parameters' covariance, ``g`` the gradient of ``L(T)`` in ``(E, A,
alpha)`` and ``s`` the residual standard deviation (or the given ``sigma``, then with the normal
quantile). Needs the ``fit`` extra (scipy), imported when a fit is made.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["fit_budget_curve", "BudgetFit", "ALPHA_RANGE"]

ALPHA_RANGE = (0.01, 3.0)


def _scipy() -> tuple[Any, Any]:
    try:
        from scipy import optimize, stats
    except ImportError as e:
        raise ImportError("fit_budget_curve needs scipy: pip install 'cooldown-callbacks[fit]'") from e
    return optimize, stats


@dataclass(frozen=True)
class BudgetFit:
    """A fitted budget curve ``L(T) = E + A * T**(-alpha)`` (see :func:`fit_budget_curve`).

    ``supported`` is False when the data do not support a power law (``reason`` says why); the
    numbers are then a flat or edge-of-range fit and predictions should not be used. ``notes``
    hold weaker caveats. ``sigma`` is the noise of one loss (given, or the residual standard
    deviation; ``nan`` when three points leave no degree of freedom and none was given;
    ``sigma_known`` when it was given).
    """

    E: float
    A: float
    alpha: float
    steps: tuple[float, ...]
    losses: tuple[float, ...]
    sigma: float
    level: float
    supported: bool
    reason: str = ""
    notes: tuple[str, ...] = ()
    sigma_known: bool = False
    cov: tuple[tuple[float, ...], ...] = field(default=(), repr=False)  # of (E, A, alpha), or of (E,) when A = 0
    quantile: float = field(default=math.nan, repr=False)

    @property
    def n(self) -> int:
        return len(self.steps)

    def predict(self, T: Any) -> Any:
        """Predicted cooled loss at total steps ``T`` (a number or an array)."""
        t = np.asarray(T, dtype=np.float64)
        out = self.E + self.A * t ** (-self.alpha)
        return float(out) if np.ndim(out) == 0 else out

    def band(self, T: Any, level: float | None = None) -> tuple[Any, Any]:
        """``(low, high)`` of the prediction band at ``T`` for a newly measured cooled loss, at ``level``
        (default: the fit's). Infinite when the noise is unknown (three points, no ``sigma``)."""
        q = self.quantile if level is None else self._quantile(level)
        t = np.atleast_1d(np.asarray(T, dtype=np.float64))
        mid = self.E + self.A * t ** (-self.alpha)
        if not math.isfinite(self.sigma) or not math.isfinite(q):
            lo, hi = np.full_like(mid, -np.inf), np.full_like(mid, np.inf)
        else:
            cov = np.asarray(self.cov, dtype=np.float64)
            if cov.shape == (3, 3):
                g = np.stack([np.ones_like(t), t ** (-self.alpha), -self.A * t ** (-self.alpha) * np.log(t)], 1)
                var = np.einsum("ij,jk,ik->i", g, cov, g)
            else:
                var = np.full_like(t, float(cov[0][0]) if cov.size else 0.0)
            half = q * np.sqrt(np.maximum(var, 0.0) + self.sigma ** 2)
            lo, hi = mid - half, mid + half
        if np.ndim(T) == 0:
            return float(lo[0]), float(hi[0])
        return lo, hi

    def gain(self, T: float, more: float = 0.1) -> float:
        """Predicted drop of the cooled loss from ``T`` to ``(1 + more) * T`` total steps."""
        return float(self.predict(T) - self.predict((1.0 + more) * T))

    def _quantile(self, level: float) -> float:
        _check_level(level)
        _, stats = _scipy()
        dof = self.n - (3 if len(self.cov) == 3 else 1)
        if self.sigma_known:
            return float(stats.norm.ppf(0.5 + level / 2))
        return float(stats.t.ppf(0.5 + level / 2, dof)) if dof > 0 else math.nan

    def summary(self) -> str:
        """A few lines: the law, its support, and predictions at 2x and 4x the last budget."""
        last = max(self.steps)
        pct = f"{self.level:.0%}"
        law = f"{self.E:.4g} + {self.A:.4g} * T^-{self.alpha:.3g}" if self.A > 0 else f"{self.E:.4g} (flat)"
        lines = [f"L(T) = {law}   ({self.n} cooled losses, T = {min(self.steps):g}..{last:g}; "
                 f"noise sigma {self.sigma:.3g})"]
        if not self.supported:
            lines.append(f"the data do not support a fit: {self.reason}")
            return "\n".join(lines)
        for k in (2, 4):
            lo, hi = self.band(k * last)
            lines.append(f"predicted cooled loss at {k}x the last budget (T = {k * last:g}): {self.predict(k * last):.4f}"
                         f"  ({pct} band {lo:.4f} .. {hi:.4f})")
        g = self.gain(last)
        lines.append(f"10% more steps (T = {1.1 * last:g}) would lower it by {g:.4f} "
                     f"({100 * g / self.predict(last):.2f}%)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _check_level(level: Any) -> None:
    if not isinstance(level, numbers.Real) or isinstance(level, bool) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"Invalid level ({level!r}): must be a probability in (0, 1), e.g. 0.9.")


def _as_array(name: str, x: Any) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: must be a sequence of numbers.") from None
    if a.ndim != 1:
        raise ValueError(f"Invalid {name}: must be a flat sequence of numbers (got shape {a.shape}).")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"Invalid {name}: every value must be finite (got {a[~np.isfinite(a)][:3].tolist()}).")
    return a


def _linear(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """Best ``(E, B)`` with ``B >= 0`` for ``y ~ E + B x^-alpha``; returns ``(E, B, rss)``."""
    z = x ** (-alpha)
    (E, B), *_ = np.linalg.lstsq(np.stack([np.ones_like(z), z], 1), y, rcond=None)
    if B < 0:  # the constraint is active: a flat curve at the mean
        E, B = float(np.mean(y)), 0.0
    r = y - E - B * z
    return float(E), float(B), float(np.sum(r * r))


def _grid_rss(x: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Residual sum of squares of the best ``(E, B >= 0)`` for each exponent (a coarse search: normal equations)."""
    z = x[None, :] ** (-alphas[:, None])
    zc = z - z.mean(1, keepdims=True)
    yc = y - y.mean()
    szz = np.sum(zc * zc, 1)
    B = np.where(szz > 0, np.sum(zc * yc[None, :], 1) / np.where(szz > 0, szz, 1.0), 0.0)
    B = np.maximum(B, 0.0)
    r = yc[None, :] - B[:, None] * zc
    return np.sum(r * r, 1)


def _decrease_p(T: np.ndarray, y: np.ndarray, sigma: float | None, stats: Any) -> float:
    """One-sided p-value of "the losses decrease with log T": the slope of a line fitted to ``y`` against
    ``log T`` (Student t with ``n - 2`` degrees of freedom, or normal with a known ``sigma``)."""
    lt = np.log(T)
    xm = lt - lt.mean()
    sxx = float(np.sum(xm * xm))
    b = float(np.sum(xm * (y - y.mean())) / sxx)
    if sigma is not None:
        return float(stats.norm.cdf(b / (sigma / math.sqrt(sxx))))
    resid = y - y.mean() - b * xm
    s2 = float(np.sum(resid * resid)) / (T.size - 2)
    if s2 <= 0:
        return 0.0 if b < 0 else 1.0
    return float(stats.t.cdf(b / math.sqrt(s2 / sxx), T.size - 2))


def fit_budget_curve(steps: Sequence[float], losses: Sequence[float], *, level: float = 0.9,
                     sigma: float | None = None) -> BudgetFit:
    """Fit ``L(T) = E + A * T**(-alpha)`` to cooled losses against total steps ``T = S + c``.

    Args:
        steps: total steps of each cooled model (the budget ``T``; repeated budgets are allowed).
        losses: the cooled losses (e.g. validation loss), one per budget.
        level: probability of the prediction band (default 0.9).
        sigma: the known noise (standard deviation) of one loss; default: estimated from the
            residuals, which needs at least four budgets.

    Refuses (``ValueError``) fewer than three distinct budgets. When the losses do not decrease
    with the budget, or the exponent runs to the edge of its range, the fit is returned with
    ``supported=False`` and the reason. Requires scipy (``pip install 'cooldown-callbacks[fit]'``).

    >>> T = [1000, 2000, 4000, 8000]
    >>> fit = fit_budget_curve(T, [2.0 + 30 * t ** -0.5 for t in T])
    >>> round(fit.E, 6), round(fit.A, 4), round(fit.alpha, 5), round(fit.predict(16000), 6)
    (2.0, 30.0, 0.5, 2.237171)
    """
    T = _as_array("steps", steps)
    y = _as_array("losses", losses)
    if T.shape != y.shape:
        raise ValueError(f"Invalid losses: {y.size} losses for {T.size} steps; give one loss per budget.")
    if np.any(T <= 0):
        raise ValueError(f"Invalid steps: budgets must be > 0 (got {T[T <= 0][:3].tolist()}).")
    distinct = np.unique(T).size
    if distinct < 3:
        raise ValueError(f"fit_budget_curve needs cooled losses at three or more budgets to fit E, A and alpha; "
                         f"got {distinct} distinct budget(s). Fork at more points (e.g. ForkPlan(every=...) or "
                         f"geometric=...).")
    _check_level(level)
    if sigma is not None and (not isinstance(sigma, numbers.Real) or isinstance(sigma, bool)
                              or not math.isfinite(sigma) or sigma <= 0):
        raise ValueError(f"Invalid sigma ({sigma!r}): the noise of one loss, a number > 0, or None to estimate it.")
    optimize, stats = _scipy()
    n = T.size
    T0 = float(T.max())
    x = T / T0
    lo, hi = math.log(ALPHA_RANGE[0]), math.log(ALPHA_RANGE[1])
    grid = np.linspace(lo, hi, 241)
    rss = _grid_rss(x, y, np.exp(grid))
    i = int(np.argmin(rss))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = optimize.minimize_scalar(lambda g: _linear(x, y, math.exp(g))[2], bounds=(a, b), method="bounded",
                                   options={"xatol": 1e-10})
    g_best = float(res.x) if res.fun <= rss[i] else float(grid[i])
    alpha = math.exp(g_best)
    E, B, r2 = _linear(x, y, alpha)
    A = B * T0 ** alpha  # back to L = E + A T^-alpha
    notes: list[str] = []
    supported, reason = True, ""
    mean = float(np.mean(y))
    r0 = float(np.sum((y - mean) ** 2))
    flat = B <= 1e-12 * max(1.0, abs(E)) or r0 <= 1e-24 * max(1.0, mean * mean) * n
    p_flat = None if flat else _decrease_p(T, y, sigma, stats)
    at_edge = g_best <= lo + 1e-3 or g_best >= hi - 1e-3
    if flat:
        supported, reason = False, "the cooled losses do not decrease with the budget (A = 0: a flat curve)"
        E, A, r2 = mean, 0.0, r0
    elif p_flat is not None and p_flat > 0.05:
        supported, reason = False, (f"the cooled losses do not decrease with the budget beyond their noise (trend in "
                                    f"log T: one-sided p = {p_flat:.2g}); the flat line is kept")
        flat, E, A, r2 = True, mean, 0.0, r0
    elif at_edge:
        supported, reason = False, (f"the exponent is not determined by these budgets (alpha = {alpha:.3g} at the "
                                    f"edge of {ALPHA_RANGE[0]}..{ALPHA_RANGE[1]})")
        if g_best <= lo + 1e-3:
            reason += ("; the losses fall about as fast or faster in log T than a power law allows, as early in "
                       "training: fit from a later budget")
    k = 1 if flat else 3
    dof = n - k
    if sigma is not None:
        s2, q = float(sigma) ** 2, float(stats.norm.ppf(0.5 + level / 2))
    elif dof > 0:
        s2, q = r2 / dof, float(stats.t.ppf(0.5 + level / 2, dof))
    else:
        s2, q = math.nan, math.nan
        notes.append("three budgets leave no degree of freedom: the curve passes through them and the noise is "
                     "unknown (infinite band); fork at more budgets or give sigma=")
    if flat:
        cov = ((s2 / n,),) if math.isfinite(s2) else ((math.nan,),)
    else:
        z = T ** (-alpha)
        J = np.stack([np.ones(n), z, -A * z * np.log(T)], 1)
        try:
            cov_m = np.linalg.inv(J.T @ J) * s2 if math.isfinite(s2) else np.full((3, 3), np.nan)
        except np.linalg.LinAlgError:
            cov_m = np.full((3, 3), np.inf)
            notes.append("the parameters are not separately determined (singular Jacobian)")
        cov = tuple(tuple(float(v) for v in row) for row in cov_m)
        se_alpha = math.sqrt(cov_m[2, 2]) if np.isfinite(cov_m[2, 2]) and cov_m[2, 2] >= 0 else math.nan
        if supported and math.isfinite(se_alpha) and se_alpha > alpha:
            notes.append(f"the exponent is weakly determined (alpha = {alpha:.3g} +- {se_alpha:.2g}): "
                         "extrapolations are uncertain, see the band")
    if supported and E < 0 <= float(y.min()):
        notes.append(f"E = {E:.3g} < 0: the law would take the loss below zero, so it fits a transient (early in "
                     "training the loss falls faster than a power law); fit from a later budget")
    if T.max() / T.min() < 2:
        notes.append(f"the budgets span only {T.max() / T.min():.2f}x: extrapolating far beyond them is uncertain")
    return BudgetFit(E=float(E), A=float(A), alpha=float(alpha), steps=tuple(T.tolist()), losses=tuple(y.tolist()),
                     sigma=math.sqrt(s2) if math.isfinite(s2) else math.nan, level=float(level), supported=supported,
                     reason=reason, notes=tuple(notes), sigma_known=sigma is not None, cov=cov, quantile=q)
