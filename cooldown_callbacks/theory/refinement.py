r"""Refinement (Defazio et al. 2023): a schedule from the gradient norms of an earlier run."""

from __future__ import annotations

import numbers
from typing import Literal, Sequence

import numpy as np

from ..shapes import Tabulated
from ._common import _check_array, _rev_cumsum

__all__ = ["smooth_grad_norms", "refine_rates", "refine", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam")


def smooth_grad_norms(grad_norms: Sequence[float] | np.ndarray, smoothing: float = 0.1) -> np.ndarray:
    """Median filter of odd width ``w = 2 * (int(smoothing * N) // 2) + 1``.

    The end of the series is reflect-padded (``2w`` values) so the last steps see a centred window;
    the start repeats the first value. Costs O(N w).

    >>> smooth_grad_norms([1.0, 1.0, 9.0, 1.0, 1.0], smoothing=0.6).tolist()
    [1.0, 1.0, 1.0, 1.0, 1.0]
    """
    g = _check_array("grad_norms", grad_norms)
    N = g.shape[0]
    if N < 2:
        raise ValueError(f"Invalid grad_norms (length {N}): give at least 2 values, one per step.")
    ok = isinstance(smoothing, numbers.Real) and not isinstance(smoothing, bool) and 0.0 < float(smoothing) <= 1.0
    if not ok:
        raise ValueError(f"Invalid smoothing ({smoothing!r}): must be a number in (0, 1], the window as a fraction "
                         "of the number of steps.")
    w = 2 * (int(float(smoothing) * N) // 2) + 1
    if w == 1:
        return g.copy()
    h = w // 2
    x = np.pad(g, (0, 2 * w), mode="reflect")
    x = np.pad(x, (h, h), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(x, w)[:N]
    out = np.empty(N)
    chunk = max(1, (1 << 22) // w)
    for i in range(0, N, chunk):
        out[i:i + chunk] = np.median(windows[i:i + chunk], axis=1)
    return out


def refine_rates(grad_norms: Sequence[float] | np.ndarray, optimizer: Literal["sgd", "adam"] = "sgd",
                 smoothing: float = 0.1) -> np.ndarray:
    r"""The refined schedule of Defazio et al. (2023) as an array of ``N`` rates, max 1, last 0.

    With :math:`\tilde g` the median-smoothed norms (:func:`smooth_grad_norms`) and weights
    :math:`w_t = \tilde g_t^{-2}` (``"sgd"``, ℓ2 norms) or :math:`\tilde g_t^{-1}` (``"adam"``, ℓ1 norms):

    .. math:: \eta_t = w_t \sum_{p > t} w_p \Big/ \sum_{p} w_p, \qquad \eta_N = 0,

    divided by its maximum. Constant norms give linear decay ``1 - t/(N-1)``:

    >>> refine_rates([2.0] * 5).round(12).tolist()
    [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer ({optimizer!r}): choose one of {OPTIMIZERS} "
                         "('sgd' for l2 gradient norms, 'adam' for l1 norms of Adam-type updates).")
    g = smooth_grad_norms(grad_norms, smoothing)
    if np.any(g <= 0):
        i = int(np.flatnonzero(g <= 0)[0])
        raise ValueError(f"Invalid grad_norms: the smoothed norm at step {i} is 0, so its weight is infinite; "
                         "record non-zero gradient norms (or raise smoothing).")
    w = g ** -2.0 if optimizer == "sgd" else 1.0 / g
    tail = _rev_cumsum(w)
    eta = np.zeros_like(w)
    eta[:-1] = w[:-1] * (tail[1:] / tail[0])
    return eta / eta.max()


def refine(grad_norms: Sequence[float] | np.ndarray, optimizer: Literal["sgd", "adam"] = "sgd",
           smoothing: float = 0.1) -> Tabulated:
    """The refined schedule (:func:`refine_rates`) as a cooldown shape.

    The ``N`` rates become a :class:`~cooldown_callbacks.Tabulated` on the grid ``p = t / (N - 1)``
    (so ``p = 1`` is the final 0), normalised to ``f(0) = 1`` because a cooldown starts from the LR at
    the fork; ``Cooldown(steps=c, shape=refine(norms))`` samples it at ``p = k / c``.

    >>> from cooldown_callbacks import Cooldown
    >>> cd = Cooldown(steps=4, shape=refine([1.0] * 101))
    >>> [round(cd.factor(k, 4), 6) for k in range(5)]
    [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    return Tabulated(tuple(refine_rates(grad_norms, optimizer, smoothing).tolist()))
