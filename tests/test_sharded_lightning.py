"""CooldownCallback with sharded Lightning strategies.

``ModelParallelStrategy`` (FSDP2 in ``configure_model``) on two CPU processes: forks at every
validation and at the end (right after Lightning validated, FSDP2's root unsharded) keep every rank's
shards equal to a fit without forks; cooled checkpoints are a full ``.ckpt`` that
``load_from_checkpoint`` loads, or a DCP folder that ``dcp_to_torch_save`` converts.
``strategy="fsdp"`` (FSDP1, GPU only) is refused before the first step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from _lightning_models import CharData, CharModel, trainer_kwargs
from _sharded_lightning_script import ShardedCharModel
from cooldown_callbacks import WSD, Cooldown, ForkPlan
from cooldown_callbacks.integrations.lightning import CooldownCallback, CooldownMisconfiguration
from cooldown_callbacks.records import read_records

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("_sharded_lightning_script.py")


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model-parallel")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return out


def _load(fits: Path, name: str, rank: int) -> dict:
    return torch.load(fits / f"{name}-rank{rank}.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("name,steps", [("on_eval", [4, 8]), ("at_end", [8])])
def test_model_parallel_forks_keep_every_rank_shards_identical(fits, name, steps):
    for r in (0, 1):
        got, ref = _load(fits, name, r), _load(fits, "plain", r)
        assert got["world_size"] == 2
        assert [(x["step"], x["status"]) for x in got["records"]] == [(s, "ok") for s in steps]
        assert ref["state"].keys() == got["state"].keys()
        assert any(".exp_avg" in k for k in ref["state"])
        bad = [k for k in ref["state"] if not torch.equal(ref["state"][k], got["state"][k])]
        assert not bad, f"{name}, rank {r}: differs from the fit without forks: {bad}"
    assert _load(fits, name, 0)["cooled_metric"] == _load(fits, name, 1)["cooled_metric"]  # reduced over ranks


@pytest.mark.slow
def test_full_cooled_checkpoint_loads_with_load_from_checkpoint(fits):
    cooled = fits / "on_eval" / "cooled"
    assert sorted(p.name for p in cooled.iterdir()) == ["cooled-step=00000004-cd=2.ckpt",
                                                         "cooled-step=00000008-cd=2.ckpt", "forks.jsonl"]
    path = cooled / "cooled-step=00000008-cd=2.ckpt"
    assert path.is_file()
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 10  # 8 main steps + 2 cooldown steps
    model = ShardedCharModel.load_from_checkpoint(path)  # plain model: no mesh outside ModelParallelStrategy
    for k, v in model.state_dict().items():
        assert type(ckpt["state_dict"][k]) is torch.Tensor and torch.equal(ckpt["state_dict"][k], v), k
    assert read_records(cooled)[1]["metrics"]["val_loss"] == _load(fits, "on_eval", 0)["cooled_metric"]


@pytest.mark.slow
def test_dcp_cooled_checkpoint_converts_with_dcp_to_torch_save(fits, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = fits / "at_end" / "cooled" / "cooled-step=00000008-cd=2.ckpt"
    assert folder.is_dir() and {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in folder.iterdir()}
    dcp_to_torch_save(folder, tmp_path / "cooled.pt")
    state = torch.load(tmp_path / "cooled.pt", weights_only=False)
    model = ShardedCharModel()
    model.load_state_dict(state["state_dict"])
    final = _load(fits, "at_end", 0)["state"]  # the main branch at step 8; the cooled model went 2 steps further
    assert not torch.equal(model.net[1].weight[:8], final["param.net.1.weight"])


def test_fsdp1_strategy_is_refused_before_training(tmp_path):
    """``strategy="fsdp"`` needs a GPU; the check sees the strategy object it builds there (FSDPStrategy)."""
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer._accelerator_connector.strategy = FSDPStrategy()
    cb = CooldownCallback(schedule=WSD(warmup_steps=1), plan=ForkPlan(every=1, cooldown=Cooldown(steps=1)))
    with pytest.raises(CooldownMisconfiguration, match=r"strategy='fsdp'.*FSDP1.*ModelParallelStrategy"):
        cb.setup(trainer, CharModel(), "fit")


def test_dcp_save_format_needs_model_parallel_strategy(tmp_path):
    cb = CooldownCallback(schedule=WSD(warmup_steps=1), plan=ForkPlan(every=1, cooldown=Cooldown(steps=1)),
                          save_format="dcp")
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[cb]))
    with pytest.raises(CooldownMisconfiguration, match=r"save_format \('dcp'\).*ModelParallelStrategy"):
        trainer.fit(CharModel(), datamodule=CharData())
    assert trainer.global_step == 0


def test_invalid_save_format_is_refused():
    with pytest.raises(ValueError, match=r"Invalid save_format \('sharded'\).*\('full', 'dcp'\)"):
        CooldownCallback(save_format="sharded")
