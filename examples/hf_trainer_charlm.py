"""Train a tiny GPT-2 on the Python standard library's sources with the Hugging Face Trainer and one
CooldownTrainerCallback, then print the budget table: for every evaluation step, the main branch's
eval loss next to the loss of a model cooled down from that point, and what the fork cost.

    python examples/hf_trainer_charlm.py                 # ~6 minutes on 2 CPU cores
    python examples/hf_trainer_charlm.py --quick         # ~15 seconds
    torchrun --nproc_per_node 2 examples/hf_trainer_charlm.py --quick   # two processes (CPU: gloo)

Everything is offline: the text is read from the local standard library, the byte-level tokenizer
is built here (ids are byte values), and the model is built from a ``GPT2Config``. Each cooled model
is saved in ``<output-dir>/cooldowns/cooled-step=<S>-cd=<c>`` with its tokenizer and loads with
``AutoModelForCausalLM.from_pretrained``; ``<output-dir>/cooldowns/forks.jsonl`` holds the records
(``cooldown-callbacks report <output-dir>/cooldowns`` plots them). Those records belong to one run: a
second run into the same ``--output-dir`` stops before its first step; give it a new one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from charlm import stdlib_text  # noqa: E402

from cooldown_callbacks import WSD, Cooldown, ForkPlan  # noqa: E402
from cooldown_callbacks.integrations.transformers import CooldownTrainerCallback  # noqa: E402


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose ids are the byte values 0..255 (GPT-2's byte alphabet, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's reversible byte -> printable character map
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chars[0], pad_token=chars[0])


class Blocks(torch.utils.data.Dataset):
    """Non-overlapping windows of token ids as ``{"input_ids", "labels"}`` (GPT-2 shifts the labels)."""

    def __init__(self, ids: torch.Tensor, block: int) -> None:
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return len(self.ids) // self.block

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        x = self.ids[i * self.block:(i + 1) * self.block]
        return {"input_ids": x, "labels": x}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=800, help="main-branch optimizer steps")
    ap.add_argument("--eval-steps", type=int, default=200, help="evaluate (and fork a cooldown) every N steps")
    ap.add_argument("--cooldown-fraction", type=float, default=0.2, help="cooldown length as a fraction of the cooled run")
    ap.add_argument("--shape", default="1-sqrt", help="cooldown shape")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--output-dir", default="runs/hf_trainer_charlm")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process (tiny models run fastest on one)")
    ap.add_argument("--quick", action="store_true", help="a tiny run for smoke tests (< 30 s)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    if args.quick:
        args.max_steps, args.eval_steps, args.batch_size = min(args.max_steps, 60), min(args.eval_steps, 20), 16
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    tokenizer = byte_tokenizer()
    text = stdlib_text(300_000 if args.quick else None).decode("utf-8", errors="replace")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    block = 64
    n_val = max(len(ids) // 20, 64 * block)
    train_ds, eval_ds = Blocks(ids[:-n_val], block), Blocks(ids[-n_val:][: (64 if args.quick else 256) * block], block)

    torch.manual_seed(0)
    d = 64 if args.quick else 96
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=block, n_embd=d, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    callback = CooldownTrainerCallback(
        schedule=WSD(warmup_steps=max(10, args.max_steps // 20)),
        plan=ForkPlan(on_eval=True, cooldown=Cooldown(fraction=args.cooldown_fraction, shape=args.shape)),
    )
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, eval_strategy="steps", eval_steps=args.eval_steps,
        logging_steps=args.eval_steps, save_strategy="no", per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="constant",  # the callback's WSD schedule drives the LR (it replaces this one)
        per_device_eval_batch_size=64, learning_rate=args.lr, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, data_collator=default_data_collator, callbacks=[callback])
    t0 = time.time()
    trainer.train()
    if trainer.is_world_process_zero():
        print_table(callback.records, time.time() - t0)
        best = min((r for r in callback.records if r["status"] == "ok"), key=lambda r: r["metrics"]["cooldown_loss"])
        cooled = AutoModelForCausalLM.from_pretrained(best["checkpoint"])
        tok = AutoTokenizer.from_pretrained(best["checkpoint"])
        prompt = tok("def ", return_tensors="pt")
        out = cooled.generate(**prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
        print(f"\nsample from the cooled model of step {best['step']}: {tok.decode(out[0])!r}")
    return callback.records


def print_table(records: list[dict], seconds: float) -> None:
    print()
    print(f"{'step':>6} {'cooldown':>8} {'total':>6} {'main eval loss':>15} {'cooled eval loss':>17} {'fork s':>7}")
    for r in records:
        cooled = r["metrics"].get("cooldown_loss", float("nan")) if r["status"] == "ok" else float("nan")
        main_l = r.get("main_metrics", {}).get("eval_loss", float("nan"))
        print(f"{r['step']:>6} {r['cooldown_steps']:>8} {r['step'] + r['cooldown_steps']:>6} {main_l:>15.4f} "
              f"{cooled:>17.4f} {r['seconds']:>7.2f}")
    print(f"total wall time {seconds:.0f}s (forks included)")


if __name__ == "__main__":
    main()
