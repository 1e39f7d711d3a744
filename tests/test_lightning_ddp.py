"""CooldownCallback under ``strategy="ddp"`` on two CPU processes (gloo).

Lightning's DDP launcher re-runs the calling script for rank 1, so the runs happen in a subprocess
running this file as a script (``python tests/test_lightning_ddp.py OUT``): one fit with forks at
every validation, one without forks (the same schedule as a plain LambdaLR). Each rank saves what it
ended with; the test compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path) -> None:
    import lightning as L

    from _lightning_models import CharData, CharModel, params_and_optimizer, trainer_kwargs
    from cooldown_callbacks import WSD, Cooldown, ForkPlan
    from cooldown_callbacks.integrations.lightning import CooldownCallback

    torch.set_num_threads(1)
    schedule = WSD(warmup_steps=3)
    for name in ("forks", "plain"):
        L.seed_everything(0, verbose=False)
        model = CharModel()
        cb = None
        if name == "forks":
            # the default dirpath (<default_root_dir>/cooled without a logger): resolved on rank 0, broadcast, claimed
            cb = CooldownCallback(schedule=schedule, plan=ForkPlan(on_eval=True, cooldown=Cooldown(steps=2)),
                                  verbose=False)
        else:
            model.scheduler = schedule.lambda_lr
        trainer = L.Trainer(**trainer_kwargs(out / name, strategy="ddp", devices=2, max_steps=8, val_check_interval=4,
                                             check_val_every_n_epoch=None, callbacks=[cb] if cb else []))
        trainer.fit(model, datamodule=CharData(n_train=64))
        params, opt = params_and_optimizer(model, trainer)
        torch.save({"params": params, "opt": opt, "records": cb.records if cb else None,
                    "dirpath": str(cb.dirpath) if cb else None,
                    "cooled_metric": float(trainer.callback_metrics["cooldown/val_loss"]) if cb else None,
                    "world_size": trainer.world_size},
                   out / f"{name}-rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    from _lightning_models import assert_bit_identical
    from cooldown_callbacks.records import RECORDS_NAME, read_records

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=240,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    res = {(n, r): torch.load(tmp_path / f"{n}-rank{r}.pt", weights_only=False)
           for n in ("forks", "plain") for r in (0, 1)}
    assert res["forks", 0]["world_size"] == 2
    for r in (0, 1):  # forks ran on both ranks, at the validation steps, and succeeded
        assert [(x["step"], x["status"]) for x in res["forks", r]["records"]] == [(4, "ok"), (8, "ok")]
        # the main branch of each rank is bit-identical to the DDP run without forks
        assert_bit_identical((res["forks", r]["params"], res["forks", r]["opt"]),
                             (res["plain", r]["params"], res["plain", r]["opt"]))
    # cooled metrics are reduced over ranks: both ranks logged the same value
    assert res["forks", 0]["cooled_metric"] == res["forks", 1]["cooled_metric"]
    params = lambda r: {k: v for k, v in res["forks", r]["params"].items() if not k.startswith("bn.")}  # noqa: E731
    assert_bit_identical((params(0), []), (params(1), []))  # DDP keeps parameters in sync; BatchNorm stats are per rank

    # each cooled checkpoint written once, by rank 0, atomically; one record line per fork
    cooled = tmp_path / "forks" / "cooled"
    assert res["forks", 0]["dirpath"] == res["forks", 1]["dirpath"] == str(cooled)
    assert sorted(p.name for p in cooled.iterdir()) == [
        "cooled-step=00000004-cd=2.ckpt", "cooled-step=00000008-cd=2.ckpt", RECORDS_NAME]
    lines = [ln for ln in (cooled / RECORDS_NAME).read_text().splitlines() if '"type": "main_metrics"' not in ln]
    assert len(lines) == 2
    records = read_records(cooled)
    assert [r["step"] for r in records] == [4, 8]
    ckpt = torch.load(cooled / "cooled-step=00000008-cd=2.ckpt", weights_only=False)
    assert ckpt["global_step"] == 10
    assert records[1]["metrics"]["val_loss"] == res["forks", 0]["cooled_metric"]


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
