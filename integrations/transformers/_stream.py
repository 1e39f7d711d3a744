"""Cooldown batches from a streaming ``train_dataset``: the main branch's own upcoming batches.

A stream (an ``IterableDataset``) cannot be replayed: restarting it gives its first batches, which the
main branch has already trained on, and when its iterators share a read position a second reader
takes batches away from the main branch. So a fork draws the batches it cools on from the main
branch's own epoch iterator and hands them back: the Trainer's next ``get_batch_samples`` calls get
exactly those batches, in order, before the iterator is read again. The main branch sees the same
batches as without the fork, and the fork cools on the batches a fixed-budget run would have seen.

How: the Trainer passes its epoch iterator to ``Trainer.get_batch_samples`` at every optimizer step;
:func:`install` wraps that method on the Trainer instance so the iterator it reads is a
:class:`MainStream` (the epoch iterator plus a queue of batches handed back).

Two conditions keep this exact, and both are checked:

- producing a batch must not draw from the global random number generators (a masking collator or
  a random crop in the dataset's ``__iter__`` does): a batch drawn ahead would then be made from other
  random numbers than the main branch's. Every batch the main branch reads (after the first of an
  epoch, whose iterator creation draws a seed) is checked; once a draw moved the RNG, forks are
  refused (recorded as failed, main branch intact). A draw inside a fork that moves the RNG has
  already produced the main branch's next batches from shifted random numbers: training stops.
- the stream must hold the cooldown's batches before the epoch ends (accelerate's prepared loader
  marks its last batch, so the fork stops before ending the epoch early): otherwise the fork fails
  with the reason, and what it drew is handed back.

Private internals (pinned: transformers 5.23, accelerate 1.15): ``Trainer.get_batch_samples(epoch_iterator,
num_batches, device)`` as the only reader of the epoch iterator; accelerate's ``end_of_dataloader`` /
``remainder`` flags on the prepared loader (kept as the main branch would see them), found through the
epoch iterator's generator frame (``gi_frame.f_locals["self"]``).
"""

from __future__ import annotations

import collections
import functools
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch

__all__ = ["MainStream", "StreamEnded", "install", "uninstall", "stop_if_disturbed"]

_LOADER_FLAGS = ("end_of_dataloader", "remainder")


class StreamEnded(RuntimeError):
    """The main branch's epoch iterator has no batch left for the cooldown."""


def _rng_state() -> tuple:
    cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else ()
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _same_rng(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or not torch.equal(a[2], b[2]) or len(a[3]) != len(b[3]):
        return False
    na, nb = a[1], b[1]
    if na[0] != nb[0] or not np.array_equal(na[1], nb[1]) or tuple(na[2:]) != tuple(nb[2:]):
        return False
    return all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


class MainStream:
    """The Trainer's epoch iterator with a queue of batches a fork drew ahead and handed back.

    ``next()`` (the main branch) serves the queue first, then the iterator. ``draw_ahead()`` (a fork)
    reads the iterator and queues what it read. ``rng_moved_at`` is the first main-branch step whose
    batch production moved the global RNG (``None`` while none did).
    """

    def __init__(self, it: Iterator, step_of: Any) -> None:
        self.it = it
        self._step_of = step_of  # () -> the main branch's completed optimizer steps
        self._queue: collections.deque = collections.deque()
        self._draws = 0
        self.rng_moved_at: int | None = None
        self.moved_in_fork = False
        frame = getattr(it, "gi_frame", None)
        self._loader = frame.f_locals.get("self") if frame is not None else None

    def __iter__(self) -> "MainStream":
        return self

    def _flags(self) -> tuple:
        return tuple(getattr(self._loader, k, None) for k in _LOADER_FLAGS)

    def _set_flags(self, flags: tuple) -> None:
        if self._loader is None:
            return
        for k, v in zip(_LOADER_FLAGS, flags):
            if v is not None:
                setattr(self._loader, k, v)

    def _read(self) -> Any:
        check = self._draws > 0  # the first read creates the epoch's iterator, which draws a seed
        before = _rng_state() if check else None
        batch = next(self.it)
        self._draws += 1
        if before is not None and not _same_rng(before, _rng_state()):
            if self.rng_moved_at is None:
                self.rng_moved_at = self._step_of()
            return batch, True
        return batch, False

    def __next__(self) -> Any:
        if self._queue:
            batch, flags = self._queue.popleft()
            self._set_flags(flags)
            return batch
        return self._read()[0]

    @property
    def at_end(self) -> bool:
        """The epoch's last batch has been read (accelerate's loader flags it when it yields it)."""
        flags = self._queue[-1][1] if self._queue else self._flags()
        return bool(flags[0])

    def draw_ahead(self) -> Any:
        """Read the main branch's next unread batch, and queue it for the main branch (check
        :attr:`at_end` first: reading past the last batch would end the main branch's epoch early)."""
        before = self._flags()
        try:
            batch, moved = self._read()
        except StopIteration:
            raise StreamEnded("the training stream has no batch left in this pass") from None
        self._queue.append((batch, self._flags()))
        self._set_flags(before)  # the main branch sees the loader's flags change when it gets the batch
        self.moved_in_fork |= moved
        return batch


def install(trainer: Any, cb: Any) -> None:
    """Wrap ``trainer.get_batch_samples`` so the main branch reads its epoch iterator through a
    :class:`MainStream` (kept on ``cb._stream``); the fork's own calls (``cb.in_fork``) pass through."""
    current = trainer.__dict__.get("get_batch_samples")
    original = current.__wrapped__ if getattr(current, "_cooldown_stream", False) else trainer.get_batch_samples

    @functools.wraps(original)
    def get_batch_samples(epoch_iterator, num_batches, device):
        if cb.in_fork:
            return original(epoch_iterator, num_batches, device)
        stream = cb._stream
        if stream is None or stream.it is not epoch_iterator:
            stream = cb._stream = MainStream(epoch_iterator, lambda: trainer.state.global_step)
        return original(stream, num_batches, device)

    get_batch_samples._cooldown_stream = True  # type: ignore[attr-defined]
    trainer.get_batch_samples = get_batch_samples
    cb._stream = None


def uninstall(trainer: Any, cb: Any) -> None:
    current = trainer.__dict__.get("get_batch_samples")
    if getattr(current, "_cooldown_stream", False):
        del trainer.get_batch_samples
    cb._stream = None


def stop_if_disturbed(trainer: Any, cb: Any, any_rank: Callable[[bool], bool], step: int) -> None:
    """After a fork: if producing the batches it drew moved the global RNG on some rank, the main branch's next
    batches are not the ones it would have had; stop training (every rank), leaving the Trainer as it was."""
    stream = cb._stream
    if not any_rank(stream is not None and stream.moved_in_fork):
        return
    uninstall(trainer, cb)
    raise RuntimeError(
        f"CooldownTrainerCallback: the fork at step {step} drew the main branch's next batches from its streaming "
        "train_dataset, and producing them drew from the global random number generator (e.g. a masking collator or "
        "a random crop): those batches now differ from the ones the main branch would have trained on, so training "
        "stops here (checkpoints saved so far are intact). Use ForkPlan(data='fresh') or an iterable of cooldown "
        "batches, or draw that randomness in DataLoader workers (dataloader_num_workers > 0).")
