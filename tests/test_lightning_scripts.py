"""CooldownCallback in the set-ups real Lightning scripts use (issue 13): default folders and several
runs, resume, two callbacks, GAN-style manual optimization, streaming data, sampling validation,
progress bars, ModelCheckpoint on a cooled metric, fast_dev_run.

Every run is a real ``Trainer.fit`` of a tiny model on real text (``_lightning_models``);
"bit-identical" is ``torch.equal`` on every parameter, buffer and optimizer-state tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger

from _lightning_models import (
    SCHEDULE,
    CharModel,
    StreamData,
    TwoOptimizerModel,
    assert_bit_identical,
    callback,
    fit,
    lambda_scheduler,
    params_and_optimizer,
    read_csv_metrics,
)
from cooldown_callbacks import Cooldown, ForkPlan
from cooldown_callbacks.integrations.lightning import CooldownCallback, CooldownMisconfiguration
from cooldown_callbacks.records import read_records

pytestmark = pytest.mark.usefixtures("one_thread")

EVERY_4 = ForkPlan(every=4, cooldown=Cooldown(steps=2))


class Steps(Callback):
    """The global steps at which training batches started (empty when fit stopped before the first)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.seen.append(trainer.global_step)


def default_cb(**kw) -> CooldownCallback:
    """A CooldownCallback with the default dirpath unless one is given (forks every 4 steps, 2 long)."""
    kw = dict(dict(schedule=SCHEDULE, plan=EVERY_4, verbose=False), **kw)
    return CooldownCallback(**kw)


# -- item 1: a fresh run writes in a folder of its own; another run's folder is refused --------------
def test_fresh_runs_get_their_own_folder_under_the_logger_version(tmp_path):
    """Default dirpath = ModelCheckpoint's convention: ``<save_dir>/<name>/<version>/cooled``."""
    runs = []
    for _ in range(2):
        cb = default_cb()
        fit(tmp_path, "run", cb=cb, logger=CSVLogger(tmp_path, name="logs"), max_steps=8)
        runs.append(cb)
    assert [cb.dirpath for cb in runs] == [tmp_path / "logs" / f"version_{v}" / "cooled" for v in (0, 1)]
    for cb in runs:  # each folder holds exactly its own run's records and checkpoints
        records = read_records(cb.dirpath)
        assert [r["step"] for r in records] == [4, 8] and {r["run"] for r in records} == {cb.engine.run_id}
        assert all(Path(r["checkpoint"]).parent == cb.dirpath for r in records)


@pytest.mark.parametrize("where", ["no-logger", "fixed-logger-version", "explicit-dirpath"])
def test_second_fresh_run_into_a_used_folder_is_refused_before_its_first_step(tmp_path, where):
    def make():
        if where == "explicit-dirpath":
            return default_cb(dirpath=tmp_path / "cooled")
        return default_cb()

    logger = {"no-logger": False, "fixed-logger-version": True, "explicit-dirpath": False}[where]
    first = make()
    fit(tmp_path, "run", cb=first, logger=logger, max_steps=4)
    before = {p.name: p.read_bytes() for p in first.dirpath.iterdir()}
    steps = Steps()
    with pytest.raises(CooldownMisconfiguration, match=r"Invalid dirpath .*holds the cooled models and forks.jsonl "
                                                        r"of another run .*Give a new dirpath, resume that run"):
        fit(tmp_path, "run", cb=make(), callbacks=[steps], logger=logger, max_steps=4)
    assert steps.seen == []
    assert {p.name: p.read_bytes() for p in first.dirpath.iterdir()} == before  # nothing of the first run touched


# -- items 1 and 3: a resumed run continues in its folder; forks finished after the checkpoint come back --
def test_resume_continues_in_place_and_takes_back_forks_finished_before_the_crash(tmp_path, capsys):
    """Run A checkpoints at step 3 and finishes the fork at step 4 (then "crashes"). Resuming from the
    step-3 checkpoint with a new logger version writes into A's folder, takes the fork at step 4 back from
    the records (printed as restored, its metric logged once) and runs the fork at step 8."""
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=3, save_top_k=-1)
    cb_a = default_cb()
    fit(tmp_path, "a", cb=cb_a, callbacks=[ckpts], logger=CSVLogger(tmp_path, name="logs"), max_steps=5,
        enable_checkpointing=True, data_kw=dict(stateful=True, n_train=64))
    (rec_a,) = cb_a.records
    capsys.readouterr()

    cb_b = default_cb(verbose=True)
    logger_b = CSVLogger(tmp_path, name="logs")
    fit(tmp_path, "b", cb=cb_b, logger=logger_b, max_steps=8, ckpt_path=tmp_path / "ckpts" / "epoch=0-step=3.ckpt",
        data_kw=dict(stateful=True, n_train=64))
    assert logger_b.version == 1 and cb_b.dirpath == cb_a.dirpath == tmp_path / "logs" / "version_0" / "cooled"
    assert cb_b.engine.run_id == cb_a.engine.run_id
    out = capsys.readouterr().out
    assert "[cooldown] step 4: 2 cooldown steps, restored from the records (finished before the restart)" in out
    assert f"cooldown/val_loss={rec_a['metrics']['val_loss']:.4f}" in out
    assert [(r["step"], r.get("restored", False)) for r in cb_b.records] == [(4, True), (8, False)]
    assert [r["step"] for r in read_records(cb_a.dirpath) if r["run"] == cb_a.engine.run_id] == [4, 8]  # not re-run
    cooled = [r for r in read_csv_metrics(Path(logger_b.log_dir) / "metrics.csv") if "cooldown/val_loss" in r]
    assert [float(r["cooldown/val_loss"]) for r in cooled][:1] == [rec_a["metrics"]["val_loss"]]  # published once
    assert len(cooled) == 2


# -- item 5: several CooldownCallbacks in one Trainer ---------------------------------------------
class WithCallbacks(CharModel):
    """Returns ``extra`` from ``configure_callbacks`` (which Lightning does not check for duplicates)."""

    extra: tuple = ()

    def configure_callbacks(self):
        return list(self.extra)


def test_two_lr_driving_callbacks_are_refused_at_fit_start(tmp_path):
    a = default_cb(prefix="cd_short/", dirpath=tmp_path / "a")
    b = default_cb(prefix="cd_long/", dirpath=tmp_path / "b", plan=ForkPlan(every=4, cooldown=Cooldown(steps=3)))
    steps = Steps()
    with pytest.raises(CooldownMisconfiguration, match=r"2 CooldownCallbacks with a schedule drive this Trainer's LR "
                                                        r".*ForkPlan\(cooldown=\[Cooldown\(steps=\.\.\.\)"):
        fit(tmp_path, "run", callbacks=[a, b, steps], logger=False)
    assert steps.seen == []


@pytest.mark.parametrize("twice", ["same-object", "same-prefix"])
def test_callback_passed_twice_says_prefix_must_differ(tmp_path, twice):
    a = default_cb(dirpath=tmp_path / "a")
    b = a if twice == "same-object" else default_cb(schedule=None, dirpath=tmp_path / "b")

    def model():
        m = WithCallbacks()
        m.extra = [a, b]
        return m

    with pytest.raises(CooldownMisconfiguration, match=r"is passed twice, or two CooldownCallbacks share that "
                                                        r"prefix.*must differ: e\.g\. prefix="):
        fit(tmp_path, "run", model=model, logger=False)


def test_second_callback_without_schedule_cools_from_the_main_lr(tmp_path):
    """A driving callback listed after a schedule=None one must not re-apply the main LR during the
    other's cooldown."""
    lrs: dict[int, list[float]] = {}
    plain = default_cb(schedule=None, prefix="other/", dirpath=tmp_path / "other",
                       plan=ForkPlan(at=[4], cooldown=Cooldown(steps=3, shape="linear")))
    driver = default_cb(dirpath=tmp_path / "driver", plan=ForkPlan(at=[8], cooldown=Cooldown(steps=2)))

    class Spy(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if plain.forking:
                lrs.setdefault(trainer.global_step, []).append(optimizer.param_groups[0]["lr"])

    fit(tmp_path, "run", callbacks=[plain, driver, Spy()], logger=False, max_steps=8)
    main = 0.01 * SCHEDULE(4)
    assert [v[0] for _, v in sorted(lrs.items())] == pytest.approx([main, main * 2 / 3, main / 3], rel=1e-12)
    assert [r["status"] for r in plain.records + driver.records] == ["ok", "ok"]


# -- item 6: manual optimization with two optimizers (GAN) -----------------------------------------
def test_two_optimizer_manual_steps_count_training_batches(tmp_path):
    """global_step moves by 2 per batch; plan steps, Cooldown(steps=...)/fraction and the schedule count
    training batches that step an optimizer. The main branch equals a run whose two LambdaLRs step once
    per batch; the fork at step 3 runs 2 batches (4 optimizer steps)."""
    plan = ForkPlan(at=[3, 5], cooldown=Cooldown(steps=2))
    cb = default_cb(plan=plan, dirpath=tmp_path / "cooled")
    ta, ma = fit(tmp_path, "forks", cb=cb, model=TwoOptimizerModel, logger=False, max_steps=14)
    tb, mb = fit(tmp_path, "plain", model=lambda: TwoOptimizerModel(schedule=SCHEDULE), logger=False, max_steps=14)
    assert ta.global_step == tb.global_step == 14
    assert_bit_identical(params_and_optimizer(ma, ta), params_and_optimizer(mb, tb))
    assert [(r["step"], r["cooldown_steps"], r["status"]) for r in cb.records] == [(3, 2, "ok"), (5, 2, "ok")]
    assert torch.load(cb.records[0]["checkpoint"], weights_only=False)["global_step"] == 2 * 3 + 2 * 2

    cb = default_cb(plan=ForkPlan(at=[6], cooldown=Cooldown(fraction=0.25)), dirpath=tmp_path / "fraction")
    fit(tmp_path, "fraction", cb=cb, model=TwoOptimizerModel, logger=False, max_steps=14)
    assert [(r["step"], r["cooldown_steps"]) for r in cb.records] == [(6, 2)]  # 25% of 8 batches, not of 16


def test_plan_steps_two_optimizers_never_reach_are_reported(tmp_path):
    cb = default_cb(plan=ForkPlan(at=[3, 9], cooldown=Cooldown(steps=1)), dirpath=tmp_path / "cooled")
    with pytest.warns(UserWarning, match=r"made 2 optimizer steps in one batch.*about 7 such steps, so ForkPlan "
                                         r"step\(s\) 9 will never be reached"):
        fit(tmp_path, "run", cb=cb, model=TwoOptimizerModel, logger=False, max_steps=14)
    assert [r["step"] for r in cb.records] == [3]
    with pytest.warns(UserWarning, match=r"ForkPlan step\(s\) 20 lie beyond max_steps=12"):
        fit(tmp_path, "beyond", cb=default_cb(plan=ForkPlan(at=[4, 20]), dirpath=tmp_path / "b"), logger=False)


# -- item 7 (and T2): streaming data ---------------------------------------------------------------
STREAM_KW = dict(val_check_interval=50, logger=False)  # no validation: the fixed-budget run validates elsewhere


@pytest.mark.parametrize("plan", [ForkPlan(at=[5], cooldown=Cooldown(steps=3)),
                                  ForkPlan(every=2, cooldown=Cooldown(steps=3))], ids=["one-fork", "overlapping"])
@pytest.mark.parametrize("shared", [False, True], ids=["restartable-stream", "shared-read-position"])
def test_stream_fork_cools_on_the_main_branchs_next_batches_and_hands_them_back(tmp_path, shared, plan):
    """data='auto' on a plain DataLoader over an IterableDataset: the fork draws the main branch's next
    batches from Lightning's fetcher and hands them back: the main branch equals a run without forks and the
    cooled model equals a fixed-budget run on the same stream - also when every iterator of the dataset
    reads from one shared position (a second iterator would take batches from the main branch), and when a
    fork reads past batches the previous fork handed back (forks 2 steps apart, 3-step cooldowns)."""
    cb = callback(tmp_path, plan)
    ta, ma = fit(tmp_path, "forks", cb=cb, data=StreamData(shared=shared), max_steps=12, **STREAM_KW)
    tb, mb = fit(tmp_path, "plain", scheduler=lambda_scheduler(SCHEDULE), data=StreamData(shared=shared), max_steps=12,
                 **STREAM_KW)
    assert ta.global_step == tb.global_step == 12
    assert_bit_identical(params_and_optimizer(ma, ta), params_and_optimizer(mb, tb))
    assert {(r["status"], r["data"]) for r in cb.records} == {("ok", "peek")}

    rec = cb.records[-1]  # the last fork: after every hand-back before it
    fixed = SCHEDULE.cooled(at=rec["step"], cooldown=plan.cooldown)
    tf, mf = fit(tmp_path, "fixed", scheduler=lambda_scheduler(fixed), data=StreamData(shared=shared),
                 max_steps=fixed.total_steps, **STREAM_KW)
    cooled = torch.load(rec["checkpoint"], weights_only=False)["state_dict"]
    for k, v in mf.state_dict().items():
        assert torch.equal(cooled[k], v), k


def test_stream_that_ends_within_the_cooldown_fails_the_fork_and_keeps_the_main_branch(tmp_path):
    cb = callback(tmp_path, ForkPlan(at=[6], cooldown=Cooldown(steps=3)))  # 8 batches per pass: 2 left after step 6
    with pytest.warns(UserWarning, match="the fork at step 6 failed .* the main branch goes on unchanged"):
        ta, ma = fit(tmp_path, "forks", cb=cb, data=StreamData(n_train=32), max_steps=12, **STREAM_KW)
    tb, mb = fit(tmp_path, "plain", scheduler=lambda_scheduler(SCHEDULE), data=StreamData(n_train=32), max_steps=12,
                 **STREAM_KW)
    assert_bit_identical(params_and_optimizer(ma, ta), params_and_optimizer(mb, tb))
    (rec,) = cb.records
    assert rec["status"] == "failed" and "the train stream ends 2 batches from here and the cooldown needs 3" in \
        rec["error"] and "data='fresh'" in rec["error"]


def test_stream_drawing_from_the_global_rng_is_detected(tmp_path):
    """num_workers=0 and a stream that draws from torch's global RNG: reading it ahead changes the main
    branch's batches; the fork fails saying so, and later forks do not read ahead again."""
    cb = callback(tmp_path, ForkPlan(every=4, cooldown=Cooldown(steps=3)))
    with pytest.warns(UserWarning, match="fork at step 4 failed .*NOT bit-identical .*global RNG"):
        fit(tmp_path, "forks", cb=cb, data=StreamData(random_skip=True, n_train=200), max_steps=8, **STREAM_KW)
    assert [r["status"] for r in cb.records] == ["failed", "failed"]
    assert "num_workers>0" in cb.records[0]["error"] and cb.records[1]["error"].startswith("ForkError: not run")


def test_fresh_on_a_stream_restarts_it_and_says_so(tmp_path, recwarn):
    cb = callback(tmp_path, ForkPlan(every=4, cooldown=Cooldown(steps=2), data="fresh"))
    fit(tmp_path, "forks", cb=cb, data=StreamData(), max_steps=8, **STREAM_KW)
    assert [r["data"] for r in cb.records] == ["fresh (stream restarted from its beginning)"] * 2
    assert [str(w.message) for w in recwarn if "restarts the train stream" in str(w.message)] != []


def test_auto_falling_back_to_fresh_warns_once(tmp_path, recwarn):
    cb = callback(tmp_path, ForkPlan(every=4, cooldown=Cooldown(steps=1)))
    fit(tmp_path, "forks", cb=cb, logger=False)
    assert [r["data"] for r in cb.records] == ["fresh"] * 3
    assert len([w for w in recwarn if "data='auto') cannot peek at this plain DataLoader" in str(w.message)]) == 1


class IteratorStep(CharModel):
    def training_step(self, dataloader_iter):
        batch, batch_idx, _ = next(dataloader_iter)
        return super().training_step(batch, batch_idx)


def test_stream_peek_refused_when_training_step_takes_the_iterator(tmp_path):
    steps = Steps()
    with pytest.raises(CooldownMisconfiguration, match=r"training_step takes the data iterator itself"):
        fit(tmp_path, "run", cb=callback(tmp_path, EVERY_4), model=IteratorStep, data=StreamData(), callbacks=[steps],
            **STREAM_KW)
    assert steps.seen == []


# -- item 12: the cooled and the main validation draw the same random numbers -----------------------
class SamplingValidation(CharModel):
    """``validation_step`` scores a random half of the positions (global RNG), like nanoGPT's estimate_loss."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        keep = torch.randperm(x.shape[1])[: x.shape[1] // 2]
        self.draws.append((self.cb.forking, keep.tolist()))
        loss, _ = self._loss((x[:, keep], y[:, keep]))
        self.log("val_loss", loss)


@pytest.mark.parametrize("where", ["before-validation", "after-unforeseen-validation"])
def test_cooled_validation_draws_what_the_main_validation_draws(tmp_path, where):
    """Each fork's cooled validation (2 batches) sees the same random draws as the main branch's validation
    at that step - also for a fork run after a validation Lightning did not announce (should_stop)."""
    cb = callback(tmp_path, ForkPlan(on_eval=True, cooldown=Cooldown(steps=2)))
    draws: list = []

    class StopAt5(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 5 and where == "after-unforeseen-validation":
                trainer.should_stop = True

    def model():
        m = SamplingValidation()
        m.cb, m.draws = cb, draws
        return m

    # StopAt5 after the callback: at its on_train_batch_end the callback cannot foresee the validation at 5
    fit(tmp_path, "run", model=model, callbacks=[cb, StopAt5()], logger=False, max_steps=8)
    forks = [r["step"] for r in cb.records]
    assert forks == ([4, 8] if where == "before-validation" else [4, 5])
    runs = [draws[i:i + 2] for i in range(0, len(draws), 2)]  # one validation = 2 batches
    assert len(runs) == 2 * len(forks)
    for a, b in zip(runs[::2], runs[1::2]):
        assert {a[0][0], b[0][0]} == {True, False}  # a cooled and a main validation of the same step
        assert [d for _, d in a] == [d for _, d in b]
    assert runs[0][0][1] != runs[2][0][1]  # the draws differ between steps: the check is not vacuous


# -- item 19: progress bars --------------------------------------------------------------------------
class BarMetrics(CharModel):
    def validation_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True)


def _shown(pb) -> dict:
    """What Lightning's bar shows next to the training progress: {name: value}, numbers as TQDM shows them."""
    if isinstance(pb, RichProgressBar):
        return {k: Tqdm.format_num(v) for k, v in pb._metric_component._metrics.items()}
    return dict(p.split("=", 1) for p in (pb.train_progress_bar.postfix or "").split(", ") if "=" in p)


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_progress_bar_labels_cooled_metrics_and_leaves_no_line(tmp_path, bar):
    """The bar listed before the callback: during the main validation right after a fork the bar shows the
    cooled loss only as ``cooldown/val_loss``, never as ``val_loss``; Rich keeps no task of the fork."""
    import io

    def make_bar():
        if bar == "tqdm":
            return TQDMProgressBar()
        return RichProgressBar(console_kwargs=dict(file=io.StringIO(), force_terminal=True, width=200))

    class Spy(Callback):
        def __init__(self, pb) -> None:
            self.pb, self.during, self.after = pb, [], []

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            if batch_idx == 0:
                self.during.append(_shown(self.pb))

        def on_validation_end(self, trainer, pl_module) -> None:
            self.after.append(_shown(self.pb))

    runs = {}
    for name in ("forks", "plain"):
        pb = make_bar()
        spy = Spy(pb)
        cb = callback(tmp_path / name, ForkPlan(on_eval=True, cooldown=Cooldown(steps=2))) if name == "forks" else None
        fit(tmp_path, name, model=BarMetrics, callbacks=[pb] + ([cb] if cb else []) + [spy], enable_progress_bar=True,
            scheduler=None if cb else lambda_scheduler(SCHEDULE), logger=False, max_steps=8)
        runs[name] = (pb, spy, cb)
    pb, spy, cb = runs["forks"]
    cooled = [Tqdm.format_num(r["metrics"]["val_loss"]) for r in cb.records]
    main = [s["val_loss"] for s in runs["plain"][1].after]
    assert len(cooled) == len(main) == 2 and all(c not in main for c in cooled)  # cooled and main values differ
    assert all(shown.get("val_loss") not in cooled for shown in spy.during)  # the main validation after a fork
    assert [s["val_loss"] for s in spy.after] == main
    assert [s["cooldown/val_loss"] for s in spy.after] == cooled  # labelled as the cooled model's
    if bar == "rich":
        tasks = lambda p: [(t.description, t.visible) for t in p.progress.tasks]  # noqa: E731
        assert tasks(pb) == tasks(runs["plain"][0])


# -- item 20: ModelCheckpoint on a cooled metric -----------------------------------------------------
def test_model_checkpoint_monitoring_a_cooled_metric_warns(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "best", monitor="cooldown/val_loss", save_top_k=1)
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(monitor='cooldown/val_loss'\) saves the main branch's "
                                         r"weights.*not a cooled model"):
        fit(tmp_path, "run", cb=callback(tmp_path), callbacks=[ckpt], enable_checkpointing=True, logger=False,
            max_steps=4)


# -- item 22: fast_dev_run ---------------------------------------------------------------------------
def test_fast_dev_run_forks_nothing_and_says_so_once(tmp_path, caplog):
    cb = callback(tmp_path, ForkPlan(every=1, at_end=True, cooldown=Cooldown(steps=1)))
    with caplog.at_level(logging.INFO):
        fit(tmp_path, "run", cb=cb, fast_dev_run=3)
    assert cb.records == [] and not (tmp_path / "cooled").exists()
    assert len([r for r in caplog.records if "fast_dev_run: no forks" in r.getMessage()]) == 1
