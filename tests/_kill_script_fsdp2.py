"""Kill-and-resume training script for the hook under FSDP2, run with ``torchrun --nproc_per_node 2``.

argv: ``OUT [KILL]``. Trains 12 optimizer steps (``_sharded_loops``: FSDP2, dropout, two param groups,
accumulation 2 without gradient sync, clipping; batches of 4, so one epoch holds 15 steps per rank)
with a fork every 4 steps (2 cooldown steps, peeked data, DCP saves: folders), and writes a main
checkpoint every 3 steps. If ``OUT/ckpt`` holds a complete checkpoint, it resumes from the latest one.
``KILL="phase:n"`` installs the kill points of ``_kill_points`` on rank 0 (the rank that renames and
records): it SIGKILLs itself at that event, and torchrun stops rank 1. Without ``KILL``, rank 0 counts
the events of every phase into ``OUT/../<name>-counts.json``.

The main checkpoint (the user's side): model and optimizer shards with DCP (``get_state_dict``) and,
per rank, the RNG state, the loader's state, the hook's state and the BatchNorm buffers (FSDP does not
synchronise them, and DCP keeps one copy of a tensor every rank holds whole), written into a temporary folder
that rank 0 renames into place once every rank has written. Outputs, as the harness expects
(``tests/_kill_harness.py``): ``OUT/cooled/`` (cooled DCP folders and ``forks.jsonl``) and
``OUT/final.pt`` (every rank's final shards, keys prefixed ``rank<r>.``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _torchrun import leave  # noqa: E402
import _kill_points  # noqa: E402
import _sharded_loops as SL  # noqa: E402

from cooldown_callbacks import Cooldown, ForkPlan, RSqrt  # noqa: E402

STEPS, SAVE_EVERY, BATCH = 12, 3, 4
COOLED = "cooled"


def load_cooled(path: Path) -> dict:
    """A cooled checkpoint (a DCP folder) as one state dict, via ``dcp_to_torch_save``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(path, Path(d) / "cooled.pt")
        return torch.load(Path(d) / "cooled.pt", weights_only=True)


def latest_checkpoint(ckdir: Path) -> Path | None:
    done = sorted(p for p in ckdir.glob("step-*") if p.is_dir())
    return done[-1] if done else None


def save_main(model, opt, loader, hook, ckdir: Path, step: int, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = ckdir / f"step-{step:06d}", ckdir / f".step-{step:06d}.tmp"
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # BatchNorm statistics differ per rank
    torch.save({"rng": torch.get_rng_state(), "loader": loader.state_dict(), "hook": hook.state_dict(),
                "buffers": buffers}, tmp / f"rank-{rank}.pt")
    dist.barrier()
    if rank == 0:
        _kill_points.main_checkpoint_written(tmp)
        os.replace(tmp, final)
    dist.barrier()


def resume(model, opt, loader, hook, path: Path, rank: int) -> torch.Tensor:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mine = torch.load(path / f"rank-{rank}.pt", weights_only=False)
    with torch.no_grad():
        for n, b in model.named_buffers():  # DCP keeps one copy of a tensor every rank holds whole
            b.copy_(mine["buffers"][n])
    loader.load_state_dict(mine["loader"])
    hook.load_state_dict(mine["hook"])
    return mine["rng"]


def main(out: str, kill: str | None) -> None:
    from cooldown_callbacks.integrations.accelerate import CooldownHook

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    out = Path(out)
    if rank == 0:  # the marker (_kill_harness.marker_path) says where rank 0 died
        _kill_points.install(kill, marker=out.parent / f"{out.name}-kill.json" if kill else None)
    ckdir = out / "ckpt"
    if rank == 0:
        ckdir.mkdir(parents=True, exist_ok=True)
        for p in ckdir.glob(".*.tmp"):  # a main checkpoint a kill left half-written
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    model, opt = SL.make_model_opt("fsdp2")
    loader = SL.make_loader(batch_size=BATCH)
    hook = CooldownHook(model, opt, schedule=RSqrt(warmup_steps=3),
                        plan=ForkPlan(every=4, cooldown=Cooldown(steps=2), data="peek"), loss_fn=SL.loss_fn,
                        eval_fn=SL.eval_fn, train_loader=loader, gradient_accumulation_steps=2, max_grad_norm=0.5,
                        dirpath=out / COOLED, save_format="dcp", verbose=False)
    torch.manual_seed(100 + rank)
    start, rng = 0, None
    path = latest_checkpoint(ckdir)
    if path is not None:
        rng = resume(model, opt, loader, hook, path, rank)
        start = hook.step_count

    def after_step(t: int, evaluating: bool) -> None:
        hook.step(evaluating=evaluating)
        if t % SAVE_EVERY == 0:
            save_main(model, opt, loader, hook, ckdir, t, rank)
    SL.train(model, opt, loader, STEPS, after_step=after_step, evaluate_at=lambda t: t % 4 == 0, start=start,
             rng=rng)
    states = [None, None]
    dist.all_gather_object(states, SL.local_state(model, opt))
    if rank == 0:
        final = {f"rank{r}.{k}": v for r, st in enumerate(states) for k, v in st.items()}
        torch.save(final, out / ".final.pt.tmp")
        os.replace(out / ".final.pt.tmp", out / "final.pt")
        if not kill:
            (out.parent / f"{out.name}-counts.json").write_text(json.dumps(_kill_points.counts(), sort_keys=True))
    leave()  # barrier, then exit without gloo's teardown (see tests/_torchrun.py)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
