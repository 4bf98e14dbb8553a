"""peftlab LoRA against HF PEFT LoRA on the same model, data, batches and hyperparameters.

    python -m bench.lora_vs_peft [--model smollm2-135m] [--task sst2] [--train-limit 1000] [--epochs 2] [--seeds 0,1,2]

Both sides: LoRA r=8, alpha=16 on q_proj and v_proj, a fresh 2-way head, fused AdamW (LoRA at --lr,
head at --head-lr, as peftlab's default groups), linear decay with 10% warmup, the same seeded
subset, the same length-bucketed batches in the same order. HF side: AutoModelForSequenceClassification
+ peft.get_peft_model, a plain loop (no Trainer), HF's own pooling and positions. Prints test
accuracy of each and the time ratio (peftlab / reference) measured in this run.
"""

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from peftlab.batching import batch_indices, collate
from peftlab.measure import PeakMemory, machine, versions
from peftlab.metrics import classification_metrics
from peftlab.models import peftlab_home
from peftlab.run import prepare
from peftlab.runconfig import RunConfig
from peftlab.train import TrainArgs, lr_lambda


def run_loop(model, forward, train, test, args, pad, groups, seed) -> dict:
    opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=True)  # as HF Trainer's default and peftlab's
    steps = math.ceil(len(train) / args.batch_size) * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", int(0.1 * steps), steps))
    epoch_s = []
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        for idx in batch_indices(train.lengths, args.batch_size, shuffle=True, seed=seed + epoch):
            b = collate(train, idx, pad, "left")
            loss = F.cross_entropy(forward(b), b["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        epoch_s.append(time.perf_counter() - t0)
    model.eval()
    preds = np.zeros(len(test), dtype=np.int64)
    with torch.inference_mode():
        for idx in batch_indices(test.lengths, 64, shuffle=False):
            preds[idx] = forward(collate(test, idx, pad, "left")).argmax(-1).numpy()
    return {"test": classification_metrics(preds, test.labels), "epoch_s": epoch_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--head-lr", type=float, default=1e-2)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (data subset, order, inits)")
    args = ap.parse_args()
    results = {"peftlab": [], "HF PEFT": []}
    for seed in [int(x) for x in args.seeds.split(",")]:
        ours, theirs = one_seed(args, seed)
        results["peftlab"].append(ours)
        results["HF PEFT"].append(theirs)
        print(f"seed {seed}: peftlab {100 * ours['test']['accuracy']:.2f}  HF PEFT {100 * theirs['test']['accuracy']:.2f}",
              flush=True)
    print(f"{args.model} {args.task}: {args.train_limit} train rows, {args.epochs} epochs, seeds {args.seeds}")
    for name, rs in results.items():
        acc = np.array([100 * r["test"]["accuracy"] for r in rs])
        print(f"  {name:8s} test acc {acc.mean():.2f} +/- {acc.std(ddof=1) if len(acc) > 1 else 0:.2f}  "
              f"s/epoch {np.mean([np.mean(r['epoch_s']) for r in rs]):.1f}  "
              f"memory rise {np.mean([r['peak_mb'] for r in rs]):.0f} MiB")
    gap = np.mean([r["test"]["accuracy"] for r in results["peftlab"]]) - np.mean(
        [r["test"]["accuracy"] for r in results["HF PEFT"]])
    ratio = np.mean([np.mean(r["epoch_s"]) for r in results["peftlab"]]) / np.mean(
        [np.mean(r["epoch_s"]) for r in results["HF PEFT"]])
    print(f"  accuracy gap {100 * gap:+.2f} points; time ratio peftlab/reference {ratio:.2f}")
    print(f"  {versions()} {machine()}")


def one_seed(args, seed: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    # --- peftlab
    cfg = RunConfig(model=args.model, task=args.task, method="lora", train_limit=args.train_limit, seed=seed,
                    train=TrainArgs(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr))
    cfg.method_args.lora_targets = "q_proj,v_proj"
    p = prepare(cfg)
    pad = p.backbone.tokenizer.pad_token_id
    train, test = p.data["train"], p.data["test"]
    head = list(p.model.head.parameters())
    body = [t for n, t in p.model.named_parameters() if t.requires_grad and not n.startswith("head.")]
    with PeakMemory() as mem_ours:
        ours = run_loop(p.model, lambda b: p.model(b["input_ids"], b["attention_mask"]), train, test, args, pad,
                        [{"params": body, "lr": args.lr}, {"params": head, "lr": args.head_lr}], seed)
    ours["peak_mb"] = mem_ours.rise_mb

    # --- HF PEFT
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    hf = AutoModelForSequenceClassification.from_pretrained(peftlab_home() / "models" / args.model, num_labels=2,
                                                            dtype=torch.float32)
    hf.config.pad_token_id = pad
    ref = get_peft_model(hf, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    named = dict(ref.named_parameters())
    ref_head = [t for n, t in named.items() if t.requires_grad and "score" in n]
    ref_body = [t for n, t in named.items() if t.requires_grad and "score" not in n]
    with PeakMemory() as mem_ref:
        theirs = run_loop(ref, lambda b: ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                          train, test, args, pad,
                          [{"params": ref_body, "lr": args.lr}, {"params": ref_head, "lr": args.head_lr}], seed)
    theirs["peak_mb"] = mem_ref.rise_mb
    return ours, theirs


if __name__ == "__main__":
    main()
