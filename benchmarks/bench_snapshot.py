"""Benchmark 2: cost of a fork's snapshot and restore vs. the memory-bandwidth limit.

State: an MLP of ``--layers`` x ``Linear(width, width)`` (default 8 x 2048: 33.6M parameters) trained
one step with Adam, so parameters + two moments hold >= 100M numbers (~403 MB fp32). Per round,
interleaved (the order alternates every round):

- ``raw clone``: ``flat.clone()`` of one tensor with the same number of bytes (fresh memory, what a
  snapshot must do: allocate and copy);
- ``raw copy_``: ``dst.copy_(flat)`` into memory that already exists (what a restore must do);
- ``snapshot``: ``Snapshot.take(modules=[model], optimizers=[opt])`` (parameters, buffers, optimizer
  state and param groups, RNG states);
- ``restore``: ``snapshot.restore()`` (in-place copy back).

Before each measured call the process is brought to the same state: ``gc.collect()`` and glibc's
``malloc_trim(0)`` hand freed memory back to the OS, so every allocation starts from untouched
pages (a cold fork, the usual case: forks are minutes apart). Peak extra memory of a call is the
kernel's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS before it.

Targets (issue 7): snapshot and restore each <= 1.5x the raw copy; extra memory <= 1.05x the state
for CPU storage. With ``--device cuda`` (not run on the CPU-only benchmark machine) the state lives on
the GPU, the copies in pinned CPU memory, and the extra *accelerator* memory is also measured
(target: none).

    .venv/bin/python benchmarks/bench_snapshot.py                    # ~1-2 min
    .venv/bin/python benchmarks/bench_snapshot.py --storages cpu,disk
    .venv/bin/python benchmarks/bench_snapshot.py --quick

Sharded mode (``--sharded``, results in ``bench_snapshot_sharded.*``): the same MLP with FSDP2
(``fully_shard`` per layer and on the root) on ``--world`` ranks (torchrun, gloo on CPU; NCCL with
``--device cuda``, one GPU per rank), trained one step with Adam. Each rank reports its snapshot's
bytes against its *local* state bytes (goal 1.00: a snapshot copies local shards only) and against the
*full* unsharded state bytes (goal 1/world), and the time of a snapshot and a restore against a raw
clone / copy of the same local bytes. The benchmark starts torchrun itself::

    .venv/bin/python benchmarks/bench_snapshot.py --sharded                 # 2 ranks, ~1 min
    .venv/bin/python benchmarks/bench_snapshot.py --sharded --quick
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (base_parser, environment, finish, iqr, median, peak_rss_bytes, reset_peak_rss,  # noqa: E402
                     rss_bytes, setup)

from cooldown_callbacks import sharding  # noqa: E402
from cooldown_callbacks.snapshot import Snapshot  # noqa: E402

NAME = "bench_snapshot"
SHARDED_NAME = "bench_snapshot_sharded"

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c"))
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def settle() -> None:
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def build_state(width: int, layers: int, device: str) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, width, device=device)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tensors = list(model.parameters()) + [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return model, opt, sum(t.numel() * t.element_size() for t in tensors)


class Measured:
    """Seconds and peak extra RSS (and accelerator memory) of one call."""

    def __init__(self, fn: Callable[[], object], device: str) -> None:
        settle()
        cuda = device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            dev_before = torch.cuda.memory_allocated()
        self.peak_ok = reset_peak_rss()
        before = rss_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        self.value = fn()
        if cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - t0
        self.cpu_seconds = time.process_time() - c0
        self.extra = (peak_rss_bytes() if self.peak_ok else rss_bytes()) - before
        self.extra_device = (torch.cuda.max_memory_allocated() - dev_before) if cuda else 0


def main(argv: Sequence[str] | None = None) -> dict:
    ap = base_parser(__doc__)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--storages", default="cpu", help="comma-separated snapshot storages to time: cpu, disk")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sharded", action="store_true", help="FSDP2 on --world ranks (starts torchrun itself)")
    ap.add_argument("--world", type=int, default=2, help="ranks of the sharded mode")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.reps = 256, 4, 2
    if args.sharded:
        return sharded_main(args, argv)
    out, env = setup(args, NAME, argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("Invalid --device cuda: no CUDA device here; use --device cpu.")
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    for s in storages:
        if s not in ("cpu", "disk"):
            raise ValueError(f"Invalid --storages entry {s!r}: choose cpu and/or disk.")

    model, opt, state_bytes = build_state(args.width, args.layers, args.device)
    n_numbers = state_bytes // 4
    flat = torch.ones(n_numbers, device=args.device)       # same bytes as the state
    dst = torch.zeros(n_numbers, device="cpu", pin_memory=args.device == "cuda")
    snap_dir = out / ".snapshots"

    def raw_clone():
        if args.device == "cuda":
            buf = torch.empty(n_numbers, pin_memory=True)
            buf.copy_(flat, non_blocking=True)
            return buf
        return flat.clone()

    def raw_copy():
        if args.device == "cuda":
            return flat.copy_(dst, non_blocking=True)
        return dst.copy_(flat)

    fns: dict[str, Callable[[], Measured]] = {
        "raw clone": lambda: Measured(raw_clone, args.device),
        "raw copy_": lambda: Measured(raw_copy, args.device),
    }
    samples: dict[str, list[Measured]] = {}
    names = list(fns) + [f"snapshot ({s})" for s in storages] + [f"restore ({s})" for s in storages]
    for n in names:
        samples[n] = []
    for r in range(args.reps):
        order = ["raw clone", "raw copy_", *storages]
        if r % 2:
            order = order[::-1]
        for what in order:
            if what in fns:
                m = fns[what]()
                m.value = None
                samples[what].append(m)
                continue
            take = Measured(lambda: Snapshot.take(modules=[model], optimizers=[opt], storage=what,
                                                  directory=snap_dir), args.device)
            snap = take.value
            take.value = None
            with torch.no_grad():  # scribble on the state so the restore really writes
                for p in model.parameters():
                    p.add_(1.0)
            rest = Measured(snap.restore, args.device)
            snap.close()
            del snap
            samples[f"snapshot ({what})"].append(take)
            samples[f"restore ({what})"].append(rest)
        settle()

    def stats(name: str) -> dict:
        ms = samples[name]
        secs = [m.seconds for m in ms]
        return {"seconds": secs, "median_s": median(secs), "iqr_s": iqr(secs),
                "cpu_seconds": [m.cpu_seconds for m in ms], "median_cpu_s": median([m.cpu_seconds for m in ms]),
                "extra_bytes": [m.extra for m in ms], "max_extra_bytes": max(m.extra for m in ms),
                "max_extra_device_bytes": max(m.extra_device for m in ms),
                "gb_per_s": state_bytes / median(secs) / 1e9}

    if snap_dir.exists() and not any(snap_dir.iterdir()):
        snap_dir.rmdir()  # disk snapshots delete their files on close(); drop the empty directory too
    st = {n: stats(n) for n in names}
    clone_s, copy_s = st["raw clone"]["median_s"], st["raw copy_"]["median_s"]
    rows = []
    ratios = {}
    for n in names:
        s = st[n]
        base = copy_s if n.startswith(("restore", "raw copy")) else clone_s
        base_name = "raw copy_" if n.startswith(("restore", "raw copy")) else "raw clone"
        ratio = s["median_s"] / base
        # paired ratios (same round) are less sensitive to the shared machine's load swings
        paired = [a / b for a, b in zip(s["seconds"], st[base_name]["seconds"])]
        cpu_ratio = s["median_cpu_s"] / st[base_name]["median_cpu_s"]
        ratios[n] = {"vs": base_name, "ratio_of_medians": ratio, "median_paired_ratio": median(paired),
                     "cpu_ratio_of_medians": cpu_ratio,
                     "vs_raw_copy_": s["median_s"] / copy_s, "extra_over_state": s["max_extra_bytes"] / state_bytes}
        rows.append([n, f"{s['median_s'] * 1e3:.1f}", f"{s['iqr_s'][0] * 1e3:.1f}-{s['iqr_s'][1] * 1e3:.1f}",
                     f"{s['gb_per_s']:.2f}", base_name, f"{ratio:.2f}", f"{median(paired):.2f}", f"{cpu_ratio:.2f}",
                     f"{s['median_s'] / copy_s:.2f}", f"{s['max_extra_bytes'] / 2**20:.1f}",
                     f"{s['max_extra_bytes'] / state_bytes:.3f}",
                     f"{s['max_extra_device_bytes'] / 2**20:.1f}" if args.device == "cuda" else "n/a (CPU run)"])
    tgt = {}
    for s in storages:
        if s == "cpu":
            tgt["snapshot (cpu) <= 1.5x raw clone"] = ratios["snapshot (cpu)"]["ratio_of_medians"] <= 1.5
            tgt["restore (cpu) <= 1.5x raw copy_"] = ratios["restore (cpu)"]["ratio_of_medians"] <= 1.5
            tgt["snapshot (cpu) extra memory <= 1.05x state"] = ratios["snapshot (cpu)"]["extra_over_state"] <= 1.05
            tgt["restore (cpu) extra memory <= 1.05x state"] = ratios["restore (cpu)"]["extra_over_state"] <= 1.05
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "config": {"width": args.width, "layers": args.layers, "params": n_params, "state_numbers": n_numbers,
                   "state_bytes": state_bytes, "reps": args.reps, "storages": storages, "device": args.device,
                   "peak_rss_reset": all(m.peak_ok for ms in samples.values() for m in ms),
                   "malloc_trim": _malloc_trim is not None},
        "stats": st, "ratios": ratios, "targets_met": tgt,
    }
    headers = ["operation", "median ms", "IQR ms", "GB/s", "compared with", "ratio (medians)", "ratio (paired median)",
               "CPU-time ratio",
               "ratio vs raw copy_", "peak extra RSS MiB", "extra / state", "extra accelerator MiB"]
    notes = [f"state: {n_params / 1e6:.1f}M parameters + 2 Adam moments = {n_numbers / 1e6:.1f}M numbers, "
             f"{state_bytes / 2**20:.0f} MiB ({args.device}); {args.reps} interleaved rounds; torch threads "
             f"{torch.get_num_threads()}.",
             "ratio (medians) = median time / median time of the raw operation it is compared with; "
             "ratio (paired median) = median over rounds of the per-round ratio.",
             "Every call starts cold (gc + malloc_trim): clones and snapshots fault in fresh pages.",
             "targets met: " + (", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in tgt.items()) or "n/a"),
             "no GPU on this machine: the accelerator-memory column is not measured (run with --device cuda)."
             if args.device == "cpu" else "GPU run."]
    if "disk" in storages:
        notes.append(f"disk storage writes to {snap_dir} (torch.save) and restores via mmap; its RSS includes "
                     "file-backed pages of the mapped snapshot.")
    return finish(out, env, result, [("Snapshot and restore vs. a raw copy of the same bytes", headers, rows)], notes)


# -- sharded mode ------------------------------------------------------------------------------------
def sharded_main(args, argv: Sequence[str] | None) -> dict:
    """Parent: start ``--world`` ranks under torchrun, then read the result rank 0 wrote. Rank: measure."""
    if "LOCAL_RANK" in os.environ:
        return _sharded_rank(args, argv)
    if args.world < 2:
        raise ValueError(f"Invalid --world ({args.world}): the sharded mode needs at least 2 ranks.")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise ValueError(f"Invalid --world {args.world} with --device cuda: {torch.cuda.device_count()} GPU(s) here.")
    out, _ = setup(args, SHARDED_NAME, argv)
    given = list(sys.argv[1:] if argv is None else argv)
    rest = [a for i, a in enumerate(given)  # the ranks get --out as resolved here
            if a != "--out" and not a.startswith("--out=") and (i == 0 or given[i - 1] != "--out")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.world),
           str(Path(__file__).resolve()), *rest, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, env=env)
    return json.loads((out / f"{SHARDED_NAME}.json").read_text())


def _sharded_state(width: int, layers: int, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, width, device=device)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _sharded_rank(args, argv: Sequence[str] | None) -> dict:
    import torch.distributed as dist

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    env = environment(SHARDED_NAME, argv) if rank == 0 else {}
    model, opt = _sharded_state(args.width, args.layers, args.device)
    tensors = list(model.parameters()) + [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    local_bytes = sum(sharding.local(t).numel() * t.element_size() for t in tensors)
    full_bytes = sum(t.numel() * t.element_size() for t in tensors)  # a DTensor's numel() is the global one
    flat = torch.ones(local_bytes // 4, device=args.device)
    dst = torch.zeros(local_bytes // 4, pin_memory=cuda)
    snap_dir = out / f".snapshots-{rank}"
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    rows: dict[str, dict] = {}
    for what in ["raw clone", "raw copy_", *storages]:
        secs, restores, nbytes = [], [], 0
        for _ in range(args.reps):
            dist.barrier()
            if what == "raw clone":
                secs.append(Measured(lambda: (torch.empty_like(dst, pin_memory=cuda).copy_(flat, non_blocking=cuda)
                                              if cuda else flat.clone()), args.device).seconds)
                continue
            if what == "raw copy_":
                secs.append(Measured(lambda: (flat.copy_(dst, non_blocking=True) if cuda else dst.copy_(flat)),
                                     args.device).seconds)
                continue
            take = Measured(lambda: Snapshot.take(modules=[model], optimizers=[opt], storage=what, directory=snap_dir),
                            args.device)
            snap = take.value
            nbytes = snap.nbytes
            secs.append(take.seconds)
            restores.append(Measured(snap.restore, args.device).seconds)
            snap.close()
        rows[what] = {"median_s": median(secs), "restore_median_s": median(restores) if restores else None,
                      "nbytes": nbytes}
    if snap_dir.exists() and not any(snap_dir.iterdir()):
        snap_dir.rmdir()
    mine = {"rank": rank, "local_bytes": local_bytes, "full_bytes": full_bytes, "rows": rows}
    got: list = [None] * world
    dist.all_gather_object(got, mine)
    result: dict = {}
    if rank == 0:
        result = _sharded_report(args, out, env, got, world, storages)
    dist.barrier()
    dist.destroy_process_group()
    return result


def _sharded_report(args, out: Path, env: dict, ranks: list[dict], world: int, storages: list[str]) -> dict:
    table_rows, per_rank = [], []
    for r in ranks:
        clone_s, copy_s = r["rows"]["raw clone"]["median_s"], r["rows"]["raw copy_"]["median_s"]
        for s in storages:
            row = r["rows"][s]
            ratio_local, ratio_full = row["nbytes"] / r["local_bytes"], row["nbytes"] / r["full_bytes"]
            per_rank.append({"rank": r["rank"], "storage": s, "snapshot_bytes": row["nbytes"],
                             "local_bytes": r["local_bytes"], "full_bytes": r["full_bytes"],
                             "snapshot_over_local": ratio_local, "snapshot_over_full": ratio_full,
                             "snapshot_s": row["median_s"], "restore_s": row["restore_median_s"],
                             "snapshot_over_raw_clone": row["median_s"] / clone_s,
                             "restore_over_raw_copy": row["restore_median_s"] / copy_s})
            table_rows.append([r["rank"], s, f"{row['nbytes'] / 2**20:.2f}", f"{r['local_bytes'] / 2**20:.2f}",
                               f"{r['full_bytes'] / 2**20:.2f}", f"{ratio_local:.3f}", f"{ratio_full:.3f}",
                               f"{1 / world:.3f}", f"{row['median_s'] * 1e3:.1f}", f"{row['median_s'] / clone_s:.2f}",
                               f"{row['restore_median_s'] * 1e3:.1f}", f"{row['restore_median_s'] / copy_s:.2f}"])
    cpu = [x for x in per_rank if x["storage"] == "cpu"]
    tgt = {"snapshot bytes == local state bytes (cpu)": all(abs(x["snapshot_over_local"] - 1) < 1e-9 for x in cpu),
           f"snapshot bytes <= 1/{world} of the full state + 1% (cpu)":
               all(x["snapshot_over_full"] <= 1 / world * 1.01 for x in cpu)}
    headers = ["rank", "storage", "snapshot MiB", "local state MiB", "full state MiB", "snapshot / local (goal 1.00)",
               "snapshot / full", "goal 1/world", "snapshot ms", "vs raw clone", "restore ms", "vs raw copy_"]
    notes = [f"FSDP2: {args.layers} x Linear({args.width}, {args.width}), fully_shard per layer and on the root, "
             f"Adam after one step; {world} ranks ({args.device}); {args.reps} rounds per operation, medians.",
             "local state = this rank's shards of parameters and Adam moments (plus the step counters); full "
             "state = the same tensors unsharded. The snapshot counts the bytes it holds (disk: the file's size).",
             "raw clone / raw copy_ = one tensor of the rank's local bytes, cloned (host buffer) / copied back.",
             "targets met: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in tgt.items())]
    result = {"config": {"width": args.width, "layers": args.layers, "world": world, "reps": args.reps,
                         "storages": storages, "device": args.device},
              "per_rank": per_rank, "targets_met": tgt}
    return finish(out, env, result, [("Per-rank snapshot of an FSDP2 model", headers, table_rows)], notes)


if __name__ == "__main__":
    main()
