"""CooldownHook's cooldown data: README's Accelerate set-up, streams, loaders that cannot be peeked,
the record's data source, evaluation loaders, device moves.

Every "main branch" comparison is against the same loop without the library (a LambdaLR over the
same schedule), with ``torch.equal``; every "fixed-budget" comparison against a run of ``S + c`` steps
with ``schedule.cooled(at=S, ...)``.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from _loops import (XV, YV, X, Y, assert_equal_states, eval_fn, full_state, loss_fn, make_loader, make_model_opt,
                    train, train_accelerate)
from cooldown_callbacks import WSD, Cooldown, ForkPlan
from cooldown_callbacks.data import RESTARTED
from cooldown_callbacks.integrations.accelerate import CooldownHook
from cooldown_callbacks.records import read_records

SCHED = WSD(warmup_steps=3)
CD = Cooldown(steps=2, shape="1-sqrt")


def _accelerator(ga: int = 1, stateful: bool = False) -> Accelerator:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(gradient_accumulation_steps=ga, cpu=True,
                       dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=stateful))


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_not_updated(before, model, opt):
    """Refused before the first update: parameters unchanged, no optimizer state yet."""
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state


def accel_run(steps, *, ga=1, plan=None, schedule=SCHED, wrap=False, tmp=None, batch_size=8):
    """README's set-up: a default Accelerator, a plain DataLoader prepared, the Accelerate loop idiom."""
    torch.manual_seed(0)
    acc = _accelerator(ga)
    model, opt = make_model_opt()
    model, opt, loader = acc.prepare(model, opt, make_loader(batch_size=batch_size))
    hook = None
    if plan is None:
        sched = schedule.lambda_lr(opt.optimizer)
        after = lambda t: sched.step()  # noqa: E731
    else:
        hook = CooldownHook(model, opt, schedule=schedule, plan=plan, loss_fn=loss_fn, eval_fn=eval_fn,
                            train_loader=loader, accelerator=acc, max_grad_norm=0.5, dirpath=tmp, verbose=False)
        if wrap:
            loader = hook.wrap(loader)
        after = lambda t: hook.step()  # noqa: E731
    train_accelerate(acc, model, opt, loader, steps, after)
    return model, opt.optimizer, hook


def test_readme_setup_auto_data_forks_succeed_on_fresh_batches_and_say_so(tmp_path):
    """Issue 13 item 0: prepared loaders always have state_dict; the fork took them for stateful ones."""
    ref = full_state(*accel_run(12)[:2])
    with pytest.warns(UserWarning, match=r"data='auto'.*cannot show the main branch's upcoming batches"):
        model, opt, hook = accel_run(12, plan=ForkPlan(every=5, cooldown=CD), tmp=tmp_path)
    assert_equal_states(ref, full_state(model, opt))
    recs = read_records(tmp_path)
    assert [(r["step"], r["status"], r["data"]) for r in recs] == [(5, "ok", "fresh"), (10, "ok", "fresh")]


@pytest.mark.parametrize("ga", [1, 2])
def test_wrapped_prepared_loader_forks_cool_on_the_main_branchs_next_batches(ga, tmp_path):
    """hook.wrap(loader): the fork takes the next batches from the loop's own iterator and hands them back.

    15 batches per pass: with ga=2 Accelerate ends each pass with a forced sync on its last batch
    (end_of_dataloader), so the replayed bookkeeping of handed-back batches decides the main branch's
    accumulation. The fork at 6*ga batches draws the end of the pass (then goes on with fresh batches);
    the main branch crosses two pass ends."""
    steps = 20
    ref = full_state(*accel_run(steps, ga=ga, batch_size=16)[:2])
    plan = ForkPlan(every=3, cooldown=CD)
    model, opt, hook = accel_run(steps, ga=ga, plan=plan, wrap=True, tmp=tmp_path, batch_size=16)
    assert_equal_states(ref, full_state(model, opt))
    recs = {r["step"]: r for r in read_records(tmp_path)}
    assert all(r["status"] == "ok" for r in recs.values()) and recs[3]["data"] == "peek"
    crossing = recs[6 if ga == 2 else 15]["data"]  # 12 of 15 batches used (the fork needs 4) / all 15 used
    assert crossing == (f"peek ({3 if ga == 2 else 0} batches), then fresh: the main branch's pass over the data "
                        "ended during the fork")
    # the fork at 3 (within the pass) is the fixed-budget run of 3 + 2 steps
    fixed, _, _ = accel_run(5, ga=ga, schedule=SCHED.cooled(at=3, cooldown=CD), batch_size=16)
    cooled = torch.load(tmp_path / "cooled-step00000003-cd2.pt")
    assert all(torch.equal(cooled[k], v) for k, v in fixed.state_dict().items())


def test_pass_end_drawn_by_a_fork_is_replayed_when_the_main_branch_reaches_it(tmp_path):
    """The fork at 14 of 15 batches draws the pass's end (the loader leaves GradientState); the main branch
    then ends its pass on the handed-back batch, and the loader must leave GradientState there too."""
    for plan in (None, ForkPlan(at=[14], cooldown=CD)):
        torch.manual_seed(0)
        acc = _accelerator()
        model, opt = make_model_opt()
        model, opt, loader = acc.prepare(model, opt, make_loader(batch_size=16))
        hook = CooldownHook(model, opt, schedule=SCHED, plan=plan or ForkPlan(at=[99]), loss_fn=loss_fn,
                            eval_fn=eval_fn, train_loader=loader, accelerator=acc, dirpath=tmp_path / str(plan is None),
                            verbose=False)
        flags = []
        for batch in hook.wrap(loader):  # one whole pass, as README's loop
            with acc.accumulate(model):
                acc.backward(loss_fn(model, batch))
                opt.step()
                opt.zero_grad()
            hook.step()
            flags.append(acc.gradient_state.end_of_dataloader)
        assert flags == [False] * 14 + [True]
        assert not acc.gradient_state.in_dataloader  # the loader left GradientState at its end
    assert read_records(tmp_path / "False")[0]["data"].startswith("peek (1 batches), then fresh")


class SharedStream(IterableDataset):
    """A stream with one read position shared by all its iterators (a file handle, a queue)."""

    def __init__(self, n: int) -> None:
        self.pos, self.n = 0, n

    def __iter__(self):
        while self.pos < self.n:
            i, self.pos = self.pos % len(X), self.pos + 1
            yield X[i], Y[i]


def stream_run(steps, *, n=400, plan=None, schedule=SCHED, tmp=None, wrap=True, finish=False):
    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = DataLoader(SharedStream(n), batch_size=8)
    if plan is None:
        sched = schedule.lambda_lr(opt)
        train(model, opt, loader, steps, after_step=sched.step)
        return model, opt, None
    hook = CooldownHook(model, opt, schedule=schedule, plan=plan, loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader,
                        max_grad_norm=0.5, dirpath=tmp, verbose=False)
    train(model, opt, hook.wrap(loader) if wrap else loader, steps, after_step=hook.step)
    if finish:
        hook.finish()
    return model, opt, hook


def test_stream_forks_cool_on_the_upcoming_batches_without_disturbing_the_main_branch(tmp_path):
    ref = full_state(*stream_run(14)[:2])
    model, opt, hook = stream_run(14, plan=ForkPlan(every=4, cooldown=Cooldown(steps=3)), tmp=tmp_path)
    assert_equal_states(ref, full_state(model, opt))
    recs = read_records(tmp_path)
    assert [(r["step"], r["status"], r["data"]) for r in recs] == [(s, "ok", "peek") for s in (4, 8, 12)]
    fixed, _, _ = stream_run(7, schedule=SCHED.cooled(at=4, cooldown=Cooldown(steps=3)))
    cooled = torch.load(tmp_path / "cooled-step00000004-cd3.pt")
    assert all(torch.equal(cooled[k], v) for k, v in fixed.state_dict().items())


def test_stream_that_ends_fails_the_fork_with_the_reason_and_keeps_the_main_branch(tmp_path):
    ref = full_state(*stream_run(10, n=80)[:2])
    model, opt, hook = stream_run(10, n=80, plan=ForkPlan(at_end=True, cooldown=CD), tmp=tmp_path, finish=True)
    assert_equal_states(ref, full_state(model, opt))
    (rec,) = read_records(tmp_path)
    assert rec["status"] == "failed" and "stream ended after 0 upcoming batch(es)" in rec["error"]


def test_unwrapped_stream_is_refused_before_the_first_step(tmp_path):
    model, opt = make_model_opt()
    before = params(model)
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=4), loss_fn=loss_fn, eval_fn=eval_fn,
                        train_loader=DataLoader(SharedStream(400), batch_size=8), dirpath=tmp_path, verbose=False)
    with pytest.raises(ValueError, match=r"data='auto'.*a stream .*hook.wrap\(train_loader\)"):
        train(model, opt, hook.train_loader, 3, after_step=hook.step)
    assert_not_updated(before, model, opt)


def test_peek_on_a_loader_that_cannot_be_peeked_is_refused_before_the_first_step(tmp_path):
    model, opt = make_model_opt()
    before = params(model)
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=4, data="peek"), loss_fn=loss_fn,
                        eval_fn=eval_fn, train_loader=make_loader(), dirpath=tmp_path, verbose=False)
    with pytest.raises(ValueError, match=r"data='peek'.*a loader that cannot report its position.*hook.wrap"):
        train(model, opt, hook.train_loader, 3, after_step=hook.step)
    assert_not_updated(before, model, opt)


def test_fresh_on_a_stream_restarts_it_and_says_so(tmp_path):
    class Restartable(IterableDataset):
        def __iter__(self):
            return iter(zip(X, Y))

    model, opt = make_model_opt()
    loader = DataLoader(Restartable(), batch_size=8)
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=4, cooldown=CD, data="fresh"), loss_fn=loss_fn,
                        eval_fn=eval_fn, train_loader=loader, dirpath=tmp_path, verbose=False)
    with pytest.warns(UserWarning, match=r"restarted from its beginning"):
        train(model, opt, loader, 5, after_step=hook.step)
    assert read_records(tmp_path)[0]["data"] == RESTARTED


class NoisyData(torch.utils.data.Dataset):
    """Random augmentation in the main process: each batch draws from the global torch RNG."""

    def __len__(self) -> int:
        return len(X)

    def __getitem__(self, i: int):
        return X[i] + 0.01 * torch.randn(X.shape[1]), Y[i]


def test_loader_that_draws_random_numbers_is_not_peeked(tmp_path):
    model, opt = make_model_opt()
    before = params(model)
    loader = DataLoader(NoisyData(), batch_size=8, shuffle=True)
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=4, data="peek"), loss_fn=loss_fn,
                        eval_fn=eval_fn, train_loader=loader, dirpath=tmp_path / "peek", verbose=False)
    with pytest.raises(ValueError, match=r"data='peek'.*draws from the global random number generators"):
        train(model, opt, hook.wrap(), 3, after_step=hook.step, ga=3)  # 3 batches drawn before the first step
    assert_not_updated(before, model, opt)
    # data="auto" goes to fresh batches instead, and the main branch is exact
    torch.manual_seed(0)
    ref_model, ref_opt = make_model_opt()
    sched = SCHED.lambda_lr(ref_opt)
    train(ref_model, ref_opt, DataLoader(NoisyData(), batch_size=8, shuffle=True), 9, after_step=sched.step, ga=3)
    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = DataLoader(NoisyData(), batch_size=8, shuffle=True)
    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=4, cooldown=CD), loss_fn=loss_fn,
                        eval_fn=eval_fn, train_loader=loader, gradient_accumulation_steps=3, dirpath=tmp_path / "auto",
                        verbose=False)
    train(model, opt, hook.wrap(), 9, after_step=hook.step, ga=3)
    assert_equal_states(full_state(ref_model, ref_opt), full_state(model, opt))
    assert [r["data"] for r in read_records(tmp_path / "auto")] == ["fresh", "fresh"]


def test_callable_and_iterable_sources_are_recorded(tmp_path):
    draws = []

    def cooldown_data(step):  # nanoGPT's get_batch: random windows, no DataLoader
        draws.append(step)
        while True:
            ix = torch.randint(len(X), (8,))
            yield X[ix], Y[ix]

    for name, data in [("callable", cooldown_data), ("iterable", [(X[:8], Y[:8])])]:
        model, opt = make_model_opt()
        hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=3, cooldown=CD, data=data),
                            loss_fn=loss_fn, eval_fn=eval_fn, dirpath=tmp_path / name, verbose=False)
        train(model, opt, make_loader(), 6, after_step=hook.step)
        assert [(r["status"], r["data"]) for r in read_records(tmp_path / name)] == [("ok", name)] * 2
    assert draws == [3, 6]  # called once per fork, with the fork step


def test_eval_fn_iterating_the_scripts_prepared_eval_loader_leaves_the_main_branch_exact(tmp_path):
    """Issue 13 A2: a stateful prepared loader's first pass reuses the iterator made at construction; a
    fork that took it made the main branch's first evaluation draw a random number instead."""

    def run(plan=None):
        torch.manual_seed(0)
        acc = _accelerator(stateful=True)
        model, opt = make_model_opt()
        eval_loader = DataLoader(TensorDataset(XV, YV), batch_size=16)
        model, opt, loader, eval_loader = acc.prepare(model, opt, make_loader(stateful=True), eval_loader)

        def evaluate(m):
            with torch.no_grad():
                return {"val_loss": float(torch.stack([loss_fn(m, b) for b in eval_loader]).mean())}

        if plan is None:
            sched = SCHED.lambda_lr(opt.optimizer)
            step = sched.step
        else:
            hook = CooldownHook(model, opt, schedule=SCHED, plan=plan, loss_fn=loss_fn, eval_fn=evaluate,
                                train_loader=loader, accelerator=acc, dirpath=tmp_path, verbose=False)
            step = hook.step

        def after(t):
            step()
            if t % 4 == 0:  # the script's own evaluation, right after the fork
                model.eval()
                evaluate(model)
                model.train()
        train_accelerate(acc, model, opt, loader, 10, after)
        return full_state(model, opt.optimizer)

    ref = run()
    assert_equal_states(ref, run(ForkPlan(every=4, cooldown=CD)))
    assert [r["status"] for r in read_records(tmp_path)] == ["ok", "ok"]


@pytest.mark.parametrize("with_accelerator", [False, True])
def test_cooldown_batches_reach_the_device_inside_batch_encodings(with_accelerator):
    """Issue 13 A3: a tokenizer's BatchEncoding is a UserDict, not a dict; the hand-written move skipped it."""
    from transformers import BatchEncoding

    from cooldown_callbacks.integrations.accelerate._loaders import to_device

    batch = [BatchEncoding({"input_ids": torch.ones(2, 3)}), {"labels": torch.zeros(2)}, (torch.ones(1), 7)]
    acc = _accelerator() if with_accelerator else None
    moved = to_device(batch, torch.device("meta"), acc)
    assert moved[0]["input_ids"].device.type == "meta" and moved[1]["labels"].device.type == "meta"
    assert moved[2][0].device.type == "meta" and moved[2][1] == 7
