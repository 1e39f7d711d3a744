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


# -- several cooldowns per fork point, the cost of a plan, the cap --------------------------------
TWO = (Cooldown(steps=50, shape="linear"), Cooldown(steps=50, shape="1-sqrt"))


def test_a_list_of_cooldowns_is_kept_and_a_single_one_stays_as_it_is():
    p = ForkPlan(every=100, cooldown=list(TWO))
    assert p.cooldown == TWO and p.cooldowns == TWO and p.cooldown_labels == ("linear", "1-sqrt")
    one = ForkPlan(every=100, cooldown=[TWO[0]])
    assert one.cooldown == TWO[0] and one.cooldowns == (TWO[0],) and one.cooldown_labels == (None,)
    assert ForkPlan(every=100).cooldowns == (Cooldown(fraction=0.2, shape="1-sqrt"),)
    assert p.fork_cost(100) == 100 and ForkPlan(every=10, cooldown=Cooldown(fraction=0.2)).fork_cost(800) == 200


@pytest.mark.parametrize("cooldowns,labels", [
    ([Cooldown(steps=50), Cooldown(steps=100)], ("50steps", "100steps")),
    ([Cooldown(fraction=0.2, shape="linear"), Cooldown(fraction=0.125, shape="linear")], ("20pct", "12.5pct")),
    ([Cooldown(steps=50, shape="linear"), Cooldown(steps=50, shape="1-sqrt"), Cooldown(steps=80, shape="linear")],
     ("50steps_linear", "50steps_1-sqrt", "80steps_linear")),
    ([Cooldown(steps=50), Cooldown(steps=50, final_ratio=0.1)], ("1-sqrt_1", "1-sqrt_2")),
    ([Cooldown(steps=50), Cooldown(fraction=0.2)], ("50steps", "20pct")),
])
def test_labels_name_what_differs(cooldowns, labels):
    assert ForkPlan(every=100, cooldown=cooldowns).cooldown_labels == labels


@pytest.mark.parametrize("kwargs,match", [
    (dict(cooldown=[]), r"Invalid cooldown \(\[\]\): give a Cooldown"),
    (dict(cooldown=[TWO[0], 5]), r"Invalid cooldown \(5\) in the list"),
    (dict(cooldown=[TWO[0], TWO[0]]), r"is listed twice"),
    (dict(cooldown="steps=5"), r"Invalid cooldown \('steps=5'\)"),
    (dict(mode="continue", cooldown=list(TWO)), r"mode='continue' \(WSD-S\) keeps the cooled weights, so it takes one "
                                                r"Cooldown, not a list of 2"),
    (dict(max_overhead=0), r"Invalid max_overhead \(0\): must be a number > 0"),
    (dict(max_overhead=float("inf")), r"Invalid max_overhead \(inf\)"),
    (dict(max_overhead=True), r"Invalid max_overhead \(True\)"),
    (dict(mode="continue", max_overhead=0.5), r"Invalid max_overhead: in mode='continue' .* add none"),
])
def test_invalid_cooldown_lists_and_caps_name_the_argument(kwargs, match):
    kwargs.setdefault("every", 100)
    with pytest.raises(ValueError, match=match):
        ForkPlan(**kwargs)


def test_the_cost_of_forking_at_every_evaluation_is_quadratic():
    """The issue's example: 20% cooldowns at every 500 steps up to 10,000 add 26,250 steps."""
    c = ForkPlan(on_eval=True).cost(10_000, eval_every=500)
    assert c.fork_steps == tuple(range(500, 10_001, 500)) and c.cooldown_steps == 26_250 and c.ratio == 2.625
    assert str(c) == ("ForkPlan cost to step 10000: 20 fork points x 1 cooldown = 26250 cooldown steps, 2.62x the "
                      "10000 main steps")
    assert ForkPlan(geometric=(500, 2)).cost(10_000).cooldown_steps == 125 + 250 + 500 + 1000 + 2000
    two = ForkPlan(every=1000, cooldown=list(TWO)).cost(3000)
    assert two.cooldowns_per_fork == 2 and two.cooldown_steps == 300 and "3 fork points x 2 cooldowns" in str(two)
    with pytest.raises(ValueError, match=r"Invalid eval_every \(None\)"):
        ForkPlan().cost(1000)


def test_at_end_adds_the_final_fork_and_continue_mode_adds_nothing():
    c = ForkPlan(every=300, at_end=True, cooldown=Cooldown(steps=10)).cost(1000)
    assert c.fork_steps == (300, 600, 900, 1000) and c.cooldown_steps == 40
    assert ForkPlan(every=500, at_end=True, cooldown=Cooldown(steps=10)).cost(1000).fork_steps == (500, 1000)
    wsds = ForkPlan(every=100, mode="continue", cooldown=Cooldown(steps=10)).cost(1000)
    assert wsds.cooldown_steps == 0 and "main-branch steps, no steps added" in str(wsds)


@pytest.mark.parametrize("r,forks", [
    # c = S/4 at S = 500, 1000, ..., 3000; a fork runs while (cooldown steps so far + its own) <= r * S
    (0.25, (500,)),  # 125 <= 125; then 125 + 250 > 250, 125 + 375 > 375, ...
    (0.5, (500, 1000, 1500, 3000)),  # 125, 375, 750; 750 + 500 > 1000, 750 + 625 > 1250; 750 + 750 <= 1500
    (1.0, (500, 1000, 1500, 2000, 2500, 3000)),  # 2625 <= 3000 at the end
    (0.1, ()),  # 125 > 50: even the first is too dear
])
def test_max_overhead_runs_a_fork_only_while_the_total_stays_under_the_cap(r, forks):
    plan = ForkPlan(every=500, cooldown=Cooldown(fraction=0.2), max_overhead=r)
    c = plan.cost(3000)
    assert c.fork_steps == forks and c.skipped_steps == tuple(s for s in range(500, 3001, 500) if s not in forks)
    assert c.cooldown_steps == sum(s // 4 for s in forks)
    assert plan.admits(500, 0) == (125 <= r * 500)
    assert plan.skip_reason(500, 7) == (f"max_overhead={r:g}: 7 cooldown steps so far + 125 for this fork = 132 > "
                                        f"{r:g} x 500 = {r * 500:g}")


@pytest.mark.parametrize("plan", [
    ForkPlan(every=10, cooldown=list(TWO), max_overhead=0.75),
    ForkPlan(at=[5, 9], cooldown=[Cooldown(fraction=0.2), Cooldown(fraction=0.1, shape="linear")]),
])
def test_plans_with_cooldown_lists_and_caps_round_trip_through_json(plan):
    d = json.loads(json.dumps(plan.to_dict()))
    assert ForkPlan.from_dict(d) == plan


def test_engine_cost_line_needs_a_horizon_and_an_eval_interval(tmp_path):
    eng = ForkEngine(ForkPlan(on_eval=True, cooldown=Cooldown(steps=10)), WSD(0), tmp_path)
    assert eng.cost_line(None) is None and eng.cost_line(1000) is None and eng.cost_line(-1, 100) is None
    assert eng.cost_line(1000.0, 100.0) == eng.cost_line(1000, 100) == \
        "ForkPlan cost to step 1000: 10 fork points x 1 cooldown = 100 cooldown steps, 0.10x the 1000 main steps"
    assert ForkEngine(ForkPlan(every=250), WSD(0), tmp_path).cost_line(1000).startswith("ForkPlan cost to step 1000: 4")


def test_main_metrics_noted_after_a_fork_point_reach_every_cooldowns_record(tmp_path):
    eng = ForkEngine(ForkPlan(every=10, cooldown=list(TWO)), WSD(0), tmp_path)
    for lab in ("linear", "1-sqrt"):
        eng._finish(ForkRecord(step=10, cooldown_steps=50, shape=lab, label=lab, metrics={"val_loss": 1.0}))
    eng.note_main_metrics(10, {"val_loss": 1.5})
    assert [r["main_metrics"] for r in read_records(tmp_path)] == [{"val_loss": 1.5}] * 2
    assert [r["main_metrics"] for r in eng.records] == [{"val_loss": 1.5}] * 2
