"""Where a decode step's time goes, dense against compressed: the weight products against the rest.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/decode_profile.py FOLDER [FOLDER ...] [--batch 1]

The speed issue's decode bar asks S − 1 ≥ 0.8·(L − 1), with L the limit from the bytes a step reads.
Compression shrinks only the weight products (every module ``lowrank-kit speed`` counts in L: the
linears, the low-rank factors, the vocabulary head); the rest of a step (norms, rotary embeddings,
attention over the cache, the cache's growth, the generate loop) stays. This times both parts inside
the decode runs the speed benchmark makes (128-token prompt, 32 greedy steps, interleaved repeats
after a warm-up), with a clock around every weight module (forward hooks; the prompt's forward is
left out), and prints per folder:

- the step time of both models, split into the weight products and the rest (medians);
- the products' own speed-up against their byte limit;
- the ceiling: the speed-up if the products ran exactly at their byte limit and the rest took what
  the compressed model's rest took. When that is below what the bar needs, compression alone
  cannot meet the bar on this machine; the missing time is in the rest.

The clocks add a few microseconds per module call to both models (counted in "rest").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from lowrank_kit.harness.speed import Regime, Shapes, decode_span, interleaved, limit, load, matmul_modules, sample_ids


class ProductClock:
    """Seconds spent inside the model's weight modules, as (start, seconds) spans."""

    def __init__(self, model: nn.Module) -> None:
        self.spans: list[tuple[float, float]] = []
        self._start: dict[int, float] = {}
        for module in matmul_modules(model):  # the modules whose weights the limit counts
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        start = self._start.pop(id(module))
        self.spans.append((start, time.perf_counter() - start))


def decoder(model: nn.Module, clock: ProductClock, regime: Regime, runs: list[tuple[float, float]]
            ) -> Callable[[], float]:
    """A call that decodes once and records (step seconds, seconds in weight products) into ``runs``."""
    ids = sample_ids(model, regime.batch, regime.tokens)

    def decode() -> float:
        clock.spans.clear()
        first, last = decode_span(model, ids, regime.steps)
        products = sum(s for start, s in clock.spans if first <= start < last)
        runs.append((last - first, products))
        return last - first

    return decode


def profile(folder: Path, batch: int, repeats: int) -> dict[str, Any]:
    report = json.loads((folder / "report.json").read_text())
    models = {"dense": load(report["model"], None, "cpu"), "compressed": load(str(folder), None, "cpu")}
    regime = Regime("decode", batch, 128, 32)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    calls = {name: decoder(m, ProductClock(m), regime, runs[name]) for name, m in models.items()}
    interleaved(calls, repeats)
    rows = {}
    for name, measured in runs.items():
        timed = measured[-repeats:]  # the calls before are the warm-up
        step = statistics.median(s for s, _ in timed) / regime.steps
        products = statistics.median(p for _, p in timed) / regime.steps
        rows[name] = {"step_ms": 1e3 * step, "products_ms": 1e3 * products, "rest_ms": 1e3 * (step - products)}
    shapes = {name: Shapes.of(m) for name, m in models.items()}
    product_limit = shapes["dense"].weight_bytes / shapes["compressed"].weight_bytes
    dense, compressed = rows["dense"], rows["compressed"]
    whole_limit = limit(shapes["dense"], shapes["compressed"], regime)
    return {"folder": str(folder), "recipe": report["name"], "ratio": report["achieved_ratio"], "batch": batch,
            "repeats": repeats, "rows": rows, "speedup": dense["step_ms"] / compressed["step_ms"],
            "products_speedup": dense["products_ms"] / compressed["products_ms"], "products_limit": product_limit,
            "limit": whole_limit, "bar_needs": 1 + 0.8 * (whole_limit - 1),
            "ceiling": dense["step_ms"] / (compressed["rest_ms"] + dense["products_ms"] / product_limit)}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | batch | step ms dense / compressed | products ms | rest ms | products: speed-up (byte limit) "
             "| S | L | bar needs | ceiling |", "|---|---:|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        d, c = r["rows"]["dense"], r["rows"]["compressed"]
        lines.append(
            f"| {r['recipe']} {r['ratio']:.2f} | {r['batch']} | {d['step_ms']:.1f} / {c['step_ms']:.1f} "
            f"| {d['products_ms']:.1f} / {c['products_ms']:.1f} | {d['rest_ms']:.1f} / {c['rest_ms']:.1f} "
            f"| {r['products_speedup']:.3f} ({r['products_limit']:.3f}) | {r['speedup']:.3f} | {r['limit']:.3f} "
            f"| {r['bar_needs']:.3f} | {r['ceiling']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders written by lowrank-kit compress")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = [profile(folder, batch, args.repeats) for folder in args.folders for batch in args.batch]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; per decode step, medians of {args.repeats}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
