"""CooldownHook with FSDP2 (``fully_shard``) and FSDP1 on two CPU processes (torchrun, gloo).

One torchrun per kind (``_sharded_hook_script.py``) trains, in one process group: a run without the library,
four runs with forks at steps 4, 8 and 12 (right after the user evaluated the main branch, so FSDP2's
root is unsharded at each fork; gradient accumulation 2 without gradient sync on the first
micro-batch; dropout; two param groups; clipping) with CPU, disk and device snapshots and full, DCP
or the user's own saves, and a fixed-budget run of 4 + 3 steps. The tests compare what each run wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _torchrun import torchrun
from cooldown_callbacks.records import read_records

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
FORK_RUNS = {"fsdp2": ("cpu-full", "disk-dcp", "device-full", "cpu-fn", "cpu-zf"),
             "fsdp1": ("cpu-full", "disk-dcp", "cpu-fn")}
REFERENCE = {"cpu-zf": "ref-zf"}  # the run without forks that each run is compared with (default "ref")
CASES = [(kind, run) for kind, runs in FORK_RUNS.items() for run in runs]
STEPS = (4, 8, 12)


_outputs: dict[str, Path] = {}


def outputs(kind: str, tmp_path_factory) -> Path:
    """The runs of one kind (one torchrun, shared by the tests)."""
    if kind not in _outputs:
        out = tmp_path_factory.mktemp(f"{kind}-hook")
        res = torchrun(HERE / "_sharded_hook_script.py", str(out), kind)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
        _outputs[kind] = out
    return _outputs[kind]


@pytest.fixture(params=list(FORK_RUNS))
def runs(request, tmp_path_factory) -> Path:
    return outputs(request.param, tmp_path_factory)


@pytest.fixture
def kind_run(request, tmp_path_factory) -> tuple[Path, str]:
    kind, run = request.param
    return outputs(kind, tmp_path_factory), run


def _plain_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))


@pytest.mark.parametrize("kind_run", CASES, indirect=True, ids=[f"{k}-{r}" for k, r in CASES])
def test_every_rank_local_shards_equal_the_run_without_forks(kind_run):
    runs, run = kind_run
    for r in (0, 1):
        ref = torch.load(runs / REFERENCE.get(run, "ref") / f"rank-{r}.pt")
        got = torch.load(runs / run / f"rank-{r}.pt")
        assert ref.keys() == got.keys()
        assert any(k.startswith("opt.") and k.endswith("exp_avg") for k in ref)  # optimizer state is compared too
        bad = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert not bad, f"{run}, rank {r}: differs from the run without forks: {bad}"
        assert any(k.startswith("grad.") for k in ref) == (run == "cpu-zf")  # gradients are compared too there


def test_fsdp2_shards_are_uneven(tmp_path_factory):
    assert torch.load(outputs("fsdp2", tmp_path_factory) / "ref" / "rank-1.pt")["param.4.weight"].numel() == 0


@pytest.mark.parametrize("kind_run", CASES, indirect=True, ids=[f"{k}-{r}" for k, r in CASES])
def test_forks_are_recorded_with_their_checkpoints_and_nothing_else(kind_run):
    runs, run = kind_run
    cooled = runs / run / "cooled"
    recs = read_records(cooled)
    assert [(r["step"], r["status"]) for r in recs] == [(s, "ok") for s in STEPS]
    suffix = "" if run.endswith(("dcp", "fn")) else ".pt"  # a DCP folder, or the folder the user's save_fn wrote
    names = [f"cooled-step{s:08d}-cd3{suffix}" for s in STEPS]
    assert [Path(r["checkpoint"]).name for r in recs] == names
    assert sorted(p.name for p in cooled.iterdir()) == sorted(names + ["forks.jsonl"])  # no temporaries


def test_cooled_model_equals_a_fixed_budget_run_and_loads_into_the_plain_model(runs):
    budget = torch.load(runs / "budget" / "full.pt")
    for run in ("cpu-full", "cpu-zf"):  # gradients zeroed after or before each step: the same training
        if not (runs / run).exists():
            continue
        cooled = torch.load(runs / run / "cooled" / "cooled-step00000004-cd3.pt")
        assert cooled.keys() == budget.keys()
        assert all(not v.is_meta and type(v) is torch.Tensor for v in cooled.values())  # plain, full tensors
        bad = [k for k in budget if not torch.equal(budget[k], cooled[k])]
        assert not bad, f"{run}: cooled model differs from the fixed-budget run: {bad}"
    model = _plain_model()
    model.load_state_dict(torch.load(runs / "cpu-full" / "cooled" / "cooled-step00000012-cd3.pt"))
    if (runs / "device-full").exists():
        for s in STEPS:  # storage does not change what is trained
            a = torch.load(runs / "cpu-full" / "cooled" / f"cooled-step{s:08d}-cd3.pt")
            b = torch.load(runs / "device-full" / "cooled" / f"cooled-step{s:08d}-cd3.pt")
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_dcp_checkpoints_convert_to_the_full_ones(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    for s in STEPS:
        folder = runs / "disk-dcp" / "cooled" / f"cooled-step{s:08d}-cd3"
        assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        dcp_to_torch_save(folder, tmp_path / f"{s}.pt")
        got = torch.load(tmp_path / f"{s}.pt")
        full = torch.load(runs / "cpu-full" / "cooled" / f"cooled-step{s:08d}-cd3.pt")
        assert got.keys() == full.keys()
        bad = [k for k in full if not torch.equal(full[k], got[k])]
        assert not bad, f"DCP checkpoint at {s} differs from the full one: {bad}"
        _plain_model().load_state_dict(got)


SNAPSHOT_CASES = [(kind, run) for kind, run in CASES if run != "disk-dcp"]  # disk: nbytes is the file's size


@pytest.mark.parametrize("kind_run", SNAPSHOT_CASES, indirect=True, ids=[f"{k}-{r}" for k, r in SNAPSHOT_CASES])
def test_snapshot_holds_each_rank_local_shards_only(kind_run):
    runs, run = kind_run
    per_rank = json.loads((runs / run / "snapshot.json").read_text())
    for r, got in enumerate(per_rank):
        assert got["snapshot"] == got["local"], f"rank {r}: snapshot {got['snapshot']} B != local state {got['local']} B"
        assert got["local"] < 0.7 * got["global"]  # the unsharded state of the same tensors is much larger
