"""CooldownCallback under Lightning's ``ModelParallelStrategy`` (FSDP2 in ``configure_model``), 2 CPU processes.

Run as ``python tests/_sharded_lightning_script.py OUT`` (Lightning's launcher starts rank 1 by
re-running this file). Three fits, one after the other, each 8 steps with validation every 4 steps:

- ``plain``: no callback, the same schedule as a ``LambdaLR`` in ``configure_optimizers``;
- ``on_eval``: forks at every validation (steps 4 and 8, 2 cooldown steps), full ``.ckpt`` saves;
- ``at_end``: one fork when training ends, right after Lightning validated at step 8 (FSDP2's root is
  unsharded then), saved as a DCP folder (``save_format="dcp"``).

Each rank writes ``OUT/<fit>-rank<r>.pt``: its local shards of parameters and optimizer state, the
LRs, the records and the logged cooled metric.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lightning_models import CharData, trainer_kwargs  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan, sharding  # noqa: E402


class ShardedCharModel(L.LightningModule):
    """Next-byte prediction with dropout; ``configure_model`` shards it with FSDP2 (each Linear, then the
    network as root) on the data-parallel mesh; without a mesh (``load_from_checkpoint``) it stays plain."""

    def __init__(self, d: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Embedding(256, d), nn.Linear(d, d), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(d, 256))
        self.scheduler = None

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[1], mesh=mesh)
        fully_shard(self.net[4], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW([{"params": list(self.net[0].parameters()) + list(self.net[1].parameters()), "lr": 1e-2},
                                 {"params": self.net[4].parameters(), "lr": 3e-3}], weight_decay=0.01)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


def local_state(module: L.LightningModule, trainer: L.Trainer) -> dict:
    sharding.reshard([module])  # read the shards, not what the last validation left unsharded
    out = {f"param.{n}": sharding.local(p).detach().clone() for n, p in module.named_parameters()}
    names = {p: n for n, p in module.named_parameters()}
    opt = trainer.optimizers[0]
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"opt.{names[p]}.{k}"] = sharding.local(torch.as_tensor(v)).clone()
    out["lrs"] = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
    return out


def main(out: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from cooldown_callbacks.integrations.lightning import CooldownCallback

    torch.set_num_threads(1)
    schedule = WSD(warmup_steps=3)
    plans = {"plain": None, "on_eval": (ForkPlan(on_eval=True, cooldown=Cooldown(steps=2)), "full"),
             "at_end": (ForkPlan(on_eval=False, at_end=True, cooldown=Cooldown(steps=2)), "dcp")}
    for name, spec in plans.items():
        L.seed_everything(0, verbose=False)
        model = ShardedCharModel()
        cb = None
        if spec is None:
            model.scheduler = schedule.lambda_lr
        else:
            cb = CooldownCallback(schedule=schedule, plan=spec[0], save_format=spec[1], dirpath=out / name / "cooled",
                                  verbose=False)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer = L.Trainer(**trainer_kwargs(out / name, strategy=strategy, devices=2, max_steps=8,
                                             val_check_interval=4, check_val_every_n_epoch=None,
                                             callbacks=[cb] if cb else []))
        trainer.fit(model, datamodule=CharData(n_train=64))
        metric = trainer.callback_metrics.get("cooldown/val_loss")
        torch.save({"state": local_state(model, trainer), "records": cb.records if cb else None,
                    "cooled_metric": None if metric is None else float(metric), "world_size": trainer.world_size},
                   out / f"{name}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
