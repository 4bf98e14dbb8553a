"""A single LoRA adapter merged for inference (lora.merged_for_inference) against unmerged.

    python -m bench.lora_merged [--rounds 2] [--new-tokens 32] [--eval-rows 600]

SmolLM2-135M, one process, the two sides alternating (merged first) for --rounds rounds after
a warm-up: greedy decoding of one prompt with LoRA on every projection (B random, std 0.02),
and evaluation (`predict`, batch 64) of SST-2 test rows with LoRA on q,v (B random, std 0.05),
each in bf16 and fp32. "unmerged" replaces merged_for_inference with a no-op. Prints
tokens/s or seconds per side and how far the outputs differ.
"""

import argparse
import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch

import peftlab.decode
import peftlab.methods.lora
from peftlab.heads import LanguageModel
from peftlab.methods import MethodArgs, parse_method
from peftlab.methods.lora import lora_layers
from peftlab.models import load_backbone
from peftlab.run import prepare
from peftlab.runconfig import RunConfig
from peftlab.train import TrainArgs, logits_fn, predict

REAL = peftlab.methods.lora.merged_for_inference


def use(merged: bool) -> None:
    fn = REAL if merged else (lambda *a, **k: contextlib.nullcontext(False))
    peftlab.methods.lora.merged_for_inference = fn  # what inference_weights (evaluation, decoding) calls


def alternate(rounds: int, fn: Callable[[], object]) -> dict[bool, list[tuple[float, object]]]:
    """(seconds, output) of `fn` merged (True) and unmerged (False), alternating, merged first,
    for `rounds` rounds after a warm-up round."""
    runs: dict[bool, list] = {True: [], False: []}
    for r in range(rounds + 1):
        for merged in (True, False):
            use(merged)
            t0 = time.perf_counter()
            out = fn()
            if r:  # round 0 warms up
                runs[merged].append((time.perf_counter() - t0, out))
    return runs


def randomize(model: torch.nn.Module, std: float) -> None:
    torch.manual_seed(1)
    for layer in lora_layers(model):
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b.weight, std=std)


def decoding(args) -> None:
    b = load_backbone("smollm2-135m")
    m = LanguageModel(b.arch, b.tokenizer).eval()
    parse_method("lora", MethodArgs(lora_targets="all-linear")).apply(m)
    randomize(m, 0.02)
    batch = b.tokenizer(["Article: The quick brown fox jumps over the lazy dog. " * 8 + "\nSummary:"],
                        return_tensors="pt")
    for precision in ("bf16", "fp32"):
        runs = alternate(args.rounds, lambda: peftlab.decode.generate(
            m, batch["input_ids"], batch["attention_mask"], args.new_tokens, precision=precision))
        same = all(torch.equal(o, runs[True][0][1]) for side in runs.values() for _, o in side)
        rate = lambda side: [round(args.new_tokens / s, 1) for s, _ in runs[side]]
        print(f"decoding, batch 1, LoRA all-linear, {precision}: merged {rate(True)} tokens/s, unmerged "
              f"{rate(False)}; same tokens: {same}", flush=True)


def evaluation(args) -> None:
    cfg = RunConfig(model="smollm2-135m", task="sst2", method="lora", train_limit=16, eval_limit=args.eval_rows,
                    train=TrainArgs())
    p = prepare(cfg)
    randomize(p.model, 0.05)
    tok, enc = p.backbone.tokenizer, p.data["test"]
    fn = logits_fn(p.model, enc, tok.pad_token_id, tok.padding_side)
    for precision in ("bf16", "fp32"):
        runs = alternate(args.rounds, lambda: predict(p.model, enc, fn, 64, precision=precision)[0])
        a, b = runs[True][0][1], runs[False][0][1]
        print(f"evaluation, {len(enc)} SST-2 rows, LoRA q,v, {precision}: merged "
              f"{[round(t, 2) for t, _ in runs[True]]} s, unmerged {[round(t, 2) for t, _ in runs[False]]} s; "
              f"max |logit diff| {np.abs(a - b).max():.2g}, argmax differs on "
              f"{int((a.argmax(-1) != b.argmax(-1)).sum())} rows", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--eval-rows", type=int, default=600)
    args = ap.parse_args()
    decoding(args)
    evaluation(args)
    use(True)


if __name__ == "__main__":
    main()
