"""Several cooldowns per fork point in the Lightning and HF Trainer adapters (real Trainers, tiny models).

Each cooled model equals its own fixed-budget run of the same framework (a plain scheduler, no
callback) bit for bit; the cooled metrics reach the host's loggers under names that keep the
cooldowns apart; each adapter states the plan's cost at the start of training.
"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from _lightning_models import CharData, CharModel, read_csv_metrics, trainer_kwargs
from cooldown_callbacks import WSD, Cooldown, ForkPlan
from cooldown_callbacks.integrations.lightning import CooldownCallback
from cooldown_callbacks.records import read_records

pytestmark = pytest.mark.usefixtures("one_thread")

TWO = [Cooldown(steps=2, shape="linear"), Cooldown(steps=3, shape="1-sqrt")]
LABELS = ["2steps_linear", "3steps_1-sqrt"]


# -- Lightning -----------------------------------------------------------------------------------
def lightning_fit(tmp, name, *, cb=None, scheduler=None, **kw):
    L.seed_everything(0, verbose=False)
    model = CharModel()
    model.scheduler = scheduler
    args = dict(max_steps=8, val_check_interval=50, check_val_every_n_epoch=None,
                logger=CSVLogger(tmp, name=name, version=0))
    args.update(kw)
    trainer = L.Trainer(**trainer_kwargs(tmp / name, callbacks=[cb] if cb is not None else [], **args))
    trainer.fit(model, datamodule=CharData(stateful=True, n_train=64))
    return trainer, model


def test_lightning_each_cooldown_equals_its_fixed_budget_run(tmp_path, caplog):
    s, schedule = 6, WSD(warmup_steps=3)
    cb = CooldownCallback(schedule=schedule, plan=ForkPlan(at=[s], cooldown=TWO, data="peek"),
                          dirpath=tmp_path / "cooled", verbose=True)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        lightning_fit(tmp_path, "forks", cb=cb)
    assert "CooldownCallback: ForkPlan cost to step 8: 1 fork point x 2 cooldowns = 5 cooldown steps, 0.62x the 8 " \
           "main steps" in caplog.text
    recs = read_records(tmp_path / "cooled")
    assert [(r["label"], r["cooldown_steps"], r["status"]) for r in recs] == [(LABELS[0], 2, "ok"), (LABELS[1], 3, "ok")]
    for cd, rec in zip(TWO, recs):
        fixed = schedule.cooled(at=s, cooldown=cd)
        tf, mf = lightning_fit(tmp_path, f"fixed{cd.steps}", scheduler=lambda opt, f=fixed: f.lambda_lr(opt),
                               max_steps=fixed.total_steps, logger=False)
        ckpt = torch.load(rec["checkpoint"], weights_only=False)
        assert ckpt["global_step"] == s + cd.steps
        for k, v in mf.state_dict().items():
            assert torch.equal(ckpt["state_dict"][k], v), (rec["label"], k)
    logged = {k for row in read_csv_metrics(tmp_path / "forks" / "version_0" / "metrics.csv") for k in row}
    assert {f"cooldown/{lab}/val_loss" for lab in LABELS} <= logged and "cooldown/val_loss" not in logged
    assert recs[0]["metrics"]["val_loss"] != recs[1]["metrics"]["val_loss"]


def test_lightning_skipped_fork_is_recorded_not_warned(tmp_path, recwarn):
    cb = CooldownCallback(schedule=WSD(warmup_steps=3), dirpath=tmp_path / "cooled", verbose=False,
                          plan=ForkPlan(every=2, cooldown=Cooldown(steps=2), max_overhead=0.5))
    lightning_fit(tmp_path, "run", cb=cb, max_steps=8, logger=False)
    # cost 2 per fork: 2: 2 > 1 skip; 4: 2 <= 2 run; 6: 4 > 3 skip; 8: 4 <= 4 run
    assert [(r["step"], r["status"]) for r in cb.records] == [(2, "skipped"), (4, "ok"), (6, "skipped"), (8, "ok")]
    assert not [w for w in recwarn if "failed" in str(w.message)]


# -- HF Trainer ----------------------------------------------------------------------------------
def test_hf_each_cooldown_equals_its_fixed_budget_run_and_logs_apart(tmp_path, capsys):
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    import test_transformers as hf  # the HF tests' tiny GPT-2 and byte-level data

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        s = 4
        callback = hf.CooldownTrainerCallback(schedule=WSD(warmup_steps=hf.W), verbose=True,
                                              plan=ForkPlan(at=[s], cooldown=TWO, data="peek"))
        forked = hf.train(tmp_path / "fork", [callback], eval_strategy="no", max_steps=6)
        out = capsys.readouterr().out
        assert "[cooldown] ForkPlan cost to step 6: 1 fork point x 2 cooldowns = 5 cooldown steps, 0.83x the 6 " \
               "main steps" in out
        recs = callback.records
        assert [(r["label"], r["status"]) for r in recs] == [(LABELS[0], "ok"), (LABELS[1], "ok")]
        assert all(set(r["metrics"]) >= {"cooldown_loss"} for r in recs)  # records: names as for one cooldown
        logged = {k for h in forked.state.log_history for k in h}
        assert {f"cooldown_{lab}_loss" for lab in LABELS} <= logged and "cooldown_loss" not in logged
        assert {f"cooldown_{lab}_steps" for lab in LABELS} <= logged
        for cd, rec in zip(TWO, recs):
            fixed = hf.train(tmp_path / f"fixed{cd.steps}", eval_strategy="no", max_steps=s + cd.steps,
                             lr_scheduler_type="warmup_stable_decay",
                             lr_scheduler_kwargs={"num_decay_steps": cd.steps, "decay_type": cd.shape})
            assert isinstance(fixed, Trainer)
            cooled = hf.load_params(rec["checkpoint"])
            for n, p in fixed.model.named_parameters():
                assert torch.equal(cooled[n], p), (rec["label"], n)
            assert rec["metrics"]["cooldown_loss"] == fixed.evaluate(metric_key_prefix="cooldown")["cooldown_loss"]
    finally:
        hf_logging.set_verbosity(verbosity)
