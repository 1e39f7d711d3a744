"""Command line: ``cooldown-callbacks {plot,bound,transfer,extend,refine,report}``.

Schedules are written as ``KIND[:KEY=VALUE,...]`` and cooldowns as ``KEY=VALUE,...`` (see
``SCHEDULE_HELP`` or ``cooldown-callbacks plot --help``). Plots need the ``plot`` extra
(matplotlib), budget-curve fits the ``fit`` extra (scipy); both are imported only when used.

Modules: :mod:`.parsing` (specs and argparse types), :mod:`.output` (tables, figures),
:mod:`.schedule_cmds` (plot, bound, transfer, extend, refine), :mod:`.report` (a run's records).

Exit codes: 0 success, 2 usage or input errors (the message says what to fix), 1 a missing
optional dependency.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import report, schedule_cmds
from .parsing import (COOLDOWN_KEYS, PROG, SCHEDULE_HELP, SCHEDULE_KINDS, MissingExtra, ScheduleSpec, UsageError,
                      arg_type, parse_cooldown, parse_schedule, spec_or_cooldown)

__all__ = ["main", "parse_schedule", "parse_cooldown", "ScheduleSpec", "SCHEDULE_KINDS", "COOLDOWN_KEYS"]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Draw schedules, evaluate them with convex-optimisation theory (Schaipp et al. 2025), "
                    "refine them from gradient norms (Defazio et al. 2023), and report a run's fork records.",
        epilog=SCHEDULE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, description: str, specs: bool = True) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, epilog=SCHEDULE_HELP if specs else None,
                              formatter_class=_Formatter)

    schedule_cmds.add_parsers(add, arg_type(parse_schedule), arg_type(parse_cooldown), arg_type(spec_or_cooldown))
    report.add_parser(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage/input error, 1 missing extra)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) and argparse usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except (UsageError, ValueError, OSError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MissingExtra as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
