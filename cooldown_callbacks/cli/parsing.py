"""Command-line input: schedule specs ``KIND[:KEY=VALUE,...]``, cooldown specs ``KEY=VALUE,...``,
argparse types, and the two error kinds (a user error: exit 2; a missing optional dependency: exit 1)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..schedules import WSD, Cooldown, Noam, RSqrt, Schedule, cosine, linear
from ..shapes import DECAY_SHAPES

__all__ = ["PROG", "SCHEDULE_KINDS", "COOLDOWN_KEYS", "DEFAULT_COOLDOWN", "SCHEDULE_HELP", "UsageError", "MissingExtra",
           "ScheduleSpec", "parse_schedule", "parse_cooldown", "arg_type", "spec_or_cooldown", "int_at_least",
           "positive_int", "nonneg_int", "positive_float", "convert", "parse_pairs"]

PROG = "cooldown-callbacks"

# kind -> (builder, finite?, {spec key: (keyword, type)})
_WARMUP_KEYS = {"warmup": ("warmup_steps", "int"), "warmup_shape": ("warmup_shape", "str"),
                "warmup_start": ("warmup_start", "float")}
SCHEDULE_KINDS: dict[str, tuple[Callable[..., Schedule], bool, dict[str, tuple[str, str]]]] = {
    "wsd": (WSD, False, dict(_WARMUP_KEYS)),
    "constant": (WSD, False, dict(_WARMUP_KEYS)),
    "rsqrt": (RSqrt, False, {**_WARMUP_KEYS, "timescale": ("timescale", "int")}),
    "noam": (Noam, False, {"warmup": ("warmup_steps", "int")}),
    "cosine": (cosine, True, {"total": ("total_steps", "int"), "warmup": ("warmup_steps", "int"),
                              "final": ("final_ratio", "float"), "warmup_shape": ("warmup_shape", "str")}),
    "linear": (linear, True, {"total": ("total_steps", "int"), "warmup": ("warmup_steps", "int"),
                              "final": ("final_ratio", "float"), "warmup_shape": ("warmup_shape", "str")}),
}
COOLDOWN_KEYS = {"steps": ("steps", "int"), "fraction": ("fraction", "float"), "shape": ("shape", "str"),
                 "final": ("final_ratio", "float"), "half_life": ("half_life", "float")}
DEFAULT_COOLDOWN = "fraction=0.2,shape=1-sqrt"

SCHEDULE_HELP = f"""\
schedule spec: KIND[:KEY=VALUE,...]
  wsd | constant   warmup then constant: warmup=W, warmup_shape=linear|cosine|1-sqrt, warmup_start=X
  rsqrt            warmup then 1/sqrt: warmup=W, timescale=TAU (default W), warmup_shape, warmup_start
  noam             min(t/W, sqrt(W/t)): warmup=W
  cosine | linear  fixed horizon to final*peak: total=N (default --steps), warmup=W, final=X
examples: "wsd:warmup=100"  "rsqrt:warmup=100"  "cosine:total=1000,final=0.1"
cooldown spec: KEY=VALUE,... with steps=C or fraction=F (of the cooled run), shape={'|'.join(DECAY_SHAPES)},
  final=X (final ratio), half_life=H (exponential); default "{DEFAULT_COOLDOWN}".
  Indefinite schedules (wsd, rsqrt, noam) are cooled down with it; cosine and linear are used as they are."""


class UsageError(ValueError):
    """A user error: printed as ``error: ...`` with exit code 2, no traceback."""


class MissingExtra(RuntimeError):
    """An optional dependency is missing: exit code 1."""


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------
def convert(key: str, value: str, kind: str) -> Any:
    try:
        if kind == "int":
            x = float(value.replace("_", ""))
            if not x.is_integer():
                raise ValueError
            return int(x)
        if kind == "float":
            return float(value)
    except ValueError:
        raise UsageError(f"{key}={value!r} is not a{'n integer' if kind == 'int' else ' number'}") from None
    return value


def parse_pairs(text: str, keys: dict[str, tuple[str, str]], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not text.strip():
        return out
    for item in text.split(","):
        if "=" not in item:
            raise UsageError(f"{what}: {item!r} is not KEY=VALUE; known keys: {', '.join(keys)}")
        k, v = (s.strip() for s in item.split("=", 1))
        if k not in keys:
            raise UsageError(f"{what}: unknown key {k!r}; known keys: {', '.join(keys)}")
        name, typ = keys[k]
        out[name] = convert(k, v, typ)
    return out


@dataclass(frozen=True)
class ScheduleSpec:
    """A parsed ``KIND[:KEY=VALUE,...]``; :meth:`build` makes the schedule."""

    text: str
    kind: str
    kwargs: dict = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        return SCHEDULE_KINDS[self.kind][1]

    def build(self, total: int | None = None) -> Schedule:
        """The schedule; ``total`` is the default ``total=`` of cosine / linear."""
        builder = SCHEDULE_KINDS[self.kind][0]
        kwargs = dict(self.kwargs)
        if self.finite and "total_steps" not in kwargs:
            if total is None:
                raise UsageError(f"schedule {self.text!r}: give total=N in the spec or --steps N")
            kwargs["total_steps"] = total
        try:
            return builder(**kwargs)
        except ValueError as e:
            raise UsageError(f"schedule {self.text!r}: {e}") from None


def parse_schedule(text: str) -> ScheduleSpec:
    """Parse a schedule spec (see ``SCHEDULE_HELP``).

    >>> parse_schedule("wsd:warmup=100").build()
    WSD(warmup_steps=100, warmup_shape='linear', warmup_start=0.0)
    >>> parse_schedule("cosine:final=0.1").build(total=1000).total_steps
    1000
    """
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in SCHEDULE_KINDS:
        raise UsageError(f"unknown schedule kind {kind!r} in {text!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    kwargs = parse_pairs(rest, SCHEDULE_KINDS[kind][2], f"schedule {text!r}")
    spec = ScheduleSpec(text=text, kind=kind, kwargs=kwargs)
    if not spec.finite:
        spec.build()  # validate now, so the error names the argument
    return spec


def parse_cooldown(text: str) -> Cooldown:
    """Parse a cooldown spec ``KEY=VALUE,...`` (see ``SCHEDULE_HELP``).

    >>> parse_cooldown("steps=200,shape=linear")
    Cooldown(steps=200, fraction=None, shape='linear', final_ratio=0.0, half_life=0.1)
    """
    kwargs = parse_pairs(text, COOLDOWN_KEYS, f"cooldown {text!r}")
    if "steps" not in kwargs and "fraction" not in kwargs:
        kwargs["fraction"] = 0.2
    try:
        return Cooldown(**kwargs)
    except ValueError as e:
        raise UsageError(f"cooldown {text!r}: {e}") from None


def arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def conv(text: str) -> Any:
        try:
            return parse(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    conv.__name__ = parse.__name__.replace("parse_", "")
    return conv


def spec_or_cooldown(text: str) -> ScheduleSpec | Cooldown:
    """``--from`` / ``--to``: a schedule spec if it starts with a kind, else a cooldown spec."""
    if text.partition(":")[0].strip().lower() in SCHEDULE_KINDS:
        return parse_schedule(text)
    return parse_cooldown(text)


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            x = convert("value", text, "int")
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if x < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= {minimum}")
        return x
    return parse


positive_int, nonneg_int = int_at_least(1), int_at_least(0)


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return x

