"""cooldown-callbacks: train indefinitely, fork exact cooldown-to-zero runs along the way.

The core is framework-agnostic (torch and numpy only). Adapters live in
``cooldown_callbacks.integrations`` (Lightning, HF Trainer, Accelerate / plain PyTorch).
"""

from .budget import BudgetFit, fit_budget_curve
from .engine import ForkEngine, ForkError
from .plan import ForkPlan, PlanCost
from .records import ForkRecord, read_records
from .schedules import (
    WSD,
    Cooldown,
    Cooled,
    Noam,
    RSqrt,
    Schedule,
    Tabulated,
    WithCooldowns,
    cosine,
    linear,
    schedule_from_dict,
)
from .shapes import DECAY_SHAPES, WARMUP_SHAPES
from .snapshot import Snapshot

__version__ = "0.1.0"

__all__ = [
    "WSD",
    "RSqrt",
    "Noam",
    "Cooldown",
    "Cooled",
    "WithCooldowns",
    "Schedule",
    "Tabulated",
    "ForkPlan",
    "PlanCost",
    "fit_budget_curve",
    "BudgetFit",
    "ForkEngine",
    "ForkError",
    "ForkRecord",
    "Snapshot",
    "read_records",
    "cosine",
    "linear",
    "schedule_from_dict",
    "DECAY_SHAPES",
    "WARMUP_SHAPES",
]
