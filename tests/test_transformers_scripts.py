"""What users of real HF scripts (run_clm.py, TRL's SFTTrainer) hit, with the real ``transformers.Trainer``
(issue 13): runs that share an output_dir, resume after a crash, two callbacks, streaming data, the data
source in the records, random evaluation batches, schedule/warmup messages, the final model, the
progress bar, and TRL's metrics accumulated in ``compute_loss``.

Same tiny GPT-2 and byte-level data as ``test_transformers.py`` (helpers imported from there).
"""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
from accelerate.state import GradientState
from transformers import Trainer, TrainerCallback

from cooldown_callbacks import WSD, Cooldown, ForkPlan
from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback
from cooldown_callbacks.records import read_records
from _hf_data import ByteLM, ByteStream
from test_transformers import (BLOCK, EVAL, PLAN, TRAIN, W, LogCatcher, _BYTES, assert_same_main, cb, load_params,
                               main_log, make_args, make_model, train)
from test_transformers import _quiet_single_thread  # noqa: F401  (autouse: one thread, quiet transformers)

LOGGER = "cooldown_callbacks.integrations.transformers"


def weights(model: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# -- item 1: a fresh run never writes over another run's cooled models; item 3: resume in place -------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run that saved checkpoint-6 and then forked at 8 and 12: as if it crashed after step 12."""
    out = tmp_path_factory.mktemp("shared") / "out"
    callback = cb()
    t = train(out, [callback], save_strategy="steps", save_steps=6)
    return out, t, callback


def test_fresh_run_into_a_used_output_dir_is_refused_before_the_first_step(finished_run, tmp_path):
    out, _, first = finished_run
    records_before = (out / "cooldowns" / "forks.jsonl").read_bytes()
    t = Trainer(model=make_model(), args=make_args(out), train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[cb()])
    before = weights(t.model)
    with pytest.raises(ValueError, match=r"Invalid dirpath \('.*out/cooldowns'\): it holds the cooled models and "
                                         r"forks.jsonl of another run .*default dirpath, <output_dir>/cooldowns: use "
                                         r"a new output_dir, pass dirpath=.*resume_from_checkpoint"):
        t.train()
    assert t.state.global_step == 0 and same_weights(before, weights(t.model))
    assert (out / "cooldowns" / "forks.jsonl").read_bytes() == records_before  # the first run's records are intact
    # a dirpath of its own works (and a fresh folder is claimed by nobody)
    ok = train(out, [cb(dirpath=tmp_path / "mine")], max_steps=4)
    assert [r["step"] for r in read_records(tmp_path / "mine")] == [4] and ok.state.global_step == 4


def test_resume_in_place_takes_back_finished_forks_and_publishes_them_once(finished_run, capsys):
    """Resume from checkpoint-6 in the same output_dir: forks 8 and 12 finished before the 'crash' (their
    records and folders are there), so they are taken back, not run again; the lines say so; their metrics
    reach log_history and report_to once; the main branch goes on exactly."""
    out, full, first = finished_run
    catcher = LogCatcher()
    records_before = read_records(out / "cooldowns")
    callback = cb(verbose=True)
    t = train(out, [catcher, callback], resume=str(out / "checkpoint-6"), save_strategy="steps", save_steps=6)
    assert_same_main(full, t, after=6)
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if ln.startswith("[cooldown] step")]
    assert len(lines) == 2 and all("restored from the records (finished before the restart)" in ln for ln in lines)
    assert not re.search(r" in \d+\.\ds", printed)  # not the old fork's duration
    by_step = {r["step"]: r for r in first.records}
    for s in (8, 12):
        rows = [h for h in t.state.log_history if h["step"] == s and "cooldown_loss" in h]
        assert len(rows) == 1 and rows[0]["cooldown_loss"] == by_step[s]["metrics"]["cooldown_loss"]
        assert rows[0]["cooldown_restored"] == 1.0
        assert [x["cooldown_loss"] for x in catcher.logs if x["step"] == s and "cooldown_loss" in x] == \
            [by_step[s]["metrics"]["cooldown_loss"]]
    assert [(r["step"], r.get("restored", False)) for r in callback.records] == [(4, False), (8, True), (12, True)]
    after = read_records(out / "cooldowns")
    assert [r["step"] for r in after] == [r["step"] for r in records_before] == [4, 8, 12]  # nothing recorded twice
    assert [r["metrics"] for r in after] == [r["metrics"] for r in records_before]


# -- item 2: records pair cooled and main metrics by name ----------------------------------------------------
def test_records_hold_cooled_and_main_metrics_under_pairable_names(finished_run):
    _, _, first = finished_run
    for r in read_records(first._engine.dirpath):
        assert r["metrics"] and all(k.startswith("cooldown_") for k in r["metrics"])
        assert r["main_metrics"] and all(k.startswith("eval_") for k in r["main_metrics"])
        cooled = {k[len("cooldown_"):] for k in r["metrics"]}
        main = {k[len("eval_"):] for k in r["main_metrics"]}
        assert "loss" in cooled & main


# -- item 5: two LR-driving callbacks (or a shared folder or prefix) are refused -----------------------------
@pytest.mark.parametrize("second,match", [
    (dict(dirpath="b", metric_key_prefix="cd2"), r"Invalid callbacks: 2 CooldownTrainerCallbacks with a schedule.*"
                                                 r"ForkPlan\(cooldown=\[\.\.\.\]\)"),
    (dict(schedule=None, metric_key_prefix="cd2"), r"Invalid dirpath .*write there.*its own dirpath"),
    (dict(schedule=None, dirpath="b"), r"Invalid metric_key_prefix \('cooldown'\).*its own metric_key_prefix"),
])
def test_two_callbacks_that_would_mix_are_refused_before_the_first_step(second, match, tmp_path):
    second = {k: (str(tmp_path / v) if k == "dirpath" else v) for k, v in second.items()}
    t = Trainer(model=make_model(), args=make_args(tmp_path / "out"), train_dataset=TRAIN, eval_dataset=EVAL,
                callbacks=[cb(), cb(**second)])
    before = weights(t.model)
    with pytest.raises(ValueError, match=match):
        t.train()
    assert t.state.global_step == 0 and same_weights(before, weights(t.model))
    assert not (tmp_path / "out" / "cooldowns" / "forks.jsonl").exists()


def test_a_second_callback_without_schedule_forks_from_the_first_ones_lr(tmp_path):
    a, b = cb(), cb(schedule=None, dirpath=tmp_path / "b", metric_key_prefix="cd2")
    t = train(tmp_path / "out", [a, b])
    assert [r["step"] for r in a.records] == [r["step"] for r in b.records] == [4, 8, 12]
    assert [r["lr"] for r in b.records] == [3e-3, 3e-3, 3e-3]  # WSD(2) after warmup: what the main branch uses
    assert all(h["step"] in (4, 8, 12) for h in t.state.log_history if "cd2_loss" in h)


# -- item 12: the cooled evaluation sees the same random draws as the main evaluation ------------------------
def _random_metric(pred):
    """Like nanoGPT's estimate_loss, an evaluation that samples at random (here: one draw it reports)."""
    return {"draw": float(torch.randint(0, 2**30, ()).item())}


def test_cooled_and_main_evaluations_draw_the_same_random_numbers(tmp_path):
    callback = cb()
    t = train(tmp_path / "out", [callback], trainer_kw={"compute_metrics": _random_metric,
                                                         "preprocess_logits_for_metrics": lambda lg, lb: lg[:, :1]})
    main = {h["step"]: h["eval_draw"] for h in t.state.log_history if "eval_draw" in h}
    cooled = {h["step"]: h["cooldown_draw"] for h in t.state.log_history if "cooldown_draw" in h}
    assert sorted(main) == sorted(cooled) == [4, 8, 12]
    assert cooled == main  # the cooldown's dropout draws did not shift the evaluation's
    assert len(set(main.values())) == 3  # and they are random draws, not a constant
    assert [r["metrics"]["cooldown_draw"] for r in callback.records] == [main[s] for s in (4, 8, 12)]


# -- items 14, 15: the schedule replaces lr_scheduler_type, says so once, and is recorded ---------------------
def test_replacing_a_decaying_scheduler_warns_once_and_the_model_card_names_the_schedule(tmp_path, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    t = train(tmp_path / "out", [cb()], lr_scheduler_type="linear", warmup_steps=0)
    msgs = warnings_of(caplog)
    assert len([m for m in msgs if "replaces lr_scheduler_type='linear'" in m]) == 1
    assert not any("SchedulerType" in m for m in msgs)
    lrs = {s: m["learning_rate"] for s, m in main_log(t) if "learning_rate" in m}
    assert lrs[12] == 3e-3  # no linear decay to max_steps
    t.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- lr_scheduler_type: WSD(warmup_steps=2" in card and "replaces 'linear'" in card
    assert "- lr_scheduler_type: linear" not in card
    t.save_state()
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["CooldownTrainerCallback"]["args"]["schedule"] == WSD(W).to_dict()


def test_schedule_none_with_a_decaying_scheduler_names_it_plainly(tmp_path, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    train(tmp_path / "out", [cb(schedule=None)], lr_scheduler_type="linear", max_steps=4)
    msgs = [m for m in warnings_of(caplog) if "keeps lr_scheduler_type=" in m]
    assert len(msgs) == 1 and "lr_scheduler_type='linear'" in msgs[0] and "SchedulerType" not in msgs[0]


@pytest.mark.parametrize("trainer_warmup,warns", [(2.0, False), (3, True)])
def test_trainer_warmup_passed_to_the_schedule(trainer_warmup, warns, tmp_path, caplog):
    """transformers 5 types warmup_steps as a float (2.0): WSD(warmup_steps=args.warmup_steps) works and
    equals WSD(2); only a warmup the schedule does not use is reported as ignored."""
    caplog.set_level(logging.WARNING, LOGGER)
    args = make_args(tmp_path / "out", warmup_steps=trainer_warmup)
    callback = CooldownTrainerCallback(schedule=WSD(warmup_steps=2.0 if not warns else W), plan=PLAN, verbose=False)
    t = Trainer(model=make_model(), args=args, train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[callback])
    t.train()
    ignored = [m for m in warnings_of(caplog) if "warmup" in m and "ignored" in m]
    assert bool(ignored) is warns
    if warns:
        assert "(3 steps) is ignored" in ignored[0]
    lrs = {s: m["learning_rate"] for s, m in main_log(t) if "learning_rate" in m}
    assert lrs[2] == 1.5e-3 and lrs[4] == 3e-3  # WSD(2) either way
    assert callback.state()["args"]["schedule"]["warmup_steps"] == 2 and json.dumps(callback.state())


# -- item 17: end on the cooled final model (opt-in) ---------------------------------------------------------
def test_final_model_cooled_makes_the_trainer_end_on_the_cooled_model(tmp_path, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    plan = ForkPlan(on_eval=True, at_end=True, cooldown=Cooldown(steps=3))
    callback = cb(plan, final_model="cooled", verbose=True)
    t = train(tmp_path / "out", [callback], save_strategy="steps", save_steps=12)
    assert not [m for m in warnings_of(caplog) if "saved nowhere" in m]
    rec = callback.records[-1]
    assert rec["step"] == 12 and rec["status"] == "ok"
    cooled = load_params(rec["checkpoint"])
    assert all(torch.equal(cooled[n], p) for n, p in t.model.named_parameters())
    # what run_clm does after train(): save, evaluate, model card - all of the cooled model
    assert t.evaluate()["eval_loss"] == rec["metrics"]["cooldown_loss"]
    t.save_model(str(tmp_path / "final"))
    saved = load_params(tmp_path / "final")
    assert all(torch.equal(saved[n], cooled[n]) for n in cooled)
    # the main branch stays in the last checkpoint
    main = load_params(tmp_path / "out" / "checkpoint-12")
    assert any(not torch.equal(main[n], cooled[n]) for n in cooled)


def test_final_model_cooled_without_checkpoints_warns_that_the_main_branch_is_saved_nowhere(tmp_path, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    plan = ForkPlan(at_end=True, cooldown=Cooldown(steps=2))
    train(tmp_path / "out", [cb(plan, final_model="cooled")], max_steps=4, eval_strategy="no")
    assert len([m for m in warnings_of(caplog) if "main branch's final weights are saved nowhere" in m]) == 1


def test_final_model_main_is_the_default_and_keeps_the_main_branch(ga1_base, tmp_path):
    plan = ForkPlan(on_eval=True, at_end=True, cooldown=Cooldown(steps=3))
    t = train(tmp_path / "out", [cb(plan)])
    assert same_weights(weights(ga1_base.model), weights(t.model))


@pytest.fixture(scope="module")
def ga1_base(tmp_path_factory):
    return train(tmp_path_factory.mktemp("base") / "base")


@pytest.mark.parametrize("kwargs,setup,match", [
    (dict(final_model="cooled"), {}, r"Invalid final_model \('cooled'\).*at_end=True"),
    (dict(final_model="last"), {}, r"Invalid final_model \('last'\)"),
    (dict(plan=ForkPlan(at_end=True, cooldown=Cooldown(steps=2)), final_model="cooled"),
     dict(load_best_model_at_end=True, save_strategy="steps", save_steps=4), r"load_best_model_at_end=True"),
    (dict(trainer_attributes="_metrics"), {}, r"Invalid trainer_attributes \('_metrics'\)"),
    (dict(trainer_attributes=["_no_such"]), {}, r"Invalid trainer_attributes.*has no attribute '_no_such'"),
])
def test_bad_final_model_or_trainer_attributes(kwargs, setup, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        t = Trainer(model=make_model(), args=make_args(tmp_path, **setup), train_dataset=TRAIN, eval_dataset=EVAL,
                    callbacks=[cb(**kwargs)])
        t.train()


# -- item 18: the [cooldown] line goes through the progress bar ----------------------------------------------
def test_fork_line_is_written_through_the_progress_bar(tmp_path):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from transformers.utils import logging as hf_logging

    out = io.StringIO()
    hf_logging.enable_progress_bar()
    try:
        with redirect_stdout(out), redirect_stderr(out):  # a terminal: the bar and the line share one screen
            train(tmp_path / "out", [cb(verbose=True)], disable_tqdm=False, max_steps=8)
    finally:
        hf_logging.disable_progress_bar()
    text = out.getvalue()
    assert text.count("[cooldown] step") == 2 and "it/s" in text  # a bar was drawn
    for m in re.finditer(r"\[cooldown\] step", text):
        # tqdm.write clears the bar line first: the line starts a fresh line, never follows the bar's text
        assert m.start() == 0 or text[m.start() - 1] in "\r\n", text[max(0, m.start() - 80):m.start() + 20]


# -- item 7, T2: streaming data; where cooldown data came from -----------------------------------------------
def stream_train(out, callbacks=(), stream=None, **kw) -> Trainer:
    kw = {"eval_strategy": "no", "max_steps": 8, **kw}
    t = Trainer(model=make_model(), args=make_args(out, **kw), train_dataset=stream, eval_dataset=EVAL,
                callbacks=list(callbacks))
    t.train()
    return t


@pytest.mark.parametrize("shared,ga", [(False, 1), (True, 1), (True, 2)])
def test_stream_forks_cool_on_the_main_branchs_upcoming_batches(shared, ga, tmp_path):
    """data='auto' on an IterableDataset: the fork draws the main branch's next batches from its epoch
    iterator and hands them back. The main branch is bit-identical to a run without forks, even when the
    stream's iterators share one read position, and the cooled model equals a fixed-budget run (S + c steps,
    WSD decay) on the same stream: it cooled on the batches the main branch was about to see."""
    base = stream_train(tmp_path / "base", stream=ByteStream(TRAIN, shared=shared), gradient_accumulation_steps=ga)
    callback = cb(ForkPlan(at=[4], cooldown=Cooldown(steps=3, shape="1-sqrt")))
    t = stream_train(tmp_path / "fork", [callback], stream=ByteStream(TRAIN, shared=shared),
                     gradient_accumulation_steps=ga)
    assert_same_main(base, t)
    [rec] = callback.records
    assert (rec["step"], rec["status"], rec["data"]) == (4, "ok", "peek")
    fixed = stream_train(tmp_path / "fixed", stream=ByteStream(TRAIN, shared=shared), gradient_accumulation_steps=ga,
                         max_steps=7, lr_scheduler_type="warmup_stable_decay",
                         lr_scheduler_kwargs={"num_decay_steps": 3, "decay_type": "1-sqrt"})
    cooled = load_params(rec["checkpoint"])
    assert all(torch.equal(cooled[n], p) for n, p in fixed.model.named_parameters())
    assert "get_batch_samples" not in vars(t)  # the Trainer is left as it was


@pytest.mark.parametrize("data,stream,setup,source,warning", [
    ("auto", False, {}, "peek", None),
    ("auto", True, {}, "peek", None),
    ("auto", False, {"train_sampling_strategy": "group_by_length"}, "fresh", "the training order cannot be replayed"),
    ("fresh", False, {}, "fresh", None),
    ("fresh", True, {}, "fresh (stream restarted from its beginning)", "restarts the stream from its beginning"),
    ("iterable", False, {}, "iterable", None),
])
def test_records_say_where_cooldown_data_came_from(data, stream, setup, source, warning, tmp_path, caplog):
    """T2: each record names its data source; a source that is not the main branch's upcoming batches is
    warned about once (a stream is restarted only under data='fresh', and that says so too)."""
    caplog.set_level(logging.WARNING, LOGGER)
    if data == "iterable":
        data = [{k: torch.stack([TRAIN[i][k] for i in range(j, j + 4)]) for k in ("input_ids", "labels")}
                for j in (0, 4)]
    callback = cb(ForkPlan(at=[2, 4], cooldown=Cooldown(steps=2), data=data))
    stream_train(tmp_path / "out", [callback], stream=ByteStream(TRAIN) if stream else TRAIN, max_steps=4, **setup)
    assert [r["data"] for r in callback.records] == [source, source]
    assert [r["data"] for r in read_records(tmp_path / "out" / "cooldowns")] == [source, source]
    msgs = [m for m in warnings_of(caplog) if "data" in m]
    assert len(msgs) == (warning is not None) and (warning is None or warning in msgs[0])


def test_stream_whose_batches_draw_random_numbers_is_never_peeked(tmp_path):
    """A stream whose batches draw from the global RNG cannot be drawn ahead exactly: seen on the main
    branch (from its second batch), every fork is refused with the reason; the main branch is untouched."""
    base = stream_train(tmp_path / "base", stream=ByteStream(TRAIN, noisy=True))
    callback = cb(ForkPlan(at=[4], cooldown=Cooldown(steps=3)))
    t = stream_train(tmp_path / "fork", [callback], stream=ByteStream(TRAIN, noisy=True))
    assert_same_main(base, t)
    [rec] = callback.records
    assert rec["status"] == "failed" and "drew from the global random number generator (at step 1" in rec["error"]
    assert "data='fresh'" in rec["error"]


def test_a_fork_that_finds_the_stream_drawing_random_numbers_stops_training(tmp_path):
    """The first batches a fork draws are the first to show it (a fork after step 1): the main branch's
    next batches are no longer the ones it would have had, so training stops there, saying why."""
    callback = cb(ForkPlan(at=[1], cooldown=Cooldown(steps=2)))
    t = Trainer(model=make_model(), args=make_args(tmp_path, eval_strategy="no", max_steps=4),
                train_dataset=ByteStream(TRAIN, noisy=True), eval_dataset=EVAL, callbacks=[callback])
    with pytest.raises(RuntimeError, match=r"fork at step 1 drew the main branch's next batches.*training stops here"):
        t.train()
    assert t.state.global_step == 1


def test_a_fork_past_the_end_of_the_stream_fails_and_hands_its_batches_back(tmp_path):
    """10 windows, batches of 4: each pass of the stream has 3 batches. A 3-step fork after step 2 finds
    one batch left: it fails with the reason, and that batch goes back to the main branch."""
    short = ByteLM(_BYTES[:10 * BLOCK], BLOCK)
    seen = [LoaderState(), LoaderState()]
    base = stream_train(tmp_path / "base", [seen[0]], stream=ByteStream(short), max_steps=5)
    callback = cb(ForkPlan(at=[2], cooldown=Cooldown(steps=3)))
    t = stream_train(tmp_path / "fork", [callback, seen[1]], stream=ByteStream(short), max_steps=5)
    assert_same_main(base, t)
    [rec] = callback.records
    assert rec["status"] == "failed" and "no batch left in this pass: it ended after 1 cooldown step(s)" in rec["error"]
    assert t.state.global_step == 5
    # accelerate's view of the epoch (its last-batch flag, the loaders it tracks) moves as without the fork
    assert seen[1].states == seen[0].states and (2, False, 1) in seen[0].states and (3, True, 1) in seen[0].states


class LoaderState(TrainerCallback):
    """What other callbacks and accelerate see after each step: ``(step, end_of_dataloader, tracked loaders)``."""

    def __init__(self) -> None:
        self.states: list[tuple] = []
        self.start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = len(GradientState().dataloader_references)  # accelerate's state is process-wide

    def on_step_end(self, args, state, control, **kwargs):
        gs = GradientState()
        self.states.append((state.global_step, gs.end_of_dataloader, len(gs.dataloader_references) - self.start))


# -- T1: TRL's SFTTrainer accumulates metrics in compute_loss; forks keep out of them -------------------------
def sft_run(out, callbacks=()):
    """SFTTrainer as in TRL's quick start, offline: a tiny GPT-2 from its config, a word-level tokenizer over
    bytes built here, pre-tokenized byte windows as the dataset."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    vocab = {f"<{i}>": i for i in range(256)} | {"<pad>": 256, "<eos>": 257}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")),
                                  pad_token="<pad>", eos_token="<eos>")
    rows = lambda ds, n: Dataset.from_dict({"input_ids": [ds[i]["input_ids"].tolist() for i in range(n)]})  # noqa: E731
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=258, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2))
    args = SFTConfig(output_dir=str(out), max_steps=12, per_device_train_batch_size=4, per_device_eval_batch_size=16,
                     eval_strategy="steps", eval_steps=4, logging_steps=2, save_strategy="no", report_to="none",
                     disable_tqdm=True, use_cpu=True, learning_rate=3e-3, lr_scheduler_type="constant_with_warmup",
                     warmup_steps=W, seed=7, max_length=None, dataloader_num_workers=0)
    t = SFTTrainer(model=model, args=args, train_dataset=rows(TRAIN, 256), eval_dataset=rows(EVAL, 32),
                   processing_class=tok, callbacks=list(callbacks))
    t.train()
    return t


def test_trl_sft_trainer_metrics_are_not_polluted_by_forks(tmp_path, monkeypatch):
    if os.environ.get("CI"):  # the dev extra installs trl: in CI its absence is a failure, never a skip
        import trl  # noqa: F401
    pytest.importorskip("trl")
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = sft_run(tmp_path / "base")
    callback = cb()
    t = sft_run(tmp_path / "fork", [callback])
    assert [(r["step"], r["status"]) for r in callback.records] == [(4, "ok"), (8, "ok"), (12, "ok")]
    assert same_weights(weights(base.model), weights(t.model))
    timing = ("runtime", "per_second")

    def main_rows(tr):
        return [{k: v for k, v in h.items() if not any(x in k for x in timing)} for h in tr.state.log_history
                if not any(k.startswith("cooldown_") for k in h) and "train_loss" not in h]

    # every main row - loss, entropy, mean_token_accuracy, num_tokens, and the eval rows - as without forks
    assert main_rows(t) == main_rows(base)
    assert any("entropy" in h and "num_tokens" in h for h in main_rows(t))
    for h in t.state.log_history:
        if "cooldown_steps" in h:  # the callback's own row carries nothing of the main branch's
            assert set(h) <= {"cooldown_steps", "cooldown_seconds", "step", "epoch"}, h
        if "cooldown_loss" in h:  # the cooled evaluation: TRL's extras under the cooled prefix
            assert not any(k.startswith("eval_") for k in h) and "cooldown_entropy" in h, h
    for r in callback.records:  # pairable by name: cooled cooldown_entropy with main eval_entropy
        assert "cooldown_entropy" in r["metrics"] and "eval_entropy" in r["main_metrics"]
        assert "cooldown_mean_token_accuracy" in r["metrics"]


# -- several cooldowns per fork point (ForkPlan(cooldown=[...])) with the items above -------------------------
TWO = [Cooldown(steps=2, shape="linear"), Cooldown(steps=3, shape="1-sqrt")]


def test_several_cooldowns_final_model_and_resume_in_place(tmp_path, capsys):
    """final_model='cooled' with two cooldowns per fork point ends on the last one in the plan's order; a resume
    in place takes both back, logging each once under its own label."""
    plan = ForkPlan(at=[4, 8], at_end=True, cooldown=TWO)
    callback = cb(plan, final_model="cooled")
    out = tmp_path / "out"
    t = train(out, [callback], eval_strategy="no", max_steps=8, save_strategy="steps", save_steps=4)
    labels = [r["label"] for r in callback.records]
    assert len(set(labels)) == 2 and [r["step"] for r in callback.records] == [4, 4, 8, 8]
    last = callback.records[-1]
    cooled = load_params(last["checkpoint"])
    assert all(torch.equal(cooled[n], p) for n, p in t.model.named_parameters())
    catcher = LogCatcher()
    again = cb(plan, verbose=True)
    train(out, [catcher, again], eval_strategy="no", max_steps=8, save_strategy="steps", save_steps=4,
          resume=str(out / "checkpoint-4"))
    assert [(r["step"], r["label"], r.get("restored", False)) for r in again.records] == \
        [(4, labels[0], False), (4, labels[1], False), (8, labels[0], True), (8, labels[1], True)]
    for r in callback.records[2:]:
        assert [x[f"cooldown_{r['label']}_loss"] for x in catcher.logs if f"cooldown_{r['label']}_restored" in x] == \
            [r["metrics"]["cooldown_loss"]]
    assert capsys.readouterr().out.count("restored from the records") == 2
