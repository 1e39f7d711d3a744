"""Reliability of the Lightning and HF Trainer adapters: what ``test_reliability.py`` and
``test_soak.py`` prove for the Accelerate/plain hook, here for ``CooldownCallback`` and
``CooldownTrainerCallback``.

- a SIGKILL while a fork that runs again after a resume replaces its finished cooled folder (HF's
  ``save_pretrained`` folders) leaves no half-removed folder under the final name (found a bug: the
  engine removed the old folder in place before the rename; it now moves it aside in one rename);
- DDP: a failure on rank 1 inside a fork (an exception in a cooldown step; for HF also a SIGKILL
  of rank 1) makes both processes exit non-zero promptly (within 60 s of the failure, not at the
  collective's timeout), the output names rank 1 and the reason, rank 0 restores its main branch and
  records the failed fork (unless torchrun stopped it first), and nothing is left under a final name;
- soak: after 10 warm-up forks, 100 more forks (a fork after every step, 1 cooldown step, evaluation,
  atomic save, record) inside one real ``fit``/``train`` keep RSS within 20 MB and the number of
  open file descriptors unchanged (numbers printed: ``pytest -s``). The models are big enough (a
  snapshot of 2-3 MB) that keeping one snapshot per fork would exceed the bound many times over.

The kill-and-resume trials of both adapters are in ``test_reliability.py`` (harness
``_kill_harness.py``, scripts ``_kill_script_lightning.py`` and ``_kill_script_transformers.py``).
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import _kill_harness as harness
from cooldown_callbacks.records import RECORDS_NAME, read_records
from test_soak import open_fds, rss_mb

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
COOLED = "cooled"
WARMUP, FORKS = 10, 100
RSS_BOUND_MB = 20.0
FAIL_WITHIN_S = 60.0


@pytest.fixture(autouse=True)
def _quiet(one_thread):
    """One intra-op thread (conftest); transformers' logs and progress bars off, put back after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


# -- kill while a re-run fork replaces a cooled folder ---------------------------------------------------

def _cooled_files(d: Path) -> dict:
    return {p.name: sorted(q.name for q in p.iterdir()) if p.is_dir() else None for p in harness.final_checkpoints(d)}


@pytest.mark.slow
def test_sigkill_while_a_rerun_fork_replaces_its_cooled_folder_leaves_no_partial_folder(tmp_path):
    """HF cooled models are folders. Killed right after the rename of the fork at 5 (no record yet),
    the resumed run forks at 5 again and must replace the finished folder; a second SIGKILL in the
    middle of removing the old one must not leave a partial folder under the final name."""
    ref = harness.Reference("_kill_script_transformers", tmp_path / "ref")
    out = tmp_path / "run"
    assert harness.run("_kill_script_transformers", out, kill="after_rename:0") == -signal.SIGKILL
    harness.check_marker(out, "after_rename", 0, out / COOLED)
    name = "cooled-step=00000005-cd=3"
    assert name in _cooled_files(out / COOLED) and not harness._ok(read_records(out / COOLED))
    assert harness.run("_fail_rmtree_transformers", out) == -signal.SIGKILL
    died = json.loads(harness.marker_path(out).read_text())  # written just before the kill
    # inside the removal of the old copy of that folder (the engine moves it aside first)
    assert died["phase"] == "rmtree" and name in Path(died["path"]).name, died
    ref_files = _cooled_files(ref.cooled_dir)
    for folder, files in _cooled_files(out / COOLED).items():
        assert files == ref_files[folder], f"partial folder under a final name: {folder} holds {files}"
    harness.check_files(ref, out, "after the kill inside the removal")
    assert harness.run("_kill_script_transformers", out) == 0, harness._error(out)
    harness.check_files(ref, out, "after resume")
    assert _cooled_files(out / COOLED) == ref_files
    assert not harness._equal_tensors(ref.final, torch.load(out / "final.pt", weights_only=True))
    assert sorted(harness._ok(read_records(out / COOLED)), key=lambda r: r["step"]) == ref.records
    assert not [str(p) for p in out.rglob("*.tmp")]


# -- DDP: a failure on rank 1 inside a fork -----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _check_both_ranks_stopped(out: Path, finished: float, fault: str, rank0_may_be_stopped: bool = False) -> float:
    """Common checks after the run; returns the seconds from the failure on rank 1 to the end.

    ``rank0_may_be_stopped``: torchrun stops the surviving ranks (SIGTERM) as soon as it sees rank 1
    exit, which may come before rank 0 noticed the failure in its next collective."""
    pids = [int((out / f"rank-{r}.pid").read_text()) for r in range(2)]
    assert not [p for p in pids if _alive(p)], "a rank is still running after the launcher returned"
    assert not list(out.glob("rank-*.ok")), "a rank finished normally after the failure on rank 1"
    failed_at = float((out / "rank-1.failed-at").read_text())
    elapsed = finished - failed_at
    assert elapsed < FAIL_WITHIN_S, f"the ranks stopped {elapsed:.1f}s after the failure on rank 1"
    if fault == "train":
        err1 = (out / "rank-1.err").read_text()
        assert "fork at step 3 failed on rank 1 of 2: RuntimeError: injected failure in a cooldown step on rank 1" \
            in err1, err1[-2000:]
    recs = [(r["step"], r["status"]) for r in read_records(out / "cooled")]
    if (out / "rank-0.err").exists() or not rank0_may_be_stopped:
        # rank 0 noticed in the fork's next collective, restored its main branch, recorded the fork and failed
        err0 = (out / "rank-0.err").read_text()
        assert "fork at step 3 failed on rank 0 of 2" in err0 and "the main branch was restored" in err0, err0[-2000:]
        assert recs == [(3, "failed")]
    else:
        assert recs in ([], [(3, "failed")])  # stopped by the launcher in the fork, before or after the record
    assert sorted(p.name for p in (out / "cooled").iterdir()) in ([], [RECORDS_NAME])  # no cooled model, no temporary
    return elapsed


@pytest.mark.slow
def test_lightning_ddp_failure_on_rank_1_inside_a_fork_stops_both_ranks_promptly(tmp_path):
    """``strategy="ddp", accelerator="cpu", devices=2``: Lightning's launcher re-runs the script as rank 1."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(TESTS / "_fail_lightning_ddp.py"), str(tmp_path), "train"],
                         capture_output=True, text=True, timeout=180, env=_env(), cwd=ROOT)
    finished = time.time()
    output = res.stdout + res.stderr
    assert res.returncode != 0, output[-3000:]  # rank 0 (the launching process)
    assert int((tmp_path / "rank-1.exitcode").read_text()) != 0  # rank 1, as rank 0's launcher saw it exit
    # the combined output of both ranks names rank 1 and the reason
    assert "[rank1]: cooldown_callbacks.engine.ForkError: fork at step 3 failed on rank 1 of 2: RuntimeError: " \
           "injected failure in a cooldown step on rank 1" in output, output[-3000:]
    elapsed = _check_both_ranks_stopped(tmp_path, finished, "train")
    print(f"\n[lightning ddp] failure on rank 1: exit codes rank 0 {res.returncode}, "
          f"rank 1 {(tmp_path / 'rank-1.exitcode').read_text()}; stopped {elapsed:.1f}s after the failure "
          f"({time.perf_counter() - t0:.1f}s in all)")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["train", "kill"])
def test_hf_ddp_failure_on_rank_1_inside_a_fork_stops_both_ranks_promptly(fault, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo): torchrun's summary gives each rank's exit code."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(TESTS / "_fail_hf_ddp.py"), str(tmp_path), fault]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(), cwd=ROOT)
    finished = time.time()
    output = res.stdout + res.stderr
    assert res.returncode != 0, output[-3000:]
    codes = {int(r): int(c) for r, c in re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)",
                                                   output)}
    assert sorted(codes) == [0, 1] and all(c != 0 for c in codes.values()), output[-3000:]
    root_cause = output[output.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), root_cause  # torchrun blames rank 1
    if fault == "train":
        assert codes[1] == 1
        assert "[rank1]: cooldown_callbacks.engine.ForkError: fork at step 3 failed on rank 1 of 2: RuntimeError: " \
               "injected failure in a cooldown step on rank 1" in output, output[-3000:]
    else:
        assert codes[1] == -signal.SIGKILL and "Signal 9 (SIGKILL) received by PID" in root_cause, root_cause
    elapsed = _check_both_ranks_stopped(tmp_path, finished, fault, rank0_may_be_stopped=True)
    how = "failed itself" if (tmp_path / "rank-0.err").exists() else "stopped by torchrun"
    print(f"\n[hf ddp] {fault} on rank 1: exit codes {codes}, rank 0 {how}; stopped {elapsed:.1f}s after the failure "
          f"({time.perf_counter() - t0:.1f}s in all)")


# -- soak: 100 forks in one fit / train ---------------------------------------------------------------

def _marks_at(marks: dict, step: int) -> None:
    if step in (WARMUP, WARMUP + FORKS):
        gc.collect()
        marks[step] = (rss_mb(), open_fds())


def _snapshot_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """What one fork's snapshot holds at least: parameters, buffers and optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _report(name: str, marks: dict, records: list, dirpath: Path, suffix: str, snapshot_mb: float) -> None:
    (rss0, fd0), (rss1, fd1) = marks[WARMUP], marks[WARMUP + FORKS]
    print(f"\n[soak {name}] {FORKS} forks after {WARMUP} warm-up: RSS {rss0:.1f} -> {rss1:.1f} MB "
          f"({rss1 - rss0:+.2f} MB, bound {RSS_BOUND_MB} MB), open fds {fd0} -> {fd1}; "
          f"one snapshot {snapshot_mb:.2f} MB")
    # the model is large enough that keeping one snapshot per fork would break the bound several times over
    assert FORKS * snapshot_mb > 5 * RSS_BOUND_MB
    assert [(r["step"], r["status"]) for r in records] == [(s, "ok") for s in range(1, WARMUP + FORKS + 1)]
    assert len(read_records(dirpath)) == WARMUP + FORKS
    assert len(list(dirpath.glob(f"cooled-*{suffix}"))) == WARMUP + FORKS
    assert not list(dirpath.glob(".*"))  # no temporaries or snapshot files left behind
    assert rss1 - rss0 < RSS_BOUND_MB
    assert fd1 == fd0


def test_lightning_100_forks_keep_rss_and_file_descriptors_flat(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from _lightning_models import CharData, CharModel, trainer_kwargs
    from cooldown_callbacks import WSD, Cooldown, ForkPlan
    from cooldown_callbacks.integrations.lightning import CooldownCallback

    marks: dict = {}

    class Probe(Callback):  # after the cooldown callback: the fork of this step is done and restored
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _marks_at(marks, trainer.global_step)

    L.seed_everything(0, verbose=False)
    cb = CooldownCallback(schedule=WSD(warmup_steps=2), plan=ForkPlan(every=1, cooldown=Cooldown(steps=1)),
                          dirpath=tmp_path / "cooled", save_weights_only=True, progress_bar=False, verbose=False)
    trainer = L.Trainer(**trainer_kwargs(tmp_path / "trainer", max_steps=WARMUP + FORKS, val_check_interval=10_000,
                                         check_val_every_n_epoch=None, callbacks=[cb, Probe()]))
    model = CharModel(d=256)
    trainer.fit(model, datamodule=CharData(n_train=64, n_val=4, stateful=True))
    _report("lightning", marks, cb.records, tmp_path / "cooled", ".ckpt", _snapshot_mb(model, trainer.optimizers[0]))


def test_hf_100_forks_keep_rss_and_file_descriptors_flat(tmp_path):
    from transformers import PrinterCallback, Trainer, TrainerCallback

    from _kill_script_transformers import datasets, make_args, make_model
    from cooldown_callbacks import WSD, Cooldown, ForkPlan
    from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback

    marks: dict = {}

    class Probe(TrainerCallback):  # after the cooldown callback: the fork of this step is done and restored
        def on_step_end(self, args, state, control, **kwargs):
            _marks_at(marks, state.global_step)

    cb = CooldownTrainerCallback(schedule=WSD(warmup_steps=2), plan=ForkPlan(every=1, cooldown=Cooldown(steps=1)),
                                 dirpath=tmp_path / "cooled", verbose=False)
    train, val = datasets(n_train=64, n_eval=4)
    args = make_args(tmp_path / "trainer", max_steps=WARMUP + FORKS, gradient_accumulation_steps=1,
                     eval_strategy="no", save_strategy="no", logging_steps=1000)
    trainer = Trainer(model=make_model(n_embd=128), args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[cb, Probe()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    _report("hf", marks, cb.records, tmp_path / "cooled", "", _snapshot_mb(trainer.model, trainer.optimizer.optimizer))
