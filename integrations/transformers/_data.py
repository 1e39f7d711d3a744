"""Cooldown batches for the HF adapter: the main branch's upcoming batches (a replayed sampler, or drawn from a
stream and handed back), a separate loader, or the user's own."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, SequentialSampler
from transformers import Trainer
from transformers.utils import logging

from cooldown_callbacks.data import cooldown_batches
from cooldown_callbacks.engine import ForkError

from ._stream import StreamEnded

if TYPE_CHECKING:
    from .callback import CooldownTrainerCallback

logger = logging.get_logger("cooldown_callbacks.integrations.transformers")


def _sampler_chain(loader: Any) -> tuple[list, Any]:
    """``([batch samplers, outer to inner], innermost sampler)`` of a (prepared) DataLoader."""
    chain, bs = [], getattr(loader, "batch_sampler", None)
    while bs is not None:
        chain.append(bs)
        if isinstance(bs, BatchSampler) and not hasattr(bs, "batch_sampler"):
            break
        bs = getattr(bs, "batch_sampler", None)
    return chain, (getattr(chain[-1], "sampler", None) if chain else None)


def _replayable(loader: Any) -> bool:
    """Whether the loader's order is a function of (seed, epoch), so a copy can replay it."""
    from accelerate.data_loader import SeedableRandomSampler

    if loader is None or isinstance(getattr(loader, "dataset", None), IterableDataset):
        return False
    chain, sampler = _sampler_chain(loader)
    if not chain:
        return False
    try:
        len(loader)
    except TypeError:
        return False
    return isinstance(sampler, (SeedableRandomSampler, SequentialSampler, DistributedSampler))


# How a fork gets its batches (``cb._data_kind``) and what its record says (``ForkRecord.data``).
DATA_SOURCES = {
    "peek": "peek",  # the main branch's upcoming batches, replayed from a copy of its sampler
    "peek-stream": "peek",  # the main branch's upcoming batches, drawn from its epoch iterator and handed back
    "fresh": "fresh",  # a separate seeded loader over train_dataset
    "fresh-stream": "fresh (stream restarted from its beginning)",
    "iterable": "iterable",
    "callable": "callable",
}


def _is_stream(trainer: Trainer, loader: Any) -> bool:
    dataset = getattr(loader, "dataset", None)
    return isinstance(dataset if dataset is not None else trainer.train_dataset, IterableDataset)


def _data_kind(data: Any, trainer: Trainer, loader: Any) -> str:
    """Resolve ``ForkPlan(data=...)`` for this Trainer (a key of :data:`DATA_SOURCES`), before the first step.

    ``"auto"`` and ``"peek"`` always mean the main branch's upcoming batches: replayed for a map-style
    dataset whose order can be replayed, drawn from the epoch iterator and handed back for a stream.
    ``"auto"`` falls back to ``"fresh"`` only for a map-style dataset whose order cannot be replayed
    (with a warning); a stream is restarted from its beginning only under ``data="fresh"`` (with a
    warning too).
    """
    if not isinstance(data, str):
        return "callable" if callable(data) and not isinstance(data, Iterable) else "iterable"
    stream = _is_stream(trainer, loader)
    if data in ("peek", "auto") and stream:
        if loader is None:
            raise ValueError(f"Invalid plan: ForkPlan(data={data!r}) needs the Trainer's training loader.")
        return "peek-stream"
    if data == "peek" and not _replayable(loader):
        raise ValueError("Invalid plan: ForkPlan(data='peek') needs a map-style train_dataset whose order depends only "
                         "on the seed and epoch (the Trainer's default sampler with use_seedable_sampler=True, "
                         "train_sampling_strategy='sequential', or a DistributedSampler) or a streaming one; use "
                         "data='fresh' or an iterable of batches.")
    if data == "auto":
        data = "peek" if _replayable(loader) else "fresh"
        if data == "fresh":
            logger.warning("CooldownTrainerCallback: the training order cannot be replayed (e.g. "
                           "train_sampling_strategy='group_by_length' or a custom sampler), so cooldowns do not see "
                           "the main branch's upcoming batches: they use a separate loader over train_dataset with "
                           "its own seeded sampler (ForkPlan(data='fresh'); pass it to silence this warning). The "
                           "records say data='fresh'.")
    if data == "fresh" and (trainer.train_dataset is None or loader is None):
        raise ValueError("Invalid plan: ForkPlan(data='fresh') needs the Trainer's train_dataset; or pass an "
                         "iterable of batches.")
    if data == "fresh" and stream:
        logger.warning("CooldownTrainerCallback: ForkPlan(data='fresh') on a streaming train_dataset restarts the "
                       "stream from its beginning for every cooldown: the forks cool on batches the main branch has "
                       "already trained on (and, if the stream's iterators share a read position, take batches from "
                       "the main branch). data='auto' cools on the main branch's upcoming batches instead. The records "
                       "say data='fresh (stream restarted from its beginning)'.")
        return "fresh-stream"
    return data


def _cooldown_groups(cb: CooldownTrainerCallback, trainer: Trainer, step: int,
                     any_rank: Callable[[bool], bool] = bool) -> Iterator[list]:
    """Endless iterator of micro-batch groups, one group per cooldown optimizer step."""
    args = trainer.args
    ga = args.gradient_accumulation_steps
    loader = trainer.callback_handler.train_dataloader
    kind = cb._data_kind
    if kind == "peek":
        return _peek_groups(loader, step, ga)
    if kind == "peek-stream":
        return _stream_groups(cb, ga, any_rank)
    if kind in ("fresh", "fresh-stream"):
        chain, _ = _sampler_chain(loader)
        bs = next((getattr(b, "batch_size", None) for b in reversed(chain) if getattr(b, "batch_size", None)), None)
        template = DataLoader(trainer.train_dataset, batch_size=bs or args.train_batch_size,
                              collate_fn=loader.collate_fn, drop_last=args.dataloader_drop_last)
        it = cooldown_batches("fresh", loader=template, step=step, seed=cb.plan.seed, rank=args.process_index,
                              world_size=args.world_size)
    else:
        it = cooldown_batches(cb.plan.data, step=step, seed=cb.plan.seed, rank=args.process_index,
                              world_size=args.world_size)
    return ([next(it) for _ in range(ga)] for _ in iter(int, 1))


def _stream_groups(cb: CooldownTrainerCallback, ga: int, any_rank: Callable[[bool], bool]) -> Iterator[list]:
    """The main branch's next batches, ``ga`` per cooldown step, drawn from its epoch iterator and
    handed back to it (see :mod:`._stream`). Every rank agrees before each draw that no rank's stream
    has ended, so all ranks stop at the same draw (no rank is left in a cooldown step's collectives)."""
    stream = cb._stream
    if stream is None:
        raise RuntimeError("the main branch's epoch iterator was not seen (Trainer.get_batch_samples was not called)")
    done = 0
    while True:
        group = []
        for _ in range(ga):
            if any_rank(stream.at_end):
                raise ForkError(f"the training stream has no batch left in this pass: it ended after {done} cooldown "
                                "step(s); what the fork read was handed back to the main branch. Fork earlier in the "
                                "pass, or give ForkPlan(data=<iterable>).")
            try:
                group.append(stream.draw_ahead())
            except StreamEnded as e:
                raise ForkError(f"{e}: it ended after {done} cooldown step(s)") from None
        yield group
        done += 1


def _peek_groups(loader: Any, step: int, ga: int) -> Iterator[list]:
    """The batches the main branch will train on after ``step`` optimizer steps, grouped as the
    Trainer groups them (``ga`` micro-batches per step, the remainder at the end of an epoch).

    Position: epoch ``step // n`` and ``(step % n) * ga`` batches into it, with ``n`` the optimizer
    steps per epoch - the Trainer's own resume arithmetic (``_init_training_state``).
    """
    dataset = loader.dataset
    chain, sampler = _sampler_chain(loader)
    memo: dict[int, Any] = {id(dataset): dataset}
    data_source = getattr(sampler, "data_source", None)
    if data_source is not None:
        memo[id(data_source)] = data_source
    outer = copy.deepcopy(chain[0], memo)
    copied_chain, copied_sampler = _sampler_chain(_Holder(outer))
    n_batches = len(loader)
    per_epoch = max(n_batches // ga + int(n_batches % ga > 0), 1)
    remainder = n_batches % ga or ga
    epoch, update = divmod(step, per_epoch)
    getitems = getattr(dataset, "__getitems__", None)
    collate = loader.collate_fn
    own_generator = getattr(loader, "generator", None) is not None

    def fetch(idx: list) -> Any:
        items = getitems(idx) if getitems is not None else [dataset[i] for i in idx]
        return collate(items)

    while True:
        if update == 0 and not own_generator:
            # A new epoch: the Trainer creates a new DataLoader iterator, which draws one seed from the
            # global RNG (torch's _BaseDataLoaderIter). Draw it too, so dropout in the cooldown steps
            # after an epoch end matches a run that trained through that epoch end.
            torch.empty((), dtype=torch.int64).random_()
        for obj in [*copied_chain, copied_sampler]:
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        batches = iter(outer)
        for _ in range(update * ga):
            next(batches, None)
        while update < per_epoch:
            size = ga if update != per_epoch - 1 else remainder
            group = [fetch(idx) for idx in _take(batches, size)]
            if not group:
                break
            yield group
            update += 1
        epoch, update = epoch + 1, 0


class _Holder:
    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler


def _take(it: Iterator, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out

