"""An epoch of real, variable-length SST-2 (or `--task`, e.g. sms_spam): `peftlab train` against
HF Trainer + PEFT.

    python -m bench.sst2_epoch [--task sst2] [--train-limit 2000] [--eval-limit 400] [--rounds 1] [--seeds 0]
                               [--precision bf16]

Both sides: SmolLM2-135M, LoRA r=8 alpha=16 on q_proj,v_proj plus a fresh 2-way head, the same
seeded rows of SST-2 as users have them (sentences of 2 to 60 tokens), batch 16, one epoch,
fused AdamW with LoRA at 1e-3 and the head at 1e-2 (peftlab's defaults, given to the Trainer as its
optimizer), linear decay after 10% warmup, clipping at 1.0, the same precision. Each side runs
with its best documented settings: HF Trainer with dynamic padding (DataCollatorWithPadding) and
length grouping (`train_sampling_strategy="group_by_length"`, transformers 5's group_by_length);
peftlab with its defaults (length bucketing). Times are the training epoch alone (HF:
`train_runtime`; peftlab: the epoch's seconds), validation accuracy on the same rows. Sides
alternate for --rounds rounds, round r with seed seeds[r % len(seeds)] (the seed picks the
training and validation rows, the order and the inits, on both sides); prints medians, the ratio
HF/peftlab and the mean accuracy of each side.
"""

import argparse
import datetime
import json
import statistics
import tempfile
import time

import numpy as np
import torch

from peftlab.data import load_task, subset
from peftlab.measure import machine, versions
from peftlab.methods import MethodArgs
from peftlab.models import load_backbone, peftlab_home
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.speed import tune_allocator
from peftlab.train import TrainArgs


def peftlab_epoch(args, out: str, seed: int) -> tuple[float, float]:
    cfg = RunConfig(model="smollm2-135m", task=args.task, method="lora", train_limit=args.train_limit, seed=seed,
                    eval_limit=args.eval_limit, out=out, method_args=MethodArgs(lora_targets="q_proj,v_proj"),
                    train=TrainArgs(epochs=1, batch_size=16, lr=1e-3, head_lr=1e-2, save_every=0,
                                    precision=args.precision))
    r = train_run(cfg, progress=False)
    return r["time_per_epoch_s"][0], r["validation"]["accuracy"]


def hf_epoch(args, out: str, seed: int) -> tuple[float, float]:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, \
        TrainingArguments

    path = peftlab_home() / "models" / "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                             target_modules=["q_proj", "v_proj"]))
    task = load_task(args.task, seed=seed)

    def rows(split: str, limit: int) -> Dataset:
        ds = subset(task.splits[split], limit, seed)
        enc = tok(list(ds["text"]), truncation=True, max_length=256)
        return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                  "labels": list(ds["label"])})
    train, val = rows("train", args.train_limit), rows("validation", args.eval_limit)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "score" not in n]
    # fused: what the Trainer builds by default (optim="adamw_torch_fused"), here with two groups
    opt = torch.optim.AdamW([{"params": lora, "lr": 1e-3}, {"params": head, "lr": 1e-2}], weight_decay=0.01,
                            fused=True)
    steps = -(-len(train) // 16)
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                              num_train_epochs=1, learning_rate=1e-3, warmup_steps=int(0.1 * steps),
                              lr_scheduler_type="linear", max_grad_norm=1.0, train_sampling_strategy="group_by_length",
                              bf16=args.precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
                              eval_strategy="no", logging_strategy="no", disable_tqdm=True, seed=seed,
                              dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                      data_collator=DataCollatorWithPadding(tok), optimizers=(opt, None),
                      compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
    seconds = trainer.train().metrics["train_runtime"]
    return seconds, trainer.evaluate()["eval_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sst2", help="any 2-way classification task, e.g. sms_spam")
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--eval-limit", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seeds", default="0", help="comma-separated; round r uses seeds[r %% len(seeds)]")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tune_allocator()  # both sides in this process: the same allocator
    load_backbone("smollm2-135m")  # the safetensors copy HF loads
    ours, ref = [], []
    with tempfile.TemporaryDirectory() as tmp:
        seeds = [int(x) for x in args.seeds.split(",")]
        for r in range(args.rounds):
            t0, seed = time.perf_counter(), seeds[r % len(seeds)]
            ours.append(peftlab_epoch(args, f"{tmp}/peftlab-{r}", seed))
            ref.append(hf_epoch(args, f"{tmp}/hf-{r}", seed))
            print(f"round {r + 1} (seed {seed}): peftlab {ours[-1][0]:.1f} s, acc {ours[-1][1]:.3f}; HF Trainer {ref[-1][0]:.1f} s, "
                  f"acc {ref[-1][1]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    a, b = statistics.median(s for s, _ in ours), statistics.median(s for s, _ in ref)
    print(f"| {args.task}, {args.train_limit} rows, {args.precision} | {a:.1f} | {b:.1f} | {b / a:.2f}x | "
          f"{100 * statistics.mean(x for _, x in ours):.1f} / {100 * statistics.mean(x for _, x in ref):.1f} |")
    print(f"\n{datetime.date.today()}  {json.dumps(versions())}  {json.dumps(machine())}")


if __name__ == "__main__":
    main()
