"""Run under ``torchrun --nproc_per_node 2``: DeepSpeed ZeRO loops (CPU, gloo) with and without forks.

argv: OUT_DIR [VARIANT ...] (default: all of ``VARIANTS`` and ``refusals``); a VARIANT is ``<stage>`` or
``<stage>-bf16`` / ``<stage>-fp16`` (DeepSpeed refuses fp16 on a CPU without fp16 kernels: the script
lifts that check, the ZeRO code is unchanged), ``<stage>-autocast`` (DeepSpeed's torch_autocast, bf16),
``<stage>-sched`` (the user's StepLR given to
DeepSpeed, the hook with ``schedule=None``; no ``fixed`` run) or ``accel-<stage>`` (Accelerate's
DeepSpeed plugin and its loop idiom; no ``fixed`` run). For each variant, one process runs, each from the same
seeds, into ``OUT_DIR/<variant>/<mode>/``:

- ``none``: the main branch without the library (the WSD schedule as a ``LambdaLR`` the loop steps);
- ``forks``: the same loop with a :class:`CooldownHook` forking every 4 steps (3 cooldown steps, peek data);
- ``fixed``: a fixed-budget run of 4 + 3 steps with the cooled schedule (no library code in the loop).

Each writes ``rank-<r>.pt``: the module's state, the torch optimizer's params (this rank's fp32 master
partitions under ZeRO-1/2) and state, its LRs, the engine's counters and last grad norm; ``fixed`` also ``full.pt``
(rank 0): the full model with fp32 masters gathered by DeepSpeed's own ``safe_get_full_fp32_param``
(ZeRO-1/2; under stage 0 the module's own parameters).
The loop: ``engine(x)``, ``engine.backward``, ``engine.step`` per micro-batch; DeepSpeed accumulates 2
micro-batches and clips at 0.5. ``refusals`` writes ``refusals.json``: the error of each configuration
the hook must refuse.
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: no CUDA here

import torch  # noqa: E402
from torch.utils.data import DistributedSampler, TensorDataset  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _loops import XV, YV, X, Y, make_model_opt  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.integrations.accelerate import CooldownHook  # noqa: E402

SCHED = WSD(warmup_steps=2)
STEPS, EVERY, COOL = 12, 4, Cooldown(steps=3)


def ds_config(variant: str) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
           "zero_optimization": {"stage": int(variant.split("-")[0])}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9}
    if variant.endswith("-bf16"):
        cfg["bf16"] = {"enabled": True}
    if variant.endswith("-fp16"):  # dynamic loss scale from 2**20: overflows skip steps, the scale moves
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 20, "loss_scale_window": 2, "hysteresis": 1}
    if variant.endswith("-autocast"):  # torch.autocast (bf16) around the fp32 module
        cfg["torch_autocast"] = {"enabled": True, "dtype": "torch.bfloat16"}
    return cfg


def make_engine(variant: str, config: dict | None = None):
    """``-sched`` variants give DeepSpeed the user's own scheduler (a chainable StepLR that the engine steps)."""
    import deepspeed

    model, opt = make_model_opt()
    if variant.endswith(("-bf16", "-fp16")):  # BatchNorm's fp32 running stats do not mix with a half module
        model[1] = torch.nn.Identity()
        opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-2},
                                 {"params": model[4].parameters(), "lr": 3e-3}], weight_decay=0.01)
    sched = (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5)) if "-sched" in variant else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config or ds_config(variant),
                                           lr_scheduler=sched)
    return engine, opt


def loss_fn(model, batch):
    """MSE of the engine's output; inputs in the module's dtype."""
    x, y = batch
    return torch.nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)


def eval_fn(model) -> dict:
    t = loss_fn(model, (XV, YV)).detach().reshape(1)
    torch.distributed.all_reduce(t)
    return {"val_loss": t.item() / torch.distributed.get_world_size()}


def make_loader():
    from torchdata.stateful_dataloader import StatefulDataLoader

    sampler = DistributedSampler(TensorDataset(X, Y), shuffle=True, seed=3)
    # its own generator: creating an iterator (the fork's peek clone too) then draws no global RNG
    return StatefulDataLoader(TensorDataset(X, Y), batch_size=4, sampler=sampler,
                              generator=torch.Generator().manual_seed(5))


def train(engine, loader, steps: int, after_step) -> None:
    t = 0
    while t < steps:
        for batch in loader:
            engine.backward(loss_fn(engine, batch))
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if boundary:
                t += 1
                after_step()
                if t == steps:
                    return


def rank_state(engine) -> dict:
    """Module state, the torch optimizer's params (ZeRO-1/2: this rank's fp32 master partitions,
    ``single_partition_of_fp32_groups``) and state, LRs, and the engine's counters."""
    inner = engine.optimizer
    while hasattr(getattr(inner, "optimizer", None), "param_groups"):  # DeepSpeedZeroOptimizer -> AdamW
        inner = inner.optimizer
    out = {f"model.{k}": v.detach().clone() for k, v in engine.module.state_dict().items()}
    masters = [p for g in inner.param_groups for p in g["params"]]
    if hasattr(engine.optimizer, "single_partition_of_fp32_groups"):
        assert [id(p) for p in masters] == [id(p) for p in engine.optimizer.single_partition_of_fp32_groups]
    for i, p in enumerate(masters):
        out[f"master.{i}"] = p.detach().clone()
    for i, (p, st) in enumerate(inner.state.items()):
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = torch.as_tensor(v).clone()
    out["lrs"] = torch.tensor([g["lr"] for g in inner.param_groups], dtype=torch.float64)
    out["counters"] = torch.tensor([engine.global_steps, engine.global_samples, engine.micro_steps,
                                    engine.skipped_steps])
    # the last step's grad norm, as users log it (the engine's and the ZeRO optimizer's copy)
    out["grad_norm"] = torch.tensor([float(engine.get_global_grad_norm() or 0.0),
                                     float(getattr(engine.optimizer, "_global_grad_norm", None) or 0.0)])
    return out


def full_fp32(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # a collective: every rank
        state[name] = (full if full is not None else p).detach().clone()  # ZeRO-0: no masters to gather
    return state


def run(out: str, variant: str, mode: str) -> None:
    os.makedirs(out, exist_ok=True)
    engine, opt = make_engine(variant)
    rank = torch.distributed.get_rank()
    torch.manual_seed(100 + rank)  # dropout differs per rank
    loader = make_loader()
    if "-sched" in variant and mode == "none":
        train(engine, loader, STEPS, lambda: None)  # the engine steps its scheduler
    elif "-sched" in variant:  # schedule=None: the main branch keeps the engine's scheduler, forks decay from its LR
        hook = CooldownHook(engine, None, schedule=None, plan=ForkPlan(every=EVERY, cooldown=COOL, data="peek"),
                            loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader, dirpath=os.path.join(out, "cooled"),
                            verbose=False)
        train(engine, loader, STEPS, hook.step)
        hook.close()
    elif mode in ("none", "fixed"):
        # stepped by the loop, not given to deepspeed.initialize: with a client scheduler, DeepSpeed (0.19,
        # stage 0 + bf16) builds its fp32 masters from the bf16-cast weights, without one from the fp32 ones
        sched = (SCHED if mode == "none" else SCHED.cooled(at=EVERY, cooldown=COOL)).lambda_lr(opt)
        train(engine, loader, STEPS if mode == "none" else EVERY + COOL.steps, sched.step)
    else:
        hook = CooldownHook(engine, None, schedule=SCHED, plan=ForkPlan(every=EVERY, cooldown=COOL, data="peek"),
                            loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader, dirpath=os.path.join(out, "cooled"),
                            verbose=rank == 0)
        train(engine, loader, STEPS, hook.step)
        hook.close()
    torch.save(rank_state(engine), os.path.join(out, f"rank-{rank}.pt"))
    if mode == "fixed":
        full = full_fp32(engine)
        if rank == 0:
            torch.save(full, os.path.join(out, "full.pt"))
    torch.distributed.barrier()


def run_accelerate(out: str, variant: str, mode: str) -> None:
    """The Accelerate idiom with its DeepSpeed plugin: ``accelerator.backward`` runs ``engine.backward`` and,
    at the accumulation boundary Accelerate decides, ``engine.step``; ``optimizer.step()`` is a no-op."""
    from accelerate import Accelerator, DeepSpeedPlugin, PartialState
    from accelerate.state import AcceleratorState, GradientState

    os.makedirs(out, exist_ok=True)
    # as the HF Trainer sets it up on CPU: a gloo process state, then DeepSpeed (cpu=True would drop DeepSpeed,
    # no state would leave Accelerate at one process while DeepSpeed runs two)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(cpu=True)
    stage = variant.split("-")[1]
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(stage)), gradient_accumulation_steps=2)
    assert acc.distributed_type == "DEEPSPEED" and acc.num_processes == 2
    model, opt = make_model_opt()
    sched = SCHED.lambda_lr(opt) if mode == "none" else None  # the loop steps it
    engine, popt, loader = acc.prepare(model, opt, make_loader())
    rank = acc.process_index
    torch.manual_seed(100 + rank)
    if mode == "forks":
        hook = CooldownHook(engine, popt, schedule=SCHED, plan=ForkPlan(every=EVERY, cooldown=COOL, data="fresh"),
                            loss_fn=loss_fn, eval_fn=eval_fn, train_loader=loader, accelerator=acc,
                            dirpath=os.path.join(out, "cooled"), verbose=False)
    t = 0
    while t < STEPS:
        for batch in loader:
            with acc.accumulate(engine):
                acc.backward(loss_fn(engine, batch))
                popt.step()
                popt.zero_grad()
            if acc.sync_gradients:
                t += 1
                sched.step() if mode == "none" else hook.step()
                if t == STEPS:
                    break
    torch.save(rank_state(engine), os.path.join(out, f"rank-{rank}.pt"))
    acc.wait_for_everyone()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    del os.environ["ACCELERATE_USE_DEEPSPEED"]


def refusals(out: str) -> None:
    """The error each configuration gets from CooldownHook (before any step), or ``None``."""
    found = {}

    def attempt(name: str, config: dict | None = None, **kw) -> None:
        engine, _ = make_engine("2", config)
        try:
            CooldownHook(engine, None, schedule=SCHED, plan=ForkPlan(every=EVERY), loss_fn=loss_fn, eval_fn=eval_fn,
                         train_loader=make_loader(), dirpath=os.path.join(out, "cooled"), verbose=False, **kw)
            found[name] = None
        except ValueError as e:
            found[name] = str(e)
            assert engine.global_steps == 0 and engine.micro_steps == 0

    base = ds_config("2")
    attempt("stage3", {**base, "zero_optimization": {"stage": 3}})
    attempt("offload_optimizer", {**base, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                  "zero_force_ds_cpu_optimizer": False})
    attempt("autocast_fp16", {**base, "torch_autocast": {"enabled": True, "dtype": "torch.float16"}})
    attempt("max_grad_norm", max_grad_norm=1.0)
    attempt("gradient_accumulation_steps", gradient_accumulation_steps=4)
    attempt("accepted")
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out, "refusals.json"), "w") as f:
            json.dump(found, f)
    torch.distributed.barrier()


VARIANTS = ("1", "2", "2-bf16", "1-fp16", "0-bf16", "2-autocast", "2-sched", "accel-2")


def main() -> None:
    import deepspeed

    out, variants = sys.argv[1], sys.argv[2:] or [*VARIANTS, "refusals"]
    deepspeed.init_distributed(dist_backend="gloo")
    if any(v.endswith("-fp16") for v in variants):
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True
    for variant in variants:  # one process for all: DeepSpeed's start-up costs seconds, a run half a second
        if variant == "refusals":
            refusals(out)
            continue
        for mode in ("none", "forks") if "-sched" in variant or "accel" in variant else ("none", "forks", "fixed"):
            (run_accelerate if "accel" in variant else run)(os.path.join(out, variant, mode), variant, mode)


if __name__ == "__main__":
    main()
