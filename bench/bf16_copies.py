"""bf16 copies of the frozen weights (speed.bf16_weights) on and off: the same peftlab run twice.

    python -m bench.bf16_copies [--task sst2] [--train-limit 2000] [--rounds 2]

LoRA (default targets) on SmolLM2-135M under bf16 autocast, one epoch, batch 16, evaluation on
100 test rows. "off" replaces `bf16_weights` in the training loop with a no-op, so autocast casts
every frozen weight again in every forward, as it does in HF's loops. The two alternate for
--rounds rounds in one process; prints each epoch's seconds and test macro-F1 (identical on both
sides: the copies hold the values autocast would compute) and the median ratio.
"""

import argparse
import contextlib
import statistics
import tempfile

import peftlab.train
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.train import TrainArgs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    real = peftlab.train.bf16_weights
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in ("on", "off"):
                peftlab.train.bf16_weights = real if side == "on" else lambda *a, **k: contextlib.nullcontext(0)
                cfg = RunConfig(model="smollm2-135m", task=args.task, method="lora", train_limit=args.train_limit,
                                eval_limit=100, out=f"{tmp}/{side}{r}",
                                train=TrainArgs(epochs=1, batch_size=16, precision="bf16"))
                rec = train_run(cfg, progress=False)
                seconds[side].append(rec["time_per_epoch_s"][0])
                print(f"round {r + 1}, copies {side}: {seconds[side][-1]:.1f} s/epoch, "
                      f"test macro-F1 {rec['test']['macro_f1']:.4f}", flush=True)
    peftlab.train.bf16_weights = real
    on, off = statistics.median(seconds["on"]), statistics.median(seconds["off"])
    print(f"{args.task}, {args.train_limit} rows: copies on {on:.1f} s, off {off:.1f} s, on/off {on / off:.3f}")


if __name__ == "__main__":
    main()
