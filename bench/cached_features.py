"""Training from cached features against training end to end with the same frozen backbone.

    python -m bench.cached_features [--model smollm2-135m] [--task cola,sst2] [--method head]
                                    [--train-limit 1000] [--epochs 3]

Two runs, same model, data, seed and settings, in this process: --cache-features off (every
epoch runs the frozen backbone) and auto (the backbone runs once, into a fresh cache folder, and
the top trains from it). Prints the seconds per epoch of each, the cache build time, and the
ratio end-to-end epoch / cached epoch for the epochs after the first; the test metrics of both
must agree (the same parameters, trained on the same numbers).
"""

import argparse
import tempfile
from pathlib import Path

import peftlab.features
from peftlab.measure import machine
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.train import TrainArgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="cola,sst2")
    ap.add_argument("--method", default="head")
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--eval-limit", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    peftlab.features.features_dir = lambda: tmp / "features"  # a cold cache: its build is measured
    records = {}
    for mode in ("off", "auto"):
        cfg = RunConfig(model=args.model, task=args.task, method=args.method, train_limit=args.train_limit,
                        eval_limit=args.eval_limit, cache_features=mode, out=str(tmp / mode),
                        train=TrainArgs(epochs=args.epochs, batch_size=args.batch_size))
        records[mode] = train_run(cfg, progress=False)
    e2e, cached = records["off"], records["auto"]
    later = lambda r: sum(r["time_per_epoch_s"][1:]) / max(1, len(r["time_per_epoch_s"]) - 1)
    print(f"{args.model} {args.task} {args.method}: {e2e['train_rows']} training rows, {args.epochs} epochs; "
          f"{machine()}")
    print(f"  end to end   s/epoch {', '.join(f'{s:.2f}' for s in e2e['time_per_epoch_s'])}")
    print(f"  cached       s/epoch {', '.join(f'{s:.3f}' for s in cached['time_per_epoch_s'])} "
          f"(cache built in {cached['cached_features']['seconds']:.1f} s, cut {cached['cached_features']['cut']})")
    print(f"  ratio end-to-end / cached, epochs 2+: {later(e2e) / later(cached):.0f}x")
    print(f"  test {e2e['metric']}: end to end {e2e['test'][e2e['metric']]:.4f}, cached {cached['test'][cached['metric']]:.4f}")


if __name__ == "__main__":
    main()
