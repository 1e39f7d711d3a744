"""Tiny LightningModules and data for the Lightning adapter's tests.

Real text (the Python standard library's sources, via ``examples/charlm.py``), a real byte-level
model with an embedding, BatchNorm (buffers that change in forward) and dropout (RNG), real
optimizers, real ``lightning.Trainer``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from charlm import splits  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402

BLOCK = 16
_DATA: dict = {}


def text_data() -> tuple:
    if "splits" not in _DATA:
        _DATA["splits"] = splits(block_size=BLOCK, max_bytes=200_000)
    return _DATA["splits"]


class CharModel(L.LightningModule):
    """Next-byte prediction: embedding -> linear -> BatchNorm -> GELU -> dropout -> head.

    Options cover the cases the adapter must handle: ``manual`` optimization, a torchmetrics metric
    updated in ``training_step`` (``metric=True``), an LR scheduler from ``configure_optimizers``
    (``scheduler``: a callable ``optimizer -> LRScheduler``). ``poison(module)``
    (set as an attribute) makes the training loss NaN when it returns True, or only the gradients NaN
    when it returns ``"grad"``; ``fail_val(module)`` makes ``validation_step`` raise.
    """

    def __init__(self, d: int = 16, lr: float = 0.01, dropout: float = 0.1, manual: bool = False,
                 metric: bool = False, clip: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = not manual
        self.emb = nn.Embedding(256, d)
        self.fc = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, 256)
        if metric:
            from torchmetrics.classification import MulticlassAccuracy

            self.train_acc = MulticlassAccuracy(num_classes=256, average="micro")
        self.scheduler: Callable | None = None
        self.poison: Callable[[Any], bool] | None = None
        self.fail_val: Callable[[Any], bool] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.emb(x))
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.drop(F.gelu(h)))

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits

    def training_step(self, batch, batch_idx):
        loss, logits = self._loss(batch)
        kind = self.poison(self) if self.poison is not None else None
        if kind == "grad":  # a finite loss whose gradients are NaN (d sqrt(z)/dz at 0, times 0)
            loss = loss + (logits * 0).abs().sqrt().sum() * 0
        elif kind:
            loss = loss * float("nan")
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if self.hparams.metric:
            self.train_acc(logits.flatten(0, 1).argmax(-1), batch[1].flatten())
            self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        if self.hparams.manual:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            if self.hparams.clip:
                self.clip_gradients(opt, gradient_clip_val=self.hparams.clip, gradient_clip_algorithm="norm")
            opt.step()
            sch = self.lr_schedulers()
            if sch is not None:
                sch.step()
        return loss

    def validation_step(self, batch, batch_idx):
        if self.fail_val is not None and self.fail_val(self):
            raise RuntimeError("validation failed on purpose")
        loss, _ = self._loss(batch)
        self.log("val_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


class CharData(L.LightningDataModule):
    """``n_train`` training windows (shuffled with a seeded generator), ``n_val`` validation windows."""

    def __init__(self, n_train: int = 32, n_val: int = 8, batch_size: int = 4, stateful: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        self.n_train, self.n_val, self.batch_size, self.stateful, self.seed = n_train, n_val, batch_size, stateful, seed

    def train_dataloader(self):
        train, _ = text_data()
        ds = Subset(train, range(self.n_train))
        gen = torch.Generator().manual_seed(self.seed)
        if self.stateful:
            from torchdata.stateful_dataloader import StatefulDataLoader

            return StatefulDataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=gen)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self):
        _, val = text_data()
        return DataLoader(Subset(val, range(self.n_val)), batch_size=self.batch_size)


class TwoOptimizerModel(CharModel):
    """Manual optimization with two optimizers stepped in every ``training_step`` (a GAN's pattern):
    ``global_step`` moves by 2 per batch. ``schedulers=True`` adds a LambdaLR per optimizer, stepped once
    per batch (the reference a run without the callback uses)."""

    def __init__(self, schedule: Callable | None = None, **kw) -> None:
        super().__init__(manual=True, **kw)
        self.schedule = schedule

    def training_step(self, batch, batch_idx):
        opt_body, opt_head = self.optimizers()
        for opt in (opt_body, opt_head):  # one update each, on the same batch, like generator/discriminator
            loss, _ = self._loss(batch)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        for sch in self.lr_schedulers() or []:
            sch.step()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        head = list(self.head.parameters())
        body = [p for n, p in self.named_parameters() if not n.startswith("head.")]
        opts = [torch.optim.AdamW(body, lr=self.hparams.lr), torch.optim.AdamW(head, lr=self.hparams.lr / 2)]
        if self.schedule is None:
            return opts
        return opts, [torch.optim.lr_scheduler.LambdaLR(o, self.schedule) for o in opts]


class TextStream(IterableDataset):
    """The training windows in order, as a stream (an ``IterableDataset`` without length).

    ``shared=True``: every iterator continues from one shared read position (a socket, a pipe, a
    file handle): a second iterator takes batches from the first. ``random_skip=True``: the stream
    skips windows at random with the main process's global RNG (a shuffle buffer without a seed).
    """

    def __init__(self, n: int = 64, shared: bool = False, random_skip: bool = False) -> None:
        self.n, self.shared, self.random_skip = n, shared, random_skip
        self._position = [0]

    def __iter__(self):
        position = self._position if self.shared else [0]
        train, _ = text_data()
        while position[0] < self.n:
            i = position[0]
            position[0] += 1 + (int(torch.randint(0, 2, ())) if self.random_skip else 0)
            yield train[i]


class StreamData(L.LightningDataModule):
    """A plain ``DataLoader`` over :class:`TextStream` (batch 4); validation as :class:`CharData`."""

    def __init__(self, n_train: int = 64, n_val: int = 8, **stream) -> None:
        super().__init__()
        self.n_train, self.n_val, self.stream = n_train, n_val, stream

    def train_dataloader(self):
        return DataLoader(TextStream(self.n_train, **self.stream), batch_size=4)

    def val_dataloader(self):
        return CharData(n_val=self.n_val).val_dataloader()


def trainer_kwargs(tmp: Path, **kw) -> dict:
    """Quiet, fast, deterministic defaults for a test Trainer."""
    base = dict(accelerator="cpu", devices=1, default_root_dir=str(tmp), enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, logger=False, num_sanity_val_steps=0,
                log_every_n_steps=1, deterministic=True)
    base.update(kw)
    return base


SCHEDULE = WSD(warmup_steps=3)


def lambda_scheduler(schedule):
    return lambda opt: schedule.lambda_lr(opt)


def fit(tmp: Path, name: str, *, cb=None, scheduler=None, model_kw=None, data_kw=None, model=None, data=None,
        callbacks=(), ckpt_path=None, seed: int = 0, logger=True, poison=None, fail_val=None,
        holder: list | None = None, **trainer_kw):
    """One seeded ``Trainer.fit`` (12 steps, validation every 4 by default); returns (trainer, model).

    ``model``: a LightningModule class or factory, called after seeding (default ``CharModel(**model_kw)``);
    ``data``: a DataModule (default ``CharData(**data_kw)``); ``logger``: ``True`` for ``CSVLogger(tmp, name, version=0)``, ``False``, or
    a logger. ``scheduler``: ``optimizer -> LRScheduler`` for ``configure_optimizers``; ``poison`` /
    ``fail_val``: ``module -> bool`` making the training loss NaN / ``validation_step`` raise; ``holder``
    receives the model before ``fit`` (for runs that raise)."""
    L.seed_everything(seed, verbose=False)
    model = (model or CharModel)(**(model_kw or {}))
    model.scheduler, model.poison, model.fail_val = scheduler, poison, fail_val
    if holder is not None:
        holder.append(model)
    cbs = list(callbacks) + ([cb] if cb is not None else [])
    kw = dict(max_steps=12, val_check_interval=4, check_val_every_n_epoch=None)
    kw.update(trainer_kw)
    if logger is True:
        kw["logger"] = CSVLogger(tmp, name=name, version=0)
    elif logger is not False:
        kw["logger"] = logger
    trainer = L.Trainer(**trainer_kwargs(tmp / name, callbacks=cbs, **kw))
    trainer.fit(model, datamodule=CharData(**(data_kw or {})) if data is None else data, ckpt_path=ckpt_path)
    return trainer, model


def callback(tmp: Path, plan=None, schedule=SCHEDULE, **kw):
    """A quiet ``CooldownCallback`` writing to ``tmp/cooled`` (default: a 3-step fork at every validation)."""
    from cooldown_callbacks.integrations.lightning import CooldownCallback

    plan = plan if plan is not None else ForkPlan(on_eval=True, cooldown=Cooldown(steps=3))
    kw.setdefault("verbose", False)
    kw.setdefault("dirpath", tmp / "cooled")
    return CooldownCallback(schedule=schedule, plan=plan, **kw)


def main_metrics(trainer) -> dict:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("cooldown/")}


def read_csv_metrics(path: Path, drop_prefix: str | None = None) -> list[dict]:
    """Rows of a CSVLogger ``metrics.csv`` (empty cells removed); optionally without ``drop_prefix`` keys."""
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            r = {k: v for k, v in row.items() if v not in ("", None)}
            if drop_prefix is not None:
                r = {k: v for k, v in r.items() if not k.startswith(drop_prefix)}
                if set(r) <= {"step", "epoch"}:
                    continue
            rows.append(r)
    return rows


def params_and_optimizer(module: L.LightningModule, trainer: L.Trainer) -> tuple[dict, list]:
    params = {k: v.detach().clone() for k, v in module.state_dict().items()}
    opt_states = []
    for opt in trainer.optimizers:
        for p, st in opt.state.items():
            opt_states.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()})
    return params, opt_states


def assert_bit_identical(a: tuple[dict, list], b: tuple[dict, list]) -> None:
    pa, oa = a
    pb, ob = b
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"parameter/buffer {k} differs"
    assert len(oa) == len(ob)
    for sa, sb in zip(oa, ob):
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), f"optimizer state {k} differs"
            else:
                assert sa[k] == sb[k]
