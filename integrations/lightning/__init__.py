"""PyTorch Lightning adapter: :class:`CooldownCallback`.

Add one callback and train indefinitely; at every validation point (or the plan's steps) the
callback forks a cooldown-to-zero run, validates and saves it, and the main branch goes on
untouched::

    from cooldown_callbacks import WSD, Cooldown, ForkPlan
    from cooldown_callbacks.integrations.lightning import CooldownCallback

    cb = CooldownCallback(schedule=WSD(warmup_steps=200),
                          plan=ForkPlan(on_eval=True, cooldown=Cooldown(fraction=0.2, shape="1-sqrt")),
                          dirpath="checkpoints/cooled")
    trainer = L.Trainer(max_epochs=-1, val_check_interval=500, check_val_every_n_epoch=None, callbacks=[cb])
    trainer.fit(model, datamodule=dm)

Main branch. With a ``schedule`` the callback drives the LR: every param group's LR is its base LR
(``initial_lr``, the LR from ``configure_optimizers``) times ``schedule(t)``, ``t`` the steps done
(``trainer.global_step``; under manual optimization, training batches that stepped an optimizer -
see :class:`CooldownCallback`), forced in ``on_before_optimizer_step`` (automatic and manual optimization
alike). A scheduler returned by ``configure_optimizers`` would fight it: that is an error at
``fit`` start. With ``schedule=None`` your own scheduler drives the main branch and forks decay from
the current LR of each param group.

Forks. At an optimizer-step boundary in ``on_train_batch_end`` (before ``ModelCheckpoint``, which
Lightning always runs last, and before that step's validation), a branch-mode fork snapshots the
main branch (parameters, buffers, gradients, optimizer and scheduler states, precision plugin,
torchmetrics states, Lightning's step counters, RNGs), then runs ``c`` optimizer steps through
Lightning's own machinery (the strategy's ``training_step`` - so DDP - the precision plugin,
gradient clipping, accumulation with no-sync micro-batches, ``optimizer_step``; manual optimization
runs your ``training_step`` unchanged), validates the cooled model with your ``validation_step``
over the validation data, saves it with ``trainer.save_checkpoint`` (a normal checkpoint, loadable
with ``MyModule.load_from_checkpoint``), records it in ``<dirpath>/forks.jsonl`` and restores the
main branch in place. ``ForkPlan(on_eval=True)`` forks exactly where Lightning validates.

Metrics of the cooled model are logged to every logger under ``prefix`` (``cooldown/val_loss``)
at the logger step of the main branch's validation at the fork step and put in
``trainer.callback_metrics``; the main branch's metrics, its
``ModelCheckpoint`` and ``EarlyStopping`` never see cooled values, and what the fork's
``training_step`` logs is discarded. ``mode="continue"`` (WSD-S) decays in-loop on main-branch steps
and evaluates/saves at the end of each window. The callback's state (completed forks, records, RNG)
is saved in Lightning checkpoints, so ``fit(ckpt_path=...)`` continues the plan without repeating a
fork. ``ForkPlan(at_end=True)`` also cools the final model when training stops (``max_steps``,
``max_time``, ``trainer.should_stop``, SIGTERM).

LightningCLI / YAML::

    trainer:
      callbacks:
        - class_path: cooldown_callbacks.integrations.lightning.CooldownCallback
          init_args:
            schedule: {class_path: cooldown_callbacks.WSD, init_args: {warmup_steps: 200}}
            plan:
              class_path: cooldown_callbacks.ForkPlan
              init_args: {on_eval: true, cooldown: {steps: 500, shape: 1-sqrt}}

(without ``dirpath`` the cooled checkpoints go to ``<log dir>/cooled``, next to the logger's
``checkpoints``.)
"""


from .callback import CooldownCallback, CooldownMisconfiguration

__all__ = ["CooldownCallback", "CooldownMisconfiguration"]
