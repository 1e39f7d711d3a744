"""Running test scripts under ``torchrun`` (the tests' side), and the end of such a script (the workers')."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch.distributed as dist


def torchrun(script, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script *args`` under ``torchrun --standalone --nproc_per_node 2`` (one intra-op thread per rank).

    A run that hangs past ``timeout`` (a collective on one rank only) gets SIGTERM, so torchrun stops its
    workers: they run in sessions of their own and would go on, holding the pipes, if torchrun were killed
    outright. Then ``subprocess.TimeoutExpired`` is raised."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def leave() -> None:
    """Wait for every rank, then end the process without tearing the gloo process group down.

    On this 2-core machine under load, gloo's teardown (``destroy_process_group`` or interpreter exit)
    now and then aborts a worker after its results are saved ("terminate called without an active
    exception", SIGABRT, exit -6): seen about once in ten loaded runs, in the plain-DDP reference run
    that never touches the library as well. A test reads that as a failure of the property it checks.
    Every rank has written its files when the barrier returns, so the worker exits with status 0
    without the teardown."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
