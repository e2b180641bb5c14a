"""Dense against compressed speed on this machine: the ``lowrank-kit speed`` benchmark.

Both models live in one process and every timed call alternates between them (dense then
compressed, then the other way round), after a warm-up that is not counted, so load from a
neighbour on shared cores hits both alike. Each regime reports the median and the minimum of
its repeats; the speed-up is the ratio of the medians. Beside every speed-up stands the limit
the real shapes allow (``limits``): for compute-bound prefill, the multiply-adds per token of
the whole forward (every matmul module, the vocabulary head included, and attention's score and
value products at that context); for memory-bound decode, the bytes of weights and KV cache
read per step. Peak memory and the KV cache's bytes after a 2,048-token prompt are measured in
a fresh process per model on a CPU (its peak RSS is its own), by the CUDA allocator on a GPU.
It is a benchmark, not a test: its numbers hold for this machine and this run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from lowrank_kit.compressed.quantization import tensor_bytes
from lowrank_kit.models import hf_compat
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.reporting.report import peak_rss_mb


@dataclass(frozen=True)
class Regime:
    """One measured workload: a prefill of ``batch`` × ``tokens``, or ``steps`` decode steps at
    ``batch`` after a prompt of ``tokens`` (the KV cache on)."""

    kind: str  # "prefill" or "decode"
    batch: int
    tokens: int
    steps: int = 0

    @property
    def label(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.batch}×{self.tokens}"
        return f"decode batch {self.batch} ({self.tokens}-token prompt, {self.steps} steps)"

    @property
    def name(self) -> str:
        """What ``--regimes`` calls it: ``prefill-8x512``, ``decode-32``."""
        return f"prefill-{self.batch}x{self.tokens}" if self.kind == "prefill" else f"decode-{self.batch}"

    @property
    def timed_tokens(self) -> int:
        return self.batch * (self.tokens if self.kind == "prefill" else self.steps)


REGIMES = (
    Regime("prefill", 1, 512), Regime("prefill", 8, 512), Regime("prefill", 1, 2048), Regime("prefill", 8, 2048),
    Regime("decode", 1, 128, 32), Regime("decode", 8, 128, 32), Regime("decode", 32, 128, 32),
)
MEMORY_TOKENS = 2048


def select(names: list[str] | None) -> tuple[Regime, ...]:
    """The regimes a list of kinds (``prefill``, ``decode``) or names (``prefill-8x512``) picks; all for none."""
    if not names:
        return REGIMES
    known = {r.kind for r in REGIMES} | {r.name for r in REGIMES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown regime '{unknown[0]}'; choose from {', '.join(sorted(known))}")
    return tuple(r for r in REGIMES if r.kind in names or r.name in names)


# --- The limits the shapes allow -------------------------------------------------------------


def _matrices(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if t.dim() >= 2]


def matmul_modules(model: nn.Module) -> list[nn.Module]:
    """The leaf modules whose forward multiplies by a weight matrix (linears, low-rank factors, the
    vocabulary head); not the embedding, which only looks rows up."""
    return [m for m in model.modules() if not isinstance(m, nn.Embedding) and next(m.children(), None) is None
            and _matrices(m)]


def matmul_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every weight matrix a forward multiplies with (factors of low-rank modules, the vocabulary
    head even when it is tied to the embedding), each once per module that uses it."""
    return [t for module in matmul_modules(model) for t in _matrices(module)]


def _window(config: Any, layer: int) -> int | None:
    """The attention window of a layer (None: the whole context)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and types[layer] != "sliding_attention"):
        return None
    return int(window)


def _mean_context(tokens: int, window: int | None) -> float:
    """Mean number of keys a query of a causal prefill of ``tokens`` attends to."""
    if window is None or window >= tokens:
        return (tokens + 1) / 2
    return (window * (window + 1) / 2 + (tokens - window) * window) / tokens


@dataclass(frozen=True)
class Shapes:
    """What the limits are computed from, read off the real modules."""

    matmul_macs: int  # multiply-adds per token of every matmul module
    weight_bytes: int  # bytes of those weights (read once per decode step)
    layers: list[tuple[int, int, int, int | None]]  # per layer: heads, kv heads, qk dim + v dim, window
    element_bytes: int  # of the KV cache

    @classmethod
    def of(cls, model: nn.Module) -> Shapes:
        adapter = adapter_for(model)
        g, config = adapter.geometry, adapter.config
        weights = matmul_weights(model)
        layers = []
        for index in range(g.layers):
            v_dim = getattr(adapter.attention(index), "v_head_dim", None) or g.head_dim
            layers.append((g.heads, g.kv_heads, g.head_dim + v_dim, _window(config, index)))
        element = next(model.parameters()).element_size()
        return cls(sum(w.numel() for w in weights), sum(tensor_bytes(w) for w in weights), layers, element)

    def prefill_macs_per_token(self, tokens: int) -> float:
        attention = sum(h * dims * _mean_context(tokens, w) for h, _, dims, w in self.layers)
        return self.matmul_macs + attention

    def kv_bytes(self, batch: int, context: int) -> int:
        """Bytes the KV cache holds after ``context`` tokens; a sliding-window layer keeps the last
        window − 1 (with the new token's own, a query sees ``window`` keys)."""
        return sum(batch * kv * dims * min(context, w - 1 if w else context) * self.element_bytes
                   for _, kv, dims, w in self.layers)

    def decode_bytes_per_step(self, batch: int, context: int) -> float:
        return self.weight_bytes + self.kv_bytes(batch, context)


def limit(dense: Shapes, compressed: Shapes, regime: Regime) -> float:
    """The speed-up the shapes allow: fewer multiply-adds (prefill) or fewer bytes read (decode)."""
    if regime.kind == "prefill":
        return dense.prefill_macs_per_token(regime.tokens) / compressed.prefill_macs_per_token(regime.tokens)
    context = regime.tokens + regime.steps // 2
    return (dense.decode_bytes_per_step(regime.batch, context)
            / compressed.decode_bytes_per_step(regime.batch, context))


# --- Timing ----------------------------------------------------------------------------------


class StepClock(BaseStreamer):
    """Times decoding apart from the prompt: generate hands the streamer the prompt, then each new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        self.stamps.append(time.perf_counter())


def sample_ids(model: nn.Module, batch: int, tokens: int) -> torch.Tensor:
    """Seeded random token ids of that shape (the same for dense and compressed, run after run)."""
    generator = torch.Generator().manual_seed(batch * 100_003 + tokens)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(100, min(vocab, 20_000), (batch, tokens), generator=generator)


@torch.no_grad()
def decode_span(model: nn.Module, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """Greedy decoding of ``steps`` tokens after ``ids``; the clock times of the first decode step's
    start and the last one's end (the prompt's forward left out)."""
    clock = StepClock()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps + 1,
                   min_new_tokens=steps + 1, pad_token_id=0, streamer=clock)
    # stamps: the prompt, the token the prefill produced, one per decode step, the end
    return clock.stamps[1], clock.stamps[-2]


def timer(model: nn.Module, regime: Regime, device: torch.device, ids: torch.Tensor | None = None
          ) -> Callable[[], float]:
    """A call that runs the regime once on ``model`` and returns its seconds (decode: steps only);
    on ``ids`` when given (of the regime's shape), else on seeded random tokens."""
    ids = (sample_ids(model, regime.batch, regime.tokens) if ids is None else ids).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def prefill() -> float:
        sync()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        sync()
        return time.perf_counter() - start

    @torch.no_grad()
    def decode() -> float:
        first, last = decode_span(model, ids, regime.steps)
        sync()
        return last - first

    return prefill if regime.kind == "prefill" else decode


def interleaved(calls: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every call, ``repeats`` times each after ``warmup`` uncounted rounds, alternating
    the order every round so neither model always runs right after the other."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            seconds = calls[name]()
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def quick_compare(models: dict[str, nn.Module], window: torch.Tensor, steps: int = 32, repeats: int = 3
                  ) -> dict[str, dict[str, float]]:
    """Prefill tokens/s of ``window`` and decode tokens/s of ``steps`` steps after its first 128
    tokens, per model, medians of interleaved repeats: a report's quick before/after check (the
    int8 report), not the benchmark."""
    prefill = Regime("prefill", window.shape[0], window.shape[1])
    decode = Regime("decode", window.shape[0], min(128, window.shape[1]), steps)
    p = interleaved({n: timer(m, prefill, window.device, window) for n, m in models.items()}, repeats)
    d = interleaved({n: timer(m, decode, window.device, window[:, : decode.tokens]) for n, m in models.items()},
                    repeats)
    return {n: {"prefill_tok_s": prefill.timed_tokens / statistics.median(p[n]),
                "decode_tok_s": decode.timed_tokens / statistics.median(d[n])} for n in models}


# --- Memory (a fresh process per model on a CPU) ---------------------------------------------


def load(which: str, dtype: str | None, device: str) -> nn.Module:
    """A saved compressed folder, or the dense model it names (an alias, folder or hub id)."""
    from lowrank_kit.models.loading import load_model
    from lowrank_kit.persistence.saving import load_pretrained

    model = load_pretrained(which) if (Path(which) / "report.json").is_file() else load_model(which)[0]
    if dtype is not None:
        model.to(getattr(torch, dtype))
    return model.to(device).eval()


@torch.no_grad()
def memory(which: str, dtype: str | None, device: str, tokens: int = MEMORY_TOKENS) -> dict[str, float]:
    """Peak memory of loading ``which`` and a ``tokens`` prompt with the KV cache; the cache's bytes."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = load(which, dtype, device)
    ids = sample_ids(model, 1, tokens).to(device)
    out = model(input_ids=ids, use_cache=True)
    kv = hf_compat.cache_bytes(hf_compat.output_cache(out))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
    return {"peak_mb": peak, "kv_cache_mb": kv / 2**20}


def in_fresh_process(function: str, *args: Any) -> Any:
    """``function`` of this module called in a new Python process (its result through JSON): a
    peak measured there is that model's alone. A plain subprocess, not a multiprocessing pool,
    whose semaphores the resource tracker reports as leaked at exit."""
    code = ("import json, sys; from lowrank_kit.harness import speed; "
            "print(json.dumps(getattr(speed, sys.argv[1])(*json.loads(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", code, function, json.dumps(args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {function} process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_elsewhere(which: str, dtype: str | None, device: str) -> dict[str, float]:
    return in_fresh_process("memory", which, dtype, device)


# --- The benchmark -----------------------------------------------------------------------------


def _stats(seconds: list[float], tokens: int) -> dict[str, float]:
    median = statistics.median(seconds)
    return {"median_s": median, "min_s": min(seconds), "tok_s": tokens / median}


def measure(folder: Path, dense: nn.Module, regimes: tuple[Regime, ...], repeats: int, device: torch.device,
            dtype: str | None, memory_check: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every regime on the dense model and the compressed one in ``folder``, interleaved."""
    report = json.loads((folder / "report.json").read_text())
    compressed = load(str(folder), dtype, str(device))
    shapes = {"dense": Shapes.of(dense), "compressed": Shapes.of(compressed)}
    rows = []
    for regime in regimes:
        say(f"{folder.name}: {regime.label}")
        times = interleaved({"dense": timer(dense, regime, device), "compressed": timer(compressed, regime, device)},
                            repeats)
        d, c = _stats(times["dense"], regime.timed_tokens), _stats(times["compressed"], regime.timed_tokens)
        rows.append({**asdict(regime), "label": regime.label, "dense": d, "compressed": c,
                     "speedup": d["median_s"] / c["median_s"], "limit": limit(shapes["dense"], shapes["compressed"],
                                                                               regime)})
    result: dict[str, Any] = {
        "folder": str(folder), "recipe": report["name"], "achieved_ratio": report["achieved_ratio"],
        "device": str(device), "dtype": dtype or str(next(compressed.parameters()).dtype).removeprefix("torch."),
        "repeats": repeats, "threads": torch.get_num_threads(), "rows": rows,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),  # read by OpenMP when torch loaded
        "kv_cache_model_mb": {k: s.kv_bytes(1, MEMORY_TOKENS) / 2**20 for k, s in shapes.items()},
    }
    if memory_check:
        say(f"{folder.name}: memory at a {MEMORY_TOKENS}-token prompt")
        result["memory"] = {"dense": _memory_elsewhere(report["model"], dtype, str(device)),
                            "compressed": _memory_elsewhere(str(folder), dtype, str(device))}
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines += [f"### {r['recipe']} (achieved ratio {r['achieved_ratio']:.4f}; {r['device']}, {r['dtype']}, "
                  f"{r['threads']} threads, OMP_WAIT_POLICY {r.get('omp_wait_policy', 'unset')}, "
                  f"{r['repeats']} interleaved repeats after a warm-up)", "",
                  "| regime | dense tok/s | compressed tok/s | dense median / min s | compressed median / min s "
                  "| speed-up S | limit L | (S−1)/(L−1) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            d, c, s, lim = row["dense"], row["compressed"], row["speedup"], row["limit"]
            share = f"{(s - 1) / (lim - 1):.0%}" if lim > 1.001 else "–"
            lines.append(f"| {row['label']} | {d['tok_s']:.1f} | {c['tok_s']:.1f} | {d['median_s']:.3f} / "
                         f"{d['min_s']:.3f} | {c['median_s']:.3f} / {c['min_s']:.3f} | {s:.3f}× | {lim:.3f}× "
                         f"| {share} |")
        lines += ["", f"| batch 1, {MEMORY_TOKENS}-token prompt | dense | compressed | ratio |", "|---|---:|---:|---:|"]
        table = [("KV cache from the shapes (MB)", r["kv_cache_model_mb"]["dense"],
                  r["kv_cache_model_mb"]["compressed"])]
        if "memory" in r:
            m = r["memory"]
            table += [("KV cache measured (MB)", m["dense"]["kv_cache_mb"], m["compressed"]["kv_cache_mb"]),
                      ("peak memory (MB)", m["dense"]["peak_mb"], m["compressed"]["peak_mb"])]
        lines += [f"| {name} | {d:.1f} | {c:.1f} | {c / d:.3f} |" for name, d, c in table] + [""]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Speed-up against achieved ratio per recipe, one panel per regime, limits dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = list(dict.fromkeys(row["label"] for r in results for row in r["rows"]))
    columns = min(len(labels), 4)
    fig, axes = plt.subplots(math.ceil(len(labels) / columns), columns, figsize=(4 * columns, 3.4 *
                             math.ceil(len(labels) / columns)), squeeze=False)
    for ax, label in zip(axes.flat, labels, strict=False):
        for i, recipe in enumerate(dict.fromkeys(r["recipe"] for r in results)):
            points = sorted((r["achieved_ratio"], row["speedup"], row["limit"]) for r in results
                            if r["recipe"] == recipe for row in r["rows"] if row["label"] == label)
            x, s, lim = zip(*points, strict=True)
            ax.plot(x, s, marker="o", color=f"C{i}", label=recipe)
            ax.plot(x, lim, linestyle="--", color=f"C{i}", alpha=0.6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("achieved ratio")
        ax.set_ylabel("speed-up (dashed: limit)")
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_speed(folders: list[Path], output: Path, repeats: int = 5, regimes: tuple[Regime, ...] = REGIMES,
              device: str = "cpu", dtype: str | None = None, memory_check: bool = True,
              say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure every folder against its dense model; write speed.md, speed.json and speed.png in ``output``."""
    for folder in folders:
        if not (folder / "report.json").is_file():
            raise FileNotFoundError(f"'{folder}' is not a folder written by lowrank-kit compress (no report.json)")
    output.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in output.iterdir() if not p.name.startswith("speed.")]
    if foreign:
        raise FileExistsError(f"'{output}' holds files that are not a speed benchmark's ({foreign[0]}, ...); "
                              "choose another --output")
    results, dense_models = [], {}
    for folder in folders:
        model = json.loads((folder / "report.json").read_text())["model"]
        if model not in dense_models:
            dense_models = {model: load(model, dtype, device)}  # one dense model in memory at a time
        results.append(measure(folder, dense_models[model], regimes, repeats, torch.device(device), dtype,
                               memory_check, say))
        (output / "speed.json").write_text(json.dumps(results, indent=1))
    (output / "speed.md").write_text(markdown(results))
    plot(results, output / "speed.png")
    return results
