"""Run under ``torchrun --nproc_per_node 2`` (CPU, gloo): a Trainer without forks, then the same run
with a CooldownTrainerCallback, then (map-style data) that run resumed in place from its checkpoint at
step 4. Each rank writes ``rank-<r>.json``: whether its main branch matched the run without forks bit
for bit (parameters and optimizer state), the fork records it holds, and what the resumed run took back.

argv: OUT_DIR [map|stream]   (stream: the training data is an IterableDataset)
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _hf_data import ByteStream  # noqa: E402
from test_transformers import EVAL, TRAIN, make_args, make_model  # noqa: E402
from transformers import Trainer  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback  # noqa: E402


def run(out: Path, callbacks=(), stream=False, resume=None) -> Trainer:
    args = make_args(out, max_steps=8, eval_steps=4, ddp_backend="gloo", logging_steps=4, save_strategy="steps",
                     save_steps=4)
    t = Trainer(model=make_model(), args=args, train_dataset=ByteStream(TRAIN) if stream else TRAIN,
                eval_dataset=EVAL, callbacks=list(callbacks))
    t.train(resume_from_checkpoint=resume)
    return t


def same(a: Trainer, b: Trainer) -> bool:
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        if not torch.equal(p, q):
            return False
    sa, sb = a.optimizer.optimizer.state_dict()["state"], b.optimizer.optimizer.state_dict()["state"]
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[i][k]) for i in sa for k, v in sa[i].items())


def callback() -> CooldownTrainerCallback:
    return CooldownTrainerCallback(schedule=WSD(warmup_steps=2), verbose=True,
                                   plan=ForkPlan(on_eval=True, cooldown=Cooldown(steps=3)))


def main() -> None:
    out, stream = Path(sys.argv[1]), sys.argv[2:] == ["stream"]
    torch.set_num_threads(1)
    ref = run(out / "ref", stream=stream)
    cb = callback()
    forked = run(out / "forks", [cb], stream=stream)
    rank = dist.get_rank()
    main_log = [h for h in forked.state.log_history if "loss" in h or "eval_loss" in h]
    ref_log = [h for h in ref.state.log_history if "loss" in h or "eval_loss" in h]
    strip = lambda log: [{k: v for k, v in h.items() if k in ("step", "loss", "eval_loss", "learning_rate")} for h in log]  # noqa: E731
    result = {"rank": rank, "world_size": dist.get_world_size(), "same_main": same(ref, forked),
              "same_log": strip(main_log) == strip(ref_log), "records": cb.records,
              "cooldown_losses": [h["cooldown_loss"] for h in forked.state.log_history if "cooldown_loss" in h]}
    if not stream:  # resume in place from step 4: the fork at 8 finished "before the crash" and is taken back
        again = callback()
        resumed = run(out / "forks", [again], resume=str(out / "forks" / "checkpoint-4"))
        result["resumed"] = {"same_main": same(forked, resumed), "records": again.records,
                             "logged": [h["cooldown_loss"] for h in resumed.state.log_history
                                        if "cooldown_restored" in h]}
    (out / f"rank-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
