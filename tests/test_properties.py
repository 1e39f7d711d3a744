"""Property-based tests (hypothesis): valid arguments build a sound schedule / plan; invalid ones are
refused with a ``ValueError`` naming the argument.

Valid and invalid configurations come from *separate* strategies: a valid strategy draws only
valid values (so every example reaches every check), an invalid one draws a valid configuration
and spoils exactly one argument (so the error must name that argument, ``match=``). Each test runs
its hypothesis loop inside and then asserts that every valid example reached the end of the checks
(and how many ran); ``pytest -s`` prints the counts.

"Sound" is checked against ``_reference_schedules``, written from the documented formulas and
sharing no code with the library: every value of a cooled schedule (before, during and after the
cooldown), of a WSD-S branch (decay, re-warm, main) and of every fork step sequence. Also: finite,
>= 0, non-increasing through each cooldown, a fork's LRs the same floats as ``LambdaLR`` over the
fixed-budget schedule, serialisation round-trips.

Budget: ``max_examples`` is set per test so the file runs in a few seconds.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import _reference_schedules as ref
from cooldown_callbacks import DECAY_SHAPES, RSqrt, WARMUP_SHAPES, WSD, Cooldown, ForkPlan, Noam, Tabulated
from cooldown_callbacks.engine import ForkEngine
from cooldown_callbacks.plan import DATA_SOURCES, MODES, ON_FORK_ERROR
from cooldown_callbacks.records import append_record, read_records
from cooldown_callbacks.schedules import schedule_from_dict

EXAMPLES = 200
RUN = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TMP = tempfile.gettempdir()
# Every property test must run at least this many examples, each reaching every check.
MIN_EXAMPLES = EXAMPLES // 2


def run_counted(name: str, check) -> None:
    """Run a hypothesis-decorated ``check(counter, ...)`` and prove its examples reached the assertions."""
    counter: Counter = Counter()
    check(counter)
    print(f"\n[{name}] {counter['reached']} of {counter['examples']} examples reached every check")
    assert counter["examples"] >= MIN_EXAMPLES, counter
    assert counter["reached"] == counter["examples"], counter


def non_increasing(a: float, b: float) -> bool:
    """``b <= a`` up to one rounding (interpolating a flat segment of a table can wobble by an ulp)."""
    return b <= a * (1 + 1e-15) + 1e-300


def refused(build, argument: str):
    """``build()`` raises a ValueError that says what is invalid and names ``argument``."""
    with pytest.raises(ValueError, match=argument) as e:
        build()
    assert "Invalid" in str(e.value)


# -- valid values ---------------------------------------------------------------------------------

unit = st.floats(0.0, 1.0)
open_unit = st.one_of(st.floats(1e-9, 1.0 - 1e-9), st.sampled_from([1e-9, 0.2, 0.5, 0.999999]))


@st.composite
def main_configs(draw) -> dict:
    kind = draw(st.sampled_from(["WSD", "RSqrt", "Noam"]))
    event(f"main {kind}")
    if kind == "Noam":
        return {"kind": kind, "warmup_steps": draw(st.integers(1, 40))}
    kw = {"kind": kind, "warmup_steps": draw(st.integers(0, 40)), "warmup_shape": draw(st.sampled_from(WARMUP_SHAPES)),
          "warmup_start": draw(unit)}
    if kind == "RSqrt":
        kw["timescale"] = draw(st.one_of(st.none(), st.integers(1, 50)))
    return kw


def build_main(kw: dict):
    args = {k: v for k, v in kw.items() if k != "kind"}
    return {"WSD": WSD, "RSqrt": RSqrt, "Noam": Noam}[kw["kind"]](**args)


def ref_main(kw: dict):
    args = {k: v for k, v in kw.items() if k != "kind"}
    return ref.main_schedule(kw["kind"], **args)


decreasing_tables = st.lists(unit, min_size=1, max_size=6).map(lambda xs: [1.0] + sorted(xs, reverse=True))


@st.composite
def cooldown_configs(draw, max_steps: int = 60) -> dict:
    if draw(st.booleans()):
        kw = {"steps": draw(st.integers(1, max_steps))}
    else:
        kw = {"fraction": draw(open_unit)}
    kw["shape"] = draw(st.one_of(st.sampled_from(DECAY_SHAPES), decreasing_tables))
    kw["final_ratio"] = draw(st.one_of(unit, st.just(0.0)))
    kw["half_life"] = draw(st.one_of(st.floats(0.01, 1.0), st.sampled_from([0.1, 1.0])))
    shape = kw["shape"] if isinstance(kw["shape"], str) else "table"
    event(f"cooldown {'steps' if 'steps' in kw else 'fraction'}, shape {shape}")
    return kw


def build_cooldown(kw: dict) -> Cooldown:
    shape = Tabulated(tuple(kw["shape"])) if isinstance(kw["shape"], list) else kw["shape"]
    return Cooldown(**{**kw, "shape": shape})


def ref_cooldown_length(kw: dict):
    return lambda at: ref.cooldown_length(at, kw.get("steps"), kw.get("fraction"))


# -- invalid values: a valid configuration with exactly one argument spoiled ----------------------

NOT_INT = [2.5, "3", True, None, float("nan"), [1]]
NOT_RATIO = [-0.1, 1.5, float("nan"), float("inf"), "0.5", True, None]


@st.composite
def invalid_main_configs(draw) -> tuple[dict, str]:
    kw = draw(main_configs())
    options = {"warmup_steps": NOT_INT + ([-1, 0] if kw["kind"] == "Noam" else [-1, -3])}
    if kw["kind"] != "Noam":
        options.update(warmup_shape=["cosine-ish", 3, None, ""], warmup_start=NOT_RATIO)
    if kw["kind"] == "RSqrt":
        options["timescale"] = [0, -1, 2.5, "3", True, float("nan")]
    arg = draw(st.sampled_from(sorted(options)))
    kw[arg] = draw(st.sampled_from(options[arg]))
    return kw, rf"Invalid {arg} \("


@st.composite
def invalid_cooldown_configs(draw) -> tuple[dict, str]:
    kw = draw(cooldown_configs())
    arg = draw(st.sampled_from(["steps/fraction", "steps", "fraction", "shape", "final_ratio", "half_life"]))
    if arg == "steps/fraction":
        both = draw(st.booleans())
        kw["steps"], kw["fraction"] = (5, 0.2) if both else (None, None)
        return kw, "give exactly one of steps"
    if arg in ("steps", "fraction"):
        kw.pop("steps", None), kw.pop("fraction", None)
        bad = [0, -1, 2.5, "3", True, float("nan")] if arg == "steps" else [0.0, 1.0] + NOT_RATIO[:-1]  # None: absent
        kw[arg] = draw(st.sampled_from(bad))
        return kw, rf"Invalid Cooldown {arg} \("
    bad = {"shape": ["sqrt", 7, None, ""], "final_ratio": NOT_RATIO, "half_life": [0.0, -1.0, 1.5, float("nan"), None]}
    kw[arg] = draw(st.sampled_from(bad[arg]))
    return kw, rf"Invalid Cooldown {arg} \("


# -- 1. cooled schedules --------------------------------------------------------------------------

def sample_steps(at: int, c: int) -> list[int]:
    """Every step of the run, or an even sample of a huge cooldown (fraction near 1 gives millions)."""
    stride = max(1, c // 2000)
    return sorted({*range(at), *range(at, at + c, stride), at + c - 1, at + c, at + c + 1, at + c + 7})


def test_cooled_schedule_equals_the_documented_formula():
    @RUN
    @given(main_configs(), cooldown_configs(), st.one_of(st.integers(1, 120), st.just(0)))
    def check(counter, mkw, ckw, at):
        counter["examples"] += 1
        main, cd = build_main(mkw), build_cooldown(ckw)
        cooled = main.cooled(at=at, cooldown=cd)
        c = ref_cooldown_length(ckw)(at)
        assert cooled.cooldown_steps == c and cooled.total_steps == at + c
        expected = ref.cooled(ref_main(mkw), at, c, ckw["shape"], ckw["final_ratio"], ckw["half_life"])
        ts = sample_steps(at, c)
        values = {t: cooled(t) for t in ts}
        wrong = [(t, values[t], expected(t)) for t in ts if not ref.close(values[t], expected(t))]
        assert not wrong, f"(t, library, reference): {wrong[:5]}"
        assert all(math.isfinite(v) and v >= 0 for v in values.values())
        window = [values[t] for t in ts if at <= t <= at + c]  # at least 2 values: c >= 1
        assert len(window) >= 2 and all(non_increasing(a, b) for a, b in zip(window, window[1:])), window
        # a fork's LRs are the same floats as LambdaLR's over the fixed-budget schedule (exactness)
        engine = ForkEngine(ForkPlan(at=[max(1, at)], cooldown=cd), main, TMP)
        base = [1e-3, 0.3]
        ks = [t - at for t in ts if at <= t <= at + c]
        assert [engine.fork_lrs(at, k, c, base, base) for k in ks] == [[b * values[at + k] for b in base] for k in ks]
        again = schedule_from_dict(cooled.to_dict())
        assert [again(t) for t in ts] == [values[t] for t in ts]
        counter["reached"] += 1

    run_counted("cooled schedules", check)


def test_invalid_schedule_arguments_are_refused_naming_the_argument():
    @RUN
    @given(st.one_of(invalid_main_configs().map(lambda x: ("main",) + x),
                     invalid_cooldown_configs().map(lambda x: ("cooldown",) + x),
                     st.tuples(st.just("at"), st.sampled_from([-1, 2.5, "3", True, None]), st.just(r"Invalid at \("))))
    def check(counter, case):
        counter["examples"] += 1
        what, kw, match = case
        event(f"invalid {what}: {match}")
        if what == "main":
            refused(lambda: build_main(kw), match)
        elif what == "cooldown":
            refused(lambda: build_cooldown(kw), match)
        else:
            refused(lambda: WSD(2).cooled(at=kw, cooldown=Cooldown(steps=3)), match)
        counter["reached"] += 1

    run_counted("invalid schedule arguments", check)


@pytest.mark.parametrize("values,match", [
    ((), r"Invalid Tabulated values \(length 0\)"), ((0.0, 0.5), r"Invalid Tabulated values \(first sample 0.0\)"),
    ((1.0, -0.5), r"Invalid Tabulated values: every sample"), ((1.0, float("nan")), r"Invalid Tabulated values: every"),
])
def test_invalid_tables_are_refused(values, match):
    with pytest.raises(ValueError, match=match):
        Tabulated(values)


# -- 2. fork plans and the engine's decisions -----------------------------------------------------

HORIZON = 200


def geometric_steps(first: int, ratio: float, until: int) -> list[int]:
    """``first, first * ratio, first * ratio^2, ...`` rounded, repeats dropped (the documented trigger)."""
    out, x = [], float(first)
    while round(x) <= until:
        if not out or round(x) != out[-1]:
            out.append(int(round(x)))
        x *= ratio
    return out


@st.composite
def plan_configs(draw) -> tuple[dict, dict, list[int] | None]:
    """``(ForkPlan kwargs, cooldown kwargs, expected fork steps up to HORIZON or None for no step trigger)``."""
    mode = draw(st.sampled_from(MODES))
    trigger = draw(st.sampled_from(["every", "at", "geometric", "on_eval", "at_end"]))
    ckw = draw(cooldown_configs(max_steps=8))
    if mode == "continue" and trigger == "on_eval":  # windows end at evaluations: a fixed length (see the test)
        ckw.pop("fraction", None)
        ckw["steps"] = draw(st.integers(1, 8))
    cd = build_cooldown(ckw)
    kw: dict = {"mode": mode, "cooldown": cd, "seed": draw(st.integers(0, 10**6)),
                "on_fork_error": draw(st.sampled_from(ON_FORK_ERROR)), "record_grad_norms": draw(st.booleans()),
                "data": draw(st.one_of(st.sampled_from(DATA_SOURCES), st.just([(1, 2)])))}
    if mode == "continue":
        kw["rewarm_steps"] = draw(st.integers(0, 3))
    event(f"plan {mode} {trigger}")
    expected = None
    if trigger == "every":
        lo = cd.steps + kw.get("rewarm_steps", 0) if mode == "continue" and cd.steps is not None else 1
        kw["every"] = draw(st.integers(lo, max(lo, 60)))
        expected = list(range(kw["every"], HORIZON + 1, kw["every"]))
    elif trigger == "at":
        at = draw(st.lists(st.integers(1, HORIZON), min_size=1, max_size=6))
        kw["at"] = draw(st.sampled_from([list, tuple]))(at)
        expected = sorted(set(at))
    elif trigger == "geometric":
        kw["geometric"] = (draw(st.integers(1, 50)), draw(st.floats(1.05, 3.0)))
        expected = geometric_steps(*kw["geometric"], HORIZON)
    elif trigger == "on_eval":  # the default trigger, unless at_end=True is the only one given
        kw.update(draw(st.sampled_from([{"at_end": False}, {"on_eval": True, "at_end": draw(st.booleans())}])))
    else:
        kw.update(draw(st.sampled_from([{"at_end": True}, {"on_eval": False, "at_end": True}])))
    if trigger not in ("on_eval", "at_end"):
        kw["at_end"] = draw(st.booleans())
    return kw, ckw, expected


def test_fork_plan_triggers_and_engine_decisions_follow_the_documented_rules():
    @RUN
    @given(plan_configs(), main_configs(), st.integers(4, 30))
    def check(counter, case, mkw, eval_every):
        counter["examples"] += 1
        kw, ckw, expected = case
        plan = ForkPlan(**kw)
        main = build_main(mkw)
        # config round-trip (a custom data iterable comes back as "auto")
        assert ForkPlan.from_dict(plan.to_dict()) == (plan if isinstance(kw["data"], str) else
                                                      ForkPlan(**{**kw, "data": "auto"}))
        if plan.mode == "continue" and plan.on_eval:  # disjoint windows: overlapping ones have no documented meaning
            eval_every = max(eval_every, plan.cooldown.steps + plan.rewarm_steps)
        engine = ForkEngine(plan, main, TMP, eval_every=eval_every)
        steps = range(1, HORIZON + 1)
        if expected is not None:  # a step trigger: at least one fork step below the horizon
            assert expected and plan.fork_steps(HORIZON) == expected
            assert [s for s in range(HORIZON + 1) if plan.is_fork_step(s)] == expected
        else:
            assert plan.fork_steps(HORIZON) == [] and not any(plan.is_fork_step(s) for s in steps)
        if plan.mode == "branch":
            if plan.on_eval:  # forks exactly where the framework evaluates
                assert all(engine.should_fork(s, evaluating=True) and not engine.should_fork(s) for s in steps)
            else:  # exactly at the trigger's steps, evaluating or not
                assert [s for s in steps if engine.should_fork(s)] == (expected or [])
                assert [s for s in steps if engine.should_fork(s, evaluating=True)] == (expected or [])
            done = (expected or [eval_every])[0]
            engine.completed.add(done)
            assert not engine.should_fork(done, evaluating=True)
            assert all(engine.main_multiplier(t) == main(t) for t in range(HORIZON))
        else:
            check_continue_mode(plan, engine, mkw, ckw, expected, eval_every)
        counter["reached"] += 1

    run_counted("fork plans", check)


def check_continue_mode(plan, engine, mkw, ckw, expected, eval_every):
    """WSD-S: the main branch's LR is the reference WSD-S schedule; cooled models are due at each window's end."""
    length = ref_cooldown_length(ckw)
    if plan.on_eval:  # the cooldown *ends* at each evaluation
        ends = list(range(eval_every, HORIZON + ckw["steps"] + eval_every, eval_every))  # windows begun by HORIZON
        by_start = {e - min(ckw["steps"], e): min(ckw["steps"], e) for e in ends}
        starts, length = sorted(by_start), by_start.__getitem__
    else:
        starts = expected or []
    if not starts:  # at_end only: no window, the main schedule untouched
        assert all(engine.main_multiplier(t) == build_main(mkw)(t) for t in range(HORIZON))
        return
    wsds = ref.wsds(ref_main(mkw), starts, length, ckw["shape"], ckw["final_ratio"], plan.rewarm_steps,
                    ckw["half_life"])
    got = [engine.main_multiplier(t) for t in range(HORIZON)]
    wrong = [(t, got[t], wsds(t)) for t in range(HORIZON) if not ref.close(got[t], wsds(t))]
    assert not wrong, f"(t, engine, reference WSD-S): {wrong[:5]}"
    nxt = dict(zip(starts, starts[1:]))
    for s in starts:
        window = got[s:min(s + length(s), nxt.get(s, HORIZON), HORIZON)]  # decay steps (a later start cuts them)
        assert all(non_increasing(a, b) for a, b in zip(window, window[1:])), (s, window)
    due = [s + length(s) for s in starts if s + length(s) <= min(nxt.get(s, HORIZON), HORIZON)]
    assert [t for t in range(HORIZON + 1) if engine.continue_due(t) is not None] == due


@st.composite
def invalid_plan_configs(draw) -> tuple[dict, str]:
    """A valid plan with one argument spoiled, and the words the error must contain."""
    kw, _, _ = draw(plan_configs())
    base = {k: v for k, v in kw.items() if k not in ("every", "at", "geometric", "on_eval", "at_end", "rewarm_steps")}
    base["mode"] = "branch"
    fault = draw(st.sampled_from(["every", "at", "geometric", "two-triggers", "on_eval+trigger", "no-trigger", "mode",
                                  "data", "rewarm_steps", "rewarm-in-branch", "seed", "on_fork_error", "cooldown",
                                  "continue-window"]))
    event(f"invalid plan: {fault}")
    if fault == "every":
        return {**base, "every": draw(st.sampled_from([0, -1, 2.5, "3", True]))}, r"Invalid every \("
    if fault == "at":
        return {**base, "at": draw(st.sampled_from([[], [0], [-1, 5], [2.5], "10", 5, [3, True]]))}, r"Invalid at \("
    if fault == "geometric":
        bad = draw(st.sampled_from([(10,), (10, 1.0), (10, 0.5), (0, 2), (5, float("nan")), "x", (2.5, 2), (5, True)]))
        return {**base, "geometric": bad}, r"Invalid geometric"
    if fault == "two-triggers":
        two = draw(st.sampled_from([{"every": 5, "at": [3]}, {"at": [3], "geometric": (2, 2.0)},
                                    {"every": 5, "geometric": (2, 2.0)}]))
        return {**base, **two}, "at most one of every, at, geometric"
    if fault == "on_eval+trigger":
        return {**base, "on_eval": True, "every": 5}, "on_eval=True cannot be combined with every"
    if fault == "no-trigger":
        return {**base, "on_eval": False}, "no trigger"
    if fault == "rewarm-in-branch":
        return {**base, "every": 10, "rewarm_steps": draw(st.integers(1, 3))}, \
            r"Invalid rewarm_steps: re-warming only applies to mode='continue'"
    if fault == "continue-window":
        c, r = draw(st.integers(1, 8)), draw(st.integers(0, 3))
        return {**base, "mode": "continue", "cooldown": Cooldown(steps=c), "rewarm_steps": r,
                "every": draw(st.integers(1, c + r - 1)) if c + r > 1 else 0}, \
            "must fit between forks" if c + r > 1 else r"Invalid every \("
    bad = {"mode": ["restart", None, "Continue"], "data": ["peeks", 3, None], "seed": [-1, 2.5, "0", None],
           "rewarm_steps": [-1, 2.5, "1", None], "on_fork_error": ["ignore", None], "cooldown": ["1-sqrt", [], 0.2]}
    if fault == "rewarm_steps":
        base["mode"] = "continue"
    return {**base, "every": 10, fault: draw(st.sampled_from(bad[fault]))}, rf"Invalid {fault} \("


def test_invalid_plan_arguments_are_refused_naming_the_argument():
    @RUN
    @given(invalid_plan_configs())
    def check(counter, case):
        counter["examples"] += 1
        kw, match = case
        refused(lambda: ForkPlan(**kw), match)
        counter["reached"] += 1

    run_counted("invalid plan arguments", check)


# -- 3. WSD-S as a schedule -----------------------------------------------------------------------

def test_wsds_schedule_equals_the_documented_formula_or_refuses_overlapping_windows():
    @RUN
    @given(main_configs(), cooldown_configs(max_steps=12), st.lists(st.integers(0, 80), min_size=1, max_size=5),
           st.integers(0, 3))
    def check(counter, mkw, ckw, at, rewarm):
        counter["examples"] += 1
        main, cd = build_main(mkw), build_cooldown(ckw)
        at = sorted(at)
        length = ref_cooldown_length(ckw)
        overlap = any(b < a + length(a) + rewarm for a, b in zip(at, at[1:]))
        event("overlapping windows" if overlap else "disjoint windows")
        if overlap:
            refused(lambda: main.with_cooldowns(at=at, cooldown=cd, rewarm_steps=rewarm), r"Invalid at \(")
        else:
            sched = main.with_cooldowns(at=at, cooldown=cd, rewarm_steps=rewarm)
            wsds = ref.wsds(ref_main(mkw), at, length, ckw["shape"], ckw["final_ratio"], rewarm, ckw["half_life"])
            horizon = at[-1] + min(length(at[-1]), 4000) + rewarm + 3
            ts = sorted({*range(min(horizon, 400)), *range(at[-1], horizon, max(1, (horizon - at[-1]) // 500))})
            wrong = [(t, sched(t), wsds(t)) for t in ts if not ref.close(sched(t), wsds(t))]
            assert not wrong, f"(t, library, reference WSD-S): {wrong[:5]}"
            assert all(math.isfinite(sched(t)) and sched(t) >= 0 for t in ts)
        counter["reached"] += 1

    run_counted("WSD-S schedules", check)


# -- 4. records -----------------------------------------------------------------------------------

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
