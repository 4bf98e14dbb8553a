"""Evaluation-side defaults on SmolLM2-135M and real data: padded tokens of evaluation batches,
feature caches and in-context scoring in fp32 against bf16.

    python -m bench.eval_precision [--cases padding,cache,icl,shared] [--tasks sms_spam,sst2]
                                   [--runs sms_spam:last-block+norm:320:200:2,...] [--shots 0,4,16]

padding  per split (--train-limit training rows, --eval-limit of the others): real tokens, and the
         token slots of 64-row length-sorted batches (before) against `batching.eval_batches` (now).
cache    per TASK:METHOD:TRAIN:EVAL:EPOCHS in --runs, one run in fp32 and one in bf16, each with a
         cold feature cache: wall seconds of the whole run and its test metrics.
icl      per task, k-shot label-word scoring (one draw per k in --shots, --icl-limit test rows)
         in fp32 and bf16: accuracy, macro-F1, seconds.
shared   per task, the same k-shot scoring under bf16 with the support examples every prompt
         starts with run once per batch (`virtual.common_start`, the default) and in every row,
         alternating for --rounds rounds: median seconds and accuracy of each.
Rows of docs/benchmarks.md "Evaluation, feature caches and in-context scoring" and "Soft prompts
and common starts computed once per batch".
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import peftlab.features
from peftlab import virtual
from peftlab.batching import batch_indices, eval_batches
from peftlab.data import load_task
from peftlab.icl import icl_classify
from peftlab.measure import machine, versions
from peftlab.models import load_backbone
from peftlab.run import prepare, train_run
from peftlab.runconfig import RunConfig
from peftlab.speed import tune_allocator
from peftlab.train import TrainArgs

PRECISIONS = ("fp32", "bf16")


def slots(lengths, batches) -> int:
    return int(sum(len(b) * lengths[b].max() for b in batches))


def padding(args) -> None:
    print("| split (rows) | real tokens | 64-row sorted batches | token-capped (now) |\n|---|---|---|---|")
    for task in args.tasks:
        p = prepare(RunConfig(model=args.model, task=task, method="head", train_limit=args.train_limit,
                              eval_limit=args.eval_limit))
        for split, enc in p.data.items():
            real = int(enc.lengths.sum())
            before = slots(enc.lengths, batch_indices(enc.lengths, 64, shuffle=False))
            now = slots(enc.lengths, eval_batches(enc.lengths, 64))
            print(f"| {task} {split} ({len(enc)}) | {real:,} | {before:,} ({before / real:.2f}x) | "
                  f"{now:,} ({now / real:.2f}x) |", flush=True)


def cache(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    print("| run | precision | wall s | test metrics |\n|---|---|---|---|")
    for i, spec in enumerate(args.runs):
        task, method, train, test, epochs = spec.split(":")
        for precision in PRECISIONS:
            folder = tmp / f"{i}-{precision}"
            peftlab.features.features_dir = lambda f=folder: f / "features"  # cold: the build is measured
            cfg = RunConfig(model=args.model, task=task, method=method, train_limit=int(train), eval_limit=int(test),
                            out=str(folder / "run"), train=TrainArgs(epochs=int(epochs), batch_size=16,
                                                                      precision=precision))
            t0 = time.perf_counter()
            r = train_run(cfg, progress=False)
            metrics = ", ".join(f"{k} {100 * v:.1f}" for k, v in r["test"].items())
            print(f"| {task} {method} {train}/{test} rows, {epochs} epochs | {precision} | "
                  f"{time.perf_counter() - t0:.1f} | {metrics} |", flush=True)


def icl(args) -> None:
    backbone = load_backbone(args.model)
    print("| task | k | fp32 accuracy (s) | bf16 accuracy (s) | speed-up |\n|---|---|---|---|---|")
    for task in args.tasks:
        loaded = load_task(task)
        runs = {p: icl_classify(backbone, loaded, args.shots, repeats=1, limit=args.icl_limit, progress=False,
                                precision=p) for p in PRECISIONS}
        for a, b in zip(runs["fp32"], runs["bf16"]):
            acc = lambda r: f"{100 * r['metrics']['accuracy']['mean']:.1f} ({r['seconds']:.1f})"
            print(f"| {task} | {a['k']} ({a['prompt_tokens']:.0f} tokens a prompt) | {acc(a)} | {acc(b)} | "
                  f"{a['seconds'] / b['seconds']:.1f}x |", flush=True)


def shared(args) -> None:
    backbone = load_backbone(args.model)
    common_start = virtual.common_start
    print("| task | k | shared s (accuracy) | every row s (accuracy) | speed-up |\n|---|---|---|---|---|")
    for task in args.tasks:
        loaded = load_task(task)
        records: dict[str, list] = {"shared": [], "rows": []}
        for _ in range(args.rounds):
            for side in records:
                virtual.common_start = common_start if side == "shared" else lambda *a, **k: None
                records[side].append(icl_classify(backbone, loaded, args.shots, repeats=1, limit=args.icl_limit,
                                                  progress=False, precision="bf16"))
        virtual.common_start = common_start
        for i, k in enumerate(args.shots):
            med = {s: statistics.median(r[i]["seconds"] for r in runs) for s, runs in records.items()}
            acc = {s: 100 * runs[0][i]["metrics"]["accuracy"]["mean"] for s, runs in records.items()}
            print(f"| {task} | {k} ({records['shared'][0][i]['prompt_tokens']:.0f} tokens a prompt) | "
                  f"{med['shared']:.1f} ({acc['shared']:.1f}) | {med['rows']:.1f} ({acc['rows']:.1f}) | "
                  f"{med['rows'] / med['shared']:.2f}x |", flush=True)


CASES = {"padding": padding, "cache": cache, "icl": icl, "shared": shared}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="padding,cache,icl")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sms_spam,sst2", help="tasks of the padding and icl cases")
    ap.add_argument("--train-limit", type=int, default=320)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--runs", default="sms_spam:last-block+norm:320:200:2,sst2:head:2000:800:5,sms_spam:head:400:300:2",
                    help="cache case: TASK:METHOD:TRAIN:EVAL:EPOCHS, comma-separated")
    ap.add_argument("--shots", default="0,4,16")
    ap.add_argument("--icl-limit", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="shared case: alternating rounds")
    args = ap.parse_args()
    args.tasks, args.runs = args.tasks.split(","), args.runs.split(",")
    args.shots = [int(k) for k in args.shots.split(",")]
    tune_allocator()  # as the peftlab command does
    print(f"{machine()}; {versions()}")
    for case in args.cases.split(","):
        CASES[case](args)


if __name__ == "__main__":
    main()
