"""Run under ``torchrun --nproc_per_node 2`` (CPU, gloo): the HF Trainer with ``deepspeed=`` (ZeRO-1 and ZeRO-2,
accumulation 2, dropout, clipping by DeepSpeed), a run without forks, then the same run with a
CooldownTrainerCallback forking at every evaluation; a fixed-budget run for the first fork (ZeRO-2); then
ZeRO-3 with the callback, which must be refused before the first step.

argv: OUT_DIR. Each rank writes ``rank-<r>.json``: per stage, whether its main branch (module
parameters, this rank's fp32 master partitions, optimizer state, the engine's counters, the Trainer's
logged losses, LRs and grad norms) matched the run without forks bit for bit, the fork records, the
parameters in which the cooled model differs from the fixed-budget run, and the ZeRO-3 error.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: no CUDA here

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_transformers import EVAL, TRAIN, load_params, make_args, make_model  # noqa: E402
from transformers import Trainer  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback  # noqa: E402


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9}


def run(out: Path, stage: int, callbacks=(), **kw) -> Trainer:
    args = make_args(out, **{**dict(max_steps=8, eval_steps=4, ddp_backend="gloo", logging_steps=2,
                                    gradient_accumulation_steps=2, deepspeed=ds_config(stage)), **kw})
    t = Trainer(model=make_model(), args=args, train_dataset=TRAIN, eval_dataset=EVAL, callbacks=list(callbacks))
    t.train()
    return t


def state(t: Trainer) -> dict:
    engine = t.model_wrapped
    inner = t.optimizer
    while hasattr(getattr(inner, "optimizer", None), "param_groups"):  # DeepSpeedOptimizerWrapper -> ZeRO -> AdamW
        inner = inner.optimizer
    out = {f"model.{k}": v.detach().clone() for k, v in t.model.state_dict().items()}
    assert [id(p) for g in inner.param_groups for p in g["params"]] == \
        [id(p) for p in engine.optimizer.single_partition_of_fp32_groups]
    for i, p in enumerate(engine.optimizer.single_partition_of_fp32_groups):
        out[f"master.{i}"] = p.detach().clone()
    for i, (p, st) in enumerate(inner.state.items()):
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = torch.as_tensor(v).clone()
    out["counters"] = torch.tensor([engine.global_steps, engine.global_samples, engine.micro_steps,
                                    engine.skipped_steps])
    return out


def main_log(t: Trainer) -> list:
    keys = ("step", "loss", "eval_loss", "learning_rate", "grad_norm")
    return [{k: h[k] for k in keys if k in h} for h in t.state.log_history if "loss" in h or "eval_loss" in h]


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    result = {}
    for stage in (1, 2):
        ref = run(out / f"ref{stage}", stage)
        cb = CooldownTrainerCallback(schedule=WSD(warmup_steps=2), verbose=False,
                                     plan=ForkPlan(on_eval=True, cooldown=Cooldown(steps=3)))
        forked = run(out / f"forks{stage}", stage, [cb])
        a, b = state(ref), state(forked)
        result[stage] = {"same_main": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
                         "differs": [k for k in a if not torch.equal(a[k], b.get(k, torch.empty(0)))],
                         "counters": b["counters"].tolist(), "same_log": main_log(ref) == main_log(forked),
                         "records": cb.records}
    # the fork at step 4 == a fixed-budget run of 4 + 3 steps with HF's own WSD schedule (the engine steps it);
    # no evaluation before step 4 in either run (evaluation draws from the RNG)
    fixed = run(out / "fixed", 2, max_steps=4 + 3, eval_steps=1000, lr_scheduler_type="warmup_stable_decay",
                lr_scheduler_kwargs={"num_decay_steps": 3, "decay_type": "1-sqrt"})
    cooled = load_params(result[2]["records"][0]["checkpoint"])  # written by the Trainer's save_model
    result["fixed"] = {"differs": [n for n, p in fixed.model.named_parameters() if not torch.equal(cooled[n], p)],
                       "names": len(cooled)}
    cb = CooldownTrainerCallback(schedule=WSD(warmup_steps=2), verbose=False, plan=ForkPlan(every=2))
    t = None
    try:
        t = Trainer(model=make_model(), args=make_args(out / "zero3", max_steps=4, ddp_backend="gloo",
                                                       deepspeed=ds_config(3)),
                    train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[cb])
        t.train()
        result["zero3"] = {"error": None}
    except ValueError as e:
        result["zero3"] = {"error": str(e), "steps": t.state.global_step, "engine_steps": t.model_wrapped.global_steps}
    (out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
