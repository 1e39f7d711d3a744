"""ForkPlan triggers and validation; engine decisions and records."""

import json

import pytest

import _reference_schedules as reference
from cooldown_callbacks import WSD, Cooldown, ForkPlan
from cooldown_callbacks.engine import ForkEngine, check_writable_dir
from cooldown_callbacks.records import ForkRecord, append_record, read_records


@pytest.mark.parametrize("plan,until,expected", [
    pytest.param(ForkPlan(every=3), 10, [3, 6, 9], id="every"),
    pytest.param(ForkPlan(at=[7, 2, 7, 20]), 10, [2, 7], id="at-sorted-dedup"),
    pytest.param(ForkPlan(geometric=(10, 1.5)), 60, [10, 15, 22, 34, 51], id="geometric"),
    pytest.param(ForkPlan(geometric=(1, 1.1)), 5, [1, 2, 3, 4, 5], id="geometric-distinct"),
    pytest.param(ForkPlan(), 100, [], id="on-eval-default"),
])
def test_fork_steps(plan, until, expected):
    assert plan.fork_steps(until) == expected
    assert [s for s in range(until + 1) if plan.is_fork_step(s)] == expected


def test_default_plan_forks_on_eval_with_hagele_cooldown():
    p = ForkPlan()
    assert p.on_eval is True and p.cooldown == Cooldown(fraction=0.2, shape="1-sqrt") and p.mode == "branch"
    assert ForkPlan(every=5).on_eval is False
    # at_end=True alone means only the end, not every evaluation
    assert ForkPlan(at_end=True).on_eval is False and ForkPlan(at_end=True, on_eval=True).on_eval is True


@pytest.mark.parametrize("kwargs,match", [
    (dict(every=5, at=[3]), r"at most one of every, at, geometric"),
    (dict(every=0), r"every \(0\)"),
    (dict(every=2.5), r"every \(2.5\)"),
    (dict(at=[]), r"at \(\[\]\)"),
    (dict(at=[0, 5]), r"at \(0\)"),
    (dict(at="100"), r"list of step counts"),
    (dict(geometric=(100,)), r"\(first, ratio\)"),
    (dict(geometric=(100, 1.0)), r"geometric ratio \(1.0\)"),
    (dict(geometric=(0, 2)), r"geometric first \(0\)"),
    (dict(on_eval=True, every=10), r"on_eval=True cannot be combined with every"),
    (dict(on_eval=False), r"no trigger"),
    (dict(cooldown=100), r"Invalid cooldown \(100\)"),
    (dict(mode="restart"), r"mode \('restart'\)"),
    (dict(data="next"), r"data \('next'\)"),
    (dict(data=42), r"data \(42\)"),
    (dict(rewarm_steps=5), r"only applies to mode='continue'"),
    (dict(mode="continue", rewarm_steps=-1), r"rewarm_steps \(-1\)"),
    (dict(seed=-1), r"seed \(-1\)"),
    (dict(on_fork_error="ignore"), r"on_fork_error \('ignore'\)"),
    (dict(mode="continue", every=10, cooldown=Cooldown(steps=10), rewarm_steps=1), r"must fit between forks"),
])
def test_invalid_plans_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForkPlan(**kwargs)


def test_engine_should_fork_skips_completed_and_respects_eval(tmp_path):
    eng = ForkEngine(ForkPlan(every=10), WSD(0), tmp_path)
    assert [s for s in range(35) if eng.should_fork(s)] == [10, 20, 30]
    eng.completed.add(20)
    assert not eng.should_fork(20)
    ev = ForkEngine(ForkPlan(on_eval=True), WSD(0), tmp_path)
    assert not ev.should_fork(7) and ev.should_fork(7, evaluating=True) and not ev.should_fork(0, evaluating=True)
    state = json.loads(json.dumps(eng.state_dict()))
    eng2 = ForkEngine(ForkPlan(every=10), WSD(0), tmp_path)
    eng2.load_state_dict(state)
    assert eng2.completed == {20}


def test_engine_continue_windows_follow_the_wsds_schedule(tmp_path):
    cd = Cooldown(steps=3, shape="linear")
    eng = ForkEngine(ForkPlan(every=10, cooldown=cd, mode="continue", rewarm_steps=2), WSD(2), tmp_path)
    # the reference WSD-S schedule, written from the documented formula (no library schedule code)
    wsds = reference.wsds(reference.main_schedule("WSD", 2), [10, 20, 30], lambda s: 3, "linear", rewarm=2)
    assert [eng.main_multiplier(t) for t in range(40)] == [wsds(t) for t in range(40)]
    assert [s for s in range(40) if eng.continue_due(s) is not None] == [13, 23, 33]
    ev = ForkEngine(ForkPlan(on_eval=True, cooldown=Cooldown(fraction=0.2, shape="linear"), mode="continue"),
                    WSD(0), tmp_path, eval_every=50)
    assert [s for s in range(160) if ev.continue_due(s) is not None] == [50, 100, 150]
    assert ev.window(45) == (40, 10) and ev.window(99) == (80, 20)


def test_engine_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid plan"):
        ForkEngine("every 10", WSD(0), tmp_path)
    with pytest.raises(ValueError, match=r"Invalid schedule"):
        ForkEngine(ForkPlan(every=3), lambda t: 1.0, tmp_path)
    with pytest.raises(ValueError, match=r"Invalid filename"):
        ForkEngine(ForkPlan(every=3), WSD(0), tmp_path, filename="cooled-{epoch}")


def test_check_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b").is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"Invalid dirpath .*cannot write there"):
        check_writable_dir(f / "sub")


def test_records_append_and_tolerate_a_torn_last_line(tmp_path):
    path = tmp_path / "forks.jsonl"
    append_record(path, ForkRecord(step=10, cooldown_steps=2, shape="linear", metrics={"val_loss": 1.5}))
    with open(path, "ab") as f:
        f.write(b'{"step": 20, "cooldo')  # a crash mid-write
    assert [r["step"] for r in read_records(path)] == [10]
    append_record(path, ForkRecord(step=30, cooldown_steps=2, shape="linear", metrics={"val_loss": float("nan")}))
    recs = read_records(tmp_path)
    assert [r["step"] for r in recs] == [10, 30]
    assert recs[1]["metrics"]["val_loss"] == "nan"
    assert path.read_bytes().count(b"\n") == 2


def test_main_metrics_noted_after_the_fork_reach_the_records_file(tmp_path):
    eng = ForkEngine(ForkPlan(every=10), WSD(0), tmp_path)
    eng._finish(ForkRecord(step=10, cooldown_steps=2, shape="linear", metrics={"val_loss": 1.0}))
    eng.note_main_metrics(10, {"val_loss": 1.5, "epoch": "x"})
    recs = read_records(tmp_path)
    assert len(recs) == 1 and recs[0]["main_metrics"] == {"val_loss": 1.5}
    assert eng.records[0]["main_metrics"] == {"val_loss": 1.5}


def test_geometric_plan_is_cheap_per_step_even_for_ratios_near_one():
    import time

    plan = ForkPlan(geometric=(10, 1.00001))
    t0 = time.perf_counter()
    hits = [s for s in range(1, 5001) if plan.is_fork_step(s)]
    assert time.perf_counter() - t0 < 2.0  # was O(steps) per call: minutes for this loop
    assert hits == list(range(10, 5001))
    assert ForkPlan(geometric=(10, 1.00001)) == plan  # the cache is not part of the value


@pytest.mark.parametrize("plan", [
    ForkPlan(), ForkPlan(every=7, cooldown=Cooldown(steps=3, shape="rex"), mode="continue", rewarm_steps=2),
    ForkPlan(at=[5, 9], data="peek", at_end=True, on_fork_error="raise"), ForkPlan(geometric=(10, 2), seed=3),
])
def test_plan_round_trips_through_json(plan):
    d = json.loads(json.dumps(plan.to_dict()))
    assert ForkPlan.from_dict(d) == plan


def test_plan_with_custom_data_round_trips_as_auto():
    from cooldown_callbacks.plan import plan_lost_data

    d = json.loads(json.dumps(ForkPlan(every=3, data=[1, 2]).to_dict()))
    assert d["data"] == {"custom": "list"} and plan_lost_data(d)
    assert ForkPlan.from_dict(d) == ForkPlan(every=3, data="auto")
    assert not plan_lost_data(ForkPlan(every=3).to_dict())
