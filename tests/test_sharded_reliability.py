"""SIGKILL inside a fork under FSDP2 (two ranks, torchrun), resume, compare bit for bit.

The training script is ``_kill_script_fsdp2.py`` (the hook, DCP cooled saves: folders). Rank 0 kills
itself at a seeded event of a fork phase (``_kill_points``); torchrun stops rank 1. Right after the
kill every cooled checkpoint under a final name is complete and equal to the uninterrupted run's, and
``forks.jsonl`` holds only complete records; after the resume, both ranks' final shards, the cooled
checkpoints and the records equal the uninterrupted run's, and no temporary is left.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import _kill_harness as harness
import _kill_script_fsdp2 as script
from _torchrun import torchrun
from cooldown_callbacks.records import RECORDS_NAME, read_records

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_kill_script_fsdp2.py")
PHASES = ("opt_step", "save_partial")  # inside the cooldown steps; the cooled folder half-written


class Reference:
    """The uninterrupted two-rank run (what ``_kill_harness.check_files`` needs of a reference)."""

    def __init__(self, out: Path) -> None:
        res = torchrun(SCRIPT, str(out))
        assert res.returncode == 0, res.stderr[-4000:]
        self.mod = script
        self.counts = json.loads((out.parent / f"{out.name}-counts.json").read_text())
        self.final = torch.load(out / "final.pt", weights_only=True)
        self.cooled = {p.name: script.load_cooled(p) for p in harness.final_checkpoints(out / script.COOLED)}
        self.records = harness._ok(read_records(out / script.COOLED))
        assert len(self.cooled) == 3 and len(self.records) == 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("fsdp2-ref") / "run")


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_inside_a_fork_then_resume_equals_the_uninterrupted_run(reference, phase, tmp_path):
    out = tmp_path / "run"
    n = random.Random(f"fsdp2-{phase}").randrange(reference.counts[phase])
    kill = f"{phase}:{n}"
    res = torchrun(SCRIPT, str(out), kill)
    assert res.returncode != 0 and "exitcode  : -9" in res.stderr, f"{kill}: rank 0 was not killed:\n{res.stderr[-3000:]}"
    harness.check_marker(out, phase, n, out / script.COOLED)  # rank 0 died at that event of that phase
    harness.check_files(reference, out, f"after kill at {kill}")
    res = torchrun(SCRIPT, str(out))
    assert res.returncode == 0, f"resume after {kill} failed:\n{res.stderr[-4000:]}"
    harness.check_files(reference, out, f"after resume from kill at {kill}")
    final = torch.load(out / "final.pt", weights_only=True)
    bad = harness._equal_tensors(reference.final, final)
    assert not bad, f"resume after {kill}: the main branch differs from the uninterrupted run: {bad}"
    assert sorted(p.name for p in harness.final_checkpoints(out / script.COOLED)) == sorted(reference.cooled)
    recs = harness._ok(read_records(out / script.COOLED))
    assert sorted(recs, key=lambda r: r["step"]) == reference.records, f"resume after {kill}: records differ"
    assert (out / script.COOLED / RECORDS_NAME).read_bytes().endswith(b"\n")
    leftovers = [str(p.relative_to(out)) for p in out.rglob("*.tmp")]
    assert not leftovers, f"resume after {kill}: temporaries left: {leftovers}"
