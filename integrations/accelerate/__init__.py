"""Accelerate and plain-PyTorch adapter: :class:`CooldownHook`.

Accelerate has no training-loop callbacks, so the hook is one explicit call after each real
optimizer step::

    hook = CooldownHook(model, optimizer, schedule=WSD(warmup_steps=100),
                        plan=ForkPlan(every=1000, cooldown=Cooldown(fraction=0.2)),
                        loss_fn=lambda model, batch: model(**batch).loss,
                        eval_fn=evaluate, train_loader=train_loader, accelerator=accelerator)
    train_loader = hook.wrap(train_loader)   # forks cool on the batches the main branch sees next
    accelerator.register_for_checkpointing(hook)
    for batch in train_loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            hook.step()          # drives the LR; forks when the plan says so
            # ... your own evaluation of this step goes here, after hook.step
    hook.finish()                # cools the final model if ForkPlan(at_end=True)

The hook sets each param group's LR to ``initial_lr * schedule(t)`` in an optimizer step pre-hook,
where ``t`` is the number of completed optimizer steps (the hook's own count of ``hook.step()``
calls, or your loop's: ``hook.step(step=iter_num)``), so no scheduler is needed (with
``schedule=None`` the user's scheduler keeps driving the main branch). The same pre-hook runs before
the first step, where the hook refuses what cannot work (another run's ``dirpath``, a stream it cannot
peek) before anything is trained.

A fork repeats the loop body ``c`` times on cooldown batches - through ``accelerator.accumulate``,
``accelerator.backward``, clipping and the prepared optimizer (or hand-written accumulation when the
Accelerator is left at 1 and ``gradient_accumulation_steps`` is given), or through the user's own
``step_fn(batch)`` - and checks that every optimizer stepped exactly ``c`` times (else the fork fails
with the reason). It then evaluates with ``eval_fn(model)`` from the fork point's random state,
saves, records, and restores the main branch in place (parameters, buffers, optimizer, schedulers,
grad scaler, RNGs, accelerator step and gradient state, the prepared loaders).

Cooldown data (``ForkPlan(data=...)``): with ``hook.wrap(train_loader)`` a fork takes the main
branch's upcoming batches from the loop's own iterator and hands them back (any loader, streams
included); a callable ``data(step) -> iterable`` serves loops without a DataLoader (nanoGPT's
``get_batch``, see ``examples/nanogpt_style.py``); each record's ``data`` field says what was used.

Without an ``accelerator`` the same hook drives a plain PyTorch loop (``loss.backward()``, an optional
``torch.amp.GradScaler`` in ``scalers``, ``torch.nn.utils.clip_grad_norm_``, ``optimizer.step()``);
under ``torchrun`` it uses ``torch.distributed`` directly for the few collectives it needs. Launch
several processes with ``torchrun --nproc_per_node N``: on a machine without GPUs, ``accelerate launch
--num_processes N --cpu`` starts a single process.
"""

from .hook import CooldownHook

__all__ = ["CooldownHook"]
