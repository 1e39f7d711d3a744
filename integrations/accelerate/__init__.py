"""Accelerate and plain-PyTorch adapter: :class:`CooldownHook`.

Accelerate has no training-loop callbacks, so the hook is one explicit call after each real
optimizer step::

    hook = CooldownHook(model, optimizer, schedule=WSD(warmup_steps=100),
                        plan=ForkPlan(every=1000, cooldown=Cooldown(fraction=0.2)),
                        loss_fn=lambda model, batch: model(**batch).loss,
                        eval_fn=evaluate, train_loader=train_loader, accelerator=accelerator)
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
    hook.finish()                # cools the final model if ForkPlan(at_end=True)

The hook sets each param group's LR to ``initial_lr * schedule(t)`` in an optimizer step pre-hook,
where ``t`` is the number of ``hook.step()`` calls so far (completed optimizer steps), so no
scheduler is needed (with ``schedule=None`` the user's scheduler keeps driving the main branch).
A fork repeats the loop body ``c`` times on cooldown batches - through ``accelerator.accumulate``,
``accelerator.backward``, clipping and the prepared optimizer, or through the user's own
``step_fn(batch)`` - then evaluates with ``eval_fn(model)``, saves, records, and restores the main
branch in place (parameters, buffers, optimizer, schedulers, grad scaler, RNGs, accelerator step
and gradient state).

Without an ``accelerator`` the same hook drives a plain PyTorch loop (``loss.backward()``,
``torch.nn.utils.clip_grad_norm_``, ``optimizer.step()``); under ``torchrun`` it uses
``torch.distributed`` directly for the few collectives it needs.
"""

from .hook import CooldownHook

__all__ = ["CooldownHook"]
