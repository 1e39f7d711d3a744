"""The end of a test script run under ``torchrun``."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


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
