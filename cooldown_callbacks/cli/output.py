"""Command-line output: aligned tables, number formatting, and PNG figures (matplotlib, the ``plot``
extra, imported only when a figure is drawn, with the Agg backend)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..records import atomic_path
from ..schedules import Schedule
from .parsing import MissingExtra

__all__ = ["is_num", "table", "fmt", "pyplot", "save", "finish_figure", "curve_steps", "values"]


def is_num(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned plain-text columns: numbers right-aligned, text left-aligned."""
    cols = list(zip(headers, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    numeric = [all(is_num(str(c)) for c in col[1:]) for col in cols]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if num else str(c).ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def fmt(x: float | None, digits: int = 6) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def pyplot():
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingExtra("plotting needs matplotlib: pip install 'cooldown-callbacks[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: str) -> None:
    plt = pyplot()
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    print(f"wrote {out}")


def curve_steps(T: int, n: int = 400) -> np.ndarray:
    return np.unique(np.linspace(1, T, min(T, n)).round().astype(int))


def values(s: Schedule, start: int, stop: int) -> np.ndarray:
    return np.fromiter((s(t) for t in range(start, stop)), dtype=np.float64, count=max(0, stop - start))



def finish_figure(fig, axs, path: str) -> None:
    """Grid and legend on every panel, then write the PNG."""
    for ax in axs:
        ax.grid(lw=0.3, ls="--")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
