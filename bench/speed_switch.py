"""One of peftlab's bf16 training speed-ups on and off: the same peftlab run twice.

    python -m bench.speed_switch [--switch bf16_weights|fp32_attention|unpad|last_block|shared_prompt]
                                 [--task sst2] [--train-limit 2000] [--rounds 2] [--model smollm2-135m]
                                 [--method lora] [--seeds 0] [--eval-limit 100]

LoRA (default targets; --method: another) on SmolLM2-135M (or --model) under bf16 autocast, one
epoch, batch 16, evaluation on 100 test rows. "off" replaces the switch in the training loop
with a no-op:
- bf16_weights (`speed.bf16_weights`): autocast then casts every frozen weight again in every
  forward, as it does in HF's loops; test metrics are identical on both sides (the copies hold
  the values autocast would compute).
- fp32_attention (`speed.fp32_attention`): attention then runs in bf16 under autocast, as in
  HF's loops (PyTorch's bf16 flash-attention backward); metrics differ by rounding.
- unpad (`unpad.last_hidden`): batches then run padded, whatever their padding, as in HF's
  loops; metrics differ by rounding.
- last_block (`pooled.hidden_at`): the last block then runs at every position, not only at
  the pooled one, as in HF's loops; metrics differ by rounding.
- shared_prompt (`virtual.shares_rows`; prompt tuning, the method it then defaults to): every
  row then runs the soft prompt itself, as in HF PEFT; metrics differ by rounding.
The two alternate for --rounds rounds (each over every seed in --seeds) in one process; prints
each epoch's seconds and test macro-F1, the median ratio and the mean macro-F1 of each side.
"""

import argparse
import contextlib
import statistics
import tempfile
from collections.abc import Callable

import peftlab.train
from peftlab import pooled, unpad, virtual
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.train import TrainArgs


def _switch(name: str) -> Callable[[bool], None]:
    """Turns the speed-up on (as shipped) or off: the context in the training loop replaced by a
    no-op, unpadding's floor raised out of reach, the pooled last block turned off, or every row
    given its own run of the soft prompt."""
    if name == "unpad":
        floor = unpad.MIN_PADDING
        return lambda on: setattr(unpad, "MIN_PADDING", floor if on else float("inf"))
    if name == "last_block":
        return lambda on: setattr(pooled, "ENABLED", on)
    if name == "shared_prompt":
        shares = virtual.shares_rows
        return lambda on: setattr(virtual, "shares_rows", shares if on else lambda *a: False)
    real = getattr(peftlab.train, name)
    return lambda on: setattr(peftlab.train, name, real if on else lambda *a, **k: contextlib.nullcontext(0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", default="fp32_attention",
                    choices=("bf16_weights", "fp32_attention", "unpad", "last_block", "shared_prompt"))
    ap.add_argument("--method", default=None, help="default: lora (prompt for --switch shared_prompt)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="comma-separated: each round runs every seed on both sides")
    ap.add_argument("--eval-limit", type=int, default=100)
    args = ap.parse_args()
    method = args.method or ("prompt" if args.switch == "shared_prompt" else "lora")
    use = _switch(args.switch)
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    scores: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for seed in [int(s) for s in args.seeds.split(",")]:
                for side in ("on", "off"):
                    use(side == "on")
                    cfg = RunConfig(model=args.model, task=args.task, method=method, train_limit=args.train_limit,
                                    eval_limit=args.eval_limit, seed=seed, out=f"{tmp}/{side}{r}-{seed}",
                                    train=TrainArgs(epochs=1, batch_size=16, precision="bf16"))
                    rec = train_run(cfg, progress=False)
                    seconds[side].append(rec["time_per_epoch_s"][0])
                    scores[side].append(rec["test"]["macro_f1"])
                    print(f"round {r + 1}, seed {seed}, {args.switch} {side}: {seconds[side][-1]:.1f} s/epoch, "
                          f"test macro-F1 {scores[side][-1]:.4f}", flush=True)
    use(True)
    on, off = statistics.median(seconds["on"]), statistics.median(seconds["off"])
    print(f"{args.model}, {method}, {args.task}, {args.train_limit} rows, {args.switch}: on {on:.1f} s, off {off:.1f} s, "
          f"on/off {on / off:.3f}; mean test macro-F1 on {statistics.mean(scores['on']):.4f}, "
          f"off {statistics.mean(scores['off']):.4f}")


if __name__ == "__main__":
    main()
