"""Every private Lightning internal the adapter relies on, and only here (see the list below)."""

from __future__ import annotations

import contextlib
import copy
import math
import random
import warnings
from collections import OrderedDict, deque
from typing import Any, Iterator, Sequence

import numpy as np
import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden



# =================================================================================================
# PRIVATE LIGHTNING INTERNALS
#
# Everything this adapter needs from Lightning that is not public API lives in this section, and
# only here. Checked against lightning 2.6.6 (``tests/test_lightning.py::test_private_internals``
# exercises every name below; ``_check_internals`` fails fast with a clear message at fit start if a
# future version moved one). Names used:
#   trainer.fit_loop.epoch_loop                       (_TrainingEpochLoop)
#     ._should_check_val_fx(data_fetcher), ._skip_next_val      "will Lightning validate now?"
#     ._should_accumulate()                            optimizer-step boundary
#     ._results                                        swapped so the fork's self.log is discarded
#     ._build_kwargs(...)                              training_step arguments
#     .batch_idx, .val_loop                            (_EvaluationLoop: data source, loaders, modes)
#     .automatic_optimization: .optim_progress, ._make_step_fn, ._make_backward_fn,
#         ._on_before_zero_grad, ._optimizer_zero_grad, ._skip_backward
#     .manual_optimization: .run(kwargs), .optim_step_progress
#   trainer.fit_loop._data_fetcher (.batches: batches Lightning prefetched but has not trained on;
#       .iterator: where the next batches come from - a train stream's batches are drawn from it for a
#       fork and put back in front of it; _DataLoaderIterDataFetcher: training_step takes the iterator)
#   trainer.fit_loop.epoch_loop._batches_that_stepped (the step Lightning's loggers use for main metrics)
#   lightning.pytorch.loops.optimization.automatic.Closure
#   lightning.pytorch.loops.utilities._block_parallel_sync_behavior  (no DDP sync while accumulating)
#   lightning.pytorch.loops.evaluation_loop._EvaluationLoop          (the cooled validation)
#   lightning.pytorch.trainer.connectors.logger_connector.result._ResultCollection
#   lightning.pytorch.trainer.call._call_lightning_module_hook / _call_strategy_hook
#   trainer._logger_connector: ._logged_metrics, ._callback_metrics, ._progress_bar_metrics,
#       ._first_loop_iter, ._current_fx, .log_metrics(...)
#   trainer._last_val_time, trainer._val_check_time_interval, trainer._signal_connector.received_sigterm
#   trainer.strategy._lightning_optimizers
#   ModelParallelStrategy._save_distributed_checkpoint  (one full file or a DCP folder, per cooled save)
#   trainer.lightning_module._on_before_batch_transfer, ._current_fx_name
#   torch DistributedDataParallel.require_forward_param_sync / require_backward_grad_sync (torch-internal flags)
#   torchmetrics Metric._defaults, ._update_count, ._forward_cache, ._computed, ... (metric states to snapshot)
# =================================================================================================

from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher
from lightning.pytorch.loops.optimization.automatic import Closure
from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior
from lightning.pytorch.trainer import call as _call
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: F401 - used by the callback

PINNED_LIGHTNING = "2.6"

_REQUIRED_EPOCH_LOOP = ("_should_check_val_fx", "_should_accumulate", "_results", "_build_kwargs", "val_loop",
                        "automatic_optimization", "manual_optimization", "batch_idx", "_skip_next_val",
                        "_batches_that_stepped")
_REQUIRED_AUTO = ("optim_progress", "_make_step_fn", "_make_backward_fn", "_on_before_zero_grad",
                  "_optimizer_zero_grad", "_skip_backward")
_REQUIRED_CONNECTOR = ("_logged_metrics", "_callback_metrics", "_progress_bar_metrics", "_first_loop_iter",
                       "_current_fx", "log_metrics")


def _check_internals(trainer: pl.Trainer) -> None:
    """Fail fast, with the names, if this Lightning version moved an internal the adapter uses."""
    loop = trainer.fit_loop.epoch_loop
    missing = [f"epoch_loop.{n}" for n in _REQUIRED_EPOCH_LOOP if not hasattr(loop, n)]
    missing += [f"automatic_optimization.{n}" for n in _REQUIRED_AUTO
                if not hasattr(loop.automatic_optimization, n)]
    missing += [f"_logger_connector.{n}" for n in _REQUIRED_CONNECTOR if not hasattr(trainer._logger_connector, n)]
    if not hasattr(loop.manual_optimization, "optim_step_progress"):
        missing.append("manual_optimization.optim_step_progress")
    for n in ("_data_source", "_combined_loader", "_max_batches", "_last_val_dl_reload_epoch", "_module_mode"):
        if not hasattr(loop.val_loop, n):
            missing.append(f"val_loop.{n}")
    others = {"strategy._lightning_optimizers": (trainer.strategy, "_lightning_optimizers"),
              "fit_loop._data_fetcher": (trainer.fit_loop, "_data_fetcher"),
              "_signal_connector.received_sigterm": (trainer._signal_connector, "received_sigterm"),
              "lightning_module._on_before_batch_transfer": (trainer.lightning_module, "_on_before_batch_transfer"),
              "lightning_module._current_fx_name": (trainer.lightning_module, "_current_fx_name")}
    missing += [name for name, (obj, attr) in others.items() if not hasattr(obj, attr)]
    if missing:
        raise RuntimeError(
            f"CooldownCallback was written against lightning {PINNED_LIGHTNING}.x (found {pl.__version__}); these "
            f"internals are missing: {', '.join(missing)}. Install lightning>={PINNED_LIGHTNING},<2.7.")


def _at_step_boundary(trainer: pl.Trainer) -> bool:
    """True right after an optimizer step (not while accumulating gradients)."""
    if not trainer.lightning_module.automatic_optimization:
        return True
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def _validation_configured(trainer: pl.Trainer) -> bool:
    """Whether this fit can validate at all: a ``validation_step``, a val dataloader, batches to run."""
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    return (trainer.limit_val_batches != 0 and is_overridden("validation_step", trainer.lightning_module)
            and source.is_defined())


def _will_validate(trainer: pl.Trainer) -> bool:
    """Called in ``on_train_batch_end``: will Lightning run validation after this batch?"""
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None or loop._skip_next_val:
        return False
    return bool(loop._should_check_val_fx(fetcher))


def _prefetched_batches(trainer: pl.Trainer) -> list:
    """Batches Lightning already drew from the train loader but has not trained on (iterable datasets)."""
    fetcher = trainer.fit_loop._data_fetcher
    return [_batch_of(item) for item in list(getattr(fetcher, "batches", None) or [])]


def _batch_of(item: Any) -> Any:
    return item[0] if isinstance(item, tuple) and len(item) == 3 else item


def _uses_dataloader_iter(trainer: pl.Trainer) -> bool:
    """Whether ``training_step`` takes the data iterator itself (Lightning then never fetches for it)."""
    return isinstance(trainer.fit_loop._data_fetcher, _DataLoaderIterDataFetcher)


def _rng_fingerprint() -> tuple:
    py = random.getstate()
    npy = np.random.get_state()
    return py, npy[1].tobytes(), npy[2], bytes(torch.get_rng_state().numpy())


class _HandedBack:
    """The main branch's batch iterator with the batches a fork drew put back in front of it."""

    def __init__(self, source: Iterator, ended: bool) -> None:
        self.items: deque = deque()
        self.source, self.ended = source, ended

    def __iter__(self) -> "_HandedBack":
        return self

    def __next__(self) -> Any:
        if self.items:
            return self.items.popleft()
        if self.ended:
            raise StopIteration
        return next(self.source)


class _MainStreamPeek:
    """The main branch's upcoming batches of a train stream, drawn from Lightning's train data fetcher.

    First the batches the fetcher already prefetched, then batches drawn from the fetcher's iterator;
    :meth:`hand_back` puts every drawn batch back in front of that iterator, in order, so the main
    branch trains on exactly the batches it would have seen. The fork gets deep copies. ``draw(n)``
    draws ahead (so every rank can agree on a shortfall before the first cooldown step).

    Exact unless drawing a batch uses the main process's global RNG (a dataset that shuffles or
    augments with it, ``num_workers=0``): the main branch's batches then get other random numbers
    than in a run without forks. That is detected (the RNG state moves during a draw): ``rng_moved``
    is set and no further batch is drawn.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is None or fetcher.iterator is None:
            raise RuntimeError("the train data iterator does not exist yet")
        self._fetcher = fetcher
        self._source = fetcher.iterator
        self._prefetched = [_batch_of(item) for item in list(getattr(fetcher, "batches", None) or [])]
        self._drawn: list = []
        self._ended = False
        self._used = 0
        self.rng_moved = False

    def draw(self, n: int) -> int:
        """Draw until ``n`` batches are available (prefetched included); returns how many are."""
        while len(self._prefetched) + len(self._drawn) < n and not self._ended:
            before = _rng_fingerprint()
            try:
                item = next(self._source)
            except StopIteration:
                self._ended = True
                break
            self._drawn.append(item)
            if _rng_fingerprint() != before:
                self.rng_moved = True
                break
        return len(self._prefetched) + len(self._drawn)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        k = self._used
        if self.draw(k + 1) <= k or self.rng_moved:
            raise StopIteration
        self._used += 1
        p = len(self._prefetched)
        return copy.deepcopy(self._prefetched[k] if k < p else _batch_of(self._drawn[k - p]))

    def hand_back(self) -> None:
        """Put the drawn batches back in front of the main branch's iterator (idempotent)."""
        if not self._drawn and not self._ended:
            return
        target = self._source if isinstance(self._source, _HandedBack) else _HandedBack(self._source, False)
        target.items.extendleft(reversed(self._drawn))
        target.ended = target.ended or self._ended
        self._fetcher.iterator = target
        self._drawn, self._ended = [], False


def _progress_extras(trainer: pl.Trainer) -> list:
    """(get, set) pairs for Lightning's step counters (``trainer.global_step`` moves during a fork)."""
    loop = trainer.fit_loop.epoch_loop
    auto, manual = loop.automatic_optimization.optim_progress, loop.manual_optimization.optim_step_progress
    return [(auto.state_dict, auto.load_state_dict), (manual.state_dict, manual.load_state_dict)]


def _ddp_extras(trainer: pl.Trainer) -> list:
    """(get, set) pairs for DistributedDataParallel's forward/backward sync flags.

    ``require_forward_param_sync`` decides whether the next forward broadcasts rank 0's buffers
    (BatchNorm statistics); the fork's own forwards change it, so it is part of the main branch.
    """
    model = trainer.strategy.model
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return []
    names = [n for n in ("require_forward_param_sync", "require_backward_grad_sync") if hasattr(model, n)]
    return [(lambda: {n: getattr(model, n) for n in names},
             lambda d: [setattr(model, n, v) for n, v in d.items()])]


def _to_device(trainer: pl.Trainer, batch: Any) -> Any:
    """The main loop's batch path: precision input conversion, ``on_before_batch_transfer``, device."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return _call._call_strategy_hook(trainer, "batch_to_device", batch, dataloader_idx=0)


def _module_hook(trainer: pl.Trainer, name: str, *args: Any) -> Any:
    return _call._call_lightning_module_hook(trainer, name, *args)


def _auto_micro_step(trainer: pl.Trainer, batch: Any, batch_idx: int, first: bool, last: bool) -> tuple[Any, dict]:
    """One micro-batch of automatic optimization, as ``_AutomaticOptimization.run`` does it.

    ``first``: zero the gradients (start of an accumulation window); ``last``: step the optimizer
    (through ``LightningModule.optimizer_step`` -> precision plugin -> clipping), else run the
    closure under the strategy's no-sync block.
    """
    loop = trainer.fit_loop.epoch_loop
    auto = loop.automatic_optimization
    optimizer = trainer.optimizers[0]
    kwargs = loop._build_kwargs(OrderedDict(), batch, batch_idx)
    zero_grad_fn = None
    if first and not auto._skip_backward:
        def zero_grad_fn() -> None:
            auto._on_before_zero_grad(optimizer)
            auto._optimizer_zero_grad(batch_idx, optimizer)
    backward_fn = None if auto._skip_backward else auto._make_backward_fn(optimizer)
    closure = Closure(step_fn=auto._make_step_fn(kwargs), backward_fn=backward_fn, zero_grad_fn=zero_grad_fn)
    strategy = trainer.strategy
    if not last and not strategy.handles_gradient_accumulation:
        with _block_parallel_sync_behavior(strategy, block=True):
            closure()
    else:
        progress = auto.optim_progress.optimizer.step
        if last:
            progress.increment_ready()
        _module_hook(trainer, "optimizer_step", trainer.current_epoch, batch_idx,
                     strategy._lightning_optimizers[0], closure)
        if last:
            progress.increment_completed()
    result = closure.consume_result()
    return result.loss, ({} if result.loss is None else result.asdict())


def _manual_micro_step(trainer: pl.Trainer, batch: Any, batch_idx: int) -> tuple[Any, dict]:
    """One call of the user's ``training_step`` under manual optimization (``_ManualOptimization.run``)."""
    loop = trainer.fit_loop.epoch_loop
    out = loop.manual_optimization.run(loop._build_kwargs(OrderedDict(), batch, batch_idx))
    return out.get("loss") if isinstance(out, dict) else None, out


def _next_batch_idx(trainer: pl.Trainer) -> int:
    return trainer.fit_loop.epoch_loop.batch_idx + 1


@contextlib.contextmanager
def _discarded_train_logging(trainer: pl.Trainer) -> Iterator[None]:
    """What the fork's ``training_step`` logs goes to a throwaway result collection."""
    loop = trainer.fit_loop.epoch_loop
    conn = trainer._logger_connector
    saved = (loop._results, conn._current_fx, conn._first_loop_iter, dict(conn._logged_metrics),
             dict(conn._callback_metrics), dict(conn._progress_bar_metrics))
    loop._results = _ResultCollection(training=True)
    try:
        yield
    finally:
        loop._results, conn._current_fx, conn._first_loop_iter = saved[0], saved[1], saved[2]
        conn._logged_metrics, conn._callback_metrics, conn._progress_bar_metrics = saved[3], saved[4], saved[5]


def _module_train_modes(trainer: pl.Trainer) -> Any:
    """The training-mode flags captured by the main validation loop (valid while it runs)."""
    return trainer.fit_loop.epoch_loop.val_loop._module_mode


def _cooled_validation(trainer: pl.Trainer, keep_callbacks: Sequence[Callback]) -> tuple[dict[str, float], set]:
    """Run ``validation_step`` over the validation data with a separate ``_EvaluationLoop``.

    ``trainer.validate()`` cannot be used inside ``fit``. The loop shares the main loop's validation
    loaders; while it runs the loggers and all callbacks but ``keep_callbacks`` are hidden (the
    progress bar too: it would show the cooled metrics under the main branch's names), and the logger
    connector's metric dicts are restored afterwards. Returns the callback metrics it produced and the
    names of those logged with ``prog_bar=True``.
    """
    loop = trainer.fit_loop.epoch_loop
    main_val = loop.val_loop
    ev = _EvaluationLoop(trainer, TrainerFn.FITTING, RunningStage.VALIDATING, verbose=False, inference_mode=False)
    ev._data_source = main_val._data_source
    if main_val._combined_loader is not None:
        ev._combined_loader = main_val._combined_loader
        ev._max_batches = list(main_val._max_batches)
        ev._last_val_dl_reload_epoch = main_val._last_val_dl_reload_epoch
    conn = trainer._logger_connector
    sig = trainer._signal_connector
    saved_metrics = (conn._logged_metrics, conn._callback_metrics, conn._progress_bar_metrics,
                     conn._first_loop_iter, conn._current_fx)
    saved = (trainer.loggers, trainer.callbacks, trainer.state.stage, getattr(trainer, "_last_val_time", None),
             sig.received_sigterm)
    conn._logged_metrics, conn._callback_metrics, conn._progress_bar_metrics = {}, {}, {}
    conn._first_loop_iter, conn._current_fx = None, None
    module = trainer.lightning_module
    modes = {n: m.training for n, m in module.named_modules()}  # a failing validation_step leaves eval mode
    fx_name = module._current_fx_name
    try:
        trainer.loggers = []
        trainer.callbacks = list(keep_callbacks)
        sig.received_sigterm = False  # a SIGTERM during the fork is handled after it, by the main loop
        loop.val_loop = ev
        trainer.state.stage = RunningStage.VALIDATING
        ev.run()
        metrics = {k: float(v) for k, v in conn._callback_metrics.items()
                   if (torch.is_tensor(v) and v.numel() == 1) or isinstance(v, (int, float))}
        return metrics, set(conn._progress_bar_metrics) & set(metrics)
    finally:
        for n, m in module.named_modules():
            if n in modes:
                m.training = modes[n]
        module._current_fx_name = fx_name
        loop.val_loop = main_val
        trainer.loggers, trainer.callbacks, trainer.state.stage = saved[0], saved[1], saved[2]
        if saved[3] is not None:
            trainer._last_val_time = saved[3]
        sig.received_sigterm = saved[4] or sig.received_sigterm
        (conn._logged_metrics, conn._callback_metrics, conn._progress_bar_metrics,
         conn._first_loop_iter, conn._current_fx) = saved_metrics
        ev._data_fetcher = None  # not teardown(): that would reset the shared loaders' workers


def _publish_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int, prog_bar: Sequence[str] = ()) -> None:
    """Log ``metrics`` to every logger at logger step ``step``, expose them in ``trainer.callback_metrics``
    and show those named in ``prog_bar`` in the progress bar."""
    conn = trainer._logger_connector
    conn._callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
    conn._progress_bar_metrics.update({k: float(metrics[k]) for k in prog_bar if k in metrics})
    conn.log_metrics(dict(metrics), step=step)


def _logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers use for the metrics of the current training batch and of the validation
    that follows it (``log_metrics`` without a step): ``_batches_that_stepped`` before its increment."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def _val_batches(trainer: pl.Trainer) -> int | None:
    """Number of batches one validation runs, when Lightning knows it."""
    sizes = trainer.fit_loop.epoch_loop.val_loop._max_batches
    total = sum(int(n) for n in sizes if isinstance(n, (int, float)) and math.isfinite(n)) if sizes else 0
    return total or None


def _eval_every_steps(trainer: pl.Trainer) -> int | None:
    """Validation interval in optimizer steps when validation is evenly spaced, else None."""
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return None
    vcb, ga = trainer.val_check_batch, trainer.accumulate_grad_batches
    if not isinstance(vcb, int) or vcb <= 0:
        return None
    if trainer.check_val_every_n_epoch is None:
        return vcb // ga if vcb % ga == 0 else None
    n = trainer.num_training_batches
    if not isinstance(n, int) or n <= 0:
        return None
    if vcb >= n:  # once per validation epoch
        return math.ceil(n / ga) * trainer.check_val_every_n_epoch
    if trainer.check_val_every_n_epoch == 1 and n % vcb == 0 and vcb % ga == 0:
        return vcb // ga
    return None

@contextlib.contextmanager
def _checkpoint_layout(strategy: Any, distributed: bool) -> Iterator[None]:
    """ModelParallelStrategy: write the next checkpoint as one full file (``distributed=False``) or as a
    DCP folder, whatever the strategy was created with. Other strategies: unchanged."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        yield
        return
    saved = strategy._save_distributed_checkpoint
    strategy._save_distributed_checkpoint = distributed
    try:
        yield
    finally:
        strategy._save_distributed_checkpoint = saved


def _metric_extras(module: torch.nn.Module) -> list:
    """(get, set) pairs for torchmetrics states, which are not in ``state_dict()`` (torchmetrics-internal names)."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics ships with lightning
        return []
    names = ("_update_count", "_forward_cache", "_computed", "_is_synced", "_cache", "_to_sync", "_should_unsync")
    out = []
    for m in module.modules():
        if isinstance(m, Metric):
            keys = [k for k in list(m._defaults) + list(names) if hasattr(m, k)]

            def get(m=m, keys=keys) -> dict:
                return {k: getattr(m, k) for k in keys}

            def set_(state: dict, m=m) -> None:
                for k, v in state.items():
                    setattr(m, k, v)
            out.append((get, set_))
    return out

# ============================== end of the private-internals section ==============================


if not pl.__version__.startswith(PINNED_LIGHTNING + "."):  # pragma: no cover
    warnings.warn(f"cooldown_callbacks.integrations.lightning was checked against lightning {PINNED_LIGHTNING}.x; "
                  f"found {pl.__version__}. Its use of Lightning internals is verified at fit start.", stacklevel=2)
