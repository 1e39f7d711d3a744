r"""What convex optimisation theory says about a schedule (Schaipp et al. 2025; Defazio et al. 2023).

For SGD :math:`x_{t+1} = x_t - \eta_t g_t` on a convex problem with :math:`D = \|x_1 - x_\star\|` and
gradient-norm bounds :math:`G_t`, the last iterate after :math:`T` updates satisfies
:math:`\mathbb{E}[f(x_T) - f_\star] \le \Omega_T` with

.. math::

    \Omega_T = \underbrace{\frac{D^2}{2 S_1}}_{\text{distance}}
             + \underbrace{\frac{Q_1}{2 S_1}}_{\text{variance}}
             + \underbrace{\frac12 \sum_{k=1}^{T-1} \frac{\eta_k}{S_{k+1}} \frac{Q_k}{S_k}}_{\text{tail}},
    \qquad S_k = \sum_{t=k}^{T} \eta_t, \quad Q_k = \sum_{t=k}^{T} \eta_t^2 G_t^2 .

``S`` and ``Q`` are tail sums, computed from the right (reverse cumulative sums), never as
``total - prefix``, so the bound keeps full precision at ``T = 10**6``.

**Rates.** ``η_1 .. η_T`` are the rates of updates ``1 .. T``. From a :class:`~cooldown_callbacks.Schedule`
``s`` they are ``s(0), ..., s(T - 1)`` (``s(t)`` is the rate of update ``t + 1``). A cooled schedule
``WSD(W).cooled(at=S, cooldown=Cooldown(steps=c, ...))`` has ``total_steps = S + c`` and its rate
``s(S + c - 1)`` is the last positive one (linear, 1-sqrt, cosine): ``T`` defaults to
``total_steps`` for a :class:`~cooldown_callbacks.Cooled` schedule. The bound needs
:math:`\eta_T > 0`; a last rate of exactly 0 raises ``ValueError``.

**Base LR.** Scaling every rate by :math:`\gamma` divides the distance term by :math:`\gamma` and
multiplies the other two by :math:`\gamma`. With :math:`a` the distance term and :math:`b` the rest at
:math:`\gamma = 1`: :math:`\gamma^\star = \sqrt{a / b}` and :math:`\Omega^\star = 2\sqrt{ab}`.

>>> from cooldown_callbacks import WSD, Cooldown, cosine
>>> wsd = WSD().cooled(at=800, cooldown=Cooldown(steps=200, shape="linear"))
>>> g_cos, _ = optimal_base_lr(cosine(1000))
>>> g_wsd, _ = optimal_base_lr(wsd)
>>> round(g_cos / g_wsd, 2)
1.89

The package keeps one concept per module: :mod:`~cooldown_callbacks.theory.bounds` (the bound, its
optimal base LR, the predicted curve), :mod:`~cooldown_callbacks.theory.extension` (LR transfer
between cooldowns, extending a finished run), :mod:`~cooldown_callbacks.theory.refinement`
(schedules from measured gradient norms). Everything public is importable from here.
"""

from __future__ import annotations

from .bounds import Bound, bound, bound_curve, optimal_base_lr
from .extension import CRITERIA, Extension, cooled_run, extend, transfer_lr
from .refinement import OPTIMIZERS, refine, refine_rates, smooth_grad_norms

__all__ = [
    "Bound",
    "Extension",
    "bound",
    "optimal_base_lr",
    "bound_curve",
    "cooled_run",
    "transfer_lr",
    "extend",
    "refine",
    "refine_rates",
    "smooth_grad_norms",
    "OPTIMIZERS",
    "CRITERIA",
]
