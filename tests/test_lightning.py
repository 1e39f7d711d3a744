"""CooldownCallback on a real ``lightning.Trainer`` (lightning 2.6.6, CPU).

Every run is a real ``Trainer.fit`` of a tiny byte-level model on real text (``_lightning_models``);
"bit-identical" is ``torch.equal`` on every parameter, buffer and optimizer-state tensor.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import _reference_schedules as reference
from _lightning_models import (
    SCHEDULE,
    CharData,
    CharModel,
    assert_bit_identical,
    callback,
    fit,
    lambda_scheduler,
    main_metrics,
    params_and_optimizer,
    read_csv_metrics,
    trainer_kwargs,
)
from cooldown_callbacks import WSD, Cooldown, ForkPlan, RSqrt
from cooldown_callbacks.engine import ForkError
from cooldown_callbacks.records import read_records
from cooldown_callbacks.integrations.lightning import CooldownCallback

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# -- 1. the main branch is bit-identical to a run without forks ----------------------------------
IDENTITY_CASES = {
    "automatic": dict(),
    "manual": dict(model_kw=dict(manual=True, clip=0.5)),
    "accumulate-2": dict(accumulate_grad_batches=2, gradient_clip_val=0.5, max_steps=6),
    "bf16-mixed": dict(precision="bf16-mixed"),
    "torchmetrics": dict(model_kw=dict(metric=True)),
}


@pytest.mark.parametrize("case", list(IDENTITY_CASES))
def test_main_branch_bit_identical_to_run_without_forks(tmp_path, case):
    """Forks at every validation leave params, optimizer state, logged metrics, ModelCheckpoint and
    EarlyStopping exactly as in a run whose LR comes from a plain LambdaLR and that never forks."""
    kw = IDENTITY_CASES[case]

    def monitors():
        return [ModelCheckpoint(dirpath=None, monitor="val_loss", save_top_k=1),
                EarlyStopping(monitor="val_loss", patience=100)]

    cb = callback(tmp_path)
    mon_a = monitors()
    ta, ma = fit(tmp_path, "forks", cb=cb, callbacks=mon_a, enable_checkpointing=True, **kw)
    mon_b = monitors()
    tb, mb = fit(tmp_path, "plain", scheduler=lambda_scheduler(SCHEDULE), callbacks=mon_b, enable_checkpointing=True,
                 **kw)

    assert [r["status"] for r in cb.records] == ["ok"] * len(cb.records) and len(cb.records) == 3
    assert ta.global_step == tb.global_step
    assert_bit_identical(params_and_optimizer(ma, ta), params_and_optimizer(mb, tb))
    assert read_csv_metrics(tmp_path / "forks/version_0/metrics.csv", drop_prefix="cooldown/") == \
        read_csv_metrics(tmp_path / "plain/version_0/metrics.csv")
    assert main_metrics(ta) == main_metrics(tb)
    assert mon_a[0].best_model_score == mon_b[0].best_model_score
    assert mon_a[1].best_score == mon_b[1].best_score and mon_a[1].wait_count == mon_b[1].wait_count
    cooled = {k for k in ta.callback_metrics if k.startswith("cooldown/")}
    assert cooled == {"cooldown/val_loss"}
    if case == "torchmetrics":
        assert "train_acc" in main_metrics(ta)


# -- 2. on_eval forks exactly where Lightning validates -----------------------------------------
class ValidationSteps(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


@pytest.mark.parametrize("trainer_kw, expected", [
    (dict(val_check_interval=3, check_val_every_n_epoch=None, max_steps=10), [3, 6, 9]),
    (dict(val_check_interval=1.0, check_val_every_n_epoch=2, max_steps=17), [16]),  # 8 batches per epoch
    (dict(val_check_interval=0.5, check_val_every_n_epoch=1, max_steps=12), [4, 8, 12]),
    (dict(val_check_interval=4, check_val_every_n_epoch=None, max_steps=6, accumulate_grad_batches=2), [2, 4, 6]),
], ids=["every-3-steps", "every-2nd-epoch", "twice-per-epoch", "accumulate-2"])
def test_on_eval_forks_exactly_at_validation_steps(tmp_path, trainer_kw, expected):
    seen = ValidationSteps()
    cb = callback(tmp_path, ForkPlan(on_eval=True, cooldown=Cooldown(steps=1)))
    fit(tmp_path, "run", cb=cb, callbacks=[seen], logger=False, **trainer_kw)
    assert seen.steps == expected
    assert [r["step"] for r in cb.records] == expected


def test_on_eval_fork_when_should_stop_makes_lightning_validate(tmp_path):
    """A later callback setting ``should_stop`` makes Lightning validate at a step that
    ``on_train_batch_end`` could not foresee: the fork still happens there, before ModelCheckpoint."""

    class StopAt(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 5:
                trainer.should_stop = True

    seen = ValidationSteps()
    cb = callback(tmp_path, ForkPlan(on_eval=True, cooldown=Cooldown(steps=1)))
    fit(tmp_path, "run", callbacks=[cb, StopAt(), seen], logger=False)
    assert seen.steps == [4, 5]
    assert [r["step"] for r in cb.records] == [4, 5]


# -- 3. peek: the cooled checkpoint equals a fixed-budget Lightning run --------------------------
@pytest.mark.parametrize("cooldown", [Cooldown(steps=4, shape="1-sqrt"), Cooldown(fraction=0.25, shape="linear")],
                         ids=["steps-1-sqrt", "fraction-linear"])
def test_peek_fork_equals_fixed_budget_run(tmp_path, cooldown):
    s = 8
    c = cooldown.length(s)
    data_kw = dict(stateful=True, n_train=64)  # 16 batches per epoch: s + c stays inside one epoch
    cb = callback(tmp_path, ForkPlan(at=[s], cooldown=cooldown, data="peek"))
    fit(tmp_path, "forks", cb=cb, data_kw=data_kw, val_check_interval=50, max_steps=s + 2, logger=False)
    rec = cb.records[0]
    assert rec["status"] == "ok" and rec["step"] == s and rec["cooldown_steps"] == c

    fixed = SCHEDULE.cooled(at=s, cooldown=cooldown)
    tf, mf = fit(tmp_path, "fixed", scheduler=lambda_scheduler(fixed), data_kw=data_kw, val_check_interval=50,
                 max_steps=fixed.total_steps, logger=False)
    assert tf.global_step == s + c
    ckpt = torch.load(rec["checkpoint"], weights_only=False)
    assert ckpt["global_step"] == s + c
    cooled = ckpt["state_dict"]
    for k, v in mf.state_dict().items():
        assert torch.equal(cooled[k], v), k
    for sa, sb in zip(ckpt["optimizer_states"][0]["state"].values(), tf.optimizers[0].state_dict()["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


# -- 4. resume from a checkpoint taken between forks ---------------------------------------------
def test_resume_between_forks_continues_plan_exactly(tmp_path):
    plan = ForkPlan(every=4, cooldown=Cooldown(steps=2))
    # 16 batches per epoch: resume mid-epoch. Resuming and then crossing an epoch end is not exact in Lightning
    # itself, with or without this callback (seen with torchdata 0.11's StatefulDataLoader: the next epoch's order
    # differs from the uninterrupted run's).
    data_kw = dict(stateful=True, n_train=64)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=6, save_top_k=-1)
    cb_a = CooldownCallback(schedule=SCHEDULE, plan=plan, dirpath=tmp_path / "a", verbose=False)
    ta, ma = fit(tmp_path, "a", cb=cb_a, callbacks=[ckpts], data_kw=data_kw, enable_checkpointing=True,
                 val_check_interval=5, max_steps=14, logger=False)
    mid = tmp_path / "ckpts" / "epoch=0-step=6.ckpt"
    state = torch.load(mid, weights_only=True)["callbacks"][cb_a.state_key]  # no pickled objects in our state
    assert state["engine"]["completed"] == [4]

    cb_b = CooldownCallback(schedule=SCHEDULE, plan=plan, dirpath=tmp_path / "b", verbose=False)
    tb, mb = fit(tmp_path, "b", cb=cb_b, data_kw=data_kw, enable_checkpointing=True, val_check_interval=5,
                 max_steps=14, logger=False, ckpt_path=mid)
    assert_bit_identical(params_and_optimizer(ma, ta), params_and_optimizer(mb, tb))
    assert [r["step"] for r in cb_b.records] == [4, 8, 12]  # 4 came from the checkpoint, not repeated
    assert [r["step"] for r in read_records(tmp_path / "b")] == [8, 12]
    for step in (8, 12):
        a = torch.load(tmp_path / "a" / f"cooled-step={step:08d}-cd=2.ckpt", weights_only=False)["state_dict"]
        b = torch.load(tmp_path / "b" / f"cooled-step={step:08d}-cd=2.ckpt", weights_only=False)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)


# -- schedule=None: the user's scheduler drives the main branch, forks decay from its current LR ----
def test_user_scheduler_drives_main_branch_without_schedule(tmp_path):
    rsqrt = RSqrt(warmup_steps=2)
    lrs = []

    class FirstForkLR(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if cb.forking:
                lrs.append(optimizer.param_groups[0]["lr"])

    cb = callback(tmp_path, ForkPlan(every=4, cooldown=Cooldown(steps=3, shape="linear"), record_grad_norms=True),
                  schedule=None)
    ta, ma = fit(tmp_path, "forks", scheduler=lambda_scheduler(rsqrt), callbacks=[cb, FirstForkLR()], logger=False)
    tb, mb = fit(tmp_path, "plain", scheduler=lambda_scheduler(rsqrt), logger=False)
    assert_bit_identical(params_and_optimizer(ma, ta), params_and_optimizer(mb, tb))
    lr4 = 0.01 * rsqrt(4)  # the LR the main branch would use for its 5th update
    assert cb.records[0]["lr"] == pytest.approx(lr4, rel=1e-12)
    assert lrs[:3] == pytest.approx([lr4, lr4 * 2 / 3, lr4 / 3], rel=1e-12)  # linear cooldown from the current LR
    assert [len(r["grad_norms"]) for r in cb.records] == [4, 4, 4]
    assert all(g > 0 and math.isfinite(g) for r in cb.records for g in r["grad_norms"])


# -- 6. the cooled checkpoint loads with load_from_checkpoint; its val loss is the logged one ----
def test_cooled_checkpoint_loads_and_matches_logged_val_loss(tmp_path, capsys):
    cb = callback(tmp_path, ForkPlan(on_eval=True, cooldown=Cooldown(fraction=0.2)), verbose=True)
    trainer, _ = fit(tmp_path, "run", cb=cb, max_steps=8)
    out = capsys.readouterr().out
    assert "[cooldown] step 4: 1 cooldown steps" in out and "cooldown/val_loss=" in out

    logged = read_csv_metrics(tmp_path / "run/version_0/metrics.csv")
    rows = [r for r in logged if "cooldown/val_loss" in r]
    # each cooled metric sits at the logger step of the main branch's own validation it belongs to
    assert [int(r["step"]) for r in rows] == [int(r["step"]) for r in logged if "val_loss" in r] == [3, 7]
    for rec, row in zip(cb.records, rows):
        path = Path(rec["checkpoint"])
        assert path.name == f"cooled-step={rec['step']:08d}-cd={rec['cooldown_steps']}.ckpt"
        model = CharModel.load_from_checkpoint(path)
        result = L.Trainer(**trainer_kwargs(tmp_path / "val")).validate(model, datamodule=CharData(), verbose=False)
        assert result[0]["val_loss"] == rec["metrics"]["val_loss"] == float(row["cooldown/val_loss"])
    assert float(trainer.callback_metrics["cooldown/val_loss"]) == cb.records[-1]["metrics"]["val_loss"]
    assert [r["step"] for r in read_records(tmp_path / "cooled")] == [4, 8]


# -- reliability: a failed fork is recorded, the main branch is untouched ------------------------
@pytest.mark.parametrize("failure", ["nan-loss", "nan-grad", "validation-error"])
def test_failed_fork_is_recorded_and_training_goes_on(tmp_path, failure):
    cb = callback(tmp_path, ForkPlan(every=4, cooldown=Cooldown(steps=3)))
    kind = {"nan-loss": True, "nan-grad": "grad"}.get(failure)
    poison = (lambda m: kind if cb.forking and m.global_step == 5 else None) if kind else None
    fail_val = (lambda m: cb.forking and m.global_step == 7) if failure == "validation-error" else None
    with pytest.warns(UserWarning, match="the fork at step 4 failed and was recorded"):
        ta, ma = fit(tmp_path, "forks", cb=cb, poison=poison, fail_val=fail_val, logger=False)
    tb, mb = fit(tmp_path, "plain", scheduler=lambda_scheduler(SCHEDULE), logger=False)

    assert ta.global_step == 12
    assert_bit_identical(params_and_optimizer(ma, ta), params_and_optimizer(mb, tb))
    assert [r["status"] for r in cb.records] == ["failed", "ok", "ok"]
    error = {"nan-loss": "non-finite training loss", "nan-grad": "non-finite",
             "validation-error": "validation failed on purpose"}[failure]
    assert error in cb.records[0]["error"] and cb.records[0]["checkpoint"] is None
    on_disk = [(r["step"], r["status"]) for r in read_records(tmp_path / "cooled")]
    assert on_disk == [(4, "failed"), (8, "ok"), (12, "ok")]
    assert [r["status"] for r in cb.state_dict()["engine"]["records"]] == ["failed", "ok", "ok"]
    assert not list((tmp_path / "cooled").glob("*step=00000004*"))


def test_failed_fork_raises_after_restoring_when_asked(tmp_path):
    cb = callback(tmp_path, ForkPlan(every=4, cooldown=Cooldown(steps=3), on_fork_error="raise"))
    models: list = []
    with pytest.raises(ForkError, match="fork at step 4 failed.*non-finite training loss"):
        fit(tmp_path, "forks", cb=cb, poison=lambda m: cb.forking, logger=False, holder=models)
    model = models[0]
    tb, mb = fit(tmp_path, "plain", scheduler=lambda_scheduler(SCHEDULE), logger=False, max_steps=4)
    assert_bit_identical(params_and_optimizer(model, model.trainer), params_and_optimizer(mb, tb))
    assert [r["status"] for r in read_records(tmp_path / "cooled")] == ["failed"]


@pytest.mark.filterwarnings("ignore:CooldownCallback. the fork at step 4 failed")
def test_sigterm_during_fork_restores_first_then_cools_the_final_model(tmp_path):
    """Preemption in the middle of a cooldown: the fork stops, the main branch is restored before any
    SIGTERM handler runs (Lightning's, then the user's, which Lightning calls after its own), and with
    ``at_end=True`` the final model is cooled before exit. Without the engine's signal guard the
    handlers would run inside the fork: on cooled weights, and the fork would finish instead."""
    cb = callback(tmp_path, ForkPlan(every=4, at_end=True, cooldown=Cooldown(steps=3)))
    sent: list = []
    seen: list = []
    models: list = []

    def preempt(m):
        if cb.forking and m.global_step == 5 and not sent:  # the fork's 2nd cooldown step
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    def handler(signum, frame):  # what a preemption handler does: look at (checkpoint) the model now
        seen.append((cb.forking, params_and_optimizer(models[0], models[0].trainer)))

    old = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(SystemExit):
            fit(tmp_path, "forks", cb=cb, poison=preempt, holder=models, logger=False)
    finally:
        signal.signal(signal.SIGTERM, old)
    tb, mb = fit(tmp_path, "plain", scheduler=lambda_scheduler(SCHEDULE), logger=False, max_steps=4)
    main_at_4 = params_and_optimizer(mb, tb)
    assert sent and len(seen) == 1, "the SIGTERM handler ran once"
    forking, state = seen[0]
    assert not forking, "the handler ran while the fork was still running"
    assert_bit_identical(state, main_at_4)  # the handler saw the main branch, not cooled weights
    assert_bit_identical(params_and_optimizer(models[0], models[0].trainer), main_at_4)
    recs = read_records(tmp_path / "cooled")
    # the interrupted fork is recorded as failed (the engine stopped it), then at_end cools step 4
    assert [(r["step"], r["status"]) for r in recs] == [(4, "failed"), (4, "ok")]
    assert recs[0]["error"].startswith("interrupted by SIGTERM") and recs[0]["checkpoint"] is None
    assert Path(recs[1]["checkpoint"]).exists()


# -- bad input: clear errors before the first step -----------------------------------------------
def test_constructor_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid schedule \(None\) with ForkPlan\(mode='continue'\)"):
        CooldownCallback(schedule=None, plan=ForkPlan(every=4, mode="continue"))
    with pytest.raises(ValueError, match="Invalid plan"):
        CooldownCallback(schedule=SCHEDULE, plan={"every": 4})
    with pytest.raises(ValueError, match="Invalid schedule"):
        CooldownCallback(schedule="wsd", plan=ForkPlan(every=4))
    with pytest.raises(ValueError, match="Invalid dirpath"):
        CooldownCallback(schedule=SCHEDULE, dirpath=3)
    with pytest.raises(ValueError, match="Invalid snapshot_storage"):
        CooldownCallback(schedule=SCHEDULE, snapshot_storage="gpu")
    with pytest.raises(ValueError, match="Invalid filename"):
        CooldownCallback(schedule=SCHEDULE, filename="cooled-{epoch}")
    with pytest.raises(ValueError, match="Invalid prefix"):
        CooldownCallback(schedule=SCHEDULE, prefix="")


def _not_a_dir(tmp: Path) -> Path:
    f = tmp / "file"
    f.write_text("x")
    return f / "cooled"


BAD_FIT_CASES = {
    "dirpath-not-writable": (lambda t: dict(cb=CooldownCallback(schedule=SCHEDULE, dirpath=_not_a_dir(t))),
                             r"Invalid dirpath .*cannot write there"),
    "schedule-and-scheduler": (lambda t: dict(cb=callback(t), scheduler=lambda_scheduler(SCHEDULE)),
                               r"Invalid schedule: .*also returns a scheduler \(LambdaLR\)"),
    "on-eval-without-validation": (lambda t: dict(cb=callback(t), limit_val_batches=0),
                                   r"Invalid plan: ForkPlan\(on_eval=True\) .* never validates"),
    "peek-without-stateful-loader": (lambda t: dict(cb=callback(t, ForkPlan(every=4, data="peek"))),
                                     r"Invalid plan: ForkPlan\(data='peek'\) needs a stateful train loader"),
    "continue-on-uneven-validation": (lambda t: dict(cb=callback(t, ForkPlan(on_eval=True, mode="continue")),
                                                     val_check_interval=0.375, check_val_every_n_epoch=1),
                                      r"Invalid plan: .*mode='continue', on_eval=True.* evenly spaced"),
}


@pytest.mark.parametrize("case", list(BAD_FIT_CASES))
def test_bad_configuration_fails_at_fit_start(tmp_path, case):
    make, match = BAD_FIT_CASES[case]
    kw = make(tmp_path)
    seen = []

    class Steps(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            seen.append(trainer.global_step)

    with pytest.raises(ValueError, match=match) as err:
        fit(tmp_path, "bad", callbacks=[Steps()], logger=False, **kw)
    assert isinstance(err.value, MisconfigurationException)
    assert seen == []


# -- WSD-S: mode="continue" decays in-loop -------------------------------------------------------
@pytest.mark.parametrize("plan, starts, trainer_kw", [
    (ForkPlan(every=6, mode="continue", cooldown=Cooldown(steps=3)), [6], dict()),
    (ForkPlan(on_eval=True, mode="continue", cooldown=Cooldown(steps=2, shape="linear")), [2, 6, 10],
     dict(val_check_interval=4, check_val_every_n_epoch=None)),
], ids=["every", "on-eval"])
def test_continue_mode_equals_wsds_schedule(tmp_path, plan, starts, trainer_kw):
    cb = callback(tmp_path, plan)
    ta, ma = fit(tmp_path, "forks", cb=cb, logger=False, **trainer_kw)
    # the reference WSD-S schedule, written from the documented formula (no library schedule code)
    wsds = reference.wsds(reference.main_schedule("WSD", 3), starts, lambda s: plan.cooldown.steps,
                          plan.cooldown.shape)
    tb, mb = fit(tmp_path, "plain", scheduler=lambda_scheduler(wsds), logger=False, **trainer_kw)
    assert_bit_identical(params_and_optimizer(ma, ta), params_and_optimizer(mb, tb))
    ends = [s + plan.cooldown.length(s) for s in starts if s + plan.cooldown.length(s) <= 12]
    expected = [(s, "continue", "ok") for s in starts[:len(ends)]]
    assert [(r["step"], r["mode"], r["status"]) for r in cb.records] == expected
    for rec, end in zip(cb.records, ends):
        assert torch.load(rec["checkpoint"], weights_only=False)["global_step"] == end
        if plan.on_eval:  # the main branch validates the same (cooled) model at the window's end
            assert rec["main_metrics"]["val_loss"] == rec["metrics"]["val_loss"]


# -- at_end: the final model is cooled however training stops ------------------------------------
class StopAt(Callback):
    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            if self.how == "should_stop":
                trainer.should_stop = True
            else:
                os.kill(os.getpid(), signal.SIGTERM)


class StateAtEnd(Callback):
    """Placed before the cooldown callback: what the final fork starts from (weights, optimizer, RNG)."""

    def __init__(self) -> None:
        self.state: dict | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.state = {"step": trainer.global_step, "model": copy.deepcopy(pl_module.state_dict()),
                      "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()), "rng": torch.get_rng_state()}

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)


def reference_cooldown(state: dict, batches: list, c: int) -> dict:
    """The cooldown written out by hand: ``c`` AdamW steps on ``batches`` at LR ``0.01 * main(S) * (1 - sqrt(k/c))``."""
    model = CharModel()
    model.load_state_dict(state["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    main = reference.main_schedule("WSD", 3)
    model.train()
    for k, batch in enumerate(batches[:c]):
        for g in opt.param_groups:
            g["lr"] = 0.01 * (main(state["step"]) * reference.decay("1-sqrt", k / c))
        opt.zero_grad()
        model._loss(batch)[0].backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("how", ["max_steps", "should_stop", "max_time", "sigterm"])
def test_at_end_cools_the_final_model(tmp_path, how):
    """However training stops, the final model is cooled once: the cooled checkpoint is the main
    branch's final state after a 2-step 1-sqrt cooldown (written out by hand here), the main branch
    itself is left as it was."""
    batches = [b for _, b in zip(range(2), iter(CharData(seed=3).train_dataloader()))]
    cb = callback(tmp_path, ForkPlan(on_eval=False, at_end=True, cooldown=Cooldown(steps=2), data=batches))
    probe = StateAtEnd()
    kw: dict = dict(max_steps=7, logger=False, callbacks=[probe])
    if how in ("should_stop", "sigterm"):
        kw["callbacks"].append(StopAt(5, how))
    if how == "max_time":
        kw.update(max_steps=-1, max_epochs=-1, max_time=timedelta(seconds=1))
    models: list = []
    if how == "sigterm":
        with pytest.raises(SystemExit):
            fit(tmp_path, "run", cb=cb, holder=models, **kw)
    else:
        fit(tmp_path, "run", cb=cb, holder=models, **kw)
    final = probe.state["step"]
    assert final == {"max_steps": 7, "should_stop": 5, "sigterm": 5}.get(how, final) and final > 0
    assert [(r["step"], r["status"]) for r in read_records(tmp_path / "cooled")] == [(final, "ok")]
    cooled = torch.load(cb.records[0]["checkpoint"], weights_only=False)
    assert cooled["global_step"] == final + 2
    expected = reference_cooldown(probe.state, batches, 2)
    assert cooled["state_dict"].keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(cooled["state_dict"][k], v), f"cooled {k} differs from the hand-written cooldown"
    # the main branch is the final model, untouched (and different from the cooled one)
    main = models[0].state_dict()
    assert all(torch.equal(main[k], v) for k, v in probe.state["model"].items())
    assert not torch.equal(main["head.weight"], cooled["state_dict"]["head.weight"])


# -- LightningCLI / YAML ------------------------------------------------------------------------
def test_configurable_from_lightning_cli_yaml(tmp_path):
    """The natural YAML: ``cooldown: {steps: 2, ...}`` with nothing about ``fraction`` (ForkPlan's default
    cooldown is resolved in ``__post_init__``, so jsonargparse has no default to merge the YAML into)."""
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 8
  val_check_interval: 4
  check_val_every_n_epoch: null
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: cooldown_callbacks.integrations.lightning.CooldownCallback
      init_args:
        schedule:
          class_path: cooldown_callbacks.WSD
          init_args: {{warmup_steps: 2}}
        plan:
          class_path: cooldown_callbacks.ForkPlan
          init_args:
            on_eval: true
            cooldown: {{steps: 2, shape: linear}}
        dirpath: {tmp_path / "cooled"}
        verbose: false
model:
  d: 8
""")
    cli = LightningCLI(CharModel, CharData, run=False, args=["--config", str(cfg)], save_config_callback=None)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, CooldownCallback))
    assert cb.schedule == WSD(warmup_steps=2)
    assert cb.plan == ForkPlan(on_eval=True, cooldown=Cooldown(steps=2, shape="linear"))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [r["step"] for r in read_records(tmp_path / "cooled")] == [4, 8]


# -- progress bars -------------------------------------------------------------------------------
@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_progress_bar_shows_the_cooldown(tmp_path, capsys, bar):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    pb = TQDMProgressBar() if bar == "tqdm" else RichProgressBar()
    cb = callback(tmp_path, ForkPlan(every=4, cooldown=Cooldown(steps=2)), verbose=True)
    fit(tmp_path, "run", cb=cb, callbacks=[pb], enable_progress_bar=True, max_steps=4, logger=False)
    out = capsys.readouterr().out
    assert "[cooldown] step 4: 2 cooldown steps" in out
    if bar == "tqdm":
        assert "Cooldown @ 4" in out


# -- the private Lightning internals the adapter relies on --------------------------------------
def test_private_internals_present_and_guarded(tmp_path):
    from cooldown_callbacks.integrations.lightning import _internals as adapter

    assert L.__version__.startswith(adapter.PINNED_LIGHTNING + ".")
    trainer, _ = fit(tmp_path, "run", cb=callback(tmp_path), max_steps=4, logger=False)
    adapter._check_internals(trainer)  # every name of the internals section exists on a real Trainer
    loop = trainer.fit_loop.epoch_loop
    saved = loop.__dict__.pop("_skip_next_val")
    try:
        with pytest.raises(RuntimeError, match=r"internals are missing: epoch_loop._skip_next_val"):
            adapter._check_internals(trainer)
    finally:
        loop._skip_next_val = saved


# -- the README example --------------------------------------------------------------------------
def test_example_quick_mode_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "examples/lightning_charlm.py"), "--quick", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cooled val loss" in out.stdout
    records = read_records(tmp_path / "cooled")
    assert records and all(r["status"] == "ok" for r in records)
