"""Where cooldown batches come from.

``ForkPlan(data=...)`` is one of:

- ``"peek"``: the next batches the main branch will see. Two ways to get them without disturbing the
  main branch:

  * a stateful loader (``state_dict``/``load_state_dict`` that work, e.g. torchdata's
    ``StatefulDataLoader``) is cloned and the clone loaded with the main loader's state: exact within
    the current epoch; past the epoch end the clone starts its own next epoch, which matches the main
    branch only if the sampler's order is a function of its saved state;
  * any other loader - a stream over an ``IterableDataset``, a plain ``DataLoader``, a generator - is
    wrapped in a :class:`PeekableLoader` that the training loop iterates instead: a fork draws the
    upcoming batches from the main branch's own iterator and hands them back, and the main branch then
    trains on exactly those batches, in order. The handed-back batches are held in memory until the
    main branch has used them (``c`` x accumulation batches per fork). The main branch's next pass
    is not known before it starts (its order may depend on the RNG at that point), so a fork that
    needs more batches than the current pass has left goes on with ``"fresh"`` batches for a map-style
    dataset (the record says so), and fails with the reason for a stream.
- ``"fresh"``: a separate loader over the same map-style dataset, shuffled by a generator seeded with
  ``seed + fork step`` (per rank, with a ``DistributedSampler`` when ``world_size > 1``). For a stream
  (``IterableDataset``) this restarts the stream from its beginning - batches the main branch has
  already trained on - and only when asked for: the data source then says so. A restarted stream must
  not share its read position with the main branch's iterator.
- ``"auto"``: ``"peek"`` where possible (a stateful loader or a :class:`PeekableLoader`), else
  ``"fresh"`` for a map-style dataset; a stream that is neither is refused (:func:`resolve_source`).
- an iterable of batches (e.g. an anneal mix), cycled when it runs out;
- a callable ``data(step) -> iterable of batches``, called once per fork with the fork step ``S``
  (completed optimizer steps), e.g. for loops without a DataLoader such as nanoGPT's ``get_batch``::

      def cooldown_data(step):
          while True:
              yield get_batch("train")

Every fork says where its batches came from (:data:`SOURCES`, kept in the record's ``data`` field).
The main loader object is never iterated for ``"fresh"``.
"""

from __future__ import annotations

import copy
import random
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

__all__ = ["PeekableLoader", "is_stateful_loader", "is_stream", "clone_stateful_loader", "fresh_loader",
           "resolve_source", "cooldown_batches", "CooldownBatches", "SOURCES", "RESTARTED", "MAIN_BRANCH_SOURCES"]

RESTARTED = "fresh (stream restarted from its beginning)"
SOURCES = ("peek", "fresh", RESTARTED, "iterable", "callable")
MAIN_BRANCH_SOURCES = ("peek",)  # sources that are the main branch's upcoming batches


class PeekableLoader:
    """Iterates like ``loader``; a fork can draw the main branch's upcoming batches and hand them back.

    Use it in place of the training loader (``for batch in PeekableLoader(train_loader)``). Between
    forks it only forwards ``loader``'s batches. :meth:`upcoming` gives a fork the batches the main
    branch will see next in the current pass: first those an earlier fork handed back and the main
    branch has not used yet, then new ones from the main branch's own iterator, each kept to be
    handed back. The main branch then yields the handed-back batches first, so it sees the same
    batches in the same order as without forks. Other attributes are ``loader``'s.

    A loader that draws from the global random number generators in this process when it makes a
    batch (random augmentation without workers) cannot be peeked: its upcoming batches depend on the
    random numbers the main branch draws before it gets them. The main branch's 2nd and 3rd batches of
    each pass are checked (``draws_rng``), and such a loader is refused for ``"peek"``.

    Args:
        loader: the training loader (any iterable; a new pass starts with ``iter(loader)``).
        capture, apply: optional bookkeeping of a framework's loader that changes as batches are
            drawn (e.g. Accelerate's end-of-dataloader flag): ``capture()`` after each drawn batch,
            ``apply(state)`` when the main branch gets that batch back, so the loader looks to the
            main branch as it did when the batch was first drawn.
        on_end: called when the main branch reaches the end of a pass whose end a fork has already
            drawn (the loader's own end-of-pass effect happened inside the fork, which the fork's
            restore may have undone).
    """

    def __init__(self, loader: Any, *, capture: Callable[[], Any] | None = None,
                 apply: Callable[[Any], None] | None = None, on_end: Callable[[], None] | None = None) -> None:
        if isinstance(loader, PeekableLoader):
            raise ValueError("Invalid loader: it is already a PeekableLoader; wrap the training loader once.")
        if not isinstance(loader, Iterable):
            raise ValueError(f"Invalid loader ({type(loader).__name__}): must be iterable (a DataLoader or a stream).")
        if (capture is None) != (apply is None):
            raise ValueError("Give both capture and apply, or neither.")
        self.loader = loader
        self._capture, self._apply, self._on_end = capture, apply, on_end
        self._it: Iterator | None = None  # the main branch's iterator of the current pass
        self._back: deque = deque()  # (batch, bookkeeping) drawn by a fork, not yet used by the main branch
        self._ended = False  # a fork drew the end of the current pass
        self._end_state: Any = None
        self.draws_rng = False  # making a batch draws from the global RNG (found on a pass's first batches)

    def __iter__(self) -> Iterator:
        return self._main_pass()

    def _main_pass(self) -> Iterator:
        self._back.clear()  # a new pass: what an abandoned pass had left is not upcoming any more
        self._ended, self._end_state = False, None
        self._it = iter(self.loader)
        n_drawn = 0
        while True:
            if self._back:
                batch, state = self._back.popleft()
                if self._apply is not None:
                    self._apply(state)
                yield batch
            elif self._ended:
                if self._apply is not None:
                    self._apply(self._end_state)
                if self._on_end is not None:
                    self._on_end()
                break
            else:
                probe = 0 < n_drawn <= _PROBED_BATCHES and not self.draws_rng  # the 1st may seed a shuffle
                before = _rng_state() if probe else None
                try:
                    batch = next(self._it)
                except StopIteration:
                    break
                n_drawn += 1
                if probe and not _same_rng(before, _rng_state()):
                    self.draws_rng = True
                yield batch
        self._it, self._ended, self._end_state = None, False, None

    def upcoming(self) -> "_Upcoming":
        """The main branch's upcoming batches of the current pass (ends where the pass ends); call
        ``close()`` on it when the fork is done."""
        return _Upcoming(self)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not yet set (copy/unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __repr__(self) -> str:
        return f"PeekableLoader({self.loader!r})"


class _Upcoming(Iterator):
    """A fork's view of a :class:`PeekableLoader`: the main branch's next batches, kept to be handed back."""

    def __init__(self, w: PeekableLoader) -> None:
        self.w, self.i = w, 0
        self._current = w._capture() if w._capture is not None and w._it is not None else None
        self.drawn = 0

    def __next__(self) -> Any:
        w = self.w
        if self.i < len(w._back):
            batch = w._back[self.i][0]
        elif w._ended or w._it is None:
            raise StopIteration
        else:
            if w.draws_rng:
                raise RuntimeError(_DRAWS_RNG)
            before = _rng_state()
            try:
                batch = next(w._it)
            except StopIteration:
                w._ended = True
                w._end_state = w._capture() if w._capture is not None else None
                raise
            w._back.append((batch, w._capture() if w._capture is not None else None))
            if not _same_rng(before, _rng_state()):
                w.draws_rng = True
                raise RuntimeError(_DRAWS_RNG + " The main branch trains on this batch as the fork drew it.")
        self.i += 1
        self.drawn += 1
        return batch

    def close(self) -> None:
        """Put the loader's bookkeeping back to where the main branch is (its current batch)."""
        if self._current is not None:
            self.w._apply(self._current)  # type: ignore[misc]
            self._current = None


# The main branch's 2nd and 3rd batches of each pass are checked for global RNG draws (the 1st may draw
# the pass's shuffling seed: a sampler without a generator draws it when the pass starts).
_PROBED_BATCHES = 2
_DRAWS_RNG = ("the training loader draws from the global random number generators in this process when it makes a "
              "batch (random augmentation with num_workers=0?), so a fork cannot take the main branch's upcoming "
              "batches: they depend on the random numbers the main branch draws before it gets them. Use DataLoader "
              "workers (num_workers > 0, each seeded by the loader), a stateful loader, or ForkPlan(data='fresh').")


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state()[1], torch.get_rng_state()


def _same_rng(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def _inner_loader(loader: Any) -> Any:
    return loader.loader if isinstance(loader, PeekableLoader) else loader


def is_stateful_loader(loader: Any) -> bool:
    """Whether ``loader`` can report and load its position (so a clone can peek).

    A wrapper that only forwards to another loader (Accelerate's prepared loaders keep it as
    ``base_dataloader``, and always have ``state_dict``/``load_state_dict``) is stateful only if the
    loader it wraps is.
    """
    loader = _inner_loader(loader)
    base = getattr(loader, "__dict__", {}).get("base_dataloader")
    if base is not None and not is_stateful_loader(base):
        return False
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def is_stream(loader: Any) -> bool:
    """Whether ``loader`` is a stream: an ``IterableDataset`` loader, or an iterable without a map-style
    ``dataset`` (a generator, a custom loader) - something a separate seeded sampler cannot re-draw."""
    dataset = getattr(_inner_loader(loader), "dataset", None)
    return dataset is None or isinstance(dataset, IterableDataset)


def resolve_source(data: Any, loader: Any) -> str:
    """What a fork under ``ForkPlan(data=data)`` draws from (one of :data:`SOURCES`), or ``ValueError``
    when that cannot work - call it before the first step."""
    if not isinstance(data, str):
        return "callable" if callable(data) and not isinstance(data, Iterable) else "iterable"
    if loader is None:
        raise ValueError(f"ForkPlan(data={data!r}) needs the training loader; pass the data loader to the "
                         "adapter or give ForkPlan(data=<iterable of batches>).")
    draws_rng = isinstance(loader, PeekableLoader) and loader.draws_rng
    peekable = is_stateful_loader(loader) or (isinstance(loader, PeekableLoader) and not draws_rng)
    if data in ("peek", "auto") and peekable:
        return "peek"
    stream = is_stream(loader)
    if data == "peek" or (data == "auto" and stream):
        if draws_rng:
            raise ValueError(f"ForkPlan(data={data!r}): " + _DRAWS_RNG)
        what = "a stream (IterableDataset or an iterable without a map-style dataset)" if stream else \
            "a loader that cannot report its position"
        raise ValueError(
            f"ForkPlan(data={data!r}): the training loader is {what}, so a fork cannot see the main branch's "
            "upcoming batches without taking them away from it. Iterate a PeekableLoader instead (the hook: "
            "`train_loader = hook.wrap(train_loader)`), or use a stateful loader (torchdata's "
            "StatefulDataLoader), or give ForkPlan(data=<iterable>|<callable step -> iterable>); "
            "data='fresh' restarts a stream from its beginning.")
    if stream:
        if getattr(_inner_loader(loader), "dataset", None) is None:
            raise ValueError("ForkPlan(data='fresh') needs a DataLoader (with a dataset) to restart; the training "
                             "loader has none. Give ForkPlan(data=<iterable>|<callable step -> iterable>).")
        return RESTARTED
    return "fresh"


def clone_stateful_loader(loader: Any) -> Any:
    """A copy of a stateful loader positioned where ``loader`` is (shares the dataset, not the sampler)."""
    loader = _inner_loader(loader)
    state = loader.state_dict()
    memo: dict[int, Any] = {}
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        memo[id(dataset)] = dataset
    it = getattr(loader, "_iterator", None)
    if it is not None:
        memo[id(it)] = None
    clone = copy.deepcopy(loader, memo)
    clone.load_state_dict(state)
    return clone


def fresh_loader(loader: DataLoader, *, seed: int, rank: int = 0, world_size: int = 1,
                 collate_fn: Callable | None = None, batch_size: int | None = None) -> DataLoader:
    """A separate, seeded loader over ``loader.dataset`` with the same batch size and collate."""
    loader = _inner_loader(loader)
    dataset = loader.dataset
    bs = batch_size or loader.batch_size
    if bs is None and loader.batch_sampler is not None:
        bs = getattr(loader.batch_sampler, "batch_size", None)
    if bs is None:
        raise ValueError("Cannot build a 'fresh' cooldown loader: the training loader has no batch_size; "
                         "pass ForkPlan(data=<iterable of batches>) instead.")
    kwargs: dict[str, Any] = dict(batch_size=bs, collate_fn=collate_fn or loader.collate_fn,
                                  drop_last=loader.drop_last, num_workers=0)
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        return DataLoader(dataset, sampler=sampler, **kwargs)
    return DataLoader(dataset, shuffle=True, generator=gen, **kwargs)


def _cycle(make: Callable[[], Iterable]) -> Iterator:
    """Iterate ``make()`` again and again; a loader at the very end of its epoch may yield nothing once."""
    empty_passes = 0
    while True:
        empty_passes += 1
        for batch in make():
            empty_passes = 0
            yield batch
        if empty_passes >= 2:
            raise ValueError("The cooldown data is empty: give ForkPlan(data=...) at least one batch.")


class CooldownBatches(Iterator):
    """An endless iterator of cooldown batches; ``source`` says where they come from (one of
    :data:`SOURCES`, or ``"peek, then fresh ..."`` when the main branch's pass ended during the fork).
    ``close()`` when the fork is done (hands a :class:`PeekableLoader` its bookkeeping back)."""

    def __init__(self, it: Iterator, source: str, upcoming: _Upcoming | None = None) -> None:
        self._it, self.source, self._upcoming = it, source, upcoming

    def __next__(self) -> Any:
        return next(self._it)

    def close(self) -> None:
        if self._upcoming is not None:
            self._upcoming.close()
            self._upcoming = None


def cooldown_batches(source: Any, *, loader: Any = None, step: int = 0, seed: int = 0, rank: int = 0,
                     world_size: int = 1, collate_fn: Callable | None = None) -> CooldownBatches:
    """An endless iterator of cooldown batches for a fork after ``step`` completed steps.

    ``source`` is a :class:`~cooldown_callbacks.ForkPlan` ``data`` value; ``loader`` the main branch's
    training loader (needed for ``"peek"``, ``"fresh"`` and ``"auto"``). Raises ``ValueError`` where
    :func:`resolve_source` does.
    """
    kind = resolve_source(source, loader)
    if kind == "callable":
        produced = source(step)
        return CooldownBatches(_cycle(lambda: produced), kind)
    if kind == "iterable":
        return CooldownBatches(_cycle(lambda: source), kind)

    def fresh() -> Iterator:
        fl = fresh_loader(loader, seed=seed + step, rank=rank, world_size=world_size, collate_fn=collate_fn)
        epoch = [0]

        def make() -> Iterable:
            if isinstance(fl.sampler, DistributedSampler):
                fl.sampler.set_epoch(epoch[0])
            epoch[0] += 1
            return fl
        return _cycle(make)

    if kind != "peek":
        return CooldownBatches(fresh(), kind)
    if is_stateful_loader(loader):
        clone = clone_stateful_loader(loader)
        first = [True]

        def resume() -> Iterable:
            # The main loader drew its iterator's base seed when its epoch began; the clone continues
            # that epoch, so its iterator must not draw again from the global RNG (a loader without its
            # own generator, e.g. with a DistributedSampler, would shift the fork's dropout stream).
            if not first[0]:
                return clone
            first[0] = False
            state = torch.get_rng_state()
            it = iter(clone)
            torch.set_rng_state(state)
            return it
        return CooldownBatches(_cycle(resume), kind)
    up = loader.upcoming()
    out = CooldownBatches(iter(()), kind, up)

    def peek_then_fresh() -> Iterator:
        yield from up
        if is_stream(loader):
            raise RuntimeError(
                f"the main branch's stream ended after {up.drawn} upcoming batch(es), before the cooldown had "
                "all it needs; there are no further upcoming batches. For forks at the end of the data give "
                "ForkPlan(data='fresh') (restarts the stream) or data=<iterable>|<callable step -> iterable>.")
        out.source = (f"peek ({up.drawn} batches), then fresh: the main branch's pass over the data ended "
                      "during the fork")
        yield from fresh()
    out._it = peek_then_fresh()
    return out
