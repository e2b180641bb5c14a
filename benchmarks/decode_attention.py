"""One decoding query through attention whose value head dim is smaller than the key's (FLAT-LLM).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/decode_attention.py [--value-dim 45]

On SmolLM2-135M's attention shapes (9 query heads, 3 KV heads, key dim 64), per batch and
context, microseconds per call (median of interleaved repeats) of: the dense model's SDPA call
(value dim 64, its fused kernel), SDPA with the smaller value dim (what transformers runs: SDPA's
unfused path), and lowrank-kit's one-query path on one thread and on every thread. The
one-thread column is what ``models.attention.ONE_THREAD_MACS`` chooses from.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch.nn import functional as F

from lowrank_kit.compressed import modules
from lowrank_kit.models import attention

HEADS, GROUPS, KEY_DIM = 9, 3, 64
CASES = ((1, 160), (1, 512), (1, 2048), (8, 160), (8, 2048), (32, 160), (32, 2048))


def microseconds(call: object, inner: int = 50) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        call()  # type: ignore[operator]
    return (time.perf_counter() - start) / inner * 1e6


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--value-dim", type=int, default=45)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}, "
          f"value dim {args.value_dim}, µs per call (median of {args.repeats})\n")
    print("| batch × context | MACs | SDPA, value dim 64 | SDPA, value dim r | one-query, 1 thread "
          "| one-query, all threads |\n|---|---:|---:|---:|---:|---:|")
    chosen = attention.ONE_THREAD_MACS
    modules.THREADS_SLEEP = True  # the one-thread column under any wait policy
    for batch, context in CASES:
        query = torch.randn(batch, HEADS, 1, KEY_DIM)
        key = torch.randn(batch, GROUPS, context, KEY_DIM)
        dense_value, value = torch.randn(batch, GROUPS, context, KEY_DIM), torch.randn(batch, GROUPS, context,
                                                                                       args.value_dim)
        sdpa = functools.partial(F.scaled_dot_product_attention, query, key, enable_gqa=True)
        ours = functools.partial(attention._one_query, query, key, value, None, 0.125)
        calls = {"dense": functools.partial(sdpa, dense_value), "sdpa": functools.partial(sdpa, value),
                 "one": ours, "all": ours}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, call in calls.items():
                attention.ONE_THREAD_MACS = 10**15 if name == "one" else 0
                times[name].append(microseconds(call))
        attention.ONE_THREAD_MACS = chosen
        median = {name: statistics.median(t[1:]) for name, t in times.items()}
        macs = batch * HEADS * context * (KEY_DIM + args.value_dim)
        print(f"| {batch} × {context} | {macs / 1e6:.2f} M | {median['dense']:.0f} | {median['sdpa']:.0f} | "
              f"{median['one']:.0f} | {median['all']:.0f} |")


if __name__ == "__main__":
    main()
