"""Accelerate's data loaders as a fork sees them: bookkeeping replayed for handed-back batches, prepared
loaders shielded from a fork's evaluation, batches moved to the device.

Accelerate is imported lazily: the hook also drives plain PyTorch loops without it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from cooldown_callbacks.data import PeekableLoader

# What a prepared loader (DataLoaderShard / DataLoaderDispatcher) changes as it yields batches:
# the end-of-dataloader flag that accelerator.accumulate() syncs on, the padding remainder that
# gather_for_metrics() drops, the pass counter that seeds set_epoch(), the resumable position.
_TRACKED = ("end_of_dataloader", "remainder", "iteration", "dl_state_dict")


def _is_prepared(loader: Any) -> bool:
    """An Accelerate-prepared loader (its class hides behind the wrapped loader's ``__class__``)."""
    try:
        from accelerate.data_loader import DataLoaderStateMixin
    except ImportError:  # plain PyTorch loop without accelerate installed
        return False
    return isinstance(loader, DataLoaderStateMixin) and "gradient_state" in vars(loader)


def peekable(loader: Any) -> PeekableLoader:
    """A :class:`PeekableLoader` over ``loader``; for a prepared loader it replays, for each handed-back
    batch, the bookkeeping the loader had when it first yielded that batch, and the loader's end of
    pass (leaving ``GradientState``) where a fork drew it."""
    if not _is_prepared(loader):
        return PeekableLoader(loader)
    capture, apply = _bookkeeping(loader)
    return PeekableLoader(loader, capture=capture, apply=apply, on_end=loader.end)


def add_bookkeeping(w: PeekableLoader) -> None:
    """Give a user-made :class:`PeekableLoader` over a prepared loader the bookkeeping :func:`peekable` adds."""
    if w._capture is None and _is_prepared(w.loader):
        w._capture, w._apply = _bookkeeping(w.loader)
        w._on_end = w.loader.end


def _bookkeeping(loader: Any) -> tuple[Callable[[], dict], Callable[[dict], None]]:
    d = vars(loader)

    def capture() -> dict:
        return {k: d[k] for k in _TRACKED if k in d}

    return capture, d.update


class _Opaque:
    """A snapshot value that must not be deep-copied (it holds live iterators)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> "_Opaque":
        return self


def shield_prepared_loaders(accelerator: Any, skip: Any) -> list[tuple[Callable[[], Any], Callable[[Any], None]]]:
    """Snapshot extras that keep a fork's evaluation from changing the script's prepared loaders.

    An ``eval_fn`` that iterates the script's own prepared eval loader moves its bookkeeping (pass
    counter, end flag, resumable position) and, for a stateful loader, takes the pass that the loader
    prepared at construction (it draws no random number; a later pass does): the main branch's next
    evaluation would then draw one and its random stream would shift. Each prepared loader other than
    the training loader ``skip`` keeps its attributes (and its wrapped loader's) across the fork, and
    a prepared-but-unused iterator is set aside so the fork's pass makes its own.
    """
    extras = []
    skip_ids = {id(skip), id(getattr(skip, "loader", None))}
    for dl in list(getattr(accelerator, "_dataloaders", [])):
        if id(dl) in skip_ids:
            continue
        objs = [dl]
        base = vars(dl).get("base_dataloader")
        if base is not None:
            objs.append(base)

        def get(objs: list = objs) -> _Opaque:
            saved = [dict(vars(o)) for o in objs]
            for o in objs:  # torchdata's StatefulDataLoader: its first pass reuses the iterator state_dict() made;
                if vars(o).get("_initial_iter_for_state_dict"):  # the fork's pass makes its own, this one is put back
                    o._initial_iter_for_state_dict = False
            return _Opaque(saved)

        def put(v: _Opaque, objs: list = objs) -> None:
            for o, d in zip(objs, v.value):
                vars(o).clear()
                vars(o).update(d)

        extras.append((get, put))
    return extras


def to_device(batch: Any, device: torch.device, accelerator: Any = None) -> Any:
    """``batch`` (tensors nested in dicts, lists, tuples, ``BatchEncoding`` and other mappings with
    ``.to``) on ``device``: Accelerate's ``send_to_device`` when there is an accelerator, else a pytree map."""
    if accelerator is not None:
        from accelerate.utils import send_to_device

        return send_to_device(batch, device)
    from torch.utils import _pytree

    def move(x: Any) -> Any:
        if torch.is_tensor(x) or (hasattr(x, "to") and not isinstance(x, torch.nn.Module) and hasattr(x, "keys")):
            return x.to(device)
        return x
    return _pytree.tree_map(move, batch)
