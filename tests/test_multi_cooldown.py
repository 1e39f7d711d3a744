"""Several cooldowns per fork point, and the compute cap, through the plain-PyTorch hook (real loop, AdamW).

- each cooled model equals its own fixed-budget run (``LambdaLR`` over ``WSD.cooled``, no library
  code in the loop) bit for bit, and the main branch equals a run without forks;
- one snapshot per fork point; distinct records, checkpoints and labels;
- ``max_overhead``: skipped forks are recorded with the reason, decisions survive a resume;
- a resumed run takes back the cooldowns finished before a crash and runs only the others.
"""

import json

import pytest
import torch

from _loops import assert_equal_states, eval_fn, full_state, loss_fn, make_loader, make_model_opt, train
from cooldown_callbacks import WSD, Cooldown, ForkPlan, Snapshot
from cooldown_callbacks.integrations.accelerate import CooldownHook
from cooldown_callbacks.records import RECORDS_NAME, read_records

SCHED = WSD(warmup_steps=2)
THREE = [Cooldown(steps=3, shape="linear"), Cooldown(steps=3, shape="1-sqrt"), Cooldown(steps=5, shape="linear")]

pytestmark = pytest.mark.usefixtures("one_thread")


def hook_run(tmp, plan, steps, *, state=None, eval_fn=eval_fn, **kw):
    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = make_loader(stateful=True)
    hook = CooldownHook(model, opt, schedule=SCHED, plan=plan, loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader,
                        max_grad_norm=0.5, dirpath=tmp, verbose=False, **kw)
    train(model, opt, loader, steps, after_step=hook.step)
    return model, opt, hook


def fixed_run(schedule, steps):
    """The reference: a plain loop with a LambdaLR, no library code but the schedule's formula."""
    torch.manual_seed(0)
    model, opt = make_model_opt()
    lam = schedule.lambda_lr(opt)
    train(model, opt, make_loader(stateful=True), steps, after_step=lam.step)
    return model, opt


def test_each_cooldown_equals_its_own_fixed_budget_run_and_main_is_untouched(tmp_path):
    s = 6
    plan = ForkPlan(at=[s], cooldown=THREE, data="peek")
    model, opt, hook = hook_run(tmp_path, plan, 10)
    recs = read_records(tmp_path)
    assert [(r["step"], r["cooldown_steps"], r["shape"], r["label"], r["status"]) for r in recs] == [
        (6, 3, "linear", "3steps_linear", "ok"), (6, 3, "1-sqrt", "3steps_1-sqrt", "ok"),
        (6, 5, "linear", "5steps_linear", "ok")]
    assert len({r["checkpoint"] for r in recs}) == 3
    for cd, r in zip(THREE, recs):
        ref, _ = fixed_run(SCHED.cooled(at=s, cooldown=cd), s + cd.steps)
        cooled = torch.load(r["checkpoint"])
        for k, v in ref.state_dict().items():
            assert torch.equal(cooled[k], v), (r["label"], k)
    ref_model, ref_opt = fixed_run(SCHED, 10)
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))
    # the cooled models differ from one another (each cooldown really ran from the fork point)
    a, b = (torch.load(r["checkpoint"])["0.weight"] for r in recs[:2])
    assert not torch.equal(a, b)


def test_one_snapshot_per_fork_point(tmp_path, monkeypatch):
    taken = []
    real = Snapshot.take

    def counting(*a, **k):
        taken.append(1)
        return real(*a, **k)

    monkeypatch.setattr(Snapshot, "take", staticmethod(counting))
    hook_run(tmp_path, ForkPlan(every=4, cooldown=THREE[:2], data="peek"), 8)
    assert len(taken) == 2 and len(read_records(tmp_path)) == 4


def test_names_keep_equal_length_cooldowns_apart_and_one_cooldown_keeps_todays_names(tmp_path):
    two = [Cooldown(steps=2, shape="linear"), Cooldown(steps=2, shape="1-sqrt")]
    hook_run(tmp_path / "shapes", ForkPlan(at=[3], cooldown=two), 4)
    assert sorted(p.name for p in (tmp_path / "shapes").glob("*.pt")) == [
        "cooled-step=00000003-cd=2-1-sqrt.pt", "cooled-step=00000003-cd=2-linear.pt"]
    lengths = [Cooldown(steps=2), Cooldown(steps=3)]  # the {cooldown} field tells them apart
    hook_run(tmp_path / "lengths", ForkPlan(at=[3], cooldown=lengths), 4)
    assert sorted(p.name for p in (tmp_path / "lengths").glob("*.pt")) == [
        "cooled-step=00000003-cd=2.pt", "cooled-step=00000003-cd=3.pt"]
    finals = [Cooldown(steps=2), Cooldown(steps=2, final_ratio=0.1)]  # same length and shape: the label
    hook_run(tmp_path / "finals", ForkPlan(at=[3], cooldown=finals), 4)
    assert sorted(p.name for p in (tmp_path / "finals").glob("*.pt")) == [
        "cooled-step=00000003-cd=2-1-sqrt_1.pt", "cooled-step=00000003-cd=2-1-sqrt_2.pt"]
    hook_run(tmp_path / "one", ForkPlan(at=[3], cooldown=[Cooldown(steps=2)]), 4)
    assert [p.name for p in (tmp_path / "one").glob("*.pt")] == ["cooled-step=00000003-cd=2.pt"]
    assert read_records(tmp_path / "one")[0]["label"] is None


def test_a_failing_cooldown_is_recorded_and_the_next_one_still_runs_from_the_fork_point(tmp_path):
    calls = []

    def flaky(model):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("eval broke")
        return eval_fn(model)

    s = 4
    model, opt, hook = hook_run(tmp_path, ForkPlan(at=[s], cooldown=THREE[:2], data="peek"), 6, eval_fn=flaky)
    recs = read_records(tmp_path)
    assert [r["status"] for r in recs] == ["failed", "ok"] and "eval broke" in recs[0]["error"]
    ref, _ = fixed_run(SCHED.cooled(at=s, cooldown=THREE[1]), s + 3)
    cooled = torch.load(recs[1]["checkpoint"])
    assert all(torch.equal(cooled[k], v) for k, v in ref.state_dict().items())
    ref_model, ref_opt = fixed_run(SCHED, 6)
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))


def test_max_overhead_skips_forks_records_why_and_matches_the_plans_cost(tmp_path):
    plan = ForkPlan(every=2, cooldown=[Cooldown(steps=1), Cooldown(steps=2)], max_overhead=1.0)
    model, opt, hook = hook_run(tmp_path, plan, 12)
    recs = read_records(tmp_path)
    by_step = {}
    for r in recs:
        by_step.setdefault(r["step"], set()).add(r["status"])
    # cost 3 per fork point: 2: 3 > 2 skip; 4: 3 <= 4 run; 6: 6 <= 6 run; 8: 9 > 8 skip; 10: 9 <= 10 run; 12: 12 <= 12
    assert by_step == {2: {"skipped"}, 4: {"ok"}, 6: {"ok"}, 8: {"skipped"}, 10: {"ok"}, 12: {"ok"}}
    skipped = [r for r in recs if r["status"] == "skipped"]
    assert len(skipped) == 4 and all(r["checkpoint"] is None for r in skipped)
    assert skipped[0]["reason"] == "max_overhead=1: 0 cooldown steps so far + 3 for this fork = 3 > 1 x 2 = 2"
    cost = plan.cost(12)
    assert cost.fork_steps == (4, 6, 10, 12) and cost.skipped_steps == (2, 8) and cost.cooldown_steps == 12
    assert hook.engine.spent() == cost.cooldown_steps
    # skipping costs nothing and changes nothing on the main branch
    ref_model, ref_opt = fixed_run(SCHED, 12)
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))


def test_max_overhead_decisions_are_the_same_after_a_resume(tmp_path):
    plan = ForkPlan(every=2, cooldown=Cooldown(steps=2), max_overhead=0.6)
    _, _, ref = hook_run(tmp_path / "ref", plan, 12)
    want = [(r["step"], r["status"]) for r in ref.records]
    assert {s for s, st in want if st == "skipped"} and {s for s, st in want if st == "ok"}

    # interrupted after step 7 (checkpoint at 5): the resumed hook re-decides 6 and 8..12 from the history
    torch.manual_seed(0)
    model, opt = make_model_opt()
    mk = lambda: CooldownHook(model, opt, schedule=SCHED, plan=plan, loss_fn=loss_fn, eval_fn=eval_fn,  # noqa: E731
                              train_loader=make_loader(stateful=True), dirpath=tmp_path / "run", verbose=False)
    first = mk()
    for _ in range(5):
        first.step()
    state = json.loads(json.dumps(first.state_dict()))
    first.step(), first.step()  # 6 and 7, then the crash
    resumed = mk()
    resumed.load_state_dict(state)
    for _ in range(7):  # steps 6..12
        resumed.step()
    assert [(r["step"], r["status"]) for r in resumed.records] == want
    lines = (tmp_path / "run" / RECORDS_NAME).read_text().splitlines()
    assert [(json.loads(x)["step"], json.loads(x)["status"]) for x in lines] == want  # nothing written twice


def test_a_resume_takes_back_finished_cooldowns_and_runs_only_the_others(tmp_path):
    evaluated = []

    def counting_eval(model):
        evaluated.append(1)
        return eval_fn(model)

    plan = ForkPlan(at=[3], cooldown=THREE[:2], data="peek", max_overhead=2.0)  # 3 + 3 <= 2 x 3: just admitted
    torch.manual_seed(0)
    model, opt = make_model_opt()
    mk = lambda: CooldownHook(model, opt, schedule=SCHED, plan=plan, loss_fn=loss_fn,  # noqa: E731
                              eval_fn=counting_eval, train_loader=make_loader(stateful=True), dirpath=tmp_path,
                              verbose=False)
    first = mk()
    first.step(), first.step()
    state = first.state_dict()
    first.step()  # the fork point: both cooldowns run
    assert len(evaluated) == 2
    # the crash came after the first cooldown: drop the second one's record and checkpoint
    path = tmp_path / RECORDS_NAME
    lines = path.read_text().splitlines()
    second = read_records(tmp_path)[1]
    path.write_text(lines[0] + "\n")
    torch.load(second["checkpoint"])  # it was there
    import os
    os.remove(second["checkpoint"])
    resumed = mk()
    resumed.load_state_dict(state)
    last = resumed.step()
    assert len(evaluated) == 3  # only the second cooldown ran again
    assert [(r["label"], bool(r.get("restored"))) for r in resumed.records] == [("linear", True), ("1-sqrt", False)]
    assert last.label == "1-sqrt" and not last.restored
    assert [r["label"] for r in read_records(tmp_path)] == ["linear", "1-sqrt"]


def test_every_cooldowns_evaluation_draws_the_fork_points_random_numbers(tmp_path):
    """An eval_fn that samples random batches (nanoGPT's estimate_loss) sees the same ones for every cooldown
    of a fork point, and the same as the main branch's evaluation at that step."""
    draws = []

    def sampling_eval(model):
        idx = torch.randint(0, 1000, (5,))
        draws.append(idx)
        return {"val_loss": float(idx.float().mean())}

    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = make_loader(stateful=True)
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(at=[4], cooldown=THREE, data="peek"), loss_fn=loss_fn,
                        eval_fn=sampling_eval, train_loader=loader, dirpath=tmp_path, verbose=False)
    main = []

    def after_step():
        if hook.step() is not None:
            main.append(sampling_eval(model) and draws[-1])  # the user's own evaluation, right after the fork

    train(model, opt, loader, 6, after_step=after_step)
    cooled = draws[:3]
    assert len(main) == 1 and all(torch.equal(c, main[0]) for c in cooled)


def test_a_signal_during_the_second_cooldown_stops_the_fork_point_after_the_restore(tmp_path):
    import os
    import signal

    seen = {}
    calls = []

    def eval_then_signal(model):
        calls.append(1)
        if len(calls) == 2:  # the second cooldown's evaluation: a preemption arrives
            os.kill(os.getpid(), signal.SIGTERM)
        return eval_fn(model)

    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = make_loader(stateful=True)
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(at=[4], cooldown=THREE, data="peek"), loss_fn=loss_fn,
                        eval_fn=eval_then_signal, train_loader=loader, max_grad_norm=0.5, dirpath=tmp_path,
                        verbose=False)

    def handler(signum, frame):
        seen["state"] = full_state(model, opt)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        train(model, opt, loader, 4, after_step=hook.step)
    finally:
        signal.signal(signal.SIGTERM, old)
    ref_model, ref_opt = fixed_run(SCHED, 4)
    assert_equal_states(full_state(ref_model, ref_opt), seen["state"])  # the handler saw the main branch
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))
    recs = read_records(tmp_path)
    assert [(r["label"], r["status"]) for r in recs] == [("3steps_linear", "ok"), ("3steps_1-sqrt", "failed")]
    assert recs[1]["error"].startswith("interrupted by SIGTERM") and len(calls) == 2  # the third never ran
    assert 4 not in hook.engine.completed  # a resumed run forks here again (taking back the first cooldown)


def test_the_hook_states_the_plans_cost_when_given_the_horizon(tmp_path, capsys):
    model, opt = make_model_opt()
    plan = ForkPlan(on_eval=True, cooldown=THREE[:2], max_overhead=0.5)
    kw = dict(schedule=SCHED, plan=plan, loss_fn=loss_fn, eval_fn=eval_fn, train_loader=make_loader(), dirpath=tmp_path)
    CooldownHook(model, opt, max_steps=100, eval_every=10, **kw).close()
    assert capsys.readouterr().out == ("[cooldown] ForkPlan cost to step 100: 8 fork points x 2 cooldowns = 48 cooldown "
                                       "steps, 0.48x the 100 main steps (max_overhead=0.5: 2 of 10 fork points "
                                       "skipped)\n")
    CooldownHook(model, opt, max_steps=100, **kw).close()  # on_eval without the interval: cost unknown, nothing said
    CooldownHook(model, opt, max_steps=100, eval_every=10, verbose=False, **kw).close()
    assert capsys.readouterr().out == ""


def test_the_cap_applies_to_the_final_fork_too(tmp_path):
    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = make_loader()
    hook = CooldownHook(model, opt, schedule=SCHED, loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader,
                        plan=ForkPlan(every=4, at_end=True, cooldown=Cooldown(steps=2), max_overhead=0.5),
                        dirpath=tmp_path, verbose=False)
    train(model, opt, loader, 10, after_step=hook.step)
    rec = hook.finish()  # 2 (step 4) + 2 (step 8) + 2 > 0.5 x 10
    assert rec.status == "skipped" and rec.step == 10
    assert rec.reason == "max_overhead=0.5: 4 cooldown steps so far + 2 for this fork = 6 > 0.5 x 10 = 5"
    assert [(r["step"], r["status"]) for r in read_records(tmp_path)] == [(4, "ok"), (8, "ok"), (10, "skipped")]
    assert hook.finish() is None  # decided once
