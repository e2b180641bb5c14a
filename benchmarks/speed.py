"""Dense vs compressed speed on this machine, in one run: prefill and decode tokens/s, memory.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/speed.py runs/flat-llm-0.3 [--batch 1 4]

Prints a Markdown table. The parameter-count limit (dense / compressed decoder weights) is
printed beside the measured speed-up: a low-rank model cannot beat it on compute-bound work.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def weights_mb(model: Any) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def best_seconds(run: Any, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up: the least disturbed by other load."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def prefill_tokens_per_s(model: Any, batch: int, length: int, repeats: int) -> float:
    ids = torch.randint(100, 10000, (batch, length))
    return batch * length / best_seconds(lambda: model(input_ids=ids, use_cache=False), repeats)


@torch.no_grad()
def decode_tokens_per_s(model: Any, batch: int, prompt: int, new: int, repeats: int) -> float:
    """Generated tokens per second of greedy decoding with the KV cache (prefill excluded)."""
    ids = torch.randint(100, 10000, (batch, prompt))

    def generate(count: int) -> Any:
        return lambda: model.generate(ids, do_sample=False, min_new_tokens=count, max_new_tokens=count,
                                      pad_token_id=0)

    with_prefill = best_seconds(generate(new + 1), repeats)
    prefill_only = best_seconds(generate(1), repeats)
    return batch * new / (with_prefill - prefill_only)


def measure(which: str, folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load one model and time it; runs in its own process so its peak memory is its own."""
    from lowrank_kit import load_pretrained
    from lowrank_kit.models.loading import load_model

    torch.manual_seed(0)
    if which == "dense":
        model, _ = load_model(json.loads((folder / "report.json").read_text())["model"])
    else:
        model = load_pretrained(folder)
    rows = []
    for batch in args.batch:
        rows.append({
            "model": which if which == "dense" else folder.name, "batch": batch, "weights_mb": weights_mb(model),
            "prefill": prefill_tokens_per_s(model, batch, args.prompt, args.repeats),
            "decode": decode_tokens_per_s(model, batch, args.prompt, args.new_tokens, args.repeats),
        })
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [{**row, "peak_rss_mb": peak} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="output folder of lowrank-kit compress")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the fastest counts")
    args = parser.parse_args()
    report = json.loads((args.folder / "report.json").read_text())
    rows = []
    for which in ("dense", "compressed"):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            rows += pool.apply(measure, (which, args.folder, args))
    limit = report["decoder_linear_params"]["dense"] / report["decoder_linear_params"]["compressed"]
    print(f"\n{args.folder.name}: achieved ratio {report['achieved_ratio']:.4f}; decoder weights "
          f"{limit:.2f}x fewer (the compute limit of the speed-up, before attention, norms and lm_head)\n")
    print("| model | batch | weights (MB) | peak RSS (MB) | prefill tok/s | decode tok/s | prefill speed-up "
          "| decode speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {r["batch"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        b = base[r["batch"]]
        print(f"| {r['model']} | {r['batch']} | {r['weights_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['prefill']:.0f} | "
              f"{r['decode']:.1f} | "
              f"{r['prefill'] / b['prefill']:.2f}x | {r['decode'] / b['decode']:.2f}x |")


if __name__ == "__main__":
    main()
