"""Does this machine's matmul prefer ranks that are multiples of 8, 16, 32 or 64?

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rank_multiples.py [--low 192 --high 256]

Times the two factors of a low-rank projection, x·Bᵀ·Aᵀ with B [r, n] and A [m, r], on
SmolLM2-135M's shapes (576→576 attention, 576→1536 MLP up, 1536→576 MLP down) for every rank
in [low, high], at 4,096 tokens (a prefill of 8×512) and at 1 token (a decode step), all ranks
interleaved in each repeat (the median of the repeats counts). Prints, per multiple, the mean
time per kept parameter of the ranks that are multiples of it against the ranks that are not
(below 1.00: multiples are faster per parameter), and the dense layer's time for the break-even.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

SHAPES = {"attention 576→576": (576, 576), "mlp 576→1536": (576, 1536), "mlp 1536→576": (1536, 576)}
MULTIPLES = (8, 16, 32, 64)


def seconds(call: object, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        call()  # type: ignore[operator]
    return (time.perf_counter() - start) / inner


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--low", type=int, default=192)
    parser.add_argument("--high", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    ranks = list(range(args.low, args.high + 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ranks {args.low}–{args.high}, "
          f"median of {args.repeats} interleaved repeats\n")
    print("| shape | tokens | dense ms | largest rank faster than dense (steps of 16) | break-even rank (params) | "
          + " | ".join(f"×{m} vs others" for m in MULTIPLES) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(MULTIPLES))
    for label, (n_in, n_out) in SHAPES.items():
        for tokens, inner in ((4096, 3), (1, 200)):
            x = torch.randn(tokens, n_in)
            dense = torch.randn(n_out, n_in)
            grid = list(range(16, min(n_in, n_out) + 1, 16))  # for the break-even
            measured = sorted(set(ranks) | set(grid))
            factors = {r: (torch.randn(r, n_in), torch.randn(n_out, r)) for r in measured}
            times: dict[int | str, list[float]] = {r: [] for r in measured}
            times["dense"] = []
            for _ in range(args.repeats):
                times["dense"].append(seconds(lambda x=x, dense=dense: x @ dense.T, inner))
                for r in measured:
                    b, a = factors[r]
                    times[r].append(seconds(lambda a=a, b=b, x=x: (x @ b.T) @ a.T, inner))
            median = {k: statistics.median(v) for k, v in times.items()}
            per_param = {r: median[r] / (r * (n_in + n_out)) for r in ranks}
            cheaper = [r for r in grid if median[r] < median["dense"]]
            by_time = max(cheaper) if cheaper else "none"
            by_params = n_in * n_out // (n_in + n_out)
            cells = []
            for m in MULTIPLES:
                on = [per_param[r] for r in ranks if r % m == 0]
                off = [per_param[r] for r in ranks if r % m]
                cells.append(f"{statistics.mean(on) / statistics.mean(off):.2f}" if on and off else "–")
            print(f"| {label} | {tokens} | {median['dense'] * 1e3:.3f} | {by_time} | {by_params} | "
                  + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
