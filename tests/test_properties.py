"""Property-based tests (hypothesis): any arguments either build a sound schedule / plan, or are
refused with a ``ValueError`` that names the offending argument.

"Sound": every value finite and >= 0; non-increasing through each cooldown; equal to the main
schedule before the fork and to ``final_ratio * main(S)`` after it; a fork's LRs are the same floats
as the fixed-budget schedule's; serialisation round-trips. Arguments are drawn from valid values
mixed with wrong types, out-of-range numbers, NaN/inf, bools and strings. An independent oracle
says which arguments are invalid; the error must name one of them (the first check that fails).

Budget: ``max_examples`` is set per test so the file runs in a few seconds.
"""

from __future__ import annotations

import math
import numbers
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cooldown_callbacks import DECAY_SHAPES, RSqrt, WARMUP_SHAPES, WSD, Cooldown, ForkPlan, Noam, Tabulated
from cooldown_callbacks.engine import ForkEngine
from cooldown_callbacks.plan import MODES, ON_FORK_ERROR
from cooldown_callbacks.records import append_record, read_records
from cooldown_callbacks.schedules import schedule_from_dict

FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JUNK = st.sampled_from([None, True, False, "3", "linear", float("nan"), float("inf"), -float("inf"), [1], (2, 3)])
ints = st.one_of(st.integers(-3, 40), st.sampled_from([2.0, 0.5]), JUNK)
ratios = st.one_of(st.floats(-0.5, 1.5, allow_nan=False), st.sampled_from([0.0, 1.0, 0.999999, 1e-9]), JUNK)


def is_int(v, lo):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo


def is_steps(v, lo):
    """A schedule's step count: an int, or an integral float (transformers 5 types warmup_steps as a float)."""
    return is_int(v, lo) or (isinstance(v, float) and math.isfinite(v) and v.is_integer() and v >= lo)


def is_real_in(v, lo, hi, open_lo=False, open_hi=False):
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
        return False
    return (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)


def check_refusal(build, faults: dict[str, str]) -> object | None:
    """``build()`` must succeed iff ``faults`` is empty; else raise ValueError naming a faulty argument.

    ``faults`` maps each invalid argument to the word the message must contain for it.
    """
    if not faults:
        return build()
    with pytest.raises(ValueError) as e:
        build()
    msg = str(e.value)
    assert any(word in msg for word in faults.values()), f"{msg!r} names none of {sorted(faults)}"
    assert "Invalid" in msg  # every refusal starts by saying what is invalid
    return None


# -- main schedules -----------------------------------------------------------------------------

main_kwargs = st.fixed_dictionaries({
    "kind": st.sampled_from(["WSD", "RSqrt", "Noam"]),
    "warmup_steps": ints,
    "timescale": st.one_of(st.none(), ints),
    "warmup_shape": st.one_of(st.sampled_from(WARMUP_SHAPES), st.sampled_from(["cosine-ish", 3, None])),
    "warmup_start": ratios,
})


def build_main(kw):
    kind = kw["kind"]
    faults = {}
    if kind == "Noam":
        if not is_steps(kw["warmup_steps"], 1):
            faults["warmup_steps"] = "warmup_steps"
        return check_refusal(lambda: Noam(kw["warmup_steps"]), faults)
    if not is_steps(kw["warmup_steps"], 0):
        faults["warmup_steps"] = "warmup_steps"
    if kw["warmup_shape"] not in WARMUP_SHAPES:
        faults["warmup_shape"] = "warmup_shape"
    if not is_real_in(kw["warmup_start"], 0, 1):
        faults["warmup_start"] = "warmup_start"
    args = dict(warmup_steps=kw["warmup_steps"], warmup_shape=kw["warmup_shape"], warmup_start=kw["warmup_start"])
    if kind == "RSqrt":
        if kw["timescale"] is not None and not is_steps(kw["timescale"], 1):
            faults["timescale"] = "timescale"
        return check_refusal(lambda: RSqrt(timescale=kw["timescale"], **args), faults)
    return check_refusal(lambda: WSD(**args), faults)


# -- cooldowns ----------------------------------------------------------------------------------

decreasing_tables = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=6).map(
    lambda xs: Tabulated(tuple([1.0] + sorted(xs, reverse=True))))

cooldown_kwargs = st.fixed_dictionaries({
    "steps": st.one_of(st.none(), ints),
    "fraction": st.one_of(st.none(), ratios),
    "shape": st.one_of(st.sampled_from(DECAY_SHAPES), decreasing_tables, st.sampled_from(["sqrt", 7, None])),
    "final_ratio": ratios,
    "half_life": st.one_of(st.sampled_from([0.1, 0.5, 1.0]), ratios),
})


def build_cooldown(kw):
    faults = {}
    if (kw["steps"] is None) == (kw["fraction"] is None):
        faults["steps/fraction"] = "exactly one of steps"
    elif kw["steps"] is not None and not is_steps(kw["steps"], 1):
        faults["steps"] = "Cooldown steps"
    elif kw["fraction"] is not None and not is_real_in(kw["fraction"], 0, 1, open_lo=True, open_hi=True):
        faults["fraction"] = "Cooldown fraction"
    if not (kw["shape"] in DECAY_SHAPES or callable(kw["shape"])):
        faults["shape"] = "Cooldown shape"
    if not is_real_in(kw["final_ratio"], 0, 1):
        faults["final_ratio"] = "Cooldown final_ratio"
    if not is_real_in(kw["half_life"], 0, 1, open_lo=True):
        faults["half_life"] = "Cooldown half_life"
    return check_refusal(lambda: Cooldown(**kw), faults)


@FAST
@given(main_kwargs, cooldown_kwargs, st.one_of(st.integers(0, 120), st.sampled_from([-1, 2.5, None])))
def test_cooled_schedule_is_sound_or_refused_naming_the_argument(mkw, ckw, at):
    main = build_main(mkw)
    cd = build_cooldown(ckw)
    if main is None or cd is None:
        return
    cooled = check_refusal(lambda: main.cooled(at=at, cooldown=cd), {} if is_int(at, 0) else {"at": "Invalid at"})
    if cooled is None:
        return
    c = cooled.cooldown_steps
    assert c >= 1 and cooled.total_steps == at + c
    # every step of the run, or an even sample of a huge cooldown (fraction near 1 gives millions)
    stride = max(1, c // 2000)
    ts = sorted({*range(at), *range(at, at + c, stride), at + c - 1, at + c, at + c + 1, at + c + 2})
    values = {t: cooled(t) for t in ts}
    assert all(math.isfinite(v) and v >= 0 for v in values.values()), values
    assert all(values[t] == main(t) for t in range(at))  # the main schedule, untouched, before the fork
    window = [values[t] for t in ts if at <= t <= at + c]
    assert all(b <= a for a, b in zip(window, window[1:])), f"increases during the cooldown: {window}"
    assert all(values[t] == main(at) * cd.final_ratio for t in ts if t >= at + c)  # the end value, held
    assert values[at] <= main(at) * 1.0000000000000002  # the cooldown starts from the LR at the fork
    # a fork's LRs are the same floats as LambdaLR's over the fixed-budget schedule (exactness)
    engine = ForkEngine(ForkPlan(at=[max(1, at)], cooldown=cd), main, tempfile.gettempdir())
    base = [1e-3, 0.3]
    for t in ts:
        if at <= t <= at + c:
            assert engine.fork_lrs(at, t - at, c, base, base) == [b * values[t] for b in base]
    # serialisation round-trips to an equal schedule
    again = schedule_from_dict(cooled.to_dict())
    assert {t: again(t) for t in ts} == values


# -- WSD-S and plans ----------------------------------------------------------------------------

plan_kwargs = st.fixed_dictionaries({}, optional={
    "every": ints,
    "at": st.one_of(st.lists(st.integers(-1, 60), max_size=4), st.sampled_from(["10", 5, [3, True], (0,)])),
    "geometric": st.one_of(st.tuples(st.integers(-1, 20), st.floats(1.05, 3.0)),
                           st.sampled_from([(10,), (10, 1.0), (10, 0.5), (0, 2), (5, float("nan")), "x", (5, 2)])),
    "on_eval": st.sampled_from([True, False, None]),
    "mode": st.sampled_from(list(MODES) + ["restart", None]),
    "rewarm_steps": ints,
    "seed": ints,
    "on_fork_error": st.sampled_from(list(ON_FORK_ERROR) + ["ignore"]),
    "at_end": st.booleans(),
})


def plan_faults(kw, cd) -> dict[str, str]:
    f = {}
    given_ = [n for n in ("every", "at", "geometric") if kw.get(n) is not None]
    if len(given_) > 1:
        return {"triggers": "at most one of every, at, geometric"}
    on_eval = kw.get("on_eval")
    if on_eval and given_:
        return {"on_eval": "on_eval=True cannot be combined"}
    if on_eval is False and not given_ and not kw.get("at_end"):
        return {"trigger": "no trigger"}
    if "every" in given_ and not is_int(kw["every"], 1):
        return {"every": "Invalid every"}
    if "at" in given_:
        at = kw["at"]
        if isinstance(at, (str, bytes)) or not isinstance(at, (list, tuple)):
            return {"at": "Invalid at"}
        if not at or not all(is_int(s, 1) for s in at):
            return {"at": "Invalid at"}
    if "geometric" in given_:
        g = kw["geometric"]
        if not isinstance(g, (tuple, list)) or len(g) != 2 or not is_int(g[0], 1) or \
                not is_real_in(g[1], 1, math.inf, open_lo=True, open_hi=True):
            return {"geometric": "geometric"}
    mode = kw.get("mode", "branch")
    if mode not in MODES:
        f["mode"] = "Invalid mode"
    rw = kw.get("rewarm_steps", 0)
    if not is_int(rw, 0):
        f["rewarm_steps"] = "rewarm_steps"
    elif rw and mode != "continue":
        f["rewarm_steps"] = "rewarm_steps"
    if not is_int(kw.get("seed", 0), 0):
        f["seed"] = "Invalid seed"
    if kw.get("on_fork_error", "record") not in ON_FORK_ERROR:
        f["on_fork_error"] = "on_fork_error"
    if not f and mode == "continue" and "every" in given_ and cd.steps is not None and cd.steps + rw > kw["every"]:
        f["every"] = "must fit between forks"
    return f


@settings(max_examples=300, deadline=None)
@given(plan_kwargs, st.sampled_from([Cooldown(steps=3, shape="linear"), Cooldown(fraction=0.2),
                                     Cooldown(steps=1, shape="cosine", final_ratio=0.1)]))
def test_fork_plan_is_consistent_or_refused_naming_the_argument(kw, cd):
    plan = check_refusal(lambda: ForkPlan(cooldown=cd, **kw), plan_faults(kw, cd))
    if plan is None:
        return
    steps = plan.fork_steps(200)
    assert steps == sorted(set(steps)) and all(s >= 1 for s in steps)
    assert [s for s in range(201) if plan.is_fork_step(s)] == steps
    assert ForkPlan(**{**_plan_args(plan.to_dict()), "cooldown": cd}) == plan  # config round-trips


def _plan_args(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k not in ("cooldown", "data")}
    if d["geometric"] is not None:
        d["geometric"] = tuple(d["geometric"])
    return d


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["WSD", "RSqrt"]), st.integers(0, 8), st.integers(1, 12), st.integers(1, 6),
       st.integers(0, 3), st.sampled_from(["linear", "1-sqrt", "cosine", "rex", "square", "exponential"]),
       st.sampled_from([0.0, 0.1]))
def test_continue_mode_follows_wsds_and_cools_monotonically(kind, warmup, every, c, rewarm, shape, final):
    main = WSD(warmup) if kind == "WSD" else RSqrt(warmup)
    cd = Cooldown(steps=c, shape=shape, final_ratio=final)
    if c + rewarm > every:
        with pytest.raises(ValueError, match=r"must fit between forks \(every="):
            ForkPlan(every=every, cooldown=cd, mode="continue", rewarm_steps=rewarm)
        return
    engine = ForkEngine(ForkPlan(every=every, cooldown=cd, mode="continue", rewarm_steps=rewarm), main,
                        tempfile.gettempdir())
    horizon = 4 * every + 3
    ref = main.with_cooldowns(at=range(every, horizon, every), cooldown=cd, rewarm_steps=rewarm)
    values = [engine.main_multiplier(t) for t in range(horizon)]
    assert values == [ref(t) for t in range(horizon)]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    for s in range(every, horizon - c, every):
        window = values[s:s + c]  # the c decay steps (then WSD-S jumps back up)
        assert all(b <= a for a, b in zip(window, window[1:])), (s, window)
    assert [t for t in range(horizon) if engine.continue_due(t) is not None] == \
        [s + c for s in range(every, horizon, every) if s + c < horizon]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 80), max_size=5), st.integers(1, 10), st.integers(0, 3))
def test_wsds_join_is_sound_or_refuses_overlapping_windows(at, c, rewarm):
    cd = Cooldown(steps=c, shape="1-sqrt")
    at = sorted(at)
    overlap = any(b < a + c + rewarm for a, b in zip(at, at[1:]))
    sched = check_refusal(lambda: RSqrt(4).with_cooldowns(at=at, cooldown=cd, rewarm_steps=rewarm),
                          {"at": "Invalid at"} if overlap else {})
    if sched is None:
        return
    values = [sched(t) for t in range(100)]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    for s in at:
        window = values[s:s + c]  # the c decay steps (then WSD-S jumps back up)
        assert all(b <= a for a, b in zip(window, window[1:]))


# -- records ------------------------------------------------------------------------------------

@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(["step", "val_loss", "note"]),
                                st.one_of(st.integers(0, 10**6), st.floats(allow_nan=True), st.text(max_size=8)),
                                min_size=1), min_size=1, max_size=5),
       st.floats(0, 1))
def test_records_file_cut_anywhere_reads_a_prefix_and_heals(records, cut):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "forks.jsonl"
        ends = []
        for r in records:
            append_record(path, r)
            ends.append(path.stat().st_size)
        full = read_records(path)
        assert len(full) == len(records)
        data = path.read_bytes()
        n = int(cut * len(data))
        path.write_bytes(data[:n])  # a crash at byte n
        complete = sum(1 for e in ends if e <= n)
        assert read_records(path) == full[:complete]
        append_record(path, {"step": -1})
        assert read_records(path) == full[:complete] + [{"step": -1}]
