"""Lightning ``strategy="deepspeed"``: refused by CooldownCallback in ``setup`` (before any step), naming the
strategy and the supported alternatives. Lightning runs DeepSpeedStrategy on CUDA only (its own
``setup_environment`` raises on CPU before callbacks' ``setup``), so the test calls the callback's
``setup`` as ``Trainer.fit`` would, with a real Trainer; in a subprocess, since the Trainer imports
deepspeed.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")  # in the dev extra: installed in CI

CODE = textwrap.dedent("""
    import json, os
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import lightning.pytorch as pl
    from cooldown_callbacks import WSD, ForkPlan
    from cooldown_callbacks.integrations.lightning import CooldownCallback, CooldownMisconfiguration

    trainer = pl.Trainer(strategy="deepspeed", accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, default_root_dir=os.environ["OUT"])
    cb = CooldownCallback(schedule=WSD(warmup_steps=2), plan=ForkPlan(every=2))
    out = {"strategy": type(trainer.strategy).__name__}
    try:
        cb.setup(trainer, pl.LightningModule(), "fit")
    except CooldownMisconfiguration as e:
        out["error"] = str(e)
    out["dir_made"] = os.path.exists(os.path.join(os.environ["OUT"], "cooled"))
    print("RESULT " + json.dumps(out))
""")


def test_deepspeed_strategy_is_refused_in_setup(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["strategy"] == "DeepSpeedStrategy"
    assert re.search(r"does not support strategy='deepspeed' \(DeepSpeedStrategy\).*Use strategy='ddp', or "
                     r"strategy=ModelParallelStrategy\(\).*CooldownHook with a DeepSpeed engine",
                     out.get("error") or "")
    assert not out["dir_made"]  # refused before the callback set anything up
