"""What README's code snippets take for granted, built small: the names a snippet uses without
defining them (``model``, ``dm``, ``train_ds``, ``evaluate``, ``get_batch``, ...), per framework.

A snippet is matched to its framework by the adapter it imports. Each builder returns real objects
(a LightningModule, a GPT-2 built from a config, an AdamW, DataLoaders over the Python standard
library's own sources) sized so that the snippet runs in seconds.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from charlm import stdlib_text  # noqa: E402

BLOCK = 16
STOP_AFTER = 24  # optimizer steps for snippets that train "forever" (Lightning's max_epochs=-1)

Out = namedtuple("Out", ["logits", "loss"])  # both `model(**batch).loss` and `logits, loss = model(X, Y)`


def _bytes(n: int = 60_000) -> torch.Tensor:
    return torch.frombuffer(bytearray(stdlib_text(n)), dtype=torch.uint8).long()


class TinyLM(nn.Module):
    """Next-byte prediction with dropout (the RNG matters), called HF-style or nanoGPT-style."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, 256)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Out:
        logits = self.head(self.drop(self.emb(input_ids)))
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return Out(logits, loss)


class _Windows(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // (BLOCK + 1)

    def __getitem__(self, i: int) -> dict:
        w = self.data[i * (BLOCK + 1):(i + 1) * (BLOCK + 1)]
        return {"input_ids": w[:-1], "labels": w[1:]}


def _torch_loop(names: set[str]) -> dict:
    """Accelerate / plain PyTorch snippets: a model, its optimizer, data as a loader or get_batch."""
    torch.manual_seed(0)
    data = _bytes()
    train, val = data[:50_000], data[50_000:]
    model = TinyLM()

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = train if split == "train" else val
        ix = torch.randint(len(d) - BLOCK - 1, (8,))
        x = torch.stack([d[i:i + BLOCK] for i in ix])
        return x, torch.stack([d[i + 1:i + 1 + BLOCK] for i in ix])

    @torch.no_grad()
    def estimate_loss(m: nn.Module) -> dict:
        was = m.training
        m.eval()
        out = {s: float(torch.stack([m(*get_batch(s))[1] for _ in range(4)]).mean()) for s in ("train", "val")}
        m.train(was)
        return out

    val_loader = DataLoader(_Windows(val), batch_size=16)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return float(torch.stack([m(**b).loss for b in val_loader]).mean())

    return dict(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
                train_loader=DataLoader(_Windows(train), batch_size=32, shuffle=True), evaluate=evaluate,
                get_batch=get_batch, estimate_loss=estimate_loss, eval_interval=10, max_iters=STOP_AFTER + 6,
                dtype="float32")


def _lightning(names: set[str]) -> dict:
    import lightning as L

    from _lightning_models import CharData, CharModel

    class Model(CharModel):
        def on_train_batch_end(self, *args: Any) -> None:
            if self.global_step >= STOP_AFTER:
                self.trainer.should_stop = True

    torch.manual_seed(0)
    dm: L.LightningDataModule = CharData()
    return dict(model=Model(), dm=dm, datamodule=dm)


def _transformers(names: set[str]) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from _hf_data import ByteLM

    torch.manual_seed(0)
    data = _bytes(40_000).to(torch.uint8)
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    train_ds, eval_ds = ByteLM(data[:30_000], 32), ByteLM(data[30_000:32_048], 32)
    return dict(model=GPT2LMHeadModel(config), train_ds=train_ds, eval_ds=eval_ds, train_dataset=train_ds,
                eval_dataset=eval_ds)


def _library() -> dict:
    """What a fragment without its imports takes for granted: torch and the library's public names."""
    import cooldown_callbacks
    from cooldown_callbacks.integrations.accelerate import CooldownHook

    names = {k: getattr(cooldown_callbacks, k) for k in cooldown_callbacks.__all__}
    return dict(names, torch=torch, CooldownHook=CooldownHook)


class Blocks(nn.Module):
    """A model with ``blocks`` to shard one by one (FSDP2's usual pattern), called HF-style."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        self.head = nn.Linear(16, 256)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Out:
        h = self.emb(input_ids)
        for b in self.blocks:
            h = torch.relu(b(h))
        logits = self.head(h)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return Out(logits, loss)


def _sharded(names: set[str]) -> dict:
    """Fragments of a sharded (FSDP2 / DeepSpeed) script: one rank of a process group made here."""
    env = dict(_torch_loop(names), **_library())
    # the fragments loop `for batch in loader:` to its end: one epoch of STOP_AFTER batches (a step of a
    # DeepSpeed engine on the CPU is slow; two forks at the scaled every=10 fit in it)
    env["loader"] = DataLoader(torch.utils.data.Subset(env["train_loader"].dataset, range(STOP_AFTER * 32)),
                               batch_size=32, shuffle=True)
    env["loss_fn"] = lambda m, batch: m(**batch).loss
    env["eval_fn"] = env["evaluate"]
    env["build_model"] = Blocks
    if "fully_shard" in names:
        from torch.distributed.fsdp import fully_shard

        env["fully_shard"] = fully_shard
    if "deepspeed" in names or "ds_config" in names:
        import pytest

        env["deepspeed"] = pytest.importorskip("deepspeed")
        env["ds_config"] = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1,
                            "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                            "steps_per_print": 10**9}
    return env


BUILDERS: dict[str, Callable[[set[str]], dict]] = {
    "lightning": _lightning, "transformers": _transformers, "accelerate": _torch_loop, "core": _torch_loop,
    "sharded": _sharded,
}


def framework(source: str) -> str:
    for name in ("lightning", "transformers", "accelerate"):
        if f"integrations.{name}" in source:
            return name
    if "fully_shard" in source or "deepspeed" in source:
        return "sharded"
    return "core"


@contextlib.contextmanager
def environment(source: str, read: set[str], required: set[str]) -> Iterator[dict]:
    """The objects a snippet reads that the builders have (``read``); ``KeyError`` names any of those it
    never defines itself (``required``) that the builders lack. A sharded fragment runs as the one rank
    of a process group (gloo), torn down afterwards."""
    kind = framework(source)
    group = kind == "sharded" and not torch.distributed.is_initialized()
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    if group:
        os.environ.update(_DIST_ENV)
        torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    try:
        built = BUILDERS[kind](read)
        missing = sorted(required - built.keys())
        if missing:
            raise KeyError(f"README snippet uses names tests/_readme_env.py does not build: {missing}")
        yield {k: built[k] for k in read if k in built}
    finally:
        if group:
            torch.distributed.destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_DIST_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
