"""Does ``torch.compile`` make a compressed model faster here? Eager against compiled, dense and compressed.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/compile_speed.py FOLDER [--regime decode-1] [--repeats 5]

FOLDER is a folder written by ``lowrank-kit compress``; its dense model is the report's. Each of
the four models (dense/compressed × eager/compiled with inductor's defaults) runs the regime
after one warm-up call that also compiles (its seconds are printed apart); the timed calls are
interleaved with ``harness.speed.interleaved``. ``model.forward`` is compiled: for one fixed
shape in a prefill regime, with dynamic shapes in a decode one (the KV cache grows every step).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from lowrank_kit.harness import speed


def compiled(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """A model whose forward inductor compiles; the eager one is left as it is (its copy shares weights)."""
    twin = copy.copy(model)  # a shallow copy: same parameters, its own forward attribute
    twin.forward = torch.compile(model.forward, dynamic=kind == "decode")  # type: ignore[method-assign]
    return twin


def _frames() -> int:
    """Frames inductor has compiled so far in this process (recompilations included)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--regime", default="prefill-1x512", help="a name of `lowrank-kit speed --regimes`")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    (regime,) = speed.select([args.regime])
    report = json.loads((args.folder / "report.json").read_text())
    eager = {"dense": speed.load(report["model"], None, "cpu"), "compressed": speed.load(str(args.folder), None, "cpu")}
    models = {**eager, **{f"{name} compiled": compiled(m, regime.kind) for name, m in eager.items()}}
    calls = {name: speed.timer(m, regime, torch.device("cpu")) for name, m in models.items()}
    first = {}
    for name, call in calls.items():  # the warm-up: compiles the compiled ones
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
    compiles = _frames()
    times = speed.interleaved(calls, args.repeats, warmup=1)
    if _frames() != compiles:  # a timed call compiled again: its time is not the compiled model's
        print(f"warning: {_frames() - compiles} frames were compiled during the timed calls")
    ids = speed.sample_ids(eager["dense"], 1, 64)
    with torch.no_grad():  # compiled and eager logits of the same model, on another shape than the timed one
        drift = {name: (models[f"{name} compiled"](input_ids=ids).logits - m(input_ids=ids).logits).abs().max().item()
                 for name, m in eager.items()}
    base = statistics.median(times["dense"])
    print(f"{report['name']} at {report['achieved_ratio']:.4f}, {regime.label}; {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}, {args.repeats} interleaved repeats; "
          f"largest |compiled − eager| logit on 64 tokens: dense {drift['dense']:.2e}, "
          f"compressed {drift['compressed']:.2e}\n")
    print("| model | first call s (compiles) | median s | min s | speed-up vs eager dense |\n|---|---:|---:|---:|---:|")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {name} | {first[name]:.1f} | {median:.3f} | {min(seconds):.3f} | {base / median:.3f}× |")


if __name__ == "__main__":
    main()
