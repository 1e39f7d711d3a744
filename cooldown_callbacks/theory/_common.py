"""Shared pieces of :mod:`cooldown_callbacks.theory`: argument checks and tail sums."""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import numpy as np

from ..schedules import Schedule

Rates = Union[Schedule, Sequence[float], np.ndarray]


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name} ({value!r}): must be an integer >= {minimum}.")
    if value < minimum:
        raise ValueError(f"Invalid {name} ({value}): must be an integer >= {minimum}.")
    return int(value)


def _check_positive_real(name: str, value: object) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or float(value) <= 0:
        raise ValueError(f"Invalid {name} ({value!r}): must be a finite number > 0.")
    return float(value)


def _check_array(name: str, values: object, *, length: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: must be a 1-D sequence of numbers, got {type(values).__name__}.") from None
    if arr.ndim != 1:
        raise ValueError(f"Invalid {name} (shape {arr.shape}): must be 1-D, one value per step.")
    if length is not None and arr.shape[0] != length:
        raise ValueError(
            f"Invalid {name} (length {arr.shape[0]}): must have one value per step, i.e. length T = {length}.")
    if not np.all(np.isfinite(arr)):
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"Invalid {name}: value {arr[i]} at index {i} is not finite; drop or fill NaN/inf entries.")
    if np.any(arr < 0):
        i = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"Invalid {name}: value {arr[i]} at index {i} is negative; every value must be >= 0.")
    return arr


def _rev_cumsum(x: np.ndarray) -> np.ndarray:
    """``out[k] = sum(x[k:])``, accumulated from the right."""
    return np.cumsum(x[::-1])[::-1]
