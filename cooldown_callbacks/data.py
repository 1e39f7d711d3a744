"""Where cooldown batches come from.

- ``"peek"``: the next batches the main branch will see. The main loader must be stateful
  (``state_dict``/``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``): a clone is made and
  loaded with the main loader's state, so the fork sees exactly the main branch's next batches
  *within the current epoch*; past the epoch end the clone starts its own next epoch, which matches
  the main branch only if the sampler's order is a function of its saved state.
- ``"fresh"``: a separate loader over the same dataset, shuffled by a generator seeded with
  ``seed + fork step`` (per rank, with a ``DistributedSampler`` when ``world_size > 1``).
- an iterable (or a callable ``step -> iterable``): the user's cooldown stream, e.g. an anneal mix.

Iterators are cycled when they run out. The main loader object is never iterated.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

__all__ = ["is_stateful_loader", "clone_stateful_loader", "fresh_loader", "cooldown_batches"]


def is_stateful_loader(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def clone_stateful_loader(loader: Any) -> Any:
    """A copy of a stateful loader positioned where ``loader`` is (shares the dataset, not the sampler)."""
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


def cooldown_batches(source: Any, *, loader: Any = None, step: int = 0, seed: int = 0, rank: int = 0,
                     world_size: int = 1, collate_fn: Callable | None = None) -> Iterator:
    """An endless iterator of cooldown batches for a fork after ``step`` completed steps.

    ``source`` is a :class:`~cooldown_callbacks.ForkPlan` ``data`` value; ``loader`` the main branch's
    training loader (needed for ``"peek"``, ``"fresh"`` and ``"auto"``).
    """
    if isinstance(source, str):
        if loader is None:
            raise ValueError(f"ForkPlan(data={source!r}) needs the training loader; pass the data loader to the "
                             "adapter or give ForkPlan(data=<iterable of batches>).")
        if source == "auto":
            source = "peek" if is_stateful_loader(loader) else "fresh"
        if source == "peek":
            if not is_stateful_loader(loader):
                raise ValueError(
                    "ForkPlan(data='peek') needs a stateful training loader (with state_dict/load_state_dict), "
                    "e.g. torchdata.stateful_dataloader.StatefulDataLoader; or use data='fresh'.")
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
            return _cycle(resume)
        fresh = fresh_loader(loader, seed=seed + step, rank=rank, world_size=world_size, collate_fn=collate_fn)
        epoch = [0]

        def make_fresh() -> Iterable:
            if isinstance(fresh.sampler, DistributedSampler):
                fresh.sampler.set_epoch(epoch[0])
            epoch[0] += 1
            return fresh
        return _cycle(make_fresh)
    if callable(source) and not isinstance(source, Iterable):
        produced = source(step)
        return _cycle(lambda: produced)
    return _cycle(lambda: source)
