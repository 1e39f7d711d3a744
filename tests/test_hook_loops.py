"""CooldownHook in the loops users write (issue 13): nanoGPT-style step counts and evaluations, gradient
accumulation by hand or in a step_fn, GradScaler, torch.compile, a second hook, a script's own
scheduler, resumes and shared folders.

"Fixed-budget run" = the same loop without the library for ``S + c`` steps with
``schedule.cooled(at=S, ...)``; "main branch exact" = ``torch.equal`` with the loop without the library.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration

from _loops import XV, YV, assert_equal_states, eval_fn, full_state, loss_fn, make_loader, make_model_opt, train
from cooldown_callbacks import WSD, Cooldown, ForkPlan
from cooldown_callbacks.cli import main as cli_main
from cooldown_callbacks.integrations.accelerate import CooldownHook
from cooldown_callbacks.records import read_records

SCHED = WSD(warmup_steps=3)
CD = Cooldown(steps=3, shape="linear")


def cooled_equals(path, model) -> bool:
    cooled = torch.load(path)
    return cooled.keys() == model.state_dict().keys() and all(torch.equal(cooled[k], v)
                                                              for k, v in model.state_dict().items())


def hook_for(model, opt, tmp, **kw):
    base = dict(schedule=SCHED, plan=ForkPlan(every=4, cooldown=CD), loss_fn=loss_fn, eval_fn=eval_fn,
                train_loader=make_loader(), dirpath=tmp, verbose=False)
    base.update(kw)
    return CooldownHook(model, opt, **base)


# -- item 1 / item 3: one run per folder; a resumed run continues and says what it took back -----

def test_new_run_refuses_another_runs_folder_before_its_first_step_and_a_resumed_run_continues(tmp_path, capsys):
    model, opt = make_model_opt()
    hook = hook_for(model, opt, tmp_path, verbose=True)
    saved = {}
    train(model, opt, make_loader(), 6, after_step=lambda: (hook.step(), hook.step_count == 3 and
                                                             saved.setdefault("state", hook.state_dict())))
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert "cooled-step00000004-cd3.pt" in files and "in " in capsys.readouterr().out
    # a second, fresh run in the same folder: refused at its first optimizer step, before any update
    model2, opt2 = make_model_opt(seed=1)
    before = [p.detach().clone() for p in model2.parameters()]
    hook2 = hook_for(model2, opt2, tmp_path)
    with pytest.raises(ValueError, match=r"Invalid dirpath .* holds the cooled models and forks.jsonl of another run"):
        train(model2, opt2, make_loader(), 5, after_step=hook2.step)
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters())) and not opt2.state
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    # the first run resumed from its checkpoint at step 3 continues in place; the fork at 4 that finished
    # before the "crash" is taken back from the records and said to be
    model3, opt3 = make_model_opt()
    hook3 = hook_for(model3, opt3, tmp_path, verbose=True)
    hook3.load_state_dict(saved["state"])
    train(model3, opt3, make_loader(), 6, after_step=hook3.step)
    out = capsys.readouterr().out
    assert "[cooldown] step 4: 3 cooldown steps (linear) -> val_loss=" in out
    assert "restored from the records (it finished before the restart)" in out and " in 0." not in out.split("\n")[0]
    assert [(r["step"], r.get("restored")) for r in hook3.records] == [(4, True), (8, False)]
    assert [r["step"] for r in read_records(tmp_path)] == [4, 8]


def test_resume_through_torch_dcp_state_dicts_is_not_taken_for_the_first_step(tmp_path):
    """get_state_dict() steps an empty optimizer at LR 0 on zero gradients to create its state, before the
    checkpoint (and the hook's state) is loaded: that is not the run's first step."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = make_model_opt()
    hook = hook_for(model, opt, tmp_path)
    train(model, opt, make_loader(), 5, after_step=hook.step)  # a fork at 4
    saved = get_state_dict(model, opt)
    saved = ({k: v.clone() for k, v in saved[0].items()}, copy.deepcopy(saved[1]), hook.state_dict())
    model2, opt2 = make_model_opt(seed=1)
    hook2 = hook_for(model2, opt2, tmp_path)
    get_state_dict(model2, opt2)  # the resume: state dicts to load into (steps opt2 once, inertly)
    set_state_dict(model2, opt2, model_state_dict=saved[0], optim_state_dict=saved[1])
    hook2.load_state_dict(saved[2])
    train(model2, opt2, make_loader(), 4, after_step=hook2.step)
    assert [r["step"] for r in read_records(tmp_path)] == [4, 8]


# -- item 5: one hook per optimizer ----------------------------------------------------------------

def test_a_second_hook_on_the_same_optimizer_is_refused(tmp_path):
    model, opt = make_model_opt()
    first = hook_for(model, opt, tmp_path / "a")
    with pytest.raises(ValueError, match=r"another CooldownHook already drives its learning rate.*ForkPlan\(cooldown"):
        hook_for(model, opt, tmp_path / "b", schedule=None)
    first.close()
    hook_for(model, opt, tmp_path / "b")  # after close() the optimizer is free again


# -- items 9 and A1: a fork runs exactly its cooldown in optimizer steps ---------------------------

def step_fn_loop(model, opt, ga):
    """The user's loop body as a step_fn: accumulation inside, the optimizer steps every ga micro-batches."""
    micro = [0]

    def step_fn(batch):
        loss = loss_fn(model, batch)
        (loss / ga).backward()
        micro[0] += 1
        if micro[0] % ga == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
        return loss
    return step_fn


def run_step_fn(steps, tmp=None, schedule=SCHED, **hook_kw):
    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = make_loader(stateful=True)
    step_fn = step_fn_loop(model, opt, 2)
    hook = None
    if tmp is not None:
        hook = CooldownHook(model, opt, schedule=schedule, plan=ForkPlan(at=[4], cooldown=CD, data="peek"),
                            step_fn=step_fn, eval_fn=eval_fn, train_loader=loader, dirpath=tmp, verbose=False,
                            **hook_kw)
        after = hook.step
    else:
        after = schedule.lambda_lr(opt).step
    t = micro = 0
    for batch in loader:
        step_fn(batch)
        micro += 1
        if micro % 2 == 0:
            after()
            t += 1
            if t == steps:
                break
    return model, opt, hook


def test_step_fn_with_its_own_accumulation_runs_the_whole_cooldown(tmp_path):
    """Issue 13 item 9: without gradient_accumulation_steps each fork ran half its cooldown, recorded ok."""
    model, opt, hook = run_step_fn(6, tmp_path)
    assert_equal_states(full_state(*run_step_fn(6)[:2]), full_state(model, opt))
    (rec,) = read_records(tmp_path)
    assert rec["status"] == "ok" and rec["data"] == "peek"
    fixed, _, _ = run_step_fn(7, schedule=SCHED.cooled(at=4, cooldown=CD))
    assert cooled_equals(tmp_path / "cooled-step00000004-cd3.pt", fixed)


def test_step_fn_accumulating_more_than_the_hook_was_told_fails_the_fork_with_the_reason(tmp_path):
    model, opt, hook = run_step_fn(6, tmp_path, gradient_accumulation_steps=1)
    assert_equal_states(full_state(*run_step_fn(6)[:2]), full_state(model, opt))
    (rec,) = read_records(tmp_path)
    assert rec["status"] == "failed" and rec["checkpoint"] is None
    assert rec["error"].startswith("ForkError: cooldown step 1 of 3:")
    assert "your step_fn stepped the optimizer after 2 micro-batches, not every gradient_accumulation_steps=1" \
        in rec["error"]
    assert not list(tmp_path.glob("cooled-*"))


def run_accel_by_hand(steps, tmp=None, schedule=SCHED, ga=2, **hook_kw):
    """Accelerate's own examples: the Accelerator left at 1, accumulation written out in the loop."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
    model, opt = make_model_opt()
    model, opt, loader = acc.prepare(model, opt, make_loader(stateful=True))
    if tmp is not None:
        hook = CooldownHook(model, opt, schedule=schedule, plan=ForkPlan(at=[4], cooldown=CD), loss_fn=loss_fn,
                            eval_fn=eval_fn, train_loader=loader, accelerator=acc, max_grad_norm=0.5, dirpath=tmp,
                            verbose=False, **hook_kw)
        after = hook.step
    else:
        after = schedule.lambda_lr(opt.optimizer).step
    t = 0
    for micro, batch in enumerate(loader, 1):
        acc.backward(loss_fn(model, batch) / ga)
        if micro % ga == 0:
            acc.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
            after()
            t += 1
            if t == steps:
                break
    return model, opt.optimizer


def test_hand_written_accumulation_with_the_accelerator_at_one(tmp_path):
    """Issue 13 A1: the fork ran 2 optimizer steps per cooldown step on undivided losses."""
    model, opt = run_accel_by_hand(6, tmp_path, gradient_accumulation_steps=2)
    assert_equal_states(full_state(*run_accel_by_hand(6)), full_state(model, opt))
    fixed, _ = run_accel_by_hand(7, schedule=SCHED.cooled(at=4, cooldown=CD))
    assert cooled_equals(tmp_path / "cooled-step00000004-cd3.pt", fixed)
    # without the argument the hook cannot know: it says so before the first step
    with pytest.warns(UserWarning, match=r"ran 2 training forward passes before its first optimizer step.*"
                                         r"gradient_accumulation_steps=2"):
        run_accel_by_hand(2, tmp_path / "b")


def test_contradictory_accumulation_settings_are_refused(tmp_path):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = make_model_opt()
    with pytest.raises(ValueError, match=r"Invalid gradient_accumulation_steps \(3\): the Accelerator accumulates 2"):
        hook_for(model, opt, tmp_path, accelerator=acc, gradient_accumulation_steps=3)
    with pytest.raises(ValueError, match=r"Invalid scalers: with an accelerator the loss_fn path scales losses with "
                                         r"the Accelerator's own scaler"):
        hook_for(model, opt, tmp_path, accelerator=acc, scalers=[torch.amp.GradScaler("cpu")])


# -- items 10, 11, 12: nanoGPT's loop ----------------------------------------------------------------

def nanogpt_loop(tmp, iters, *, hook=None, evals=None, eval_interval=4):
    """iter_num counts completed steps; evaluation at the top of the loop, before the update, sampling
    random batch indices from the global RNG (estimate_loss)."""
    torch.manual_seed(0)
    model, opt = make_model_opt()
    evals = [] if evals is None else evals

    def estimate_loss(m, who):
        idx = torch.randint(len(XV), (16,))
        evals.append((who, idx))
        return float(F.mse_loss(m(XV[idx]), YV[idx]))

    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=eval_interval, cooldown=CD),
                        loss_fn=loss_fn, eval_fn=lambda m: estimate_loss(m, "cooled"), dirpath=tmp, verbose=False,
                        train_loader=make_loader()) if hook is None else hook(model, opt, estimate_loss)
    iter_num = 0
    it = iter(make_loader())
    while iter_num < iters:
        if iter_num % eval_interval == 0:
            model.eval()
            with torch.no_grad():
                hook.log_main_metrics(iter_num, {"val_loss": estimate_loss(model, "main")})
            model.train()
        loss_fn(model, next(it)).backward()
        opt.step()
        opt.zero_grad()
        iter_num += 1
        hook.step(step=iter_num)
    return model, opt, hook, evals


def test_nanogpt_loop_forks_at_its_step_count_and_both_evaluations_see_the_same_batches(tmp_path, capsys):
    model, opt, hook, evals = nanogpt_loop(tmp_path, 9)
    recs = read_records(tmp_path)
    assert [r["step"] for r in recs] == [4, 8]
    # the cooled model and the main branch at step 4 and 8 were evaluated on the same random batches
    cooled = [idx for who, idx in evals if who == "cooled"]
    main = [idx for who, idx in evals if who == "main"][1:]  # the one at step 0 has no fork
    assert len(cooled) == len(main) == 2 and all(torch.equal(a, b) for a, b in zip(cooled, main))
    # main metrics that arrived after hook.step are in the records, and the report shows them
    assert all(r["main_metrics"]["val_loss"] > 0 for r in recs)
    assert cli_main(["report", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.endswith(" ok")]
    assert [(row[0], row[4] != "-") for row in rows] == [("4", True), ("8", True)]


def test_step_counts_from_the_loop_are_checked(tmp_path):
    model, opt = make_model_opt()
    hook = hook_for(model, opt, tmp_path)
    hook.step(step=1)
    with pytest.warns(UserWarning, match=r"hook.step\(step=3\) after step 1: call it after every optimizer step"):
        hook.step(step=3)
    with pytest.raises(ValueError, match=r"Invalid step \(3\): the hook is already at step 3"):
        hook.step(step=3)
    with pytest.raises(ValueError, match=r"Invalid step \(0\)"):
        hook.step(step=0)


def test_resume_without_the_hooks_state_warns(tmp_path):
    """Issue 13 item 10: forgetting hook.load_state_dict restarted warmup silently."""
    model, opt = make_model_opt()
    train(model, opt, make_loader(), 3, after_step=lambda: None)  # the run so far: the optimizer has state
    hook = hook_for(model, opt, tmp_path)
    with pytest.warns(UserWarning, match=r"optimizer has state but the CooldownHook is at step 0"):
        train(model, opt, make_loader(), 1, after_step=hook.step)


# -- item 13: what a cooled file holds --------------------------------------------------------------

@pytest.mark.parametrize("with_accelerator", [False, True])
def test_compiled_model_is_saved_with_the_plain_modules_keys(with_accelerator, tmp_path):
    torch.manual_seed(0)
    model, opt = make_model_opt()
    acc = None
    loader = make_loader()
    if with_accelerator:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        acc = Accelerator(cpu=True)
    compiled = torch.compile(model, backend="eager")
    if acc is not None:
        compiled, opt, loader = acc.prepare(compiled, opt, loader)
    hook = CooldownHook(compiled, opt, schedule=SCHED, plan=ForkPlan(at=[2], cooldown=Cooldown(steps=1), data="fresh"),
                        loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader, accelerator=acc, dirpath=tmp_path,
                        verbose=False)
    train(compiled, opt, loader, 2, after_step=hook.step)
    state = torch.load(tmp_path / "cooled-step00000002-cd1.pt")
    fresh, _ = make_model_opt()
    assert state.keys() == fresh.state_dict().keys()
    fresh.load_state_dict(state)


def scaler_loop(steps, tmp=None, schedule=SCHED, skips=False, scales=None):
    """fp16 autocast with a GradScaler, losses small enough that unscaled fp16 gradients lose precision.
    ``skips``: a scale that grows every step until fp16 overflows, so the scaler skips every other step."""
    torch.manual_seed(0)
    model, opt = make_model_opt()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**26, growth_interval=1) if skips else \
        torch.amp.GradScaler("cpu")

    def small_loss(m, batch):
        x, y = batch
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(x)
        return 1e-3 * F.mse_loss(out.float(), y)

    loader = make_loader(stateful=True)
    if tmp is not None:
        hook = CooldownHook(model, opt, schedule=schedule, plan=ForkPlan(at=[4], cooldown=CD, data="peek"),
                            loss_fn=small_loss, eval_fn=eval_fn, train_loader=loader, scalers=[scaler],
                            max_grad_norm=0.5, dirpath=tmp, verbose=False)
        after = hook.step
    else:
        after = schedule.lambda_lr(opt).step
    for t, batch in enumerate(loader, 1):
        scaler.scale(small_loss(model, batch)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        after()
        if scales is not None:
            scales.append(scaler.get_scale())
        if t == steps:
            break
    return model, opt, scaler


@pytest.mark.parametrize("skips", [False, True], ids=["no-skips", "skipped-steps"])
def test_loss_fn_path_steps_the_grad_scaler_like_the_loop(skips, tmp_path):
    """With skips, the scaler skips a step inside the cooldown: a step for the schedule, as in the main
    loop and the fixed-budget run (the next update gets the next LR), not a failed fork."""
    model, opt, scaler = scaler_loop(6, tmp_path, skips=skips)
    ref_model, ref_opt, ref_scaler = scaler_loop(6, skips=skips)
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))
    assert scaler.state_dict() == ref_scaler.state_dict()
    scales = [2.0**26 if skips else 2.0**16]
    fixed, _, _ = scaler_loop(7, schedule=SCHED.cooled(at=4, cooldown=CD), skips=skips, scales=scales)
    assert any(b < a for a, b in zip(scales[4:], scales[5:])) == skips  # a skip among the cooldown's steps 5..7
    assert read_records(tmp_path)[0]["status"] == "ok"
    assert cooled_equals(tmp_path / "cooled-step00000004-cd3.pt", fixed)


# -- A4: a script's own scheduler beside a schedule -----------------------------------------------

def test_a_scheduler_of_the_script_that_also_steps_is_reported(tmp_path):
    model, opt = make_model_opt()
    hook = hook_for(model, opt, tmp_path / "quiet")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(model, opt, make_loader(), 5, after_step=hook.step)
    assert not [w for w in seen if "learning rate was changed" in str(w.message)]
    hook.close()
    model, opt = make_model_opt()
    hook = hook_for(model, opt, tmp_path / "sched")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with pytest.warns(UserWarning, match=r"learning rate was changed between two optimizer steps by something other "
                                         r"than the CooldownHook.*get_last_lr\(\)"):
        train(model, opt, make_loader(), 5, after_step=lambda: (sched.step(), hook.step()))


# -- what third-party scripts pass as they are (nanoGPT's train.py) ------------------------------

def test_max_grad_norm_zero_means_no_clipping_as_in_nanogpt(tmp_path):
    """nanoGPT's ``grad_clip = 0.0`` (and ``TrainingArguments(max_grad_norm=0)``) disables clipping, so a
    script passes ``max_grad_norm=grad_clip`` as it is: the run and its cooled model equal ``None``'s."""
    runs = {}
    for name, clip in (("zero", 0.0), ("none", None)):
        model, opt = make_model_opt()
        hook = hook_for(model, opt, tmp_path / name, max_grad_norm=clip)
        assert hook.max_grad_norm is None
        train(model, opt, make_loader(), 6, clip=None, after_step=hook.step)
        hook.close()
        runs[name] = full_state(model, opt), torch.load(tmp_path / name / "cooled-step00000004-cd3.pt")
    assert_equal_states(runs["none"][0], runs["zero"][0])
    assert all(torch.equal(v, runs["zero"][1][k]) for k, v in runs["none"][1].items())


def test_the_hooks_warnings_point_at_the_users_line(tmp_path):
    """A nanoGPT-style loop sets ``param_group['lr']`` itself and calls ``scaler.step(optimizer)``: the
    warning names those lines and is reported at the user's ``scaler.step`` line (not inside torch's
    optimizer wrappers), and ``hook.step``'s own warnings at the user's ``hook.step`` line."""
    model, opt = make_model_opt()
    hook = hook_for(model, opt, tmp_path)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = iter(make_loader())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for it in range(3):
            for g in opt.param_groups:
                g["lr"] = 1e-3  # nanoGPT: lr = get_lr(iter_num); param_group['lr'] = lr
            scaler.scale(loss_fn(model, next(batches))).backward()
            step_line = inspect.currentframe().f_lineno + 1
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            hook_line = inspect.currentframe().f_lineno + 1
            hook.step(step=it + 1 if it < 2 else it + 2)  # a skipped step count: warned at this line
    lr = [w for w in seen if "learning rate was changed" in str(w.message)]
    assert lr and "param_group['lr']" in str(lr[0].message)
    assert (lr[0].filename, lr[0].lineno) == (__file__, step_line)
    jump = [w for w in seen if "hook.step(step=4) after step 2" in str(w.message)]
    assert jump and (jump[0].filename, jump[0].lineno) == (__file__, hook_line)


def test_a_resumed_script_that_forgot_the_hooks_state_is_told_to_load_it(tmp_path):
    """nanoGPT's init_from='resume' loads the model and optimizer; a user who did not save/load the hook's
    state is refused (another run's folder) before the first update, with how to resume the hook too."""
    model, opt = make_model_opt()
    hook = hook_for(model, opt, tmp_path)
    train(model, opt, make_loader(), 5, after_step=hook.step)
    hook.close()
    ckpt = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    model2, opt2 = make_model_opt()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    hook2 = hook_for(model2, opt2, tmp_path)
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(ValueError, match=r"holds the cooled models .* This run looks resumed .*"
                                         r"hook\.load_state_dict\(\.\.\.\) with what hook\.state_dict\(\) gave"):
        train(model2, opt2, make_loader(), 3, after_step=hook2.step)
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters()))  # refused before the first update
