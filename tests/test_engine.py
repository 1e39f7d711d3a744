"""ForkEngine behaviour shared by every adapter, through the plain-PyTorch hook (a real loop, real AdamW).

- the cooled evaluation draws the random numbers the main branch's evaluation at that step draws;
- a fresh run refuses a ``dirpath`` that holds another run's records; a resumed run continues there;
- a fork finished before a crash is taken back from the records, marked ``restored``.
"""

import json

import pytest
import torch

from _loops import loss_fn, make_loader, make_model_opt, train
from cooldown_callbacks import WSD, Cooldown, ForkPlan
from cooldown_callbacks.engine import ForkEngine
from cooldown_callbacks.integrations.accelerate import CooldownHook
from cooldown_callbacks.records import RECORDS_NAME, ForkRecord, append_record, read_records


def _sampling_eval(draws):
    """An eval_fn like nanoGPT's estimate_loss: it samples random batch indices from the global RNG."""
    def eval_fn(model):
        idx = torch.randint(0, 1000, (5,))
        draws.append(idx)
        return {"val_loss": float(idx.float().mean())}
    return eval_fn


def test_cooled_evaluation_sees_the_main_evaluations_random_draws(tmp_path):
    draws: list[torch.Tensor] = []
    eval_fn = _sampling_eval(draws)
    model, opt = make_model_opt()
    loader = make_loader()
    hook = CooldownHook(model, opt, schedule=WSD(warmup_steps=2), plan=ForkPlan(every=5, cooldown=Cooldown(steps=3)),
                        loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader, dirpath=tmp_path, verbose=False)
    main_draws = []

    def after_step():
        rec = hook.step()
        if rec is not None:  # the user's own evaluation of the main branch, right after the fork
            main_draws.append(_sampling_eval(draws)(model) and draws[-1])

    train(model, opt, loader, 10, after_step=after_step)
    cooled = [d for d in draws if not any(d is m for m in main_draws)]
    assert len(cooled) == len(main_draws) == 2
    for c, m in zip(cooled, main_draws):
        assert torch.equal(c, m)  # the same "random batches" for both branches
    recs = read_records(tmp_path)
    assert [r["metrics"]["val_loss"] for r in recs] == [float(m.float().mean()) for m in main_draws]


def test_continue_mode_evaluation_leaves_the_random_stream_alone(tmp_path):
    torch.manual_seed(0)
    draws: list[torch.Tensor] = []
    model, opt = make_model_opt()
    hook = CooldownHook(model, opt, schedule=WSD(warmup_steps=2),
                        plan=ForkPlan(every=4, mode="continue", cooldown=Cooldown(steps=2)), loss_fn=loss_fn,
                        eval_fn=_sampling_eval(draws), train_loader=make_loader(), dirpath=tmp_path, verbose=False)
    for t in range(1, 9):
        before = torch.get_rng_state()
        hook.step()
        assert torch.equal(before, torch.get_rng_state()), f"step {t}"
    assert len(draws) == 1  # the window 4..6 was evaluated at step 6 (the next one ends at 10)


def test_fresh_run_refuses_another_runs_dirpath_and_a_resumed_run_continues(tmp_path):
    first = ForkEngine(ForkPlan(every=5), WSD(1), tmp_path)
    first.claim_dirpath()  # empty folder: fine
    append_record(tmp_path / RECORDS_NAME, ForkRecord(step=5, cooldown_steps=1, shape="1-sqrt", run=first.run_id))
    first.claim_dirpath()  # its own records: fine
    second = ForkEngine(ForkPlan(every=5), WSD(1), tmp_path)
    with pytest.raises(ValueError, match=r"Invalid dirpath .* holds the cooled models and forks.jsonl of another run"):
        second.claim_dirpath()
    with pytest.raises(ValueError, match=r"Invalid my_dir .*Give a new my_dir, resume that run"):
        second.claim_dirpath("my_dir")
    resumed = ForkEngine(ForkPlan(every=5), WSD(1), tmp_path)
    resumed.load_state_dict(first.state_dict())
    resumed.claim_dirpath()


def test_a_fork_finished_before_a_crash_is_restored_not_rerun(tmp_path):
    calls = []

    def eval_fn(model):
        calls.append(1)
        return 1.0

    def make():
        model, opt = make_model_opt()
        return CooldownHook(model, opt, schedule=WSD(warmup_steps=1), plan=ForkPlan(at=[2], cooldown=Cooldown(steps=1)),
                            loss_fn=loss_fn, eval_fn=eval_fn, train_loader=make_loader(), dirpath=tmp_path,
                            verbose=False)

    hook = make()
    hook.step_count = 1
    state = hook.state_dict()  # the checkpoint, taken before the fork at step 2
    rec = hook.step()
    assert rec.status == "ok" and not rec.restored and len(calls) == 1
    resumed = make()  # the crash: a new process resumes from the checkpoint
    resumed.load_state_dict(state)
    rec2 = resumed.step()
    assert len(calls) == 1, "the finished fork ran again"
    assert rec2.restored and rec2.metrics == rec.metrics and rec2.checkpoint == rec.checkpoint
    assert resumed.records[-1]["restored"] is True
    lines = [json.loads(x) for x in (tmp_path / RECORDS_NAME).read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["restored"] is False  # the file is not written again
