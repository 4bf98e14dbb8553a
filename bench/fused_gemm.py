"""Would fusing SmolLM2's q/k/v (576 -> 576 + 192 + 192) and gate/up (576 -> 1536 + 1536)
projections pay on this CPU? Separate GEMMs against one on the concatenated weight.

    python -m bench.fused_gemm [--tokens 192,1024] [--repeats 20]

Per dtype (fp32, bf16) and token count M: the forward (x @ W^T) and the backward input gradient
(sum of g_i @ W_i against g @ W), median milliseconds, and the forward GFLOP/s. The figures of
docs/benchmarks.md "Levers measured and left out".
"""

import argparse
import statistics
import time

import torch

from peftlab.measure import machine

GROUPS = {"q,k,v": (576, 192, 192), "gate,up": (1536, 1536)}


def ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="192,1024")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(machine())
    print("| dtype | M | group | fwd separate -> fused (ms) | GFLOP/s | bwd input separate -> fused (ms) |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, 576, dtype=dtype)
            for name, outs in GROUPS.items():
                ws = [torch.randn(n, 576, dtype=dtype) for n in outs]
                gs = [torch.randn(m, n, dtype=dtype) for n in outs]
                w, g = torch.cat(ws), torch.cat(gs, 1)
                fwd = ms(lambda: [x @ wi.t() for wi in ws], args.repeats), ms(lambda: x @ w.t(), args.repeats)
                bwd = ms(lambda: sum(gi @ wi for gi, wi in zip(gs, ws)), args.repeats), ms(lambda: g @ w, args.repeats)
                gflop = 2 * m * 576 * sum(outs) / 1e9
                print(f"| {str(dtype).removeprefix('torch.')} | {m} | {name} | {fwd[0]:.2f} -> {fwd[1]:.2f} | "
                      f"{gflop / fwd[0] * 1e3:.0f} -> {gflop / fwd[1] * 1e3:.0f} | {bwd[0]:.2f} -> {bwd[1]:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
