"""peftlab's decoding loop against transformers' generate(do_sample=False) on SmolLM2-135M.

    python -m bench.decode_vs_generate [--batch-sizes 1,8] [--new-tokens 64] [--repeats 3]
                                       [--threads N] [--bf16] [--doc-tokens 256] [--data PATH]

Both sides: the same model weights, the same left-padded token ids and attention mask (the
first documents of the XSum test split, cut to --doc-tokens tokens, framed as
"Article: ...\\nSummary:"), greedy, KV cache, exactly --new-tokens new tokens per row (no stop
ids on peftlab's side, eos_token_id=None on HF's). Each side is warmed up once, then timed
alternately (peftlab, HF, peftlab, HF, ...) for --repeats rounds. Prints the median new
tokens/s of each side (prefill included), the ratio peftlab/HF (above 1: peftlab is faster),
whether the tokens are identical, and a Markdown block for docs/benchmarks.md.

--bf16: bf16 autocast on both sides; peftlab decodes with precision="bf16" (its default where
the CPU has bf16 instructions: frozen weights cast to bf16 once per call, not once per token).
A third side, "HF bf16 model" (the model's weights converted with .to(torch.bfloat16), HF's
usual fast path, no autocast), is timed too; its numerics differ (the residual stream is bf16),
so its tokens are compared but not required to match.
"""

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from peftlab.data import data_roots
from peftlab.decode import generate
from peftlab.heads import Classifier
from peftlab.measure import machine, versions
from peftlab.models import load_backbone


def find_xsum(given: str | None) -> Path:
    if given:
        return Path(given)
    for root in data_roots():
        if (root / "xsum" / "test.jsonl").is_file():
            return root / "xsum" / "test.jsonl"
    sys.exit("decode_vs_generate: no xsum/test.jsonl under PEFTLAB_DATA or ../shared/data; give --data PATH")


def load_prompts(path: Path, n: int, doc_tokens: int, tok) -> list[str]:
    """The first n documents, each cut to its first doc_tokens tokens, framed for summarizing."""
    prompts = []
    with open(path) as f:
        for line in f:
            if len(prompts) == n:
                break
            # cut by hand: the tokenizer truncates on the left (causal LM setup), we want the article's start
            ids = tok(json.loads(line)["document"], add_special_tokens=False)["input_ids"][:doc_tokens]
            prompts.append(f"Article: {tok.decode(ids)}\nSummary:")
    if len(prompts) < n:
        sys.exit(f"decode_vs_generate: {path} has {len(prompts)} documents, {n} needed")
    return prompts


def timed(fn: Callable[[], torch.Tensor], bf16: bool) -> tuple[float, torch.Tensor]:
    # autocast wraps each side the same way; disabled it is a no-op
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    row, col = (a != b).nonzero()[0].tolist()
    return f"row {row}, new token {col}: peftlab {int(a[row, col])} vs HF {int(b[row, col])}"


def bench_batch(model: Classifier, hf, batch: dict, args, pad: int, hf16=None) -> dict:
    ids, mask, n = batch["input_ids"], batch["attention_mask"], args.new_tokens
    precision = "bf16" if args.bf16 else "fp32"
    # eos_token_id=None overrides the model's generation config, so HF never stops early either
    hf_call = lambda m: m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                   use_cache=True, pad_token_id=pad, eos_token_id=None)[:, ids.shape[1]:]
    sides = {"peftlab": lambda: generate(model, ids, mask, n, stop_ids=(), pad_id=pad, precision=precision),
             "HF": lambda: hf_call(hf)}
    if hf16 is not None:
        sides["HF bf16 model"] = lambda: hf_call(hf16)
    secs: dict[str, list[float]] = {k: [] for k in sides}
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in sides}
    for name, fn in sides.items():  # warm-up: first-call allocations, lazy inits
        outs[name].append(timed(fn, args.bf16 and name != "HF bf16 model")[1])
    for _ in range(args.repeats):  # alternate so drifting load hits both sides alike
        for name, fn in sides.items():
            s, out = timed(fn, args.bf16 and name != "HF bf16 model")
            secs[name].append(s)
            outs[name].append(out)
    ref = outs["peftlab"][0]
    bad = [(name, o) for name, runs in outs.items() for o in runs if not torch.equal(o, ref) and name != "HF bf16 model"]
    tps = {k: ids.shape[0] * n / statistics.median(v) for k, v in secs.items()}
    same16 = float((outs["HF bf16 model"][0] == ref).float().mean()) if hf16 is not None else None
    return {"batch": ids.shape[0], "prompt_len": ids.shape[1], "real_tokens": int(mask.sum()),
            "secs": secs, "tps": tps, "ratio": tps["peftlab"] / tps["HF"], "identical": not bad, "same16": same16,
            "diff": first_difference(ref, bad[0][1]) + f" ({bad[0][0]} run)" if bad else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per row, both sides (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed alternated rounds after a warm-up (3)")
    ap.add_argument("--doc-tokens", type=int, default=256, help="cut each document to this many tokens (256)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default fp32)")
    ap.add_argument("--data", default=None, help="an XSum-style .jsonl with a 'document' field (default: "
                                                 "xsum/test.jsonl under PEFTLAB_DATA or ../shared/data)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)

    b = load_backbone("smollm2-135m")
    torch.manual_seed(0)
    model = Classifier(b.arch, 2, tokenizer=b.tokenizer).eval()  # the head is unused when generating
    tok, pad = b.tokenizer, b.tokenizer.pad_token_id
    prompts = load_prompts(find_xsum(args.data), max(sizes), args.doc_tokens, tok)
    dtype = "bf16 autocast" if args.bf16 else "fp32"

    hf16 = copy.deepcopy(b.model).to(torch.bfloat16) if args.bf16 else None
    rows = []
    for size in sizes:
        r = bench_batch(model, b.model, tok(prompts[:size], padding=True, return_tensors="pt"), args, pad, hf16)
        rows.append(r)
        if hf16 is not None:
            print(f"batch {size}: HF bf16 model {r['tps']['HF bf16 model']:.1f} tok/s (peftlab/it "
                  f"{r['tps']['peftlab'] / r['tps']['HF bf16 model']:.2f}), its tokens equal peftlab's at "
                  f"{100 * r['same16']:.0f}% of positions", flush=True)
        print(f"batch {size}: peftlab {r['tps']['peftlab']:.1f} tok/s  HF {r['tps']['HF']:.1f} tok/s  "
              f"ratio {r['ratio']:.2f}  tokens identical: {'yes' if r['identical'] else 'no'}  "
              f"s/call peftlab {[round(x, 2) for x in r['secs']['peftlab']]} "
              f"HF {[round(x, 2) for x in r['secs']['HF']]}"
              + (f"  first difference: {r['diff']}" if r["diff"] else ""), flush=True)

    today = datetime.date.today().isoformat()
    print(f"\nsmollm2-135m, greedy, KV cache, {args.new_tokens} new tokens, {dtype}, "
          f"torch threads {args.threads}, median of {args.repeats} alternated rounds after one warm-up")
    print(f"{'batch':>5} {'prompt':>6} {'peftlab tok/s':>14} {'HF tok/s':>9} {'ratio':>6} {'identical':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['prompt_len']:>6} {r['tps']['peftlab']:>14.1f} {r['tps']['HF']:>9.1f} "
              f"{r['ratio']:>6.2f} {'yes' if r['identical'] else 'no':>9}")
    print(f"{today} {machine()} {versions()}")

    cmd = (f"python -m bench.decode_vs_generate --batch-sizes {args.batch_sizes} "
           f"--new-tokens {args.new_tokens} --repeats {args.repeats} --threads {args.threads}"
           + (" --bf16" if args.bf16 else ""))
    print("\n--- Markdown for docs/benchmarks.md ---")
    print(f"## Decoding: peftlab against transformers generate on SmolLM2-135M (performance issue)\n\n"
          f"{today}. The first {max(sizes)} XSum test documents, each cut to {args.doc_tokens} tokens "
          f"and framed as `Article: ...\\nSummary:`, left-padded; the same ids and mask to both sides. "
          f"Greedy, KV cache, {args.new_tokens} new tokens per row (no early stop), {dtype}, "
          f"torch threads {args.threads}, "
          f"inference mode; one warm-up each, then the median of {args.repeats} alternated rounds. "
          f"Tokens/s counts new tokens of all rows over the whole call, prefill included; "
          f"ratio above 1: peftlab is faster.\n\n```bash\n{cmd}\n```\n")
    print("| batch | prompt tokens (padded) | peftlab tokens/s | HF generate tokens/s | ratio peftlab/HF "
          "| tokens identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['prompt_len']} | {r['tps']['peftlab']:.1f} | {r['tps']['HF']:.1f} | "
              f"{r['ratio']:.2f} | {'yes' if r['identical'] else 'no'} |")
    print(f"\nMachine: {machine()}; {versions()}.")
    if not args.bf16 and not all(r["identical"] for r in rows):
        sys.exit("decode_vs_generate: greedy fp32 tokens differ from transformers' generate: a bug")


if __name__ == "__main__":
    main()
