"""CooldownTrainerCallback and sharding: FSDP v1 refused before the first step, DCP saves.

The HF Trainer runs FSDP only on accelerators (on this CPU machine ``fsdp=`` makes it fail, or under
torchrun run plain data-parallel): the FSDP2 path is the same code as DDP's on local shards and is
exercised by ``benchmarks/gpu_check.py``. What can be checked here: the refusal of FSDP v1 sees the
plugin the Trainer builds on a GPU machine; ``save_format="dcp"`` writes a folder that converts to the
same weights as the default ``save_pretrained`` folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from _hf_data import ByteLM
from cooldown_callbacks import WSD, Cooldown, ForkPlan
from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback
from cooldown_callbacks.records import read_records

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from charlm import stdlib_text  # noqa: E402

BLOCK = 32
_BYTES = torch.frombuffer(bytearray(stdlib_text(12_000)), dtype=torch.uint8)
TRAIN, EVAL = ByteLM(_BYTES[:10_000], BLOCK), ByteLM(_BYTES[10_000:11_024], BLOCK)


@pytest.fixture(autouse=True)
def _quiet(one_thread):
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    yield
    hf_logging.set_verbosity(verbosity)


def trainer(out: Path, cb: CooldownTrainerCallback, **kw) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=16, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                             per_device_eval_batch_size=8, eval_strategy="no", save_strategy="no", report_to="none",
                             disable_tqdm=True, learning_rate=3e-3, use_cpu=True, seed=7, **kw)
    return Trainer(model=model, args=args, train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[cb])


def cooldown(tmp_path: Path, data="auto", schedule=WSD(warmup_steps=1), **kw) -> CooldownTrainerCallback:
    return CooldownTrainerCallback(schedule=schedule,
                                   plan=ForkPlan(at=[3], cooldown=Cooldown(steps=2), data=data),
                                   dirpath=tmp_path / "cooled", verbose=False, **kw)


# on_train_begin called by the test (outside train()): no train loader yet, so a cooldown stream of one batch
# (and no optimizer yet: schedule=None where the check would pass)
STREAM = [{k: torch.stack([TRAIN[i][k] for i in range(4)]) for k in ("input_ids", "labels")}]


def test_fsdp_v1_is_refused_before_the_first_step(tmp_path):
    """On a GPU machine ``fsdp="full_shard"`` builds accelerate's FSDP plugin (version 1 by default)."""
    cb = cooldown(tmp_path, data=STREAM)
    t = trainer(tmp_path, cb)
    t.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    t.is_fsdp_enabled = True
    cb.attach(t)
    with pytest.raises(ValueError, match=r"does not support FSDP v1.*fsdp_version': 2"):
        cb.on_train_begin(t.args, t.state, t.control)
    assert t.state.global_step == 0


def test_fsdp_requested_but_not_enabled_is_reported(tmp_path, caplog):
    cb = cooldown(tmp_path, data=STREAM, schedule=None)
    t = trainer(tmp_path, cb)
    t.args.fsdp = ["full_shard"]  # what TrainingArguments(fsdp=...) holds when the Trainer falls back to DDP
    cb.attach(t)
    logger = hf_logging.get_logger("cooldown_callbacks.integrations.transformers")
    logger.addHandler(caplog.handler)
    try:
        cb.on_train_begin(t.args, t.state, t.control)
    finally:
        logger.removeHandler(caplog.handler)
    assert "did not enable FSDP" in caplog.text


def test_invalid_save_format_is_refused():
    with pytest.raises(ValueError, match=r"Invalid save_format \('pt'\).*\('full', 'dcp'\)"):
        CooldownTrainerCallback(schedule=WSD(warmup_steps=1), save_format="pt")


def test_dcp_save_converts_to_the_weights_of_the_full_save(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folders = {}
    for fmt in ("full", "dcp"):
        cb = cooldown(tmp_path / fmt, save_format=fmt)
        trainer(tmp_path / fmt, cb).train()
        rec = read_records(tmp_path / fmt / "cooled")
        assert [(r["step"], r["status"]) for r in rec] == [(3, "ok")]
        folders[fmt] = Path(rec[0]["checkpoint"])
    full = AutoModelForCausalLM.from_pretrained(folders["full"]).state_dict()
    assert ".metadata" in {p.name for p in folders["dcp"].iterdir()}
    dcp_to_torch_save(folders["dcp"], tmp_path / "dcp.pt")
    got = torch.load(tmp_path / "dcp.pt")
    for k, v in got.items():
        assert torch.equal(v, full[k]), k
    assert set(full) - set(got) <= {"lm_head.weight"}  # tied to the embedding: save_pretrained drops it
