"""The sharded benchmark and the GPU check script, on this CPU machine.

``benchmarks/gpu_check.py`` needs a GPU for its numbers; here: it exits cleanly without one, and its
checks (``benchmarks/_gpu_checks.py``) run on the CPU (the hook with fp32, fp16 + GradScaler and bf16 autocast; Lightning; the HF
Trainer; the hook with ``fully_shard`` in a one-rank gloo group), so a GPU machine runs tested code.
``bench_snapshot.py --sharded --quick`` reports per-rank snapshot bytes equal to the local state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _gpu_checks as checks  # noqa: E402
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_check_without_a_gpu_says_so_and_writes_nothing(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) is None
    assert "no CUDA GPU here" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("precision", checks.PRECISIONS)
def test_gpu_check_hook_checks_run_on_the_cpu(precision, one_thread):
    row = checks.check_hook("cpu", precision)
    assert row["exact"] and row["forks"] == 3, row
    assert row["tensors"] >= 17 + (precision == "fp16")  # the GradScaler's state is compared too


def test_gpu_check_compare_names_what_differs():
    a = {"x": torch.zeros(2), "y": torch.ones(2)}
    b = {"x": torch.zeros(2), "y": torch.tensor([1.0, 2.0])}
    assert checks.compare("c", a, a)["exact"]
    row = checks.compare("c", a, b)
    assert not row["exact"] and row["differs"] == ["y"]
    assert not checks.compare("c", a, {"x": a["x"]})["exact"]


@pytest.mark.slow
def test_gpu_check_framework_and_sharded_checks_run_on_the_cpu(tmp_path, one_thread):
    rows = [checks.check_lightning("cpu", "bf16", tmp_path), checks.check_hf("cpu", "fp32", tmp_path)]
    rows += gpu_check.run_sharded_part(tmp_path, "cpu", ["fp32", "bf16-mp"])
    assert [r["check"] for r in rows] == ["lightning bf16-mixed", "hf fp32", "hook FSDP2 (fp32)", "hook FSDP2 (bf16-mp)"]
    for r in rows:
        assert r["exact"] and r["forks"] >= 2, r
    assert all(r["cooled_loads_into_plain_model"] for r in rows[2:])


@pytest.mark.slow
def test_bench_snapshot_sharded_mode_reports_local_bytes(tmp_path):
    import bench_snapshot

    res = bench_snapshot.main(["--sharded", "--quick", "--storages", "cpu,disk", "--out", str(tmp_path)])
    rows = res["per_rank"]
    assert sorted((r["rank"], r["storage"]) for r in rows) == [(0, "cpu"), (0, "disk"), (1, "cpu"), (1, "disk")]
    for r in rows:
        if r["storage"] == "cpu":
            assert r["snapshot_over_local"] == 1.0
            assert r["snapshot_over_full"] == pytest.approx(0.5, rel=0.01)
        else:  # a torch.save file: the tensors plus a little framing
            assert 1.0 <= r["snapshot_over_local"] < 1.05
    assert all(res["targets_met"].values())
    assert (tmp_path / "bench_snapshot_sharded.md").read_text().startswith("# bench_snapshot_sharded\n")
