"""Soak: 100 forks in one process keep memory (RSS), open files and disk flat, for every snapshot storage.

A fork after every optimizer step (cooldown of 2 steps, evaluation, atomic save, record); after a
warm-up of 10 forks, RSS (``VmRSS`` of ``/proc/self/status``), the open descriptors
(``/proc/self/fd``) and the mapped snapshot files (``/proc/self/maps``) are measured, 100 more forks
run, and they are measured again.

The model is sized so that a leak shows: one snapshot (parameters, buffers, AdamW moments) is about
1.8 MB, so keeping one snapshot per fork alive would add ~180 MB, 9x the bound (checked in the test).
Bounds: RSS grows by less than 20 MB over the 100 forks; not a single descriptor more is open; no
snapshot file is left in the output folder or still mapped (``storage="disk"`` writes one file per
fork next to the cooled checkpoints and maps it to restore). Measured numbers are printed
(``pytest -s tests/test_soak.py``).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn

from _loops import eval_fn, loss_fn, make_loader
from cooldown_callbacks import Cooldown, ForkPlan, RSqrt
from cooldown_callbacks.integrations.accelerate import CooldownHook
from cooldown_callbacks.records import read_records

pytestmark = pytest.mark.usefixtures("one_thread")

WARMUP, FORKS = 10, 100
RSS_BOUND_MB = 20.0
WIDTH = 384  # ~152k parameters: one snapshot with AdamW's two moments is ~1.8 MB


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapped_snapshot_files() -> list[str]:
    """Snapshot files (``.snapshot-*.pt``) this process still maps, deleted or not."""
    with open("/proc/self/maps") as f:
        return sorted({line.split(None, 5)[-1].strip() for line in f if ".snapshot-" in line})


def make_model_opt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def snapshot_mb(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """Bytes one snapshot copies: parameters, buffers and the optimizer's tensor state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


@pytest.mark.parametrize("loop,storage", [("accelerate", "cpu"), ("plain", "device"), ("plain", "disk"),
                                          ("accelerate", "disk")])
def test_100_forks_keep_rss_files_and_disk_flat(loop, storage, tmp_path):
    model, opt = make_model_opt()
    acc = None
    if loop == "accelerate":  # peeks clone the stateful loader at every fork
        acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
        loader = make_loader(stateful=True)
        model, opt, loader = acc.prepare(model, opt, loader)
    else:
        loader = make_loader()
    hook = CooldownHook(model, opt, schedule=RSqrt(2), plan=ForkPlan(every=1, cooldown=Cooldown(steps=2)),
                        loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader, accelerator=acc, max_grad_norm=0.5,
                        dirpath=tmp_path, snapshot_storage=storage, verbose=False)
    marks = {}
    t = 0
    while t < WARMUP + FORKS:
        for batch in loader:
            loss = loss_fn(model, batch)
            if acc is not None:
                acc.backward(loss)
            else:
                loss.backward()
            opt.step()
            opt.zero_grad()
            rec = hook.step()
            assert rec is not None and rec.status == "ok", rec
            t += 1
            if t in (WARMUP, WARMUP + FORKS):
                gc.collect()
                marks[t] = (rss_mb(), open_fds())
            if t == WARMUP + FORKS:
                break
    (rss0, fd0), (rss1, fd1) = marks[WARMUP], marks[WARMUP + FORKS]
    one = snapshot_mb(model, opt.optimizer if acc is not None else opt)
    print(f"\n[soak {loop}/{storage}] {FORKS} forks after {WARMUP} warm-up: RSS {rss0:.1f} -> {rss1:.1f} MB "
          f"({rss1 - rss0:+.2f} MB, bound {RSS_BOUND_MB} MB), open fds {fd0} -> {fd1}; one snapshot {one:.2f} MB")
    # one leaked snapshot per fork would break the bound several times over
    assert FORKS * one > 5 * RSS_BOUND_MB
    assert len(read_records(tmp_path)) == WARMUP + FORKS
    assert len(list(tmp_path.glob("cooled-*.pt"))) == WARMUP + FORKS
    assert not list(tmp_path.glob(".*"))  # no temporaries or snapshot files left behind
    assert mapped_snapshot_files() == []  # nor a deleted snapshot file still mapped (its disk space held)
    assert rss1 - rss0 < RSS_BOUND_MB
    assert fd1 == fd0
