"""Where a step's time goes, dense against compressed: the weight products (by kind) against the rest.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/step_profile.py FOLDER [FOLDER ...] \
        [--regimes decode-1 prefill-8x512] [--repeats 5]

The speed issue's bars ask S − 1 ≥ 0.8·(L − 1) at decode (L from the bytes a step reads) and
S − 1 ≥ 0.7·(L − 1) at prefill 8×512 (L from the multiply-adds of the whole forward, attention's
included). Compression shrinks only the weight products (every module ``lowrank-kit speed`` counts in
L: the linears, the low-rank factors, the vocabulary head); the rest (norms, rotary embeddings,
attention, activations, the cache's growth, the generate loop) stays. This times both parts inside
the runs the speed benchmark makes (a decode: 128-token prompt, 32 greedy steps, the prompt's
forward left out; a prefill: one forward without the cache), interleaved repeats after a warm-up,
with a clock around every weight module (forward hooks), and prints per folder and regime:

- the time of both models (per decode step, or per prefill), split into the weight products and
  the rest (medians);
- the products' own speed-up against their limit (bytes at decode, multiply-adds at prefill);
- the ceiling: the speed-up if the products ran exactly at their limit and the rest took what the
  compressed model's rest took. When that is below what the bar needs, compression alone cannot
  meet the bar on this machine; the missing time is in the rest;
- the products by kind (the module's last name: q_proj, down_proj, lm_head, ...), dense against
  compressed, so a kind slower than its dense matrices stands out.

The clocks add a few microseconds per module call to both models (counted in "rest").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from lowrank_kit.harness.speed import (
    Regime,
    Shapes,
    decode_span,
    interleaved,
    limit,
    load,
    matmul_modules,
    sample_ids,
    select,
)

BAR = {"decode": 0.8, "prefill": 0.7}  # the share of L − 1 the speed issue asks for


class ProductClock:
    """Seconds spent inside the model's weight modules, as (start, seconds, kind) spans."""

    def __init__(self, model: nn.Module) -> None:
        self.spans: list[tuple[float, float, str]] = []
        self._start: dict[int, float] = {}
        kinds = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
        for module in matmul_modules(model):  # the modules whose weights the limit counts
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leaver(kinds[id(module)]))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _leaver(self, kind: str) -> Callable[..., None]:
        def leave(module: nn.Module, args: Any, output: Any) -> None:
            start = self._start.pop(id(module))
            self.spans.append((start, time.perf_counter() - start, kind))
        return leave


Run = tuple[float, dict[str, float]]  # seconds of the timed span, seconds per product kind inside it


def runner(model: nn.Module, clock: ProductClock, regime: Regime, runs: list[Run]) -> Callable[[], float]:
    """A call that runs the regime once and records the timed span and its product time by kind."""
    ids = sample_ids(model, regime.batch, regime.tokens)

    @torch.no_grad()
    def run() -> float:
        clock.spans.clear()
        if regime.kind == "decode":
            first, last = decode_span(model, ids, regime.steps)
        else:
            first = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            last = time.perf_counter()
        kinds: dict[str, float] = defaultdict(float)
        for start, seconds, kind in clock.spans:
            if first <= start < last:
                kinds[kind] += seconds
        runs.append((last - first, dict(kinds)))
        return last - first

    return run


def _median_ms(values: list[float], per: int) -> float:
    return 1e3 * statistics.median(values) / per


def profile(folder: Path, regime: Regime, repeats: int) -> dict[str, Any]:
    report = json.loads((folder / "report.json").read_text())
    models = {"dense": load(report["model"], None, "cpu"), "compressed": load(str(folder), None, "cpu")}
    runs: dict[str, list[Run]] = {name: [] for name in models}
    calls = {name: runner(m, ProductClock(m), regime, runs[name]) for name, m in models.items()}
    interleaved(calls, repeats)
    per = regime.steps if regime.kind == "decode" else 1
    rows, kinds = {}, {}
    for name, measured in runs.items():
        timed = measured[-repeats:]  # the calls before are the warm-up
        step = _median_ms([s for s, _ in timed], per)
        products = _median_ms([sum(k.values()) for _, k in timed], per)
        rows[name] = {"step_ms": step, "products_ms": products, "rest_ms": step - products}
        kinds[name] = {kind: _median_ms([k.get(kind, 0.0) for _, k in timed], per)
                       for kind in sorted({kind for _, k in timed for kind in k})}
    shapes = {name: Shapes.of(m) for name, m in models.items()}
    if regime.kind == "decode":  # the bytes a step reads of the weights, against the macs of a prefill
        product_limit = shapes["dense"].weight_bytes / shapes["compressed"].weight_bytes
    else:
        product_limit = shapes["dense"].matmul_macs / shapes["compressed"].matmul_macs
    dense, compressed = rows["dense"], rows["compressed"]
    whole_limit = limit(shapes["dense"], shapes["compressed"], regime)
    return {"folder": str(folder), "recipe": report["name"], "ratio": report["achieved_ratio"],
            "regime": regime.name, "repeats": repeats, "rows": rows, "kinds": kinds,
            "speedup": dense["step_ms"] / compressed["step_ms"],
            "products_speedup": dense["products_ms"] / compressed["products_ms"], "products_limit": product_limit,
            "limit": whole_limit, "bar_needs": 1 + BAR[regime.kind] * (whole_limit - 1),
            "ceiling": dense["step_ms"] / (compressed["rest_ms"] + dense["products_ms"] / product_limit)}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | regime | ms dense / compressed | products ms | rest ms | products: speed-up (limit) "
             "| S | L | bar needs | ceiling |", "|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        d, c = r["rows"]["dense"], r["rows"]["compressed"]
        lines.append(
            f"| {r['recipe']} {r['ratio']:.2f} | {r['regime']} | {d['step_ms']:.1f} / {c['step_ms']:.1f} "
            f"| {d['products_ms']:.1f} / {c['products_ms']:.1f} | {d['rest_ms']:.1f} / {c['rest_ms']:.1f} "
            f"| {r['products_speedup']:.3f} ({r['products_limit']:.3f}) | {r['speedup']:.3f} | {r['limit']:.3f} "
            f"| {r['bar_needs']:.3f} | {r['ceiling']:.3f} |")
    lines += ["", "Products by kind, ms dense / compressed (speed-up):", ""]
    for r in results:
        dense, compressed = r["kinds"]["dense"], r["kinds"]["compressed"]
        cells = [f"{kind} {dense[kind]:.1f} / {compressed.get(kind, 0.0):.1f} "
                 f"({dense[kind] / compressed[kind]:.2f})" if compressed.get(kind) else f"{kind} {dense[kind]:.1f} / –"
                 for kind in dense]
        lines.append(f"- {r['recipe']} {r['ratio']:.2f}, {r['regime']}: " + "; ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders written by lowrank-kit compress")
    parser.add_argument("--regimes", nargs="+", default=["decode-1"],
                        help="regimes of lowrank-kit speed, e.g. decode-1 decode-8 prefill-8x512")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    regimes = select(args.regimes)
    results = [profile(folder, regime, args.repeats) for folder in args.folders for regime in regimes]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; per decode step or per prefill, "
          f"medians of {args.repeats}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
