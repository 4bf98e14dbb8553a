"""Training steps on fixed shapes: peftlab against HF PEFT on SmolLM2-135M.

    python -m bench.train_step [--cases lora-qv,lora-all,prompt,full] [--batch-size 8] [--seq 128]
                               [--steps 4] [--rounds 3] [--precision fp32|bf16|both]
                               [--memory-runs 1] [--memory-only]

Both sides: the same weights, the same random token ids (B x T, no padding), a fresh 2-way
head, fused AdamW (HF Trainer's default), clipping at 1.0, one optimizer step per batch. peftlab
runs its own training loop (`peftlab.train.train`, as `peftlab train` does); the reference is
AutoModelForSequenceClassification + peft.get_peft_model (the plain model for full fine-tuning)
in a plain PyTorch loop, under the same autocast. Blocks of --steps steps alternate (peftlab, HF,
peftlab, HF, ...) for --rounds rounds after one warm-up block each; the allocator is tuned for
both (peftlab's default, applied to the whole process). peftlab's side is one `train()` call
(one optimizer, as in a real run) that hands over to HF's block after each of its own blocks
(HF's loop keeps its optimizer too). Prints per case the median s/step, tokens/s, the ratio
peftlab/HF tokens/s, MFU against the matmul peak measured in this run, and each side's peak
memory, measured alone in a child process (--memory), median of --memory-runs alternating
children: the peak RSS, and the peak live heap (what the tensors hold; RSS also counts the free
heap the tuned allocator keeps, which moves by up to 256 MiB between identical children).
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from peftlab.measure import PeakMemory, machine, versions
from peftlab.methods import MethodArgs
from peftlab.models import load_backbone, peftlab_home
from peftlab.run import prepare
from peftlab.runconfig import RunConfig
from peftlab.speed import autocast, tune_allocator
from peftlab.train import TrainArgs, train

CASES = {  # peftlab method and settings, and the matching HF PEFT config
    "lora-qv": ("lora", {"lora_targets": "q_proj,v_proj"}),
    "lora-all": ("lora", {"lora_targets": "all-linear"}),
    "prompt": ("prompt", {"virtual_tokens": 20, "prompt_init": "random"}),
    "full": ("full", {}),
}


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` square matmuls: the machine's practical peak. Measured
    before and after each case (the best counts): one measure alone once read 102 GFLOP/s fp32
    where the machine does 180, which gave MFUs above 100%."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(model: torch.nn.Module, case: str, batch: int, tokens: int) -> float:
    """Model FLOPs of one step: 2 per weight per token forward (plus attention scores), the
    same again backward for input gradients, and once more for weight gradients when all
    weights train (full fine-tuning)."""
    blocks = model.arch.blocks
    n = sum(p.numel() for p in blocks.parameters())
    d, layers = model.arch.hidden_size, len(blocks)
    forward = 2 * n * batch * tokens + 4 * layers * batch * tokens ** 2 * d
    return forward * (3 if case == "full" else 2)


def peftlab_side(case: str, args):
    """peftlab's model, and a function that runs its training loop for `steps` steps, calling
    `between()` after every `every` steps (the other side's block); one `train()` call, one
    optimizer, as in a real run. Returns the s/step of every step but the first."""
    method, kw = CASES[case]
    cfg = RunConfig(model="smollm2-135m", task="sst2", method=method, train_limit=16, eval_limit=16,
                    method_args=MethodArgs(**kw), train=TrainArgs(batch_size=args.batch_size, warmup_ratio=0,
                                                                  save_every=0, precision=args.precision, epochs=1))
    p = prepare(cfg)
    ids = torch.randint(100, 40000, (args.batch_size, args.seq))
    mask, labels = torch.ones_like(ids), torch.randint(0, 2, (args.batch_size,))

    def run(steps: int, every: int, between) -> list[float]:
        times, last, done = [], [None], [0]

        def on_step(*_):
            now = time.perf_counter()
            if last[0] is not None:  # from the end of the last step (or of the other side's block)
                times.append(now - last[0])
            done[0] += 1
            if done[0] % every == 0:
                between()
            last[0] = time.perf_counter()
        train(p.model, np.full(args.batch_size * steps, args.seq), lambda idx: (
            F.cross_entropy(p.model(ids, mask), labels), ids.numel()), lambda: ({"accuracy": 0.0}, 0.0), cfg.train,
            lr=1e-4, seed=0, metric="accuracy", progress=False,
            plan=lambda epoch: [np.arange(args.batch_size)] * steps, on_step=on_step)
        return times
    return p.model, run


def hf_side(case: str, args):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    load_backbone("smollm2-135m")  # makes sure the safetensors copy exists
    model = AutoModelForSequenceClassification.from_pretrained(peftlab_home() / "models" / "smollm2-135m",
                                                               num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = 0
    _, kw = CASES[case]
    if case.startswith("lora"):
        targets = "all-linear" if kw["lora_targets"] == "all-linear" else kw["lora_targets"].split(",")
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=targets))
    elif case == "prompt":
        model = get_peft_model(model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as HF Trainer's default and peftlab's
    ids = torch.randint(100, 40000, (args.batch_size, args.seq))
    mask, labels = torch.ones_like(ids), torch.randint(0, 2, (args.batch_size,))
    model.train()

    def block(steps: int) -> list[float]:
        stamps = [time.perf_counter()]
        for _ in range(steps):
            with autocast(args.precision):
                loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stamps.append(time.perf_counter())
        return np.diff(stamps).tolist()
    return model, block


def time_case(case: str, args) -> tuple[float, float, float]:
    """Median s/step of peftlab and of HF, alternating blocks of --steps steps, and the model
    FLOPs of one step."""
    ours, ours_run = peftlab_side(case, args)
    _, ref_block = hf_side(case, args)
    b: list[float] = []
    blocks = [0]

    def hf_block():  # after each block of peftlab steps; the first (warm-up) is not counted
        times = ref_block(args.steps)
        b.extend(times if blocks[0] else [])
        blocks[0] += 1
    a = ours_run(args.steps * (args.rounds + 1), args.steps, hf_block)[args.steps - 1:]
    tokens = args.seq + (CASES[case][1].get("virtual_tokens", 0))
    return statistics.median(a), statistics.median(b), step_flops(ours, case, args.batch_size, tokens)


def memory(case: str, side: str, args) -> tuple[float, float]:
    """Peak RSS and peak live heap (MiB) of one side alone, in a fresh process."""
    out = subprocess.run([sys.executable, "-m", "bench.train_step", "--memory", side, "--cases", case,
                          "--precision", args.precision, "--batch-size", str(args.batch_size), "--seq",
                          str(args.seq)], capture_output=True, text=True, check=True)
    rss, live = out.stdout.strip().splitlines()[-1].split()
    return float(rss), float(live)


def memories(case: str, args) -> list[tuple[float, float]]:
    """(peak RSS, peak live heap) medians for peftlab and for HF, over --memory-runs children each,
    alternating sides."""
    runs: dict[str, list] = {"peftlab": [], "hf": []}
    for _ in range(args.memory_runs):
        for side in runs:
            runs[side].append(memory(case, side, args))
    return [tuple(statistics.median(r[i] for r in runs[side]) for i in (0, 1)) for side in runs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "both"))
    ap.add_argument("--memory-runs", type=int, default=1, help="children per side for the memory columns")
    ap.add_argument("--memory-only", action="store_true", help="the memory columns only, no timing")
    ap.add_argument("--memory", choices=("peftlab", "hf"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_runs < 1:
        ap.error("--memory-runs must be at least 1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tune_allocator()
    torch.manual_seed(0)
    if args.memory:  # child: one side alone, warm-up + 2 steps, print its peak RSS
        with PeakMemory(live=True) as mem:
            if args.memory == "peftlab":
                peftlab_side(args.cases, args)[1](3, 3, lambda: None)
            else:
                hf_side(args.cases, args)[1](3)
        print(mem.peak_mb, mem.live_mb if mem.live_mb is not None else float("nan"))
        return
    for precision in (("fp32", "bf16") if args.precision == "both" else (args.precision,)):
        args.precision = precision
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        print(f"## {precision}: batch {args.batch_size} x {args.seq} tokens", flush=True)
        if args.memory_only:
            print("| case | peak RSS peftlab / HF (MiB) | peak live heap peftlab / HF (MiB) |\n|---|---|---|")
            for case in args.cases.split(","):
                (ra, la), (rb, lb) = memories(case, args)
                print(f"| {case} | {ra:.0f} / {rb:.0f} | {la:.0f} / {lb:.0f} |", flush=True)
            continue
        peak = matmul_peak(dtype)
        rows = []
        for case in args.cases.split(","):
            sa, sb, flops = time_case(case, args)
            peak = max(peak, matmul_peak(dtype))
            rows.append((case, sa, sb, flops, memories(case, args)))
            print(f"{case}: peftlab {sa:.2f} s/step, HF {sb:.2f} s/step ({sb / sa:.2f}x)", flush=True)
        print(f"matmul peak, best of all measures ({precision}): {peak / 1e9:.0f} GFLOP/s")
        print("| case | peftlab s/step | HF PEFT s/step | tokens/s ratio | peftlab MFU | HF MFU | "
              "peak RSS peftlab / HF (MiB) | peak live heap peftlab / HF (MiB) |\n|---|---|---|---|---|---|---|---|")
        for case, sa, sb, flops, ((ra, la), (rb, lb)) in rows:
            print(f"| {case} | {sa:.2f} | {sb:.2f} | {sb / sa:.2f}x | {100 * flops / sa / peak:.0f}% | "
                  f"{100 * flops / sb / peak:.0f}% | {ra:.0f} / {rb:.0f} | {la:.0f} / {lb:.0f} |", flush=True)
    print(f"\n{datetime.date.today()}  {json.dumps(versions())}  {json.dumps(machine())}")


if __name__ == "__main__":
    main()
