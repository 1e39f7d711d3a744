"""Signals during a fork: a preemption handler must never see cooled weights.

While a fork runs, the Python handlers of SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 (a framework's
preemption handler, the user's) are held; they run after the main branch has been restored.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["_SignalGuard", "_Interrupted"]


class _Interrupted(BaseException):
    """A termination signal arrived during a fork: stop the fork, restore, then run the handler."""

    def __str__(self) -> str:
        name = signal.Signals(self.args[0]).name
        return f"interrupted by {name}; the main branch was restored before its handler ran"


# Signals whose handlers typically save a checkpoint or stop the run (SLURM sends SIGUSR1/SIGTERM).
_HELD_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))


class _SignalGuard:
    """Keeps Python signal handlers (a framework's preemption handler, the user's) away from cooled weights.

    While a fork runs, a held signal stops it (``_Interrupted``); while the main branch is being
    restored and the record written, it only waits. ``release()`` puts the original handlers back and
    re-delivers what arrived, so a handler that saves a checkpoint sees the main branch. Only Python
    handlers are held (a default action such as SIGTERM's termination saves nothing). Main thread
    only (where Python runs handlers). With several ranks a fork is not stopped midway (the other
    ranks would wait in its collectives): the signal waits until the fork has finished.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.pending: list[int] = []
        self.saved: dict[int, Any] = {}
        self.raising = False
        self.stop_midway = enabled
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _HELD_SIGNALS:
            try:
                handler = signal.getsignal(sig)
                if callable(handler):
                    signal.signal(sig, self._on_signal)
                    self.saved[sig] = handler
            except (OSError, RuntimeError, ValueError):
                continue

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending.append(signum)
        if self.raising:
            self.raising = False
            raise _Interrupted(signum)

    def arm(self) -> None:
        """The fork's body starts: a held signal stops it from now on (at once if one is waiting)."""
        if self.stop_midway:
            if self.pending:
                raise _Interrupted(self.pending[0])
            self.raising = True

    def hold(self) -> None:
        self.raising = False

    def release(self) -> None:
        self.raising = False
        for sig, handler in self.saved.items():
            try:
                signal.signal(sig, handler)
            except (OSError, RuntimeError, ValueError):
                pass
        self.saved = {}
        pending, self.pending = list(dict.fromkeys(self.pending)), []
        for sig in pending:
            signal.raise_signal(sig)
