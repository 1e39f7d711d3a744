"""Hugging Face ``Trainer`` adapter: :class:`CooldownTrainerCallback`.

One callback is all a user adds::

    args = TrainingArguments(output_dir="out", max_steps=10_000, eval_strategy="steps", eval_steps=500, ...)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[CooldownTrainerCallback(schedule=RSqrt(warmup_steps=200),
                                 plan=ForkPlan(on_eval=True, cooldown=Cooldown(fraction=0.2)))])
    trainer.train()

At every evaluation point (or ``every=``/``at=``/``geometric=`` step) the callback forks a cooldown:
it snapshots the main branch, runs ``c`` optimizer steps through the Trainer's own
``training_step`` (gradient accumulation, ``no_sync`` for non-final micro-batches, clipping, mixed
precision, the wrapped DDP model and the prepared optimizer), evaluates the cooled model with
``trainer.evaluate(metric_key_prefix="cooldown")`` (``compute_metrics`` applies; ``report_to``
integrations receive ``cooldown_*`` metrics), saves it with ``trainer.save_model`` into
``<dirpath>/cooled-step=<S>-cd=<c>`` (loadable with ``from_pretrained``), records the fork in
``log_history`` and ``<dirpath>/forks.jsonl``, and restores the main branch in place. The main
branch's own log/eval/save at that step then happen as if no fork had run. The cooled evaluation
draws its random numbers from the fork point's RNG state (restored after), so an evaluation that
samples at random sees the same draws as the main branch's evaluation at that step.

**Learning rate.** With a ``schedule`` the callback replaces the Trainer's LR scheduler (at
``on_train_begin``) by a ``LambdaLR`` whose multiplier is ``schedule(t)``: the main branch never
decays at ``max_steps`` unless the plan says so (``mode="continue"``), and the LR the Trainer logs
is the LR used. With ``schedule=None`` the Trainer's own scheduler (``lr_scheduler_type``, e.g.
``"inverse_sqrt"`` or ``"warmup_stable_decay"`` without decay) drives the main branch and each fork
decays from the current LR. Replacing a decaying ``lr_scheduler_type`` (the default ``"linear"``,
``"cosine"``, ...) is warned about once; the schedule is recorded in ``trainer_state.json`` and named in
the model card (``trainer.create_model_card()``). ``WSD(warmup_steps=args.warmup_steps)`` uses the
Trainer's warmup (a float in transformers 5); a Trainer warmup the schedule does not use is warned about.

**Cooldown data** (``ForkPlan(data=...)``): ``"peek"`` is the very batches the main branch will see next.
For a map-style ``train_dataset`` the fork replays the main branch's own sampler (a copy of the prepared
loader's batch sampler, positioned at the fork step exactly as the Trainer's resume logic positions it),
grouped the way the Trainer groups them for gradient accumulation; this needs an order that is a function
of the seed and epoch: the Trainer's default sampler (``accelerator_config.use_seedable_sampler=True``),
``train_sampling_strategy="sequential"`` or a ``DistributedSampler``. For a streaming ``train_dataset`` (an
``IterableDataset``) the fork draws the batches from the Trainer's epoch iterator and hands them back, so
the main branch gets them next (see ``_stream.py``: refused when producing a batch draws from the global
RNG; a fork that would run past the end of the stream's pass fails with the reason). ``"auto"`` (default)
is peek, except for a map-style dataset whose order cannot be replayed: then ``"fresh"`` (a separate loader
over ``train_dataset`` with its own seeded sampler, sharded per rank), with a warning. ``"fresh"`` on a
stream restarts it from its beginning (with a warning). An iterable gives collated batches of your own
(e.g. an anneal mix). Each record's ``data`` says which source the fork used.

**When a fork equals a fixed-budget run bit for bit.** A fork after ``S`` steps with ``c`` cooldown
steps gives the same weights and cooled metrics as a separate Trainer run of ``S + c`` steps whose
scheduler is the cooled schedule (for ``WSD(W)``: ``lr_scheduler_type="warmup_stable_decay"``,
``warmup_steps=W``, ``num_decay_steps=c``, same ``decay_type``), given: (1) ``data="peek"`` (the
default when the order can be replayed; epoch ends and the gradient-accumulation remainder of an
epoch are replayed too, including the seed a new epoch's DataLoader iterator draws from the RNG);
(2) the same random numbers before step ``S``: evaluation draws from the global RNG (it creates
DataLoader iterators), so the fixed run must evaluate at the same steps before ``S`` as the main
branch and not at ``S`` itself (a fork runs *before* the main branch's evaluation at ``S``), unless
training draws no random numbers (no dropout); (3) the same seed, arguments and data otherwise.

**How the callback reaches its Trainer.** Callbacks never receive the Trainer. When the Trainer
calls ``on_init_end`` (in ``Trainer.__init__``) and ``on_train_begin`` (in ``train()``), the
callback looks up the call stack for the ``Trainer`` whose ``callback_handler`` holds *this very
instance* (an identity check, so several Trainers in one process never mix). ``on_train_begin`` runs
after ``restore_callback_states_from_checkpoint=True`` has re-created the callback, so the
re-created instance finds its Trainer the same way. If you drive the callback handler from code of
your own, call :meth:`CooldownTrainerCallback.attach` before ``train()``.

**One run per folder.** ``dirpath`` (default ``<output_dir>/cooldowns``) belongs to one training run: a
fresh ``train()`` into a folder holding another run's records is refused before its first step (on every
rank). ``train(resume_from_checkpoint=...)`` continues in place; a fork that finished after that checkpoint
(its record and folder are there) is taken back from the records, printed as restored and logged once.

**Trainer subclasses.** What a subclass accumulates in ``compute_loss`` for its logs (TRL's ``_metrics``
and ``_total_train_tokens``, or ``trainer_attributes=[...]``) is put back after each fork; the callback's
own log rows go through the base ``Trainer.log``; and what a subclass adds under ``eval_`` to the cooled
evaluation's metrics is renamed to the cooled prefix (``cooldown_entropy``).

**The end of training.** ``final_model="cooled"`` with ``ForkPlan(at_end=True)`` makes ``trainer.model`` the
cooled final model when ``train()`` returns (the main branch stays in the last checkpoint).

**State.** The callback is an ``ExportableState``: its config (``args``) and fork history
(``attributes``) are saved in every checkpoint's ``trainer_state.json``. On resume the history is
taken back whether or not ``restore_callback_states_from_checkpoint`` is set (without it, from
``TrainerState.stateful_callbacks``), so forks made before the checkpoint are not repeated. With
``restore_callback_states_from_checkpoint=True`` the checkpoint's config wins (HF's rule); a
``ForkPlan(data=<iterable>)``, which cannot be stored in JSON, is taken from the callback you passed
to ``Trainer(callbacks=[...])``.

Distributed: every rank forks at the same step (triggers depend only on the step and the Trainer's
control flags) and runs the same collectives; rank zero writes files. A ``torchrun`` launch that the
Trainer runs as independent processes (on CPU without ``--use_cpu --ddp_backend gloo``) is refused at
train start. DeepSpeed (``deepspeed=`` config): ZeRO stage 0, 1 and 2 are exact (the snapshot keeps each
rank's fp32 master partitions, the engine's counters, loss scaler and LR scheduler); ZeRO-3 and offload
are refused before the first step.
"""

from .callback import CooldownTrainerCallback

__all__ = ["CooldownTrainerCallback"]
