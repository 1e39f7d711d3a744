"""Run under ``torchrun --nproc_per_node 2`` on CPU *without* the flags the Trainer needs there
(``--use_cpu --ddp_backend gloo``), as a user of run_clm.py would: the callback must stop both processes
before the first step, naming the flags.

argv: OUT_DIR [TrainingArguments key=value ...]
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_transformers import EVAL, TRAIN, make_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    extra = dict(kv.split("=", 1) for kv in sys.argv[2:])
    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, eval_strategy="steps",
                             eval_steps=2, save_strategy="no", report_to="none", disable_tqdm=True, **extra)
    cb = CooldownTrainerCallback(schedule=WSD(warmup_steps=1), plan=ForkPlan(on_eval=True, cooldown=Cooldown(steps=1)))
    t = Trainer(model=make_model(), args=args, train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[cb])
    try:
        t.train()
    finally:
        (out / f"steps-{os.environ['RANK']}.txt").write_text(str(t.state.global_step))


if __name__ == "__main__":
    main()
