"""A copy of everything the main branch's future depends on, restored in place.

What is captured (see ``shared/INTEGRATION_NOTES.md``): parameters and buffers (and gradients that
exist), the optimizers' own params that are not module parameters (fp32 master copies, e.g. DeepSpeed
ZeRO's partitions), every optimizer's per-parameter state and param-group hyper-parameters, LR schedulers,
grad scalers and any other object with ``state_dict``/``load_state_dict``, the global RNGs
(python, numpy, torch CPU, every initialised CUDA device), given ``torch.Generator`` objects, and
arbitrary ``(get, set)`` pairs for state that has no ``state_dict`` (e.g. torchmetrics states), the
buffer/gradient sync flags of ``DistributedDataParallel`` modules, and for a DeepSpeed engine among
``modules`` its step counters, loss scaler and LR scheduler.

Restoring writes into the existing tensors (``copy_``), so ``Parameter`` identity is kept for DDP
buckets, optimizer references and compiled graphs. Tensor copies live in CPU memory by default
(pinned, with non-blocking copies, for accelerator tensors), on the accelerator
(``storage="device"``) or in a file (``storage="disk"``).

Sharded state stays sharded (see :mod:`cooldown_callbacks.sharding`): for a DTensor (FSDP2
parameters, gradients, optimizer moments) each rank copies only its local shard (``to_local()``),
with no communication, into a buffer of the *local* shape, and restores into ``dst.to_local()``;
``nbytes`` counts local bytes. Every FSDP module among ``modules`` is resharded before the snapshot
and before the restore, so the snapshot sees the shards (not parameters left unsharded by an
evaluation) and the next forward gathers the restored shards (not stale unsharded copies).
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch

from .sharding import like, local, reshard, sync_extras, zero_extras, zero_stateful

__all__ = ["Snapshot", "STORAGES", "capture_rng", "restore_rng"]

STORAGES = ("cpu", "device", "disk")


def capture_rng(generators: Iterable[torch.Generator] = ()) -> dict:
    """Global RNG states (python, numpy, torch CPU, initialised CUDA devices) and given generators."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: Iterable[torch.Generator] = ()) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


class _TensorStore:
    """Holds copies of a list of tensors; ``load()`` gives them back for in-place restore."""

    def __init__(self, tensors: Sequence[torch.Tensor], storage: str, directory: str | os.PathLike | None):
        self.storage = storage
        self.path: Path | None = None
        self._copies: list[torch.Tensor] | None = None
        cuda = False
        if storage == "device":
            copies = [local(t.detach()).clone() for t in tensors]
        else:
            copies = []
            for t in tensors:
                t = local(t.detach())  # a DTensor's local shard: no communication, local shape
                if t.device.type == "cpu":
                    copies.append(t.clone())
                else:
                    buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
                    buf.copy_(t, non_blocking=True)
                    copies.append(buf)
                    cuda = cuda or t.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
        if storage == "disk":
            d = Path(directory) if directory is not None else Path(tempfile.gettempdir())
            d.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".snapshot-", suffix=".pt", dir=d)
            os.close(fd)
            self.path = Path(name)
            torch.save(copies, self.path)
            del copies
        else:
            self._copies = copies

    @property
    def nbytes(self) -> int:
        if self._copies is None:
            return self.path.stat().st_size if self.path is not None and self.path.exists() else 0
        return sum(t.numel() * t.element_size() for t in self._copies)

    def load(self) -> list[torch.Tensor]:
        if self._copies is not None:
            return self._copies
        return torch.load(self.path, mmap=True, weights_only=True)

    def close(self) -> None:
        self._copies = None
        if self.path is not None and self.path.exists():
            self.path.unlink()


def _clone_tree(x: Any) -> Any:
    """Deep copy of a state dict with tensors cloned (``copy.deepcopy`` without its tensor overhead)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return type(x)((k, _clone_tree(v)) for k, v in x.items()) if type(x) is dict else \
            copy.deepcopy(x)
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_clone_tree(v) for v in x)
    return copy.deepcopy(x)


@dataclass
class Snapshot:
    """Copy of the main branch's state. Build with :meth:`take`, put back with :meth:`restore`.

    >>> import torch
    >>> m = torch.nn.Linear(2, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> snap = Snapshot.take(modules=[m], optimizers=[opt])
    >>> before = m.weight.clone(); _ = m.weight.data.add_(1.0)
    >>> snap.restore(); torch.equal(m.weight, before)
    True
    """

    storage: str = "cpu"
    _tensors: list[torch.Tensor] = field(default_factory=list, repr=False)  # live tensors (restore targets)
    _n_module: int = 0  # slots [0, _n_module) are parameters/buffers (and grads); the rest optimizer state
    _store: _TensorStore | None = field(default=None, repr=False)
    _grads: list[tuple[torch.Tensor, int | None]] = field(default_factory=list, repr=False)
    _opt_states: list[tuple[torch.optim.Optimizer, dict, list]] = field(default_factory=list, repr=False)
    _stateful: list[tuple[Any, Any]] = field(default_factory=list, repr=False)
    _extras: list[tuple[Callable[[Any], None], Any]] = field(default_factory=list, repr=False)
    _rng: dict | None = field(default=None, repr=False)
    _generators: list[torch.Generator] = field(default_factory=list, repr=False)
    _modules: list[torch.nn.Module] = field(default_factory=list, repr=False)  # resharded before restore

    @classmethod
    def take(
        cls,
        *,
        modules: Iterable[torch.nn.Module] = (),
        optimizers: Iterable[torch.optim.Optimizer] = (),
        stateful: Iterable[Any] = (),
        generators: Iterable[torch.Generator] = (),
        extras: Iterable[tuple[Callable[[], Any], Callable[[Any], None]]] = (),
        rng: bool = True,
        grads: bool = True,
        storage: Literal["cpu", "device", "disk"] = "cpu",
        directory: str | os.PathLike | None = None,
    ) -> "Snapshot":
        """Capture state.

        ``stateful``: schedulers, grad scalers, stateful loaders, anything with ``state_dict`` /
        ``load_state_dict``. ``extras``: ``(get, set)`` pairs; ``get()``'s value is deep-copied and
        handed to ``set`` on restore.
        """
        if storage not in STORAGES:
            raise ValueError(f"Invalid storage ({storage!r}): choose one of {STORAGES}.")
        snap = cls(storage=storage)
        tensors: list[torch.Tensor] = []
        seen: set[int] = set()

        def add(t: torch.Tensor) -> int:
            tensors.append(t)
            return len(tensors) - 1

        modules = list(modules)
        reshard(modules)  # FSDP: parameters() must yield the shards, not what an evaluation left unsharded
        snap._modules = modules
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) in seen:
                    continue
                seen.add(id(t))
                add(t)
                if grads and isinstance(t, torch.nn.Parameter):
                    snap._grads.append((t, add(t.grad) if t.grad is not None else None))
        optimizers = list(optimizers)
        for opt in optimizers:  # params that are not module parameters: fp32 master copies (DeepSpeed ZeRO)
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        add(p)
        snap._n_module = len(tensors)
        for opt in optimizers:
            groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            per_param: dict = {}
            for p, st in opt.state.items():
                entry = {}
                for k, v in st.items():
                    entry[k] = ("t", add(v)) if isinstance(v, torch.Tensor) else ("v", copy.deepcopy(v))
                per_param[p] = entry
            snap._opt_states.append((opt, per_param, groups))
        snap._tensors = tensors
        snap._store = _TensorStore(tensors, storage, directory)
        # a DeepSpeed engine's LR scheduler (once, also when the caller passed it)
        stateful = list({id(o): o for o in [*stateful, *zero_stateful(modules)]}.values())
        snap._stateful = [(obj, _clone_tree(obj.state_dict())) for obj in stateful]
        # DDP's next-forward buffer broadcast flag (a no-grad evaluation flips it), FSDP2's gradient
        # sync flags (a fork that accumulates sets them) and a DeepSpeed engine's step counters and loss
        # scaler are part of the main branch's state.
        extras = list(extras) + sync_extras(modules) + zero_extras(modules)
        snap._extras = [(setter, copy.deepcopy(getter())) for getter, setter in extras]
        snap._generators = list(generators)
        if rng:
            snap._rng = capture_rng(snap._generators)
        return snap

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensor copies (this rank's local shards for sharded tensors)."""
        return self._store.nbytes if self._store is not None else 0

    @torch.no_grad()
    def restore(self) -> None:
        """Write the captured state back in place. The snapshot stays valid (restore again at will)."""
        copies = self._store.load() if self._store is not None else []
        cuda = False
        reshard(self._modules)  # the next forward must gather the restored shards, not reuse unsharded copies

        def put(dst: torch.Tensor, src: torch.Tensor) -> None:
            nonlocal cuda
            dst = local(dst)
            dst.copy_(src, non_blocking=True)
            cuda = cuda or dst.device.type == "cuda"

        grad_slots = {i for _, i in self._grads if i is not None}
        for i in range(self._n_module):  # optimizer slots are restored (once) by the loop below
            if i not in grad_slots:
                put(self._tensors[i], copies[i])
        for p, i in self._grads:
            if i is None:
                p.grad = None
            elif p.grad is not None:
                put(p.grad, copies[i])
            else:
                p.grad = like(p, copies[i])
        for opt, per_param, groups in self._opt_states:
            for g, saved in zip(opt.param_groups, groups):
                for k in [k for k in g if k != "params" and k not in saved]:
                    del g[k]
                g.update(copy.deepcopy(saved))
            for p in [p for p in opt.state if p not in per_param]:
                del opt.state[p]
            for p, entry in per_param.items():
                st = opt.state[p]
                for k in [k for k in st if k not in entry]:
                    del st[k]
                for k, (kind, v) in entry.items():
                    if kind == "v":
                        st[k] = copy.deepcopy(v)
                        continue
                    cur = st.get(k)
                    src = copies[v]
                    if isinstance(cur, torch.Tensor) and local(cur).shape == src.shape and cur.dtype == src.dtype:
                        put(cur, src)
                    else:
                        st[k] = like(self._tensors[v], src)
        if cuda:
            torch.cuda.synchronize()
        for obj, state in self._stateful:
            obj.load_state_dict(_clone_tree(state))
        for setter, value in self._extras:
            setter(copy.deepcopy(value))
        if self._rng is not None:
            restore_rng(self._rng, self._generators)

    def close(self) -> None:
        """Free the copies (and delete the file with ``storage="disk"``)."""
        if self._store is not None:
            self._store.close()
            self._store = None
        self._tensors = []
        self._grads = []
        self._opt_states = []
        self._stateful = []
        self._extras = []
        self._modules = []

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
