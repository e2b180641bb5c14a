"""Products written into rows padded to a multiple of 8 (``aligned_linear``) against plain ``F.linear``.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/aligned_outputs.py [FOLDER ...] [--repeats 5]

Pruned MLP widths (e.g. 1,157) and ranks (e.g. 230) are rarely multiples of 8, and a product whose
output rows are not ran much slower at prefill sizes on this CPU. The compressed modules therefore
write such products into padded rows (``lowrank_kit.compressed.modules.aligned_linear``). This
times, interleaved, medians of the repeats after a warm-up:

1. the compressed modules alone on SmolLM2's shapes (a Nyström-pruned MLP, low-rank projections)
   at 8, 32, 512 and 4,096 tokens, with the padded rows and without;
2. for every FOLDER written by ``lowrank-kit compress``, a prefill of 8×512 of the dense model and
   of the compressed one with the padded rows and without, in one process (the speed-up over
   dense of both, so the change is read off one run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from lowrank_kit.compressed import modules
from lowrank_kit.compressed.modules import LowRankLinear, ResizedLinear
from lowrank_kit.harness.speed import Regime, interleaved, load, timer


@contextlib.contextmanager
def plain_outputs() -> Iterator[None]:
    """Every product through plain ``F.linear`` (the behaviour before padded rows)."""
    before = modules.ALIGNED_MIN_ROWS
    modules.ALIGNED_MIN_ROWS = 1 << 62
    try:
        yield
    finally:
        modules.ALIGNED_MIN_ROWS = before


def both_ways(call: Callable[[], object]) -> dict[str, Callable[[], float]]:
    """Two timed calls of the same work: with padded rows and with plain outputs."""

    def aligned() -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    def plain() -> float:
        with plain_outputs():
            return aligned()

    return {"padded": aligned, "plain": plain}


class PrunedMLP(nn.Module):
    """A Llama MLP with ``width`` channels kept (the shapes Nyström leaves)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = ResizedLinear(hidden, width), ResizedLinear(hidden, width)
        self.down_proj = ResizedLinear(width, hidden)
        self.in_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def low_rank(n_in: int, n_out: int, rank: int) -> LowRankLinear:
    return LowRankLinear.from_factors(torch.randn(n_out, rank) / rank**0.5, torch.randn(rank, n_in) / n_in**0.5, None)


CASES: dict[str, Callable[[], PrunedMLP | LowRankLinear]] = {
    "MLP, width 1,157 (Nyström)": lambda: PrunedMLP(576, 1157),
    "MLP, width 1,152": lambda: PrunedMLP(576, 1152),
    "576→576 at rank 230": lambda: low_rank(576, 576, 230),
    "576→1536 at rank 334": lambda: low_rank(576, 1536, 334),
    "1536→576 at rank 334": lambda: low_rank(1536, 576, 334),
}


@torch.no_grad()
def modules_table(repeats: int) -> list[str]:
    lines = ["| module | tokens | plain ms | padded ms | speed-up | max difference |", "|---|---:|---:|---:|---:|---:|"]
    torch.manual_seed(0)
    for name, build in CASES.items():
        module = build()
        for tokens in (8, 32, 512, 4096):
            x = torch.randn(tokens, module.in_features)
            with plain_outputs():
                reference = module(x)
            difference = float((module(x) - reference).abs().max())
            inner = max(1, 4096 // tokens)
            times = interleaved(both_ways(lambda m=module, x=x, n=inner: [m(x) for _ in range(n)]),
                                repeats * (3 if tokens < 512 else 1))
            plain, padded = (statistics.median(times[k]) / inner for k in ("plain", "padded"))
            lines.append(f"| {name} | {tokens} | {1e3 * plain:.3f} | {1e3 * padded:.3f} | {plain / padded:.3f} "
                         f"| {difference:.1e} |")
    return lines


@torch.no_grad()
def folders_table(folders: list[Path], repeats: int) -> list[str]:
    regime = Regime("prefill", 8, 512)
    lines = ["| model | ratio | dense s | plain s | padded s | S plain | S padded |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for folder in folders:
        report = json.loads((folder / "report.json").read_text())
        dense, compressed = load(report["model"], None, "cpu"), load(str(folder), None, "cpu")
        run = timer(compressed, regime, torch.device("cpu"))
        calls = {"dense": timer(dense, regime, torch.device("cpu")), **both_ways(run)}
        times = {k: statistics.median(v) for k, v in interleaved(calls, repeats).items()}
        lines.append(f"| {report['name']} | {report['achieved_ratio']:.2f} | {times['dense']:.3f} "
                     f"| {times['plain']:.3f} | {times['padded']:.3f} | {times['dense'] / times['plain']:.3f} "
                     f"| {times['dense'] / times['padded']:.3f} |")
        del dense, compressed
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help="folders written by lowrank-kit compress")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-modules", action="store_true", help="only the whole models")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}; medians of {args.repeats} interleaved repeats\n")
    if not args.skip_modules:
        print("\n".join(modules_table(args.repeats)) + "\n")
    if args.folders:
        print("Prefill 8×512, seconds; S = dense / compressed\n")
        print("\n".join(folders_table(args.folders, args.repeats)))


if __name__ == "__main__":
    main()
