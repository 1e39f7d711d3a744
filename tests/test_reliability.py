"""Reliability: faults during forks lose nothing, bad input is refused clearly (core + Accelerate hook).

- kill-and-resume: SIGKILL at seeded points of every phase of a fork (and of the user's own main
  checkpointing), resume, compare bit for bit with an uninterrupted run (harness: ``_kill_harness``);
- non-finite loss / gradient and an exception from the evaluation inside a fork: recorded as failed
  with the step and reason, main branch ``torch.equal`` to a run without forks, later forks fine;
- SIGTERM during a fork: the handler runs only after the main branch is restored;
- unwritable / full output: refused at construction; mid-run the fork fails, the run goes on;
- atomic writes: a failed or killed write leaves nothing partial under a final name;
- resume: a fork finished after the checkpoint is not run (nor recorded) again; a new run is not
  confused by another run's records; the hook drives the LR after ``accelerator.load_state``;
- DDP: a failure on rank 1 inside a fork makes both processes exit non-zero promptly, rank named.

The Lightning and HF adapters add their kill-and-resume trials by adding a name to ``ADAPTERS``
(see ``tests/_kill_harness.py``).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration

import _kill_harness as harness
import _kill_points
from _loops import (assert_equal_states, eval_fn, full_state, loss_fn, make_loader, make_model_opt, train,
                    train_accelerate)
from cooldown_callbacks import Cooldown, ForkPlan, RSqrt
from cooldown_callbacks.engine import ForkError
from cooldown_callbacks.integrations.accelerate import CooldownHook
from cooldown_callbacks.records import RECORDS_NAME, append_record, atomic_save, atomic_write_bytes, read_records

pytestmark = pytest.mark.usefixtures("one_thread")

SCHED = RSqrt(warmup_steps=3)  # the LR changes every step: a stale or leaked LR shows up


# -- kill and resume ----------------------------------------------------------------------------

ADAPTERS = [name for name in ("hook", "lightning", "transformers")
            if Path(__file__).with_name(f"_kill_script_{name}.py").exists()]
SEEDS = (0, 1)
_refs: dict[str, harness.Reference] = {}


@pytest.fixture
def reference(request, tmp_path_factory):
    name = request.param
    if name not in _refs:
        _refs[name] = harness.Reference(f"_kill_script_{name}", tmp_path_factory.mktemp(f"ref-{name}") / "run")
    return _refs[name]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("phase", _kill_points.PHASES)
@pytest.mark.parametrize("reference", ADAPTERS, indirect=True)
def test_sigkill_anywhere_then_resume_equals_uninterrupted_run(reference, phase, seed, tmp_path):
    t0 = time.perf_counter()
    got = harness.trial(reference, tmp_path / "run", phase, seed)
    evidence = {k: v for k, v in got["marker"].items() if k not in ("phase", "n", "pid")}
    print(f"{reference.script} {got['kill']}: died there ({evidence}); cooled at kill {got['cooled_at_kill']}, "
          f"{time.perf_counter() - t0:.2f}s")


@pytest.mark.slow
def test_the_marker_proves_where_a_run_died(tmp_path):
    """A run killed at one point is not taken for a run killed at another (phase or event)."""
    out = tmp_path / "run"
    assert harness.run("_kill_script_hook", out, kill="evaluate:1") == -signal.SIGKILL
    harness.check_marker(out, "evaluate", 1, out / "cooled")
    for phase, n in (("evaluate", 0), ("forward", 1), ("main_step", 1)):
        with pytest.raises(AssertionError, match=rf"died at evaluate:1, not {phase}:{n}"):
            harness.check_marker(out, phase, n, out / "cooled")
    assert harness.run("_kill_script_hook", tmp_path / "clean") == 0  # not killed: no marker
    with pytest.raises(AssertionError, match="killed without writing its marker"):
        harness.check_marker(tmp_path / "clean", "evaluate", 1, tmp_path / "clean" / "cooled")


def test_seeds_take_distinct_kill_points():
    """No two trials of one script and phase kill at the same event; too few events for the seeds is an error."""
    for count in (len(SEEDS), 3, 16, 399):
        points = [harness.kill_point("_kill_script_x", "forward", seed, count) for seed in SEEDS]
        assert len(set(points)) == len(SEEDS) and all(0 <= n < count for n in points)
    with pytest.raises(AssertionError, match=r"phase save_partial occurs 1 time\(s\), too few .* \(seed 1\)"):
        harness.kill_point("_kill_script_x", "save_partial", 1, 1)


# -- faults inside a fork -----------------------------------------------------------------------

def poisoned_loss(model, batch):
    """The user's loss; cooldown batches carry a third element saying which fault to inject."""
    if len(batch) == 2:
        return loss_fn(model, batch)
    x, y, kind = batch
    loss = F.mse_loss(model(x), y)
    if kind == "nan-loss":  # the loss is NaN, the gradients stay finite
        return loss + float("nan")
    if kind == "nan-grad":  # the loss is finite, the gradients are NaN (d sqrt(z)/dz at 0 times 0)
        return loss + (model(x) * 0).abs().sqrt().sum() * 0
    return loss


def cooldown_data(kind, ga):
    """Per fork step: the fork at 5 meets ``kind`` at its 2nd cooldown step (step 6); later forks are clean."""
    g = torch.Generator().manual_seed(7)
    clean = [(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g), "clean") for _ in range(4 * ga)]
    bad = clean[:ga] + [(x, y, kind) for x, y, _ in clean[ga:2 * ga]] + clean[2 * ga:]
    return lambda step: bad if step == 5 else clean


def _raise_in_eval(model):
    raise RuntimeError("eval exploded")


def _main_tensors(state):
    """Parameters, buffers and optimizer state; the LR is re-applied by the hook after each step."""
    return {k: v for k, v in state.items() if k != "lrs"}


def run_loop(loop, steps, plan=None, tmp=None, eval_fn_=eval_fn, ga=1, after=None, **kw):
    """Plain PyTorch or Accelerate loop; without ``plan`` a LambdaLR over SCHED drives the same LRs."""
    torch.manual_seed(0)
    model, opt = make_model_opt()
    acc = None
    if loop == "accelerate":
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        acc = Accelerator(gradient_accumulation_steps=ga, cpu=True,
                          dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
        loader = make_loader(stateful=True)
        model, opt, loader = acc.prepare(model, opt, loader)
    else:
        loader = make_loader()
    hook = None
    if plan is None:
        sched = SCHED.lambda_lr(opt.optimizer if acc is not None else opt)
        step = sched.step
    else:
        hook = CooldownHook(model, opt, schedule=SCHED, plan=plan, loss_fn=poisoned_loss, eval_fn=eval_fn_,
                            train_loader=loader, accelerator=acc, gradient_accumulation_steps=ga,
                            max_grad_norm=0.5, dirpath=tmp, verbose=False, **kw)
        step = hook.step

    def after_step():
        step()
        if after is not None:
            after(hook)

    if acc is None:
        train(model, opt, loader, steps, ga, after_step=after_step)
    else:
        train_accelerate(acc, model, opt, loader, steps, lambda t: after_step())
    return model, opt.optimizer if acc is not None else opt, hook


@pytest.mark.parametrize("loop,ga", [("plain", 1), ("accelerate", 2)])
@pytest.mark.parametrize("fault,reason", [
    ("nan-loss", "non-finite training loss in the cooldown (first at step 6"),
    ("nan-grad", "non-finite gradient in the cooldown (first at step 6"),
    ("eval-exception", "RuntimeError: eval exploded"),
])
def test_fault_in_a_fork_is_recorded_and_the_main_branch_is_untouched(loop, ga, fault, reason, tmp_path):
    ref = full_state(*run_loop(loop, 12, ga=ga)[:2])
    clean_plan = ForkPlan(every=5, cooldown=Cooldown(steps=3), data=cooldown_data("clean", ga))
    run_loop(loop, 12, clean_plan, tmp_path / "clean", ga=ga)
    if fault == "eval-exception":
        calls = []

        def ev(model):  # fails at the first fork only
            calls.append(1)
            return _raise_in_eval(model) if len(calls) == 1 else eval_fn(model)
        plan, evf = clean_plan, ev
    else:
        plan, evf = ForkPlan(every=5, cooldown=Cooldown(steps=3), data=cooldown_data(fault, ga)), eval_fn
    model, opt, hook = run_loop(loop, 12, plan, tmp_path / "faulty", eval_fn_=evf, ga=ga)
    assert_equal_states(ref, full_state(model, opt))
    recs = read_records(tmp_path / "faulty")
    assert [(r["step"], r["status"]) for r in recs] == [(5, "failed"), (10, "ok")]
    assert reason in recs[0]["error"], recs[0]["error"]
    # the failure changed nothing for the next fork: its cooled model equals the one of a run without faults
    name = "cooled-step=00000010-cd=3.pt"
    assert sorted(p.name for p in (tmp_path / "faulty").iterdir()) == [name, RECORDS_NAME]
    a, b = torch.load(tmp_path / "clean" / name), torch.load(tmp_path / "faulty" / name)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_gradient_with_on_fork_error_raise_restores_then_raises(tmp_path):
    ref = full_state(*run_loop("plain", 5)[:2])
    plan = ForkPlan(at=[5], cooldown=Cooldown(steps=3), data=cooldown_data("nan-grad", 1), on_fork_error="raise")
    state = {}

    def after(hook):
        state["hook"] = hook
    with pytest.raises(ForkError, match=r"fork at step 5 failed on rank 0: ForkError: non-finite gradient in the "
                                         r"cooldown \(first at step 6 on this rank\)"):
        run_loop("plain", 5, plan, tmp_path, after=after)
    h = state["hook"]
    assert_equal_states(_main_tensors(ref), _main_tensors(full_state(h.model, h.optimizers[0])))
    assert read_records(tmp_path)[0]["status"] == "failed"


# -- preemption signals -------------------------------------------------------------------------

class Preempted(Exception):
    """What a user's SIGTERM handler might raise to stop the loop."""


def signalling_data(sig):
    """Cooldown batches; the process receives ``sig`` while the fork at step 5 runs its 2nd step."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)) for _ in range(3)]

    def stream(step):
        def gen():
            for i, b in enumerate(batches * 100):
                if step == 5 and i == 1:
                    os.kill(os.getpid(), sig)
                yield b
        return gen()
    return stream


@pytest.mark.parametrize("handler_kind,sig", [("saves-in-handler", signal.SIGTERM), ("raises", signal.SIGTERM),
                                              ("saves-in-handler", signal.SIGUSR1)])  # SLURM's requeue signal
def test_sigterm_during_a_fork_is_handled_after_the_main_branch_is_restored(handler_kind, sig, tmp_path):
    at5 = _main_tensors(full_state(*run_loop("plain", 5)[:2]))
    ref = full_state(*run_loop("plain", 12)[:2])
    seen = {}
    torch.manual_seed(0)
    model, opt = make_model_opt()
    loader = make_loader()
    hook = CooldownHook(model, opt, schedule=SCHED, loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader,
                        plan=ForkPlan(every=5, cooldown=Cooldown(steps=3), data=signalling_data(sig)),
                        max_grad_norm=0.5, dirpath=tmp_path, verbose=False)

    def handler(signum, frame):
        # what a preemption handler does: checkpoint the model right away (Lightning's SLURM handler
        # saves inside the handler), then stop or raise
        seen["state"] = _main_tensors(full_state(model, opt))
        seen["step"] = hook.step_count
        if handler_kind == "raises":
            raise Preempted("SIGTERM")

    old = signal.signal(sig, handler)
    try:
        if handler_kind == "raises":
            with pytest.raises(Preempted):
                train(model, opt, loader, 12, after_step=hook.step)
            assert_equal_states(at5, _main_tensors(full_state(model, opt)))  # restored before the loop saw it
        else:
            train(model, opt, loader, 12, after_step=hook.step)
            assert_equal_states(ref, full_state(model, opt))  # the run went on, unchanged
        assert signal.getsignal(sig) is handler  # the user's handler is back in place
    finally:
        signal.signal(sig, old)
    assert seen["step"] == 5
    assert_equal_states(at5, seen["state"])  # the handler never saw cooled weights
    recs = read_records(tmp_path)
    assert recs[0]["step"] == 5 and recs[0]["status"] == "failed"
    assert recs[0]["error"].startswith(f"interrupted by {sig.name}"), recs[0]["error"]
    assert not (tmp_path / "cooled-step=00000005-cd=3.pt").exists() and not list(tmp_path.glob(".*tmp"))
    if handler_kind == "saves-in-handler":
        assert [(r["step"], r["status"]) for r in recs] == [(5, "failed"), (10, "ok")]


# -- unwritable or full output ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["parent-is-a-file", "is-a-file", "proc"])
def test_unwritable_dirpath_is_refused_before_training(where, tmp_path):
    (tmp_path / "f").write_text("")
    dirpath = {"parent-is-a-file": tmp_path / "f" / "cooled", "is-a-file": tmp_path / "f",
               "proc": Path("/proc/cooldown-callbacks-test")}[where]
    model, opt = make_model_opt()
    with pytest.raises(ValueError, match=r"Invalid dirpath \(.*\): cannot write there .*choose a writable directory"):
        CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=5), loss_fn=loss_fn, eval_fn=eval_fn,
                     train_loader=make_loader(), dirpath=dirpath)


def test_output_dir_lost_mid_run_fails_the_fork_and_training_goes_on(tmp_path):
    ref = full_state(*run_loop("plain", 12)[:2])
    out = tmp_path / "cooled"

    def after(hook):
        if hook.step_count == 3:  # the directory disappears and a file takes its name
            out.rename(tmp_path / "moved")
            out.write_text("not a directory")
        if hook.step_count == 7:  # back
            out.unlink()
            (tmp_path / "moved").rename(out)
    model, opt, hook = run_loop("plain", 12, ForkPlan(every=5, cooldown=Cooldown(steps=2)), out, after=after)
    assert_equal_states(ref, full_state(model, opt))
    assert [(r["step"], r["status"]) for r in hook.records] == [(5, "failed"), (10, "ok")]
    assert "cooled" in hook.records[0]["error"] and "records file not written" in hook.records[0]["error"]
    assert [(r["step"], r["status"]) for r in read_records(out)] == [(10, "ok")]  # 5 could not be written
    assert sorted(p.name for p in out.iterdir()) == ["cooled-step=00000010-cd=2.pt", RECORDS_NAME]


def test_full_records_file_does_not_stop_the_run(tmp_path):
    ref = full_state(*run_loop("plain", 12)[:2])
    (tmp_path / RECORDS_NAME).symlink_to("/dev/full")  # every write: ENOSPC
    model, opt, hook = run_loop("plain", 12, ForkPlan(every=5, cooldown=Cooldown(steps=2)), tmp_path)
    assert_equal_states(ref, full_state(model, opt))
    assert [(r["step"], r["status"]) for r in hook.records] == [(5, "ok"), (10, "ok")]
    assert all("records file not written" in r["error"] and "No space left" in r["error"] for r in hook.records)
    assert (tmp_path / "cooled-step=00000010-cd=2.pt").exists()


def test_checkpoint_write_failing_midway_leaves_nothing_and_training_goes_on(tmp_path):
    """A real short write (file-size limit, as on a full disk) inside torch.save of the cooled model."""
    ref = full_state(*run_loop("plain", 12)[:2])
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def after(hook):
        if hook.step_count == 4:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))  # the fork at 5 cannot write its model
        if hook.step_count == 5:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    try:
        model, opt, hook = run_loop("plain", 12, ForkPlan(every=5, cooldown=Cooldown(steps=2)), tmp_path, after=after)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old)
    assert_equal_states(ref, full_state(model, opt))
    recs = read_records(tmp_path)
    assert [(r["step"], r["status"]) for r in recs] == [(5, "failed"), (10, "ok")]
    assert "RuntimeError" in recs[0]["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cooled-step=00000010-cd=2.pt", RECORDS_NAME]


# -- atomic writes ------------------------------------------------------------------------------

def test_atomic_write_replaces_whole_files_or_nothing(tmp_path):
    final = tmp_path / "a.bin"
    atomic_write_bytes(final, b"old")

    def failing_writer(p):
        p.write_bytes(b"partial")
        raise OSError(28, "disk full")
    with pytest.raises(OSError, match=r"disk full"):
        atomic_save(final, failing_writer)
    assert final.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    atomic_write_bytes(final, b"new")
    assert final.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    folder = tmp_path / "ckpt"
    atomic_save(folder, lambda p: (p / "w.bin").write_bytes(b"1"), is_dir=True)
    atomic_save(folder, lambda p: (p / "w.bin").write_bytes(b"2"), is_dir=True)
    assert (folder / "w.bin").read_bytes() == b"2" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "ckpt"]


def test_sigkill_inside_an_atomic_write_leaves_the_old_file(tmp_path):
    final = tmp_path / "model.pt"
    final.write_bytes(b"finished")
    proc = harness.spawn("_kill_harness", "atomic-write-then-die", str(final))
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert final.read_bytes() == b"finished"
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in tmp_path.iterdir() if p != final)


def test_records_survive_a_torn_line_and_heal_on_the_next_append(tmp_path):
    path = tmp_path / RECORDS_NAME
    append_record(path, {"step": 5, "status": "ok"})
    append_record(path, {"step": 10, "status": "ok"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])  # a crash in the middle of the second line
    assert [r["step"] for r in read_records(path)] == [5]
    append_record(path, {"step": 10, "status": "ok"})
    assert [r["step"] for r in read_records(path)] == [5, 10]
    assert all(json.loads(line) for line in path.read_bytes().splitlines())


# -- resume -------------------------------------------------------------------------------------

def test_resumed_run_does_not_redo_forks_it_finished_and_a_new_run_is_not_confused(tmp_path):
    plan = ForkPlan(every=5, cooldown=Cooldown(steps=2))
    saved = {}

    def after(hook):
        if hook.step_count == 3:  # the last checkpoint before the "crash"
            saved["hook"] = json.loads(json.dumps(hook.state_dict()))
    run_loop("plain", 7, plan, tmp_path, after=after)  # fork at 5 done, then the crash at 7
    assert [r["step"] for r in read_records(tmp_path)] == [5]
    # resume from step 3: the fork at 5 is found finished (same run, checkpoint in place), not run again
    torch.manual_seed(0)
    model, opt = make_model_opt()
    hook = CooldownHook(model, opt, schedule=SCHED, plan=plan, loss_fn=loss_fn, eval_fn=eval_fn,
                        train_loader=make_loader(), dirpath=tmp_path, verbose=False)
    hook.load_state_dict(saved["hook"])
    hook.step_count = 4
    rec = hook.step()
    assert rec.step == 5 and rec.status == "ok" and rec.metrics == read_records(tmp_path)[0]["metrics"]
    assert [r["step"] for r in read_records(tmp_path)] == [5] and 5 in hook.engine.completed
    # a new run in the same folder: another run id, its forks run and are recorded
    run_loop("plain", 5, plan, tmp_path)
    recs = read_records(tmp_path)
    assert [r["step"] for r in recs] == [5, 5] and recs[0]["run"] != recs[1]["run"]


def test_hook_drives_the_lr_after_accelerate_load_state(tmp_path):
    """``optimizer.load_state_dict`` replaces the param-group dicts: the hook must follow them."""

    def run(steps, save_at=None, resume=None):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.manual_seed(0)
        acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
        model, opt = make_model_opt()
        loader = make_loader(stateful=True)
        model, opt, loader = acc.prepare(model, opt, loader)
        hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=4, cooldown=Cooldown(steps=2)),
                            loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader, accelerator=acc,
                            dirpath=tmp_path / ("b" if resume or save_at else "a"), verbose=False)
        acc.register_for_checkpointing(hook)
        t = 0
        if resume:
            acc.load_state(resume)
            t = hook.step_count
        lrs = []
        while t < steps:
            for batch in loader:
                acc.backward(loss_fn(model, batch))
                opt.step()
                opt.zero_grad()
                lrs.append(opt.param_groups[0]["lr"])
                hook.step()
                t += 1
                if t == save_at:
                    acc.save_state(str(tmp_path / "ckpt"))
                if t == steps:
                    break
        return full_state(model, opt.optimizer), lrs

    full, lrs = run(12)
    run(6, save_at=6)
    resumed, lrs2 = run(12, resume=str(tmp_path / "ckpt"))
    assert lrs2 == lrs[6:] and lrs[6] != lrs[7]
    assert_equal_states(full, resumed)
    a = torch.load(tmp_path / "a" / "cooled-step=00000008-cd=2.pt")
    b = torch.load(tmp_path / "b" / "cooled-step=00000008-cd=2.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- distributed --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["train", "save", "kill"])
def test_ddp_failure_on_rank_1_inside_a_fork_stops_both_ranks_promptly(fault, tmp_path):
    port = _free_port()
    t0 = time.perf_counter()
    procs = [harness.spawn("_kill_script_ddp", str(tmp_path), r, 2, port, fault) for r in range(2)]
    for p in procs:
        p.join(max(1.0, 90 - (time.perf_counter() - t0)))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, f"rank(s) {[procs.index(p) for p in alive]} hung after the failure on rank 1"
    elapsed = time.perf_counter() - t0
    codes = [p.exitcode for p in procs]
    assert all(c != 0 for c in codes), codes
    if fault == "kill":
        assert codes[1] == -signal.SIGKILL
    else:
        err1 = (tmp_path / "rank-1.err").read_text()
        assert "fork at step 5 failed on rank 1 of 2" in err1 and "injected" in err1
    err0 = (tmp_path / "rank-0.err").read_text()
    assert "fork at step 5 failed on rank 0 of 2" in err0
    recs = read_records(tmp_path / "cooled")
    assert [(r["step"], r["status"]) for r in recs] == [(5, "failed")]  # rank 0 recorded it before stopping
    assert not list((tmp_path / "cooled").glob("cooled-*")) and not list((tmp_path / "cooled").glob(".*tmp"))
    print(f"DDP fault {fault!r} on rank 1: exit codes {codes} after {elapsed:.1f}s")
