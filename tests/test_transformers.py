"""CooldownTrainerCallback with the real ``transformers.Trainer``: exact main branch, exact cooled runs.

Tiny GPT-2 models built from ``GPT2Config`` (dropout on, so the RNG matters), byte-level language
modelling on the Python standard library's own sources (real text, offline), AdamW with the
Trainer's two param groups, gradient clipping. Every comparison of weights is ``torch.equal``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from transformers import (
    AutoModelForCausalLM,
    EarlyStoppingCallback,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from cooldown_callbacks import WSD, Cooldown, ForkPlan, RSqrt
from cooldown_callbacks.engine import ForkError
from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback
from cooldown_callbacks.records import read_records
import _reference_schedules as reference
from _hf_data import ByteLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from charlm import stdlib_text  # noqa: E402


BLOCK = 32
W = 2  # warmup steps
PLAN = ForkPlan(on_eval=True, cooldown=Cooldown(steps=3, shape="1-sqrt"))


_BYTES = torch.frombuffer(bytearray(stdlib_text(40_000)), dtype=torch.uint8)
TRAIN, EVAL = ByteLM(_BYTES[:36_000], BLOCK), ByteLM(_BYTES[36_000:38_048], BLOCK)


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_thread():
    """Tiny models run fastest on one thread, and the CI machine is shared: no oversubscription.
    Quiet transformers' logs and progress bars; everything is put back for the other test modules."""
    n, verbosity, bars = torch.get_num_threads(), hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    torch.set_num_threads(n)
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


def make_model(dropout: float = 0.1) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(cfg)


def make_args(out, **kw) -> TrainingArguments:
    a = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=4, per_device_eval_batch_size=16,
             eval_strategy="steps", eval_steps=4, logging_steps=2, save_strategy="no", report_to="none",
             disable_tqdm=True, dataloader_num_workers=0, learning_rate=3e-3, weight_decay=0.01, max_grad_norm=0.5,
             use_cpu=True, lr_scheduler_type="constant_with_warmup", warmup_steps=W, seed=7)
    a.update(kw)
    return TrainingArguments(**a)


def train(out, callbacks=(), trainer_cls=Trainer, dropout=0.1, resume=None, trainer_kw=None, **kw) -> Trainer:
    t = trainer_cls(model=make_model(dropout), args=make_args(out, **kw), train_dataset=TRAIN, eval_dataset=EVAL,
                    callbacks=list(callbacks), **(trainer_kw or {}))
    t.train(resume_from_checkpoint=resume)
    return t


def cb(plan=PLAN, schedule=WSD(warmup_steps=W), **kw) -> CooldownTrainerCallback:
    return CooldownTrainerCallback(schedule=schedule, plan=plan, **{"verbose": False, **kw})


def main_log(t: Trainer, after: int = 0) -> list:
    keys = ("loss", "eval_loss", "learning_rate", "grad_norm")
    return [(h["step"], {k: h[k] for k in keys if k in h}) for h in t.state.log_history
            if h["step"] > after and ("loss" in h or "eval_loss" in h)]


def assert_same_main(a: Trainer, b: Trainer, after: int = 0) -> None:
    """Parameters, buffers, every optimizer state tensor and the logged main metrics, bit for bit."""
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    for (n, x), (_, y) in zip(a.model.named_buffers(), b.model.named_buffers()):
        assert torch.equal(x, y), n
    sa, sb = a.optimizer.optimizer.state_dict(), b.optimizer.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)
    assert main_log(a, after) == main_log(b, after)


def load_params(path) -> dict:
    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()}


class ManualLossTrainer(Trainer):
    """A user's own ``compute_loss``: next-byte cross-entropy from the logits."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs)
        logits = out.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return (loss, out) if return_outputs else loss


# -- 1, 2. exact main branch; forks at the evaluation points ------------------------------------------
def _anneal_stream():
    """A user's cooldown stream (ForkPlan(data=iterable)): collated batches of the last training windows."""
    items = [TRAIN[i] for i in range(len(TRAIN) - 16, len(TRAIN))]
    return [{k: torch.stack([it[k] for it in items[j:j + 4]]) for k in items[0]} for j in range(0, 16, 4)]


# trainer arguments (a baseline of its own) or a cooldown data source (same baseline as ga1)
CASES = {"ga1": {}, "ga2": {"gradient_accumulation_steps": 2}, "bf16": {"bf16": True},
         "compute_loss": {"trainer_cls": ManualLossTrainer},
         "data_fresh": {"data": "fresh"}, "data_iterable": {"data": "iterable"},
         "disk_snapshot": {"snapshot_storage": "disk"}}


@pytest.fixture(scope="module")
def ga1_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ga1")
    base = train(d / "base")
    callback = cb()
    forked = train(d / "fork", [callback])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return base, forked, callback


@pytest.mark.parametrize("case", list(CASES))
def test_main_branch_bit_identical_to_run_without_forks(case, ga1_runs, tmp_path):
    kw = dict(CASES[case])
    if case == "ga1":
        base, forked, callback = ga1_runs
    elif "data" in kw:
        data = _anneal_stream() if kw["data"] == "iterable" else kw["data"]
        base, callback = ga1_runs[0], cb(ForkPlan(on_eval=True, cooldown=Cooldown(steps=3), data=data))
        forked = train(tmp_path / "fork", [callback])
    elif "snapshot_storage" in kw:
        base, callback = ga1_runs[0], cb(**kw)
        forked = train(tmp_path / "fork", [callback])
        assert [r["metrics"]["cooldown_loss"] for r in callback.records] == \
            [r["metrics"]["cooldown_loss"] for r in ga1_runs[2].records]  # same cooled models as "cpu"
        assert not list((tmp_path / "fork" / "cooldowns").glob(".snapshot-*"))  # the file was deleted
    else:
        base = train(tmp_path / "base", **kw)
        callback = cb()
        forked = train(tmp_path / "fork", [callback], **kw)
    assert_same_main(base, forked)
    assert [r["step"] for r in callback.records] == [4, 8, 12]
    assert all(r["status"] == "ok" for r in callback.records)
    if case == "bf16":
        assert forked.accelerator.mixed_precision == "bf16"  # autocast on CPU, in the forks too
    if "data" in kw:  # another data source gives another cooled model than the default (peek)
        assert [r["metrics"]["cooldown_loss"] for r in callback.records] != \
            [r["metrics"]["cooldown_loss"] for r in ga1_runs[2].records]
    # the LR the Trainer logs is the LR used: WSD(2) equals lr_scheduler_type="constant_with_warmup"
    lrs = {s: m["learning_rate"] for s, m in main_log(forked) if "learning_rate" in m}
    assert lrs == {2: 1.5e-3, 4: 3e-3, 6: 3e-3, 8: 3e-3, 10: 3e-3, 12: 3e-3}  # step 2 used s(1) = 1/2


SMALL = ByteLM(_BYTES[:20 * BLOCK], BLOCK)  # 20 windows: 5 batches of 4 per epoch


def test_on_eval_with_epoch_strategy_forks_at_epoch_ends(tmp_path):
    kw = dict(eval_strategy="epoch", max_steps=-1, num_train_epochs=2)
    base = Trainer(model=make_model(), args=make_args(tmp_path / "b", **kw), train_dataset=SMALL, eval_dataset=EVAL)
    base.train()
    callback = cb()
    t = Trainer(model=make_model(), args=make_args(tmp_path / "f", **kw), train_dataset=SMALL, eval_dataset=EVAL,
                callbacks=[callback])
    t.train()
    assert_same_main(base, t)
    assert [r["step"] for r in callback.records] == [5, 10]
    assert [h["step"] for h in t.state.log_history if "cooldown_loss" in h] == [5, 10]


def test_on_eval_forks_exactly_at_eval_steps(ga1_runs):
    _, t, callback = ga1_runs
    evals = [h["step"] for h in t.state.log_history if "eval_loss" in h]
    cooled = [h for h in t.state.log_history if "cooldown_loss" in h]
    assert evals == [4, 8, 12] and [h["step"] for h in cooled] == evals
    assert [h["step"] for h in t.state.log_history if "cooldown_steps" in h] == evals
    recs = read_records(Path(t.args.output_dir) / "cooldowns")
    assert [(r["step"], r["cooldown_steps"], r["status"]) for r in recs] == [(4, 3, "ok"), (8, 3, "ok"), (12, 3, "ok")]
    for r, h in zip(recs, cooled):
        assert r["metrics"]["cooldown_loss"] == h["cooldown_loss"]
        assert Path(r["checkpoint"]).name == f"cooled-step={r['step']:08d}-cd=3"
    # the main branch's eval at the same step is attached to the record (in memory, state and file)
    main_evals = [h["eval_loss"] for h in t.state.log_history if "eval_loss" in h]
    assert [r["main_metrics"]["eval_loss"] for r in callback.records] == main_evals
    assert [r["main_metrics"]["eval_loss"] for r in recs] == main_evals
    # cooling helps on this run: every cooled loss is below the main branch's loss at that step
    assert all(r["metrics"]["cooldown_loss"] < r["main_metrics"]["eval_loss"] for r in callback.records)


# -- 6. the cooled model loads with from_pretrained and reproduces its loss ---------------------------
def test_cooled_model_loads_with_from_pretrained(ga1_runs, tmp_path):
    _, t, callback = ga1_runs
    rec = callback.records[1]
    model = AutoModelForCausalLM.from_pretrained(rec["checkpoint"])
    assert type(model).__name__ == "GPT2LMHeadModel"
    evaluator = Trainer(model=model, args=make_args(tmp_path), eval_dataset=EVAL)
    assert evaluator.evaluate()["eval_loss"] == rec["metrics"]["cooldown_loss"]


# -- 3. cooled == a fixed-budget Trainer run with get_wsd_schedule ------------------------------------
class EvalAt(TrainerCallback):
    """Lets a fixed-budget run evaluate where the forking run's main branch did before the fork,
    so both draw the same numbers from the global RNG (evaluation creates DataLoader iterators)."""

    def __init__(self, steps) -> None:
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_evaluate = True
        return control


@pytest.mark.parametrize("ga", [1, 2])
def test_cooled_equals_fixed_budget_wsd_run(ga, tmp_path):
    """Conditions: data='peek' (the default 'auto' here: the Trainer's seedable sampler is replayed),
    the fixed run evaluates at the same steps before the fork (evaluation draws from the RNG; with
    dropout off that condition goes away), same seed and arguments otherwise."""
    c = 3
    callback = cb(ForkPlan(on_eval=True, cooldown=Cooldown(steps=c, shape="1-sqrt")))
    forked = train(tmp_path / "fork", [callback], gradient_accumulation_steps=ga)
    assert [r["step"] for r in callback.records] == [4, 8, 12]
    for rec in callback.records[:2]:
        s = rec["step"]
        fixed = train(tmp_path / f"fixed{s}", [EvalAt({e for e in (4, 8) if e < s})],
                      gradient_accumulation_steps=ga, max_steps=s + c, eval_steps=1000,
                      lr_scheduler_type="warmup_stable_decay",
                      lr_scheduler_kwargs={"num_decay_steps": c, "decay_type": "1-sqrt"})
        final_eval = [h["eval_loss"] for h in fixed.state.log_history if "eval_loss" in h][-1]
        assert rec["metrics"]["cooldown_loss"] == final_eval
        cooled = load_params(rec["checkpoint"])
        for n, p in fixed.model.named_parameters():
            assert torch.equal(cooled[n], p), (s, n)
    assert forked.state.global_step == 12


@pytest.mark.parametrize("s", [2, 3])
def test_peek_crosses_an_epoch_end_with_the_accumulation_remainder(s, tmp_path):
    """5 batches per epoch, gradient accumulation 2: the Trainer groups them (2, 2, 1), 3 steps per
    epoch. A 3-step fork after step 2 cools on the 1-batch remainder of epoch 0, then on epoch 1 (its
    own shuffled order); after step 3 it starts at the epoch end. The replayed sampler gives the fixed
    run's batches, and the seed a new epoch iterator draws from the RNG is drawn too (dropout is on)."""
    callback = cb(ForkPlan(at=[s], cooldown=Cooldown(steps=3, shape="linear")))
    small = dict(gradient_accumulation_steps=2, eval_strategy="no", max_steps=8)
    t = Trainer(model=make_model(), args=make_args(tmp_path / "fork", **small), train_dataset=SMALL,
                eval_dataset=EVAL, callbacks=[callback])
    t.train()
    fixed = Trainer(model=make_model(), args=make_args(tmp_path / "fixed", **dict(small, max_steps=s + 3),
                                                       lr_scheduler_type="warmup_stable_decay",
                                                       lr_scheduler_kwargs={"num_decay_steps": 3,
                                                                            "decay_type": "linear"}),
                    train_dataset=SMALL, eval_dataset=EVAL)
    fixed.train()
    assert [(r["step"], r["status"]) for r in callback.records] == [(s, "ok")]
    assert callback.records[0]["metrics"]["cooldown_loss"] == fixed.evaluate(metric_key_prefix="cooldown")["cooldown_loss"]
    cooled = load_params(callback.records[0]["checkpoint"])
    assert all(torch.equal(cooled[n], p) for n, p in fixed.model.named_parameters())


# -- 4. resume between forks -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    callback = cb()
    t = train(d / "full", [callback], save_strategy="steps", save_steps=6)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return t, callback


@pytest.mark.parametrize("restore", [False, True])
def test_resume_between_forks_equals_uninterrupted_run(restore, uninterrupted, tmp_path):
    full, full_cb = uninterrupted
    # the main branch's own save at a fork step (12) happened, after the fork, with the fork in its state
    last = json.loads((Path(full.args.output_dir) / "checkpoint-12" / "trainer_state.json").read_text())
    assert [r["step"] for r in last["stateful_callbacks"]["CooldownTrainerCallback"]["attributes"]["fork_state"]
            ["records"]] == [4, 8, 12]
    ckpt = tmp_path / "resumed" / "checkpoint-6"
    shutil.copytree(Path(full.args.output_dir) / "checkpoint-6", ckpt)
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["CooldownTrainerCallback"]
    assert [r["step"] for r in saved["attributes"]["fork_state"]["records"]] == [4]
    user_cb = cb()
    t = train(tmp_path / "resumed", [user_cb], resume=str(ckpt), save_strategy="steps", save_steps=6,
              restore_callback_states_from_checkpoint=restore)
    assert_same_main(full, t, after=6)
    active = [c for c in t.callback_handler.callbacks if isinstance(c, CooldownTrainerCallback)]
    assert len(active) == 1 and (active[0] is user_cb) is (not restore)
    assert active[0].trainer is t
    # the history came back (fork 4), forks 8 and 12 ran once; nothing was repeated
    assert [r["step"] for r in active[0].records] == [4, 8, 12]
    assert [r["step"] for r in read_records(tmp_path / "resumed" / "cooldowns")] == [8, 12]
    assert [r["metrics"]["cooldown_loss"] for r in active[0].records] == \
        [r["metrics"]["cooldown_loss"] for r in full_cb.records]
    for mine, ref in zip(active[0].records[1:], full_cb.records[1:]):
        a, b = load_params(mine["checkpoint"]), load_params(ref["checkpoint"])
        assert all(torch.equal(a[n], b[n]) for n in b)


# -- the user's scheduler drives the main branch (schedule=None) --------------------------------------
@pytest.mark.parametrize("kind,kw", [
    ("inverse_sqrt", {"lr_scheduler_type": "inverse_sqrt", "warmup_steps": W}),
    ("wsd_no_decay", {"lr_scheduler_type": "warmup_stable_decay", "warmup_steps": W,
                      "lr_scheduler_kwargs": {"num_decay_steps": 0}}),
])
def test_user_scheduler_drives_main_branch_and_forks_decay_from_current_lr(kind, kw, tmp_path):
    base = train(tmp_path / "base", **kw)
    callback = cb(schedule=None)
    forked = train(tmp_path / "fork", [callback], **kw)
    assert_same_main(base, forked)
    # each fork starts from the LR the main branch would use next: base LR x the user's lambda(step)
    lam = forked.lr_scheduler.lr_lambdas[0]
    assert [r["lr"] for r in callback.records] == [3e-3 * lam(r["step"]) for r in callback.records]
    assert callback.records[0]["lr"] == (3e-3 / math.sqrt(4 / W) if kind == "inverse_sqrt" else 3e-3)


# -- WSD-S (mode="continue") and at_end ---------------------------------------------------------------
class WSDSTrainer(Trainer):
    """A fixed WSD-S run: the Trainer's scheduler is the core's WithCooldowns schedule."""

    wsds = None

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = self.wsds.lambda_lr(optimizer or self.optimizer)
        return self.lr_scheduler


def test_continue_mode_equals_wsds_schedule_and_evaluates_each_cooled_model(tmp_path):
    cd = Cooldown(steps=2, shape="linear")
    callback = cb(ForkPlan(on_eval=True, mode="continue", cooldown=cd))
    forked = train(tmp_path / "fork", [callback])
    # the reference WSD-S schedule, written from the documented formula (no library schedule code)
    WSDSTrainer.wsds = reference.wsds(reference.main_schedule("WSD", W), [2, 6, 10], lambda s: 2, "linear")
    ref = train(tmp_path / "ref", trainer_cls=WSDSTrainer)
    assert_same_main(ref, forked)  # includes the logged LRs (decayed at steps 2, 3, 6, 7, 10, 11)
    assert [(r["step"], r["cooldown_steps"], r["mode"]) for r in callback.records] == \
        [(2, 2, "continue"), (6, 2, "continue"), (10, 2, "continue")]
    # in WSD-S the main branch *is* the cooled model at each evaluation
    main_evals = [h["eval_loss"] for h in forked.state.log_history if "eval_loss" in h]
    assert [r["metrics"]["cooldown_loss"] for r in callback.records] == main_evals


def test_at_end_cools_the_final_model_once(tmp_path):
    callback = cb(ForkPlan(on_eval=False, at_end=True, cooldown=Cooldown(steps=2), record_grad_norms=True))
    t = train(tmp_path / "run", [callback], max_steps=10)
    assert [(r["step"], r["status"]) for r in callback.records] == [(10, "ok")]
    assert (tmp_path / "run" / "cooldowns" / "cooled-step=00000010-cd=2" / "config.json").exists()
    assert t.state.global_step == 10
    # record_grad_norms: the main branch's norms as the Trainer logs them (logging_steps=2), up to the fork
    logged = [h["grad_norm"] for h in t.state.log_history if "grad_norm" in h and h["step"] < 10]
    assert callback.records[0]["grad_norms"] == logged and len(logged) == 4


def test_at_end_after_early_stopping(tmp_path):
    callback = cb(ForkPlan(on_eval=False, at_end=True, cooldown=Cooldown(steps=2)))
    stop = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)
    t = train(tmp_path / "run", [stop, callback], max_steps=40, metric_for_best_model="eval_loss",
              load_best_model_at_end=False)
    assert t.state.global_step == 8  # stopped by the callback after the second evaluation
    assert [r["step"] for r in callback.records] == [8]


# -- reliability: failures inside a fork ---------------------------------------------------------------
class NaNInForkTrainer(Trainer):
    nan_at = 8

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        cbs = [c for c in self.callback_handler.callbacks if isinstance(c, CooldownTrainerCallback)]
        if cbs and cbs[0].in_fork and self.state.global_step == self.nan_at:
            return (out[0] * float("nan"), out[1]) if return_outputs else out * float("nan")
        return out


def test_nan_in_fork_is_recorded_and_main_branch_untouched(ga1_runs, tmp_path):
    base, _, _ = ga1_runs
    callback = cb()
    t = train(tmp_path / "nan", [callback], trainer_cls=NaNInForkTrainer)
    assert_same_main(base, t)
    status = [(r["step"], r["status"]) for r in callback.records]
    assert status == [(4, "ok"), (8, "failed"), (12, "ok")]
    assert "non-finite training loss" in callback.records[1]["error"]
    assert [r["status"] for r in read_records(tmp_path / "nan" / "cooldowns")] == ["ok", "failed", "ok"]
    assert [r["status"] for r in callback.state()["attributes"]["fork_state"]["records"]] == ["ok", "failed", "ok"]
    assert [h["step"] for h in t.state.log_history if "cooldown_failed" in h] == [8]
    assert not (tmp_path / "nan" / "cooldowns" / "cooled-step=00000008-cd=3").exists()


def _metrics_raising_in_fork(holder):
    def compute_metrics(pred):
        if holder[0].in_fork and holder[0].trainer.state.global_step == 8:
            raise RuntimeError("injected failure in compute_metrics")
        return {"accuracy": float((pred.predictions[:, :-1] == pred.label_ids[:, 1:]).mean())}
    return compute_metrics


def _argmax(logits, labels):
    return logits.argmax(-1)


class LogCatcher(TrainerCallback):
    """Sees what ``report_to`` integrations see: every ``on_log`` call."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}, step=state.global_step))


def test_exception_in_cooled_evaluation_is_recorded(tmp_path):
    holder, catcher = [cb()], LogCatcher()
    kw = dict(trainer_kw={"compute_metrics": _metrics_raising_in_fork(holder),
                          "preprocess_logits_for_metrics": _argmax})
    base = train(tmp_path / "base", **kw)
    t = train(tmp_path / "err", [catcher, holder[0]], **kw)
    assert_same_main(base, t)
    # logging integrations receive the cooled metrics (and the failure) like any other log
    assert [x["step"] for x in catcher.logs if "cooldown_loss" in x] == [4, 12]
    assert [x["step"] for x in catcher.logs if "cooldown_failed" in x] == [8]
    assert [(r["step"], r["status"]) for r in holder[0].records] == [(4, "ok"), (8, "failed"), (12, "ok")]
    assert "injected failure in compute_metrics" in holder[0].records[1]["error"]
    # compute_metrics applies to the cooled evaluation
    assert [h["step"] for h in t.state.log_history if "cooldown_accuracy" in h] == [4, 12]
    assert [h["step"] for h in t.state.log_history if "eval_accuracy" in h] == [4, 8, 12]


def test_on_fork_error_raise_restores_then_raises(tmp_path):
    at8 = train(tmp_path / "base", max_steps=8)
    callback = cb(ForkPlan(on_eval=True, cooldown=Cooldown(steps=3), on_fork_error="raise"))
    t = NaNInForkTrainer(model=make_model(), args=make_args(tmp_path / "raise"), train_dataset=TRAIN,
                         eval_dataset=EVAL, callbacks=[callback])
    with pytest.raises(ForkError, match=r"fork at step 8 failed.*non-finite training loss"):
        t.train()
    assert t.state.global_step == 8
    assert_same_main(at8, t, after=100)  # weights and optimizer as the main branch left them at step 8
    assert [r["status"] for r in read_records(tmp_path / "raise" / "cooldowns")] == ["ok", "failed"]


# -- bad input: ValueError naming the argument, before any step ---------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": "wsd"}, "Invalid schedule"),
    ({"plan": "every=10"}, "Invalid plan"),
    ({"plan": ForkPlan(every=5, mode="continue"), "schedule": None}, r"Invalid schedule \(None\).*mode='continue'"),
    ({"metric_key_prefix": "eval"}, "Invalid metric_key_prefix"),
    ({"snapshot_storage": "gpu"}, "Invalid snapshot_storage"),
    ({"filename": "cooled-{epoch}"}, "Invalid filename"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CooldownTrainerCallback(**kwargs)


def test_unwritable_dirpath(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(ValueError, match="Invalid dirpath"):
        CooldownTrainerCallback(schedule=WSD(), dirpath=f / "sub")


@pytest.mark.parametrize("setup,match", [
    (dict(plan=ForkPlan(every=4), eval_dataset=None, eval_strategy="no"), "needs eval_dataset"),
    (dict(eval_strategy="no"), "eval_strategy='no'"),
    (dict(plan=ForkPlan(on_eval=True, mode="continue"), eval_strategy="epoch"), "needs eval_strategy='steps'"),
    (dict(plan=ForkPlan(every=4, data="peek"), train_sampling_strategy="group_by_length"), r"data='peek'"),
])
def test_bad_setup_fails_before_the_first_step(setup, match, tmp_path):
    setup = dict(setup)
    callback = cb(setup.pop("plan", PLAN))
    ev = setup.pop("eval_dataset", EVAL)
    t = Trainer(model=make_model(), args=make_args(tmp_path, **setup), train_dataset=TRAIN, eval_dataset=ev,
                callbacks=[callback])
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        t.train()
    assert t.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters())


def test_each_callback_finds_its_own_trainer(tmp_path):
    a, b = cb(), cb()
    ta = Trainer(model=make_model(), args=make_args(tmp_path / "a"), train_dataset=TRAIN, eval_dataset=EVAL,
                 callbacks=[a])
    tb = Trainer(model=make_model(), args=make_args(tmp_path / "b"), train_dataset=TRAIN, eval_dataset=EVAL)
    tb.add_callback(b)  # added after __init__: found at on_train_begin (or bound by attach)
    assert a.trainer is ta and b.trainer is None
    assert b.attach(tb) is b and b.trainer is tb
    c = cb()
    assert c.attach(ta).trainer is ta and any(x is c for x in ta.callback_handler.callbacks)


def test_state_round_trips_through_json():
    callback = CooldownTrainerCallback(schedule=RSqrt(warmup_steps=10, timescale=50),
                                       plan=ForkPlan(at=[5, 9], cooldown=Cooldown(fraction=0.25, shape="linear")),
                                       metric_key_prefix="cooled")
    st = json.loads(json.dumps(callback.state()))
    again = CooldownTrainerCallback(**st["args"])
    assert again.schedule == callback.schedule and again.plan == callback.plan
    assert again.state() == callback.state()


# -- the example -------------------------------------------------------------------------------------
def test_example_quick_mode_prints_budget_table(tmp_path, capsys):
    import hf_trainer_charlm  # examples/ is on sys.path (see the top of this file)

    records = hf_trainer_charlm.main(["--quick", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "main eval loss" in out and "cooled eval loss" in out
    rows = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit() and len(ln.split()) == 6]
    assert [int(r[0]) for r in rows] == [20, 40, 60] == [r["step"] for r in records]
    assert all(float(r[4]) < float(r[3]) for r in rows)  # each cooled model beats the main branch there
    assert [r["step"] for r in read_records(tmp_path / "cooldowns")] == [20, 40, 60]
    assert "sample from the cooled model" in out


def test_example_help(capsys):
    import hf_trainer_charlm

    with pytest.raises(SystemExit, match="0"):
        hf_trainer_charlm.main(["--help"])
    out = capsys.readouterr().out
    assert "--max-steps" in out and "--quick" in out
