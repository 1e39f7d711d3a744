"""CooldownTrainerCallback under ``torchrun --nproc_per_node 2`` (CPU, gloo): forks on both ranks, no
hang, each cooled model saved once, every rank's main branch equal to a run without forks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cooldown_callbacks.records import read_records

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_hf_ddp_script.py")


def free_port() -> int:
    # the Trainer's process group uses env:// rendezvous, which needs a real port (not torchrun's 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("data", ["map", "stream"])
def test_two_process_trainer_forks_without_hang_and_saves_once(data, tmp_path):
    """Map-style data (the replayed sampler) and a stream (batches drawn from the epoch iterator and handed
    back, through accelerate's dispatching loader); map-style also resumes in place from its checkpoint at
    step 4: the fork at 8 is taken back from the records on both ranks, logged once with rank 0's metrics."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), str(tmp_path), data]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)  # a hang fails here
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["same_main"] and r["same_log"], r["rank"]
        assert [(x["step"], x["status"], x["data"]) for x in r["records"]] == [(4, "ok", "peek"), (8, "ok", "peek")]
    # the cooled evaluation is reduced over ranks: both ranks logged the same cooled losses
    assert ranks[0]["cooldown_losses"] == ranks[1]["cooldown_losses"] and len(ranks[0]["cooldown_losses"]) == 2
    cooled = tmp_path / "forks" / "cooldowns"
    assert sorted(p.name for p in cooled.iterdir()) == \
        ["cooled-step=00000004-cd=3", "cooled-step=00000008-cd=3", "forks.jsonl"]  # once, no temporaries
    assert [x["step"] for x in read_records(cooled)] == [4, 8]
    assert (cooled / "cooled-step=00000008-cd=3" / "model.safetensors").exists()
    assert res.stdout.count("[cooldown] step") == 2 + (data == "map")  # printed by the main process only
    if data == "map":
        for r in ranks:
            assert r["resumed"]["same_main"], r["rank"]
            assert [(x["step"], x.get("restored", False)) for x in r["resumed"]["records"]] == [(4, False), (8, True)]
            assert r["resumed"]["logged"] == ranks[0]["cooldown_losses"][1:]  # rank 0's metrics, on every rank
        assert "restored from the records" in res.stdout


@pytest.mark.parametrize("flags", [[], ["ddp_backend=gloo"]])
def test_torchrun_on_cpu_without_use_cpu_stops_before_the_first_step(flags, tmp_path):
    """Without --use_cpu (and --ddp_backend gloo) each process runs as rank 0 of a world of 1 (records written
    twice), or without DDP (losses not those of one run): both processes stop, naming the flags to use."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).with_name("_hf_launch_script.py")), str(tmp_path), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode != 0
    assert res.stderr.count("pass --use_cpu --ddp_backend gloo") >= 2, res.stderr[-4000:]  # both ranks say it
    assert "launched as 2 processes (WORLD_SIZE=2)" in res.stderr
    assert [(tmp_path / f"steps-{r}.txt").read_text() for r in range(2)] == ["0", "0"]
    assert not (tmp_path / "cooldowns" / "forks.jsonl").exists()
