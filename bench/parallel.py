"""Data-parallel training against one process: the same run, N processes under torchrun.

    python -m bench.parallel [--nproc 2] [--methods lora,full] [--train-limit 256] [--model smollm2-135m]

Each method trains one epoch of the same SST-2 slice (batch 16, max length 64) three ways: one
process (all cores), N processes with DDP, N processes with FSDP. Prints tokens/s, the ratio to
one process, the epoch time and the peak RSS per process (FSDP shards the weights, gradients and
AdamW moments: its per-process memory is the figure to watch). On a GPU machine torchrun would
give each process a GPU; peftlab trains on the CPU for now (see the README).
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from peftlab.measure import machine, versions


def train(out: Path, method: str, args, nproc: int = 1, parallel: str = "auto") -> dict:
    cmd = [sys.executable, "-m", "peftlab", "train", "--model", args.model, "--task", "sst2", "--method", method,
           "--train-limit", str(args.train_limit), "--eval-limit", "64", "--epochs", "1", "--batch-size", "16",
           "--max-length", "64", "--save-every", "0", "--out", str(out), "--parallel", parallel,
           "--nproc", str(nproc)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--train-limit", type=int, default=256)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    print("| method | processes | strategy | tokens/s | ratio to 1 process | s/epoch | peak RSS per process (MiB) "
          "| test accuracy |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            runs = [(1, "auto"), (args.nproc, "ddp"), (args.nproc, "fsdp")]
            records = [train(Path(tmp) / f"{method}-{n}-{s}", method, args, n, s) for n, s in runs]
            for r in records:
                print(f"| {method} | {r['processes']} | {r['parallel']} | {r['tokens_per_s']:.0f} | "
                      f"{r['tokens_per_s'] / records[0]['tokens_per_s']:.2f}x | {r['time_per_epoch_s'][0]:.1f} | "
                      f"{r['peak_memory_mb']:.0f} | {100 * r['test']['accuracy']:.1f} |", flush=True)
    print(f"\n{datetime.date.today()}  {json.dumps(versions())}  {json.dumps(machine())}")


if __name__ == "__main__":
    main()
