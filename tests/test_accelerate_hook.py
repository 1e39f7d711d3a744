"""CooldownHook in plain PyTorch and Accelerate loops: exact main branch, exact cooled runs."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration

import _reference_schedules as reference
from _loops import (assert_equal_states, eval_fn, full_state, loss_fn, make_loader, make_model_opt, train,
                    train_accelerate)
from cooldown_callbacks import WSD, Cooldown, ForkPlan, RSqrt
from cooldown_callbacks.integrations.accelerate import CooldownHook
from cooldown_callbacks.records import read_records

SCHED = WSD(warmup_steps=3)


def run_plain(steps, ga=1, plan=None, schedule=SCHED, stateful=False, tmp=None, **hook_kw):
    model, opt = make_model_opt()
    loader = make_loader(stateful)
    if plan is None:
        sched = schedule.lambda_lr(opt)
        train(model, opt, loader, steps, ga, after_step=sched.step)
        return model, opt, None
    hook = CooldownHook(model, opt, schedule=schedule, plan=plan, loss_fn=loss_fn, eval_fn=eval_fn,
                        train_loader=loader, gradient_accumulation_steps=ga, max_grad_norm=0.5, dirpath=tmp,
                        verbose=False, **hook_kw)
    train(model, opt, loader, steps, ga, after_step=hook.step)
    return model, opt, hook


@pytest.mark.parametrize("ga", [1, 3])
@pytest.mark.parametrize("data", ["fresh", "peek"])
def test_branch_mode_main_branch_is_bit_identical(ga, data, tmp_path):
    torch.manual_seed(0)
    ref_model, ref_opt, _ = run_plain(25, ga, stateful=data == "peek")
    ref, ref_rng = full_state(ref_model, ref_opt), torch.get_rng_state()
    plan = ForkPlan(every=4, cooldown=Cooldown(steps=3, shape="1-sqrt"), data=data)
    model, opt, hook = run_plain(25, ga, plan, stateful=data == "peek", tmp=tmp_path)
    assert_equal_states(ref, full_state(model, opt))
    assert torch.equal(ref_rng, torch.get_rng_state())
    recs = read_records(tmp_path)
    assert [r["step"] for r in recs] == [4, 8, 12, 16, 20, 24]
    assert all(r["status"] == "ok" and r["cooldown_steps"] == 3 for r in recs)
    assert all((tmp_path / f"cooled-step{s:08d}-cd3.pt").exists() for s in [4, 8, 24])
    # the cooled model differs from the main branch and has its own metrics
    cooled = torch.load(tmp_path / "cooled-step00000024-cd3.pt")
    assert not torch.equal(cooled["0.weight"], model[0].weight)
    assert recs[-1]["metrics"]["val_loss"] > 0


@pytest.mark.parametrize("ga,s,c", [(1, 7, 4), (3, 4, 3), (1, 12, 6)])
@pytest.mark.parametrize("shape", ["1-sqrt", "linear"])
def test_peek_fork_equals_fixed_budget_run(ga, s, c, shape, tmp_path):
    """A fork at s with c steps == a fresh run of s+c steps with schedule.cooled(at=s, ...), same data order.

    Holds while s + c stays within the current epoch (30 // ga optimizer steps here)."""
    cd = Cooldown(steps=c, shape=shape)
    torch.manual_seed(0)
    ref_model, _, _ = run_plain(s + c, ga, schedule=SCHED.cooled(at=s, cooldown=cd), stateful=True)
    torch.manual_seed(0)
    run_plain(s + 2, ga, ForkPlan(at=[s], cooldown=cd, data="peek"), stateful=True, tmp=tmp_path)
    cooled = torch.load(tmp_path / f"cooled-step{s:08d}-cd{c}.pt")
    for k, v in ref_model.state_dict().items():
        assert torch.equal(cooled[k], v), k


def test_schedule_none_keeps_user_scheduler_and_forks_decay_from_current_lr(tmp_path):
    torch.manual_seed(0)
    model, opt = make_model_opt()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)  # recursive: reads group["lr"]
    loader = make_loader()
    hook = CooldownHook(model, opt, schedule=None, plan=ForkPlan(every=6, cooldown=Cooldown(steps=2, shape="linear")),
                        loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader, schedulers=[sched], dirpath=tmp_path,
                        max_grad_norm=0.5, verbose=False)
    seen = []

    def after():
        sched.step()
        hook.step()
        seen.append([g["lr"] for g in opt.param_groups])
    train(model, opt, loader, 13, after_step=after)
    torch.manual_seed(0)
    ref_model, ref_opt = make_model_opt()
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=5, gamma=0.5)
    train(ref_model, ref_opt, make_loader(), 13, after_step=ref_sched.step)
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))
    assert read_records(tmp_path)[0]["lr"] == pytest.approx(1e-2 * 0.5)  # LR at step 6 after one StepLR decay


def test_continue_mode_follows_the_wsds_schedule(tmp_path):
    cd = Cooldown(steps=3, shape="linear")
    torch.manual_seed(0)
    # the reference WSD-S schedule, written from the documented formula (no library schedule code)
    wsds = reference.wsds(reference.main_schedule("RSqrt", 3), [8, 16, 24], lambda s: 3, "linear", rewarm=2)
    ref_model, ref_opt, _ = run_plain(26, schedule=wsds)
    torch.manual_seed(0)
    model, opt, hook = run_plain(26, plan=ForkPlan(every=8, cooldown=cd, mode="continue", rewarm_steps=2),
                                 schedule=RSqrt(3), tmp=tmp_path)
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))
    recs = read_records(tmp_path)
    assert [(r["step"], r["mode"]) for r in recs] == [(8, "continue"), (16, "continue")]  # 24+3 > 26: not yet
    # the cooled checkpoint at 8+3 is the main branch at step 11 of that same run
    torch.manual_seed(0)
    mid, _, _ = run_plain(11, schedule=reference.wsds(reference.main_schedule("RSqrt", 3), [8], lambda s: 3, "linear",
                                                      rewarm=2))
    cooled = torch.load(tmp_path / "cooled-step00000008-cd3.pt")
    assert all(torch.equal(cooled[k], v) for k, v in mid.state_dict().items())


def test_at_end_cools_the_final_model_and_leaves_main_intact(tmp_path):
    torch.manual_seed(0)
    ref_model, ref_opt, _ = run_plain(10)
    torch.manual_seed(0)
    model, opt, hook = run_plain(10, plan=ForkPlan(at_end=True, on_eval=False, cooldown=Cooldown(fraction=0.2)),
                                 tmp=tmp_path)
    assert read_records(tmp_path) == []
    rec = hook.finish()
    assert rec.status == "ok" and rec.step == 10 and rec.cooldown_steps == 2
    assert (tmp_path / "cooled-step00000010-cd2.pt").exists()
    assert hook.finish() is None  # not twice
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))


def test_on_eval_forks_where_the_loop_says_it_evaluates(tmp_path):
    model, opt = make_model_opt()
    loader = make_loader()
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(cooldown=Cooldown(steps=2)), loss_fn=loss_fn,
                        eval_fn=eval_fn, train_loader=loader, dirpath=tmp_path, verbose=False)
    step = [0]

    def after():
        step[0] += 1
        ev = step[0] % 5 == 0
        hook.step(evaluating=ev, metrics=eval_fn(model) if ev else None)
    train(model, opt, loader, 12, after_step=after)
    recs = hook.records
    assert [r["step"] for r in recs] == [5, 10]
    assert recs[0]["main_metrics"]["val_loss"] > 0


def test_float_eval_fn_and_custom_save_fn(tmp_path):
    saved = []
    model, opt = make_model_opt()
    loader = make_loader()
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(at=[3], cooldown=Cooldown(steps=1)),
                        loss_fn=loss_fn, eval_fn=lambda m: eval_fn(m)["val_loss"], train_loader=loader,
                        dirpath=tmp_path, save_fn=lambda m, p: (saved.append(p), torch.save({"w": 1}, p)),
                        verbose=False)
    train(model, opt, loader, 4, after_step=hook.step)
    assert hook.records[0]["metrics"].keys() == {"val_loss"}
    assert (tmp_path / "cooled-step00000003-cd1").exists() and len(saved) == 1


def test_user_cooldown_stream(tmp_path):
    stream = [(torch.ones(8, 6), torch.zeros(8, 1))]
    model, opt = make_model_opt()
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(at=[2], cooldown=Cooldown(steps=3), data=stream),
                        loss_fn=loss_fn, eval_fn=eval_fn, dirpath=tmp_path, verbose=False)
    train(model, opt, make_loader(), 3, after_step=hook.step)
    assert hook.records[0]["status"] == "ok"


# -- Accelerate ---------------------------------------------------------------------------------

def run_accel(steps, ga, plan=None, tmp=None, resume_from=None, save_at=None, schedule=SCHED):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(gradient_accumulation_steps=ga, cpu=True,
                      dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
    model, opt = make_model_opt()
    loader = make_loader(stateful=True)
    model, opt, loader = acc.prepare(model, opt, loader)
    if plan is None:
        sched = schedule.lambda_lr(opt.optimizer)
        acc.register_for_checkpointing(sched)
        after = sched.step
    else:
        hook = CooldownHook(model, opt, schedule=schedule, plan=plan, loss_fn=loss_fn, eval_fn=eval_fn,
                            train_loader=loader, accelerator=acc, max_grad_norm=0.5, dirpath=tmp, verbose=False)
        acc.register_for_checkpointing(hook)
        after = hook.step
    t = 0
    if resume_from is not None:
        acc.load_state(resume_from)
        t = (hook.step_count if plan is not None else sched.last_epoch)

    def after_step(t: int) -> None:
        after()
        if save_at is not None and t == save_at:
            acc.save_state(save_at_dir(tmp))
    train_accelerate(acc, model, opt, loader, steps, after_step, start=t)
    return model, opt.optimizer


def save_at_dir(tmp):
    return str(tmp / "accel_ckpt")


@pytest.mark.parametrize("ga", [1, 2])
def test_accelerate_branch_mode_bit_identical(ga, tmp_path):
    torch.manual_seed(0)
    ref = full_state(*run_accel(20, ga))
    torch.manual_seed(0)
    got = full_state(*run_accel(20, ga, ForkPlan(every=6, cooldown=Cooldown(steps=4)), tmp_path))
    assert_equal_states(ref, got)
    assert [r["step"] for r in read_records(tmp_path)] == [6, 12, 18]


def test_accelerate_resume_between_forks_equals_uninterrupted(tmp_path):
    plan = ForkPlan(every=5, cooldown=Cooldown(steps=2))
    a, b = tmp_path / "a", tmp_path / "b"
    torch.manual_seed(0)
    full = full_state(*run_accel(14, 1, plan, a))
    torch.manual_seed(0)
    run_accel(7, 1, plan, b, save_at=7)  # fork at 5, checkpoint at 7, "crash"
    torch.manual_seed(123)  # a new process: different RNG until load_state restores it
    resumed = full_state(*run_accel(14, 1, plan, b, resume_from=save_at_dir(b)))
    assert_equal_states(full, resumed)
    steps = [r["step"] for r in read_records(b)]
    assert steps == [5, 10], "fork at 5 must not be repeated after resume"


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_fn=None), r"exactly one of loss_fn"),
    (dict(step_fn=lambda b: None), r"exactly one of loss_fn"),
    (dict(eval_fn=None), r"Invalid eval_fn"),
    (dict(gradient_accumulation_steps=0), r"gradient_accumulation_steps \(0\)"),
    (dict(max_grad_norm=-1.0), r"max_grad_norm \(-1.0\)"),
    (dict(max_grad_norm=True), r"max_grad_norm \(True\)"),
    (dict(max_grad_norm=float("nan")), r"max_grad_norm \(nan\)"),
    (dict(train_loader=None), r"needs train_loader"),
    (dict(schedule="wsd"), r"Invalid schedule"),
    (dict(plan=ForkPlan(every=5, mode="continue"), schedule=None), r"needs schedule="),
    (dict(plan=ForkPlan(on_eval=True, mode="continue")), r"not available in a hand-written loop"),
    (dict(snapshot_storage="gpu"), r"snapshot_storage \('gpu'\)"),
    (dict(scalers=[torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")]), r"Invalid scalers: 2 enabled GradScalers"),
])
def test_bad_input_is_refused_before_training(kwargs, match, tmp_path):
    model, opt = make_model_opt()
    base = dict(schedule=SCHED, plan=ForkPlan(every=5), loss_fn=loss_fn, eval_fn=eval_fn, train_loader=make_loader(),
                dirpath=tmp_path)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        CooldownHook(model, opt, **base)


def test_bad_model_optimizer_and_dirpath(tmp_path):
    model, opt = make_model_opt()
    kw = dict(schedule=SCHED, plan=ForkPlan(every=5), loss_fn=loss_fn, eval_fn=eval_fn, train_loader=make_loader())
    with pytest.raises(ValueError, match=r"Invalid model"):
        CooldownHook(lambda x: x, opt, dirpath=tmp_path, **kw)
    with pytest.raises(ValueError, match=r"Invalid optimizer"):
        CooldownHook(model, "adam", dirpath=tmp_path, **kw)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"Invalid dirpath"):
        CooldownHook(model, opt, dirpath=tmp_path / "f" / "cooled", **kw)


# -- faults inside a fork -----------------------------------------------------------------------

NAN_STREAM = [(torch.full((8, 6), float("nan")), torch.zeros(8, 1))]


def _raise_in_eval(model):
    raise RuntimeError("eval exploded")


@pytest.mark.parametrize("fault", ["nan-data", "eval-exception"])
def test_fault_in_fork_is_recorded_and_main_branch_is_untouched(fault, tmp_path):
    torch.manual_seed(0)
    ref_model, ref_opt, _ = run_plain(12)
    plan = ForkPlan(every=5, cooldown=Cooldown(steps=2), data=NAN_STREAM if fault == "nan-data" else "fresh")
    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = make_loader()
    hook = CooldownHook(model, opt, schedule=SCHED, plan=plan, loss_fn=loss_fn, max_grad_norm=0.5,
                        eval_fn=_raise_in_eval if fault == "eval-exception" else eval_fn, train_loader=loader,
                        dirpath=tmp_path, verbose=False)
    train(model, opt, loader, 12, after_step=hook.step)
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))
    recs = read_records(tmp_path)
    assert [(r["step"], r["status"]) for r in recs] == [(5, "failed"), (10, "failed")]
    assert ("non-finite" if fault == "nan-data" else "eval exploded") in recs[0]["error"]
    assert not list(tmp_path.glob("cooled-*")) and not list(tmp_path.glob(".*tmp"))


def test_on_fork_error_raise_restores_then_raises(tmp_path):
    from cooldown_callbacks.engine import ForkError

    torch.manual_seed(0)
    ref_model, ref_opt, _ = run_plain(5)
    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = make_loader()
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(at=[5], cooldown=Cooldown(steps=2), data=NAN_STREAM,
                        on_fork_error="raise"), loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader,
                        dirpath=tmp_path, max_grad_norm=0.5, verbose=False)
    with pytest.raises(ForkError, match=r"fork at step 5 failed on rank 0: ForkError: non-finite training loss"):
        train(model, opt, loader, 5, after_step=hook.step)
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))
    assert read_records(tmp_path)[0]["status"] == "failed"
