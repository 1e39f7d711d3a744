"""The exactness checks of ``gpu_check.py``: each compares a run with forks against the same run without
the library, ``torch.equal`` on every tensor of the main branch (this rank's local shards), the grad
scaler's state and the RNG states. Every check takes a ``device``, so the CPU test suite runs them too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cooldown_callbacks import WSD, Cooldown, ForkPlan, sharding

__all__ = ["PRECISIONS", "SCHED", "state_of", "compare", "failed", "MLP", "make_mlp", "batches", "check_hook",
           "check_lightning", "check_hf", "check_fsdp_hook"]

PRECISIONS = ("fp32", "fp16", "bf16")
SCHED = WSD(warmup_steps=2)


# -- comparing two runs -----------------------------------------------------------------------------
def state_of(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], scaler: Any = None) -> dict:
    """Every main-branch tensor of this rank (local shards for DTensors), on the CPU, and the RNGs."""
    sharding.reshard([model])
    out = {f"param.{n}": sharding.local(p).detach().cpu().clone() for n, p in model.named_parameters()}
    out.update({f"buffer.{n}": b.detach().cpu().clone() for n, b in model.named_buffers()})
    for i, opt in enumerate(optimizers):
        for j, (p, st) in enumerate(opt.state.items()):
            for k, v in st.items():
                out[f"opt{i}.{j}.{k}"] = sharding.local(torch.as_tensor(v)).detach().cpu().clone()
        out[f"opt{i}.lrs"] = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
    if scaler is not None:
        for k, v in scaler.state_dict().items():
            out[f"scaler.{k}"] = torch.as_tensor(v).cpu()
    out["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def compare(name: str, ref: dict, got: dict, **details: Any) -> dict:
    """A check's row: exact when both runs hold the same keys and every tensor is ``torch.equal``."""
    if ref.keys() != got.keys():
        diff = sorted(set(ref) ^ set(got))
        return {"check": name, "exact": False, "tensors": len(ref), "differs": [f"keys: {diff[:5]}"], **details}
    bad = [k for k in ref if not torch.equal(ref[k], got[k])]
    return {"check": name, "exact": not bad, "tensors": len(ref), "differs": bad[:8], **details}


def failed(name: str, e: BaseException, **details: Any) -> dict:
    return {"check": name, "exact": False, "tensors": 0, "differs": [f"{type(e).__name__}: {e}"[:300]], **details}


# -- 1. the hook in a plain PyTorch loop --------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.inp, self.drop, self.out = nn.Linear(d, 4 * d), nn.Dropout(0.2), nn.Linear(4 * d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(F.gelu(self.inp(x))))


def make_mlp(device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MLP().to(device)
    opt = torch.optim.AdamW([{"params": model.inp.parameters(), "lr": 1e-3},
                             {"params": model.out.parameters(), "lr": 3e-4}], weight_decay=0.01)
    return model, opt


def batches(n: int, seed: int, d: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(32, d, generator=g)
        out.append((x, x.sum(1, keepdim=True) * 0.1))
    return out


def check_hook(device: str, precision: str, steps: int = 9, storage: str = "cpu") -> dict:
    """The hook (``step_fn`` path: the user's own autocast / GradScaler loop body) vs a LambdaLR run."""
    from cooldown_callbacks.integrations.accelerate import CooldownHook

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    data = batches(steps, seed=1)
    results = {}
    for mode in ("ref", "forks"):
        model, opt = make_mlp(device)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10) if precision == "fp16" else None
        torch.manual_seed(123)

        def step_fn(batch, model=model, opt=opt, scaler=scaler):
            x, y = (t.to(device) for t in batch)
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = F.mse_loss(model(x).float(), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            opt.zero_grad()
            return loss

        if mode == "ref":
            sched = SCHED.lambda_lr(opt)
            after = sched.step
        else:
            hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=3, cooldown=Cooldown(steps=2),
                                                                          data=batches(8, seed=2)),
                                step_fn=step_fn, eval_fn=lambda m: {"val_loss": 0.0}, scalers=[scaler] if scaler else [],
                                dirpath=tempfile.mkdtemp(prefix="gpu-check-"), snapshot_storage=storage, verbose=False)
            after = hook.step
        for b in data:
            step_fn(b)
            after()
        results[mode] = state_of(model, [opt], scaler)
        if mode == "forks":
            forks = len(hook.records)
    return compare(f"hook {precision} ({storage} snapshot)", results["ref"], results["forks"], framework="hook",
                   precision=precision, forks=forks)


# -- Lightning -------------------------------------------------------------------------------------
def check_lightning(device: str, precision: str, tmp: Path) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from cooldown_callbacks.integrations.lightning import CooldownCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = MLP()
            self.scheduler = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x).float(), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.mse_loss(self.net(x).float(), y))

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
            if self.scheduler is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}

    data = batches(16, seed=3)
    xs, ys = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    lp = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}[precision]
    results = {}
    for mode in ("ref", "forks"):
        L.seed_everything(0, verbose=False)
        module = Module()
        cbs = []
        if mode == "ref":
            module.scheduler = SCHED.lambda_lr
        else:
            cbs = [CooldownCallback(schedule=SCHED, plan=ForkPlan(on_eval=True, cooldown=Cooldown(steps=2)),
                                    dirpath=tmp / f"lightning-{precision}", verbose=False, progress_bar=False)]
        trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=lp, max_steps=8,
                            val_check_interval=4, check_val_every_n_epoch=None, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, default_root_dir=str(tmp), callbacks=cbs)
        train = DataLoader(TensorDataset(xs, ys), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        trainer.fit(module, train, DataLoader(TensorDataset(xs[:64], ys[:64]), batch_size=32))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        results[mode] = state_of(module, trainer.optimizers, scaler)
        forks = len(cbs[0].records) if cbs else 0
    return compare(f"lightning {lp}", results["ref"], results["forks"], framework="lightning", precision=precision,
                   forks=forks)


# -- HF Trainer ------------------------------------------------------------------------------------
def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=2))


class _Bytes(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.data = torch.randint(0, 256, (n, 32), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def check_hf(device: str, precision: str, tmp: Path, fsdp: bool = False) -> dict:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback

    results, forks, loaded = {}, 0, None
    for mode in ("ref", "forks"):
        kw = dict(fp16=precision == "fp16", bf16=precision == "bf16", use_cpu=device == "cpu")
        if fsdp:
            kw.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
        args = TrainingArguments(output_dir=str(tmp / f"hf-{precision}-{mode}"), max_steps=8,
                                 per_device_train_batch_size=8, per_device_eval_batch_size=16, eval_strategy="steps",
                                 eval_steps=4, save_strategy="no", report_to="none", disable_tqdm=True,
                                 learning_rate=1e-3, weight_decay=0.01, max_grad_norm=0.5, seed=7,
                                 lr_scheduler_type="constant_with_warmup", warmup_steps=2, **kw)
        cbs = [] if mode == "ref" else [CooldownTrainerCallback(schedule=SCHED, plan=ForkPlan(
            on_eval=True, cooldown=Cooldown(steps=2)), dirpath=tmp / f"hf-{precision}-cooled", verbose=False)]
        t = Trainer(model=_gpt2(), args=args, train_dataset=_Bytes(256, 0), eval_dataset=_Bytes(32, 1), callbacks=cbs)
        t.remove_callback(PrinterCallback)  # no log lines on stdout
        t.train()
        scaler = getattr(t.accelerator, "scaler", None)
        results[mode] = state_of(t.model, [t.optimizer.optimizer if hasattr(t.optimizer, "optimizer") else t.optimizer],
                                 scaler)
        if cbs:
            forks = len(cbs[0].records)
            if fsdp and cbs[0].records:
                from transformers import AutoModelForCausalLM

                AutoModelForCausalLM.from_pretrained(cbs[0].records[-1]["checkpoint"])
                loaded = True
    name = f"hf {'fp16=True' if precision == 'fp16' else 'bf16=True' if precision == 'bf16' else 'fp32'}"
    return compare(name + (" FSDP2" if fsdp else ""), results["ref"], results["forks"], framework="transformers",
                   precision=precision, forks=forks, **({"cooled_loads_with_from_pretrained": loaded} if fsdp else {}))


# -- 2. sharded, on one GPU (child process under torchrun) -------------------------------------------
def check_fsdp_hook(device: str, variant: str, tmp: Path) -> dict:
    """The hook with plain ``fully_shard`` (variant "fp32" or "bf16-mp") or Accelerate's FSDP2 plugin ("accelerate")."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from cooldown_callbacks.integrations.accelerate import CooldownHook

    acc = None
    if variant == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin

        acc = Accelerator(gradient_accumulation_steps=2, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    results, forks, loads = {}, 0, False
    for mode in ("ref", "forks"):
        model, opt = make_mlp("cpu")
        if acc is not None:
            model, opt = acc.prepare(model, opt)
        else:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if variant == "bf16-mp" else MixedPrecisionPolicy()
            model = model.to(device)
            fully_shard(model.inp, mp_policy=mp)
            fully_shard(model.out, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            opt = torch.optim.AdamW([{"params": model.inp.parameters(), "lr": 1e-3},
                                     {"params": model.out.parameters(), "lr": 3e-4}], weight_decay=0.01)
        inner = opt.optimizer if acc is not None else opt
        torch.manual_seed(123)

        def loss_fn(m, batch):
            x, y = (t.to(device) for t in batch)
            return F.mse_loss(m(x).float(), y)

        hook = None
        if mode == "ref":
            sched = SCHED.lambda_lr(inner)
            after = sched.step
        else:
            hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(every=3, cooldown=Cooldown(steps=2),
                                                                          data=batches(8, seed=2)),
                                loss_fn=loss_fn, eval_fn=lambda m: {"val_loss": 0.0}, accelerator=acc,
                                gradient_accumulation_steps=2, max_grad_norm=1.0,
                                dirpath=tmp / f"fsdp-{variant}", verbose=False)
            after = hook.step
        for micro, b in enumerate(batches(18, seed=1)):
            if acc is not None:  # the Accelerate idiom (no_sync = set_requires_gradient_sync(False) under FSDP2)
                with acc.accumulate(model):
                    acc.backward(loss_fn(model, b))
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
                if acc.sync_gradients:
                    after()
                continue
            last = micro % 2 == 1
            with sharding.no_gradient_sync(model, enabled=not last):
                (loss_fn(model, b) / 2).backward()
            if last:
                sharding.clip_grad_norm(model, 1.0)
                opt.step()
                opt.zero_grad()
                after()
        results[mode] = state_of(model, [inner])
        if hook is not None:
            forks = len(hook.records)
            plain = MLP()
            plain.load_state_dict(torch.load(hook.records[-1]["checkpoint"], weights_only=True))
            loads = True
    return compare(f"hook FSDP2 ({variant})", results["ref"], results["forks"], framework="hook FSDP2",
                   precision=variant, forks=forks, cooled_loads_into_plain_model=loads)
