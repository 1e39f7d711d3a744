"""Two processes (torchrun, gloo): forks on both ranks, no hang, main branch equal to no-fork DDP."""

import subprocess
from pathlib import Path

import pytest
import torch

import _torchrun
from _loops import assert_equal_states
from cooldown_callbacks.records import read_records

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_hook_ddp_script.py")


def torchrun(out: Path, mode: str, timeout: float = 120) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return _torchrun.torchrun(SCRIPT, out, mode, timeout=timeout)


@pytest.mark.parametrize("loop", ["", "accel-"], ids=["plain-ddp", "accelerate"])
def test_two_process_forks_keep_each_rank_main_branch_identical(loop, tmp_path):
    ref = torchrun(tmp_path / "ref", loop + "none")
    assert ref.returncode == 0, ref.stderr[-3000:]
    got = torchrun(tmp_path / "forks", loop + "forks")
    assert got.returncode == 0, got.stderr[-3000:]
    for r in range(2):
        assert_equal_states(torch.load(tmp_path / "ref" / f"rank-{r}.pt"), torch.load(tmp_path / "forks" / f"rank-{r}.pt"))
    recs = read_records(tmp_path / "forks" / "cooled")
    assert [x["step"] for x in recs] == [5, 10, 15] and all(x["status"] == "ok" for x in recs)
    assert all(x["metrics"]["rank"] == 0.5 for x in recs)  # eval_fn's metrics are averaged over the ranks
    files = sorted(p.name for p in (tmp_path / "forks" / "cooled").iterdir())
    assert files == ["cooled-step00000005-cd3.pt", "cooled-step00000010-cd3.pt", "cooled-step00000015-cd3.pt",
                     "forks.jsonl"]  # written once, no temporaries left
    assert got.stdout.count("[cooldown] step") == 3  # summary printed on rank 0 only


def test_failure_on_one_rank_fails_all_ranks_promptly(tmp_path):
    res = torchrun(tmp_path / "fail", "fail", timeout=90)
    assert res.returncode != 0
    assert "injected failure" in res.stderr and "on rank 1 of 2" in res.stderr
    assert not list((tmp_path / "fail" / "cooled").glob("cooled-*"))  # nothing under a final name


def test_a_save_failure_seen_by_rank_zero_alone_fails_the_fork_on_every_rank(tmp_path):
    """Rank 0 finds no checkpoint to rename: every rank records the fork failed and goes on in step (no hang)."""
    ref = torchrun(tmp_path / "ref", "none")
    assert ref.returncode == 0, ref.stderr[-3000:]
    got = torchrun(tmp_path / "nosave0", "nosave0", timeout=90)
    assert got.returncode == 0, got.stderr[-3000:]
    for r in range(2):
        assert_equal_states(torch.load(tmp_path / "ref" / f"rank-{r}.pt"), torch.load(tmp_path / "nosave0" / f"rank-{r}.pt"))
    recs = read_records(tmp_path / "nosave0" / "cooled")
    assert [x["step"] for x in recs] == [5, 10, 15]
    assert all(x["status"] == "failed" and "was not written to" in x["error"] and not x["checkpoint"] for x in recs)
    assert not list((tmp_path / "nosave0" / "cooled").glob("cooled-*.pt"))


def test_an_evaluation_on_rank_zero_alone_forks_every_rank(tmp_path):
    """ForkPlan(on_eval=True) in a loop that evaluates on the master process only (nanoGPT): hook.step(evaluating=
    True) on rank 0 alone forks on both ranks (no collective mismatch), and the main branch is unchanged."""
    ref = torchrun(tmp_path / "ref", "none")
    assert ref.returncode == 0, ref.stderr[-3000:]
    got = torchrun(tmp_path / "oneval0", "oneval0", timeout=90)
    assert got.returncode == 0, got.stderr[-3000:]
    for r in range(2):
        assert_equal_states(torch.load(tmp_path / "ref" / f"rank-{r}.pt"),
                            torch.load(tmp_path / "oneval0" / f"rank-{r}.pt"))
    recs = read_records(tmp_path / "oneval0" / "cooled")
    assert [x["step"] for x in recs] == [5, 10, 15] and all(x["status"] == "ok" for x in recs)
    assert all(x["metrics"]["rank"] == 0.5 for x in recs)  # both ranks ran eval_fn
