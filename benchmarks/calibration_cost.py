"""What calibration costs, as multiples of one dense forward over the same calibration tokens.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/calibration_cost.py [RECIPE ...] [--repeats 2]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/calibration_cost.py flat_llm --profile 25

Loads the recipe's model once; then, alternately, times one dense forward of the whole model
over the recipe's calibration batches (and a forward+backward, the unit of Fisher scoring) and
compresses with each recipe (no evaluation), reading the engine's own phase timings. Every
ratio is a phase's time over the median dense time of the same run, so the shared cores' load
cancels. ``--profile N`` prints the N operators that take the most time in the score and
compress phases of the first recipe (torch's profiler, self time), which says where calibration
time goes. ``--phases`` splits each recipe's last compression into its passes: the scoring
pass, the layer pass's statistics forwards, its compressed forwards (attention and MLP apart:
what a layer's statistics cannot give) and the transforms, each over the dense forward, which
says what part of a ratio any change to the decompositions could still remove. Printed as
Markdown tables.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from lowrank_kit import api
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.models.loading import load_model
from lowrank_kit.pipeline import passes
from lowrank_kit.pipeline.engine import calibration_batches

DEFAULT = ["flat_llm", "svd_llm", "flrc_static"]


def dense_seconds(model: torch.nn.Module, batches: list[torch.Tensor], backward: bool) -> float:
    """One pass of the whole model over the batches: no_grad forward, or forward + backward of the loss."""
    start = time.perf_counter()
    for batch in batches:
        if backward:
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(input_ids=batch, use_cache=False)
    return time.perf_counter() - start


def _phase(timings: dict[str, float], name: str) -> float:
    """Seconds of the phases whose label starts with ``name`` ("score (forward + backward)" too)."""
    return sum(seconds for label, seconds in timings.items() if label.startswith(name))


def compress_timings(name: str, model: torch.nn.Module, tokenizer: object, folder: str) -> dict[str, float]:
    result = api.compress(name, ["evaluate=[]"], model=model, tokenizer=tokenizer, overwrite=True, progress=False,
                          checkpoint=False, output={"dir": f"{folder}/{name}", "cache_dir": None})
    return dict(result.report["timings_s"])


def profile(name: str, model: torch.nn.Module, tokenizer: object, folder: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        compress_timings(name, model, tokenizer, folder)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"\n### Where {name}'s load-to-save time goes (self CPU time, {total / 1e6:.1f} s profiled)\n")
    print("| operator | calls | self s | share |")
    print("|---|---:|---:|---:|")
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"| {event.key} | {event.count} | {event.self_cpu_time_total / 1e6:.2f} | "
              f"{event.self_cpu_time_total / total:.1%} |")


@contextlib.contextmanager
def phase_clock(model: torch.nn.Module) -> Iterator[dict[str, float]]:
    """Seconds by phase while a compression runs: the passes' methods are wrapped with a clock,
    and each layer's attention and MLP with forward hooks (counted only in compressed forwards)."""
    seconds: dict[str, float] = collections.defaultdict(float)
    inside: list[str] = []
    restore: list[Callable[[], None]] = []

    def clock(cls: type, method: str, label: Callable[[object], str]) -> None:
        original = cls.__dict__[method]

        @functools.wraps(original)
        def timed(self: object, *args: object, **kwargs: object) -> object:
            name = label(self)
            inside.append(name)
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                inside.pop()
        setattr(cls, method, timed)
        restore.append(lambda: setattr(cls, method, original))

    def layer_forward(self: object) -> str:  # a dense-input pass's are its statistics forwards, inside its gather
        return "compressed forwards" if isinstance(self, passes.SequentialPass) else "dense layer forwards"

    for cls in (passes.SequentialPass, passes.DenseInputPass):
        clock(cls, "gather", lambda _: "layer pass: gather")
    clock(passes.LayerPass, "advance", layer_forward)
    adapter, handles, started = adapter_for(model), [], {}
    for index in range(len(adapter.layers)):
        for part, module in (("attention", adapter.attention(index)), ("MLP", adapter.mlp(index))):
            def before(_m: object, _a: object, part: str = part) -> None:
                started[part] = time.perf_counter()

            def after(_m: object, _a: object, _o: object, part: str = part) -> None:
                if inside and inside[-1] == "compressed forwards":
                    seconds[f"compressed forwards: {part}"] += time.perf_counter() - started[part]
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield seconds
    finally:
        for undo in restore:
            undo()
        for handle in handles:
            handle.remove()


def print_phases(name: str, timings: dict[str, float], seconds: dict[str, float], forward: float) -> None:
    """The compression's passes as seconds and multiples of the dense forward."""
    compressed = seconds.get("compressed forwards", 0.0)
    gathered = seconds.get("layer pass: gather", 0.0)
    statistics_forwards = gathered - compressed  # a sequential pass's gather also moves its inputs on
    attention, mlp = seconds.get("compressed forwards: attention", 0.0), seconds.get("compressed forwards: MLP", 0.0)
    rows = [
        ("scoring pass", _phase(timings, "score")),
        ("statistics forwards", statistics_forwards),
        ("compressed forwards: attention", attention),
        ("compressed forwards: MLP", mlp),
        ("compressed forwards: the rest (norms, residuals, moving inputs)", compressed - attention - mlp),
        ("transforms and the rest of compress", _phase(timings, "compress") - gathered),
    ]
    print(f"\n### {name}'s passes (one compression; dense forward {forward:.2f} s)\n")
    print("| phase | s | × dense forward |")
    print("|---|---:|---:|")
    for label, value in rows:
        print(f"| {label} | {value:.2f} | {value / forward:.2f}× |")
    total = sum(value for _, value in rows)
    print(f"| **score + compress** | **{total:.2f}** | **{total / forward:.2f}×** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=1, help="compressions per recipe (interleaved)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest operators")
    parser.add_argument("--no-backward", action="store_true",
                        help="skip the forward+backward timings (the unit of Fisher scoring only)")
    parser.add_argument("--phases", action="store_true", help="split each recipe's last compression by pass")
    args = parser.parse_args()
    first = api.load_recipe(args.recipes[0])
    model, tokenizer = load_model(first.model.path, first.model.gguf_file, first.model.dtype)
    batches = calibration_batches(first.calibration, tokenizer, adapter_for(model).needs_bos)
    tokens = sum(b.numel() for b in batches)
    forward, backward, phases = [], [], {name: [] for name in args.recipes}
    clocked: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        dense_seconds(model, batches[:1], False)  # warm-up
        for _ in range(args.repeats):
            for name in args.recipes:
                forward.append(dense_seconds(model, batches, False))
                if not args.no_backward:
                    backward.append(dense_seconds(model, batches, True))
                last = args.phases and len(phases[name]) == args.repeats - 1
                with phase_clock(model) if last else contextlib.nullcontext({}) as seconds:
                    phases[name].append(compress_timings(name, model, tokenizer, folder))
                if last:
                    clocked[name] = seconds
        forward.append(dense_seconds(model, batches, False))
        if not args.no_backward:
            backward.append(dense_seconds(model, batches, True))
        fwd = statistics.median(forward)
        bwd = statistics.median(backward) if backward else None
        both = f"forward+backward {bwd:.2f} s (min {min(backward):.2f})" if bwd else "no forward+backward"
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(batches)} batches, {tokens} "
              f"calibration tokens; dense forward {fwd:.2f} s (min {min(forward):.2f}), {both}, "
              f"medians of {len(forward)}\n")
        print("| recipe | score s | compress s | score+compress / forward | score / forward+backward |")
        print("|---|---:|---:|---:|---:|")
        for name, runs in phases.items():
            score = statistics.median(_phase(r, "score") for r in runs)
            work = statistics.median(_phase(r, "score") + _phase(r, "compress") for r in runs)
            per_backward = f"{score / bwd:.2f}×" if bwd else "–"
            print(f"| {name} | {score:.2f} | {work - score:.2f} | {work / fwd:.2f}× | {per_backward} |")
        for name, seconds in clocked.items():
            print_phases(name, phases[name][-1], seconds, fwd)
        if args.profile:
            profile(args.recipes[0], model, tokenizer, folder, args.profile)


if __name__ == "__main__":
    main()
