"""DeepSpeed through the hook: two CPU ranks (gloo), ZeRO-1/2 (and stage 0), fp32/bf16/fp16, accumulation 2,
dropout, two param groups, clipping by DeepSpeed; a DeepSpeed engine in a plain loop and through Accelerate's
DeepSpeed plugin. One torchrun runs every variant (``_deepspeed_script.py``):
a run without forks, the same run with forks every 4 steps, and a fixed-budget run; then the
configurations the hook must refuse.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from _loops import assert_equal_states, make_model_opt
from _torchrun import torchrun
from cooldown_callbacks.records import read_records

pytest.importorskip("deepspeed")  # in the dev extra: installed in CI
pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_deepspeed_script.py")
VARIANTS = ("1", "2", "2-bf16", "1-fp16", "0-bf16", "2-autocast", "2-sched", "accel-2")
FIXED = [v for v in VARIANTS if "-sched" not in v and "accel" not in v]  # with a fixed-budget reference run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    # the script sets DS_ACCELERATOR=cpu itself; the first DeepSpeed start on a machine builds a small C++ op
    res = torchrun(SCRIPT, out, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_hook_forks_keep_every_rank_exact(runs, variant):
    """Params, this rank's fp32 master partitions, optimizer state, LRs and the engine's counters equal
    a run without forks, on each rank."""
    for r in range(2):
        ref = torch.load(runs / variant / "none" / f"rank-{r}.pt")
        got = torch.load(runs / variant / "forks" / f"rank-{r}.pt")
        assert any(k.startswith("master.") for k in ref) and any(k.startswith("opt.") for k in ref)
        assert_equal_states(ref, got)
        # global_steps, global_samples, micro_steps (Accelerate calls engine.step only at its boundaries)
        assert ref["counters"][:3].tolist() == [12, 12 * 16, 12 if "accel" in variant else 24]
    if variant.endswith("-fp16"):
        assert ref["counters"][3] > 0  # overflows skipped steps: the dynamic loss scale moved
    recs = read_records(runs / variant / "forks" / "cooled")
    assert [(x["step"], x["status"]) for x in recs] == [(4, "ok"), (8, "ok"), (12, "ok")]


@pytest.mark.parametrize("variant", FIXED)
def test_cooled_model_equals_fixed_budget_run_and_loads_into_the_plain_model(runs, variant):
    """The fork at step 4 (peek data) == a fresh 4 + 3 step run on the cooled schedule: the full model,
    fp32 masters gathered by DeepSpeed itself (ZeRO-1/2); no ``module.`` prefix."""
    cooled = torch.load(runs / variant / "forks" / "cooled" / "cooled-step00000004-cd3.pt")
    fixed = torch.load(runs / variant / "fixed" / "full.pt")
    assert cooled.keys() == fixed.keys()
    bad = [k for k in fixed if not (cooled[k].dtype == fixed[k].dtype and torch.equal(cooled[k], fixed[k]))]
    assert not bad, f"differs: {bad}"
    model, _ = make_model_opt()
    if variant.endswith(("-bf16", "-fp16")):
        model[1] = torch.nn.Identity()
    model.load_state_dict(cooled)  # strict


def test_accelerate_cooled_model_loads_into_the_plain_model(runs):
    for step in (4, 8, 12):
        cooled = torch.load(runs / "accel-2" / "forks" / "cooled" / f"cooled-step{step:08d}-cd3.pt")
        make_model_opt()[0].load_state_dict(cooled)  # strict


def test_refused_configurations_name_the_option_and_the_alternative(runs):
    """Checked in CooldownHook's constructor: before any step (the script asserts the engine never stepped)."""
    found = json.loads((runs / "refusals.json").read_text())
    alternative = r"supported with CooldownHook: DeepSpeed ZeRO stage 0, 1 or 2 without offload, or FSDP2"
    assert re.search(rf"ZeRO stage 3 \(zero_optimization.stage=3\); {alternative}", found["stage3"] or "")
    assert re.search(rf"optimizer offload \(zero_optimization.offload_optimizer\); {alternative}",
                     found["offload_optimizer"] or "")
    assert re.search(rf"torch_autocast with float16 \(torch_autocast.dtype; use bfloat16, or the fp16 config\); "
                     rf"{alternative}", found["autocast_fp16"] or "")
    assert re.search(r"Invalid max_grad_norm .*set its 'gradient_clipping' config", found["max_grad_norm"] or "")
    assert re.search(r"Invalid gradient_accumulation_steps \(4\): .*accumulates 2 micro-batches",
                     found["gradient_accumulation_steps"] or "")
    assert found["accepted"] is None
