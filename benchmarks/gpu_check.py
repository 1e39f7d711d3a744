"""GPU check: exact forks with CUDA RNG and mixed precision, FSDP2 on a GPU, snapshot cost and memory.

Needs one NVIDIA GPU; runs in about 2-4 minutes. Without a GPU it prints why and exits with code 0
(nothing written). Results: ``benchmarks/results/gpu_check.json`` and ``.md`` (``--out`` elsewhere).

1. **Exactness** (every check compares a run with forks against the same run without the library,
   ``torch.equal`` on every parameter, buffer, optimizer state tensor, the grad scaler's state and
   the CUDA RNG state): dropout on the GPU (CUDA RNG) in fp32, fp16 autocast with a ``GradScaler``,
   and bf16 autocast, for the hook (plain PyTorch loop), Lightning (``precision="16-mixed"`` /
   ``"bf16-mixed"``) and the HF Trainer (``fp16=True`` / ``bf16=True``).
2. **Sharded on the GPU** (a one-rank NCCL process group, in a child process started with torchrun):
   the hook with plain ``fully_shard`` (fp32, and bf16 ``MixedPrecisionPolicy``), the hook with
   Accelerate's FSDP2 plugin, and the HF Trainer with ``fsdp_version=2``: forks exact on local shards
   (DTensors on CUDA, pinned host buffers of the local shape), cooled full saves load into the plain
   model.
3. **Snapshot cost**: ``Snapshot.take`` / ``restore`` (``storage="cpu"``: pinned host memory) of a
   ~400 MB state against a raw pinned device-to-host / host-to-device copy of the same bytes.
4. **Device memory**: the peak extra device memory of ``Snapshot.take`` + ``restore`` with
   ``storage="cpu"`` (goal: none), and the peak of a whole fork against the peak of a main-branch step.

    .venv/bin/python benchmarks/gpu_check.py            # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --quick    # smaller state, fewer steps

Deterministic CUDA kernels are requested (``torch.use_deterministic_algorithms(True, warn_only=True)``,
``CUBLAS_WORKSPACE_CONFIG=:4096:8``) so that two runs of the same ops are comparable bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, finish, median, setup  # noqa: E402
from _gpu_checks import (PRECISIONS, SCHED, batches, check_fsdp_hook, check_hf, check_hook,  # noqa: E402
                         check_lightning, failed, make_mlp)

from cooldown_callbacks import Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.snapshot import Snapshot  # noqa: E402

NAME = "gpu_check"
NO_GPU = ("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing was checked and nothing "
          "was written. Run it on a machine with one NVIDIA GPU.")
SHARDED_VARIANTS = ("fp32", "bf16-mp", "accelerate", "hf")


def sharded_part(out: Path, device: str, variants: Sequence[str]) -> None:
    """Run inside torchrun (one rank; on one GPU): the FSDP2 checks; writes ``out/sharded.json``.

    On the CPU (``--device cpu``, gloo) only the plain ``fully_shard`` variants can run: Accelerate and
    the HF Trainer enable FSDP on accelerators only."""
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rows = []
    for variant in variants:
        try:
            if variant == "hf":
                rows.append(check_hf(device, "bf16", out, fsdp=True))
            else:
                rows.append(check_fsdp_hook(device, variant, out))
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            rows.append(failed(f"FSDP2 ({variant})", e, framework="FSDP2", precision=variant))
    (out / "sharded.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def run_sharded_part(out: Path, device: str = "cuda", variants: Sequence[str] = SHARDED_VARIANTS) -> list[dict]:
    """Start the sharded checks in a one-rank torchrun child; its rows (a failed launch is one failed row)."""
    part = out / ".gpu-check-sharded"
    part.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(Path(__file__).resolve()), "--part", "sharded", "--device", device, "--variants", ",".join(variants),
           "--out", str(part)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    try:
        return json.loads((part / "sharded.json").read_text())
    except OSError:
        return [{"check": "sharded part", "exact": False, "tensors": 0, "framework": "FSDP2",
                 "differs": [f"torchrun failed ({res.returncode}): {res.stderr[-500:]}"]}]


# -- 3, 4. snapshot cost and device memory -------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    v = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, v


def snapshot_cost(width: int, layers: int, reps: int) -> dict:
    """Snapshot/restore (pinned host storage) vs a raw pinned D2H / H2D copy of the same bytes; device memory."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, width, device="cuda")).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tensors = list(model.parameters()) + [v for st in opt.state.values() for v in st.values() if v.dim() > 0]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    flat = torch.empty(nbytes // 4, device="cuda")
    host = torch.empty(nbytes // 4, pin_memory=True)
    rows: dict[str, list[float]] = {"raw D2H (pinned)": [], "raw H2D (pinned)": [], "snapshot": [], "restore": []}
    extra = {"snapshot": 0, "restore": 0}
    for _ in range(reps):
        rows["raw D2H (pinned)"].append(_timed(lambda: host.copy_(flat, non_blocking=True))[0])
        rows["raw H2D (pinned)"].append(_timed(lambda: flat.copy_(host, non_blocking=True))[0])
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        secs, snap = _timed(lambda: Snapshot.take(modules=[model], optimizers=[opt], storage="cpu"))
        extra["snapshot"] = max(extra["snapshot"], torch.cuda.max_memory_allocated() - before)
        rows["snapshot"].append(secs)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        rows["restore"].append(_timed(snap.restore)[0])
        extra["restore"] = max(extra["restore"], torch.cuda.max_memory_allocated() - before)
        snap.close()
    med = {k: median(v) for k, v in rows.items()}
    return {"state_bytes": nbytes, "median_s": med,
            "snapshot_over_raw_d2h": med["snapshot"] / med["raw D2H (pinned)"],
            "restore_over_raw_h2d": med["restore"] / med["raw H2D (pinned)"],
            "extra_device_bytes": extra}


def fork_memory() -> dict:
    """Peak device memory of a whole fork (storage="cpu") against the peak of a main-branch step."""
    from cooldown_callbacks.integrations.accelerate import CooldownHook

    model, opt = make_mlp("cuda")
    data = batches(8, seed=4)

    def loss_fn(m, batch):
        x, y = (t.to("cuda") for t in batch)
        return F.mse_loss(m(x), y)

    hook = CooldownHook(model, opt, schedule=SCHED, plan=ForkPlan(at=[4], cooldown=Cooldown(steps=2), data=data),
                        loss_fn=loss_fn, eval_fn=lambda m: {"val_loss": 0.0}, snapshot_storage="cpu",
                        dirpath=tempfile.mkdtemp(prefix="gpu-check-"), verbose=False)
    peaks = []
    for i, b in enumerate(data[:4]):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad()
        if i < 3:
            hook.step()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    hook.step()  # the fork at step 4: snapshot, 2 cooldown steps, evaluation, save, restore
    torch.cuda.synchronize()
    fork_peak = torch.cuda.max_memory_allocated()
    step_peak = max(peaks)
    return {"fork_peak_bytes": fork_peak, "main_step_peak_bytes": step_peak, "extra_bytes": fork_peak - step_peak,
            "forks": len(hook.records)}


# -- the run -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict | None:
    ap = base_parser(__doc__)
    # the child process of the sharded checks
    ap.add_argument("--part", choices=["sharded"], help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    ap.add_argument("--variants", default=",".join(SHARDED_VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part == "sharded":
        sharded_part(Path(args.out), args.device, args.variants.split(","))
        return None
    if not torch.cuda.is_available():
        print(NO_GPU, flush=True)
        return None
    torch.use_deterministic_algorithms(True, warn_only=True)
    out, env = setup(args, NAME, argv)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    checks: list[dict] = []
    for precision in PRECISIONS:
        for name, fn in (("hook", lambda p: check_hook("cuda", p)), ("lightning", lambda p: check_lightning("cuda", p, tmp)),
                         ("transformers", lambda p: check_hf("cuda", p, tmp))):
            try:
                checks.append(fn(precision))
            except Exception as e:  # noqa: BLE001 - one failed check does not hide the others
                checks.append(failed(f"{name} {precision}", e, framework=name, precision=precision))
    try:
        checks.append(check_hook("cuda", "fp32", storage="device"))
    except Exception as e:  # noqa: BLE001
        checks.append(failed("hook fp32 (device snapshot)", e, framework="hook", precision="fp32"))
    checks += run_sharded_part(tmp)
    width, layers, reps = (1024, 4, 3) if args.quick else (2048, 8, 5)
    cost = snapshot_cost(width, layers, reps)
    mem = fork_memory()
    rows = [[c["check"], c.get("framework", ""), c.get("precision", ""), "yes" if c["exact"] else "NO",
             c.get("forks", ""), c["tensors"], "; ".join(c["differs"])[:200]] for c in checks]
    med = cost["median_s"]
    cost_rows = [[k, f"{v * 1e3:.2f}", f"{cost['state_bytes'] / v / 1e9:.2f}"] for k, v in med.items()]
    mem_rows = [["Snapshot.take (storage='cpu')", f"{cost['extra_device_bytes']['snapshot'] / 2**20:.2f}"],
                ["Snapshot.restore (storage='cpu')", f"{cost['extra_device_bytes']['restore'] / 2**20:.2f}"],
                ["whole fork minus a main step (peaks)", f"{mem['extra_bytes'] / 2**20:.2f}"]]
    targets = {"every fork exact": all(c["exact"] for c in checks),
               "snapshot <= 1.5x raw pinned D2H": cost["snapshot_over_raw_d2h"] <= 1.5,
               "restore <= 1.5x raw pinned H2D": cost["restore_over_raw_h2d"] <= 1.5,
               "no extra device memory for a CPU snapshot": max(cost["extra_device_bytes"].values()) == 0}
    notes = [f"snapshot state: {layers} x Linear({width}, {width}) + Adam moments = {cost['state_bytes'] / 2**20:.0f} MiB; "
             f"{reps} rounds, medians; snapshot / raw D2H = {cost['snapshot_over_raw_d2h']:.2f}, restore / raw H2D = "
             f"{cost['restore_over_raw_h2d']:.2f}.",
             "targets met: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in targets.items())]
    result = {"checks": checks, "snapshot_cost": cost, "fork_memory": mem, "targets_met": targets}
    tables = [("Forks vs runs without forks (torch.equal)",
               ["check", "framework", "precision", "exact", "forks", "tensors compared", "differs"], rows),
              ("Snapshot / restore vs raw pinned copies", ["operation", "median ms", "GB/s"], cost_rows),
              ("Extra device memory", ["what", "MiB"], mem_rows)]
    return finish(out, env, result, tables, notes)


if __name__ == "__main__":
    main()
