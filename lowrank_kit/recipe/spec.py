"""What a recipe says, as typed objects: every section with its defaults and help text.

``recipe.loading`` turns YAML into these; nothing here knows the strategy registry, so the run
state and the hook specifications can name a Recipe without importing the extension machinery.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lowrank_kit.extension.strategy import Strategy
from lowrank_kit.recipe.schema import RecipeError, join, to_dict


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelSpec:
    path: str = _help("built-in alias (smollm2-135m, gemma3-270m), local folder, or hub id")
    gguf_file: str | None = _help("GGUF file inside the `path` folder (aliases know theirs)", default=None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("weights dtype while compressing", default="float32")


@dataclass
class Source:
    """One calibration text of a mixture, with its share of the windows."""

    dataset: str = _help("a dataset name or file, as for calibration.dataset", default="austen-emma")
    weight: float = _help("its share of the windows, relative to the other sources' weights", default=1.0)


@dataclass
class DataSpec:
    dataset: str | list[str | Source] = field(default="austen-emma", metadata={"help": (
        "austen-emma, austen-persuasion, python-reference, gnu-licenses, a .txt/.json/.jsonl file, or wikitext2/c4; "
        "or a list of them (each a name or {dataset, weight}) whose windows are mixed in proportion to the weights")})
    samples: int = _help("number of calibration windows", default=32)
    seq_len: int = _help("tokens per window", default=512)
    seed: int = _help("seed of the window sampling", default=0)
    batch_size: int = _help("windows per forward pass", default=4)
    text_field: str = _help("field holding the text in JSON/JSONL files", default="text")
    pipeline: Literal["sequential", "dense_input"] | None = _help(
        "the calibration pass of the compression (pipeline.passes): sequential takes a layer's statistics on "
        "inputs from the already compressed earlier layers (FLAT-LLM's order); dense_input on the dense "
        "model's activations (SVD-LLM's and ASVD's whitening), one forward per layer, gathered once by a "
        "bench for all ratios and recipes. Default sequential", default=None)
    sequential: bool | None = _help("older spelling of pipeline: true = sequential, false = dense_input",
                                    default=None)

    def sources(self) -> list[Source]:
        """The calibration texts with their weights (one source of weight 1 for a single name)."""
        if isinstance(self.dataset, str):
            return [Source(self.dataset, 1.0)]
        return [Source(item, 1.0) if isinstance(item, str) else item for item in self.dataset]

    def check(self, path: str) -> None:
        if isinstance(self.dataset, list):
            if not self.dataset:
                raise RecipeError(join(path, "dataset"), "an empty list: name at least one dataset")
            for i, source in enumerate(self.sources()):
                if not source.weight > 0:
                    raise RecipeError(join(join(path, "dataset"), i) + ".weight",
                                      f"must be positive, got {source.weight}")
            if len(self.dataset) > self.samples:
                raise RecipeError(join(path, "dataset"), f"{len(self.dataset)} sources but only {self.samples} "
                                                         "windows: every source needs at least one")
        for key in ("samples", "seq_len", "batch_size"):
            if getattr(self, key) < 1:
                raise RecipeError(join(path, key), f"must be at least 1, got {getattr(self, key)}")
        if self.samples * self.seq_len > MAX_CALIBRATION_TOKENS:
            raise RecipeError(join(path, "samples"), f"{self.samples}×{self.seq_len} tokens is beyond "
                                                     f"{MAX_CALIBRATION_TOKENS:,}; FLAT-LLM calibrates 7B-70B models "
                                                     "on 256×4096")
        if not 0 <= self.seed < 2**32:
            raise RecipeError(join(path, "seed"), f"must lie in [0, 2**32), got {self.seed}")
        if self.sequential is not None:
            implied = "sequential" if self.sequential else "dense_input"
            if self.pipeline not in (None, implied):
                raise RecipeError(join(path, "sequential"), f"says {implied} but pipeline says {self.pipeline}; "
                                                            "keep pipeline only")
            self.pipeline, self.sequential = implied, None  # translated: the resolved recipe names the pipeline
        self.pipeline = self.pipeline or "sequential"


# A bound far above any real calibration set (FLAT-LLM's 256×4096 is about a million tokens).
MAX_CALIBRATION_TOKENS = 100_000_000


@dataclass
class TargetSpec:
    ratio: float = _help("fraction of decoder-layer linear weights to remove, in (0, 1)")
    multiple: int = _help("every planned rank, value dim and MLP width is a multiple of this (or the module "
                          "stays dense), whichever allocator plans: 8 on CPUs, 32 or 64 on GPUs", default=1)
    break_even: float = _help("a factorised module (two matmuls) keeping this share of its dense parameters or "
                              "more stays dense instead; 1: only when it saves nothing. On a CPU the two matmuls "
                              "already run slower than dense from about 0.7 of the parameters "
                              "(benchmarks/rank_multiples.py)", default=1.0)

    def check(self, path: str) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise RecipeError(
                join(path, "ratio"), f"must lie strictly between 0 and 1 (e.g. 0.2), got {self.ratio}"
            )
        if self.multiple < 1:
            raise RecipeError(join(path, "multiple"), f"must be at least 1, got {self.multiple}")
        if not 0.0 < self.break_even <= 1.0:
            raise RecipeError(join(path, "break_even"), f"must lie in (0, 1], got {self.break_even}")


@dataclass
class EvalSpec:
    metric: Literal["perplexity", "generation", "lastword", "lm_eval"] = _help(
        "perplexity; generation: greedy continuations scored by ROUGE-L against the dense model's; "
        "lastword: accuracy of predicting held-out paragraphs' final word; lm_eval: lm-evaluation-harness "
        "tasks (the eval extra)", default="perplexity")
    dataset: str = _help("evaluation text (see calibration.dataset); for generation also a .jsonl of "
                         "prompt/reference rows", default="austen-persuasion")
    seq_len: int = _help("perplexity: window length, windows do not overlap; lastword: longest context",
                         default=512)
    max_tokens: int = _help("perplexity: evaluate on the first this many tokens", default=8192)
    text_field: str = _help("field holding the text in JSON/JSONL files", default="text")
    prompts: int = _help("generation: number of prompts (passages from the second half of a text); "
                         "lastword: number of paragraphs", default=32)
    prompt_len: int = _help("generation: prompt length in tokens for passages of a text", default=128)
    new_tokens: int = _help("generation: tokens generated greedily per prompt", default=64)
    batch_size: int = _help("generation and lastword: prompts per forward/generate call", default=8)
    prompt_field: str = _help("generation from JSONL: field holding the prompt", default="prompt")
    reference_field: str = _help("generation from JSONL: field holding the reference (optional)",
                                 default="reference")
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "lm_eval: task names (lm-eval's, or ones defined in include_path)"})
    num_fewshot: int | None = _help("lm_eval: few-shot examples per question (null: each task's default)",
                                    default=None)
    limit: int | None = _help("lm_eval: at most this many examples per task (null: all)", default=None)
    include_path: str | None = _help("lm_eval: folder of extra task YAML files", default=None)

    def check(self, path: str) -> None:
        if self.metric == "lm_eval":
            if not self.tasks:
                raise RecipeError(join(path, "tasks"), "lm_eval needs at least one task, e.g. tasks: [arc_easy]")
            if importlib.util.find_spec("lm_eval") is None:
                raise RecipeError(join(path, "metric"), "lm-eval is not installed: pip install 'lowrank-kit[eval]'")
            if self.include_path is not None and not Path(self.include_path).is_dir():
                raise RecipeError(join(path, "include_path"), f"no folder at '{self.include_path}'")
        if self.seq_len < 2 or self.max_tokens < self.seq_len:
            raise RecipeError(path, "needs seq_len >= 2 and max_tokens >= seq_len")
        for key in ("prompts", "prompt_len", "new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise RecipeError(join(path, key), f"must be at least 1, got {getattr(self, key)}")


@dataclass
class QuantizeSpec:
    weights: Literal["none", "int8"] = _help(
        "after the low-rank step: int8 weight-only quantisation (one scale per row) of every decoder weight, "
        "low-rank factors included, and of the embedding (the quant extra, torchao)", default="none")
    compare: bool = _help("measure perplexity (first perplexity evaluation) and speed before and after "
                          "quantising, for the report (holds a second copy of the model meanwhile)", default=True)

    def check(self, path: str) -> None:
        if self.weights != "none" and importlib.util.find_spec("torchao") is None:
            raise RecipeError(join(path, "weights"), "weight quantisation needs torchao: "
                                                     "pip install 'lowrank-kit[quant]'")


@dataclass
class RuntimeSpec:
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps", "tpu"] = _help(
        "Lightning Fabric accelerator", default="auto")
    devices: int = _help("processes per node for data-parallel calibration (on the CPU: gloo processes)",
                         default=1)
    num_nodes: int = _help("nodes of a multi-node run (launched by torchrun or SLURM, see docs/scaling.md)",
                           default=1)
    precision: Literal["32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "16-true", "bf16-true"] = _help(
        "Fabric precision of calibration forwards (statistics stay float64)", default="32-true")
    backward_chunk: int = _help("windows per backward pass when scoring needs gradients (memory bound); "
                                "a batch's gradient is accumulated over its chunks", default=1)
    offload: Literal["none", "cpu", "disk"] = _help(
        "where decoder layers live between uses: none (all on the device), cpu (host memory, each moved "
        "to the device while used), disk (read lazily from safetensors, written back once transformed)",
        default="none")
    inputs_memory_mb: float | None = _help(
        "calibration activations held in memory between layers, at most (MB); more are written to "
        "memory-mapped files beside the output (null: always in memory)", default=None)

    def check(self, path: str) -> None:
        if self.devices < 1:
            raise RecipeError(join(path, "devices"), f"must be at least 1, got {self.devices}")
        if self.num_nodes < 1:
            raise RecipeError(join(path, "num_nodes"), f"must be at least 1, got {self.num_nodes}")
        if self.inputs_memory_mb is not None and self.inputs_memory_mb < 0:
            raise RecipeError(join(path, "inputs_memory_mb"),
                              f"must be at least 0 (or null), got {self.inputs_memory_mb}")
        if self.backward_chunk < 1:
            raise RecipeError(join(path, "backward_chunk"), f"must be at least 1, got {self.backward_chunk}")


@dataclass
class OutputSpec:
    dir: str = _help("output folder; {name} and {ratio} are filled in", default="runs/{name}-{ratio}")
    save_model: bool = _help("write the compressed model (safetensors) to the folder", default=True)
    overwrite: bool = _help("replace an existing output folder", default=False)
    cache_dir: str | None = _help("folder of cached scores and dense evaluations shared by runs; null: no cache",
                                  default="runs/.cache")

    def check(self, path: str) -> None:
        try:
            folder = self.dir.format(name="name", ratio="0.2")
        except (KeyError, IndexError, ValueError) as err:
            raise RecipeError(join(path, "dir"), f"'{self.dir}' cannot be filled in ({type(err).__name__}: {err}); "
                                                 "only {name} and {ratio} are known") from None
        if not folder.strip() or Path(folder).resolve() in (Path.cwd().resolve(), Path(Path.cwd().anchor)):
            raise RecipeError(join(path, "dir"), f"'{self.dir}' is the working directory or the filesystem root; "
                                                 "name a folder of its own, e.g. runs/{name}-{ratio}")


@dataclass
class StrategyChoice:
    """One selected strategy with its validated arguments (and targets, for transforms)."""

    point: str
    plugin: str
    args: Any
    targets: list[str] = field(default_factory=list)
    cls: type[Strategy] = field(default=Strategy, compare=False, repr=False)  # the validated class

    def build(self) -> Strategy:
        return self.cls(self.args, self.targets)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"plugin": self.plugin}
        if self.point == "transform":
            out["targets"] = list(self.targets)
        out.update(to_dict(self.args))
        return out


@dataclass
class Recipe:
    name: str
    model: ModelSpec
    calibration: DataSpec
    target: TargetSpec
    transform: list[StrategyChoice]
    allocate: StrategyChoice
    collect: list[StrategyChoice] = field(default_factory=list)
    score: list[StrategyChoice] = field(default_factory=list)
    decode: StrategyChoice | None = None
    evaluate: list[EvalSpec] = field(default_factory=list)
    quantize: QuantizeSpec = field(default_factory=QuantizeSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    source: str | None = None

    def strategies(self) -> list[StrategyChoice]:
        return [*self.collect, *self.score, self.allocate, *self.transform, *([self.decode] if self.decode else [])]

    def calibration_data(self) -> dict[str, Any]:
        """What determines the calibration tokens (not how statistics are taken from them)."""
        return {k: v for k, v in to_dict(self.calibration).items() if k not in ("pipeline", "sequential")}

    def output_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name, ratio=f"{self.target.ratio:g}"))

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every default filled in; loading it gives the same recipe."""
        return {
            "name": self.name,
            "model": to_dict(self.model),
            "calibration": to_dict(self.calibration),
            "target": to_dict(self.target),
            "collect": [c.to_dict() for c in self.collect],
            "score": [c.to_dict() for c in self.score],
            "allocate": self.allocate.to_dict(),
            "transform": [c.to_dict() for c in self.transform],
            "decode": self.decode.to_dict() if self.decode else None,
            "evaluate": [to_dict(e) for e in self.evaluate],
            "quantize": to_dict(self.quantize),
            "runtime": to_dict(self.runtime),
            "output": to_dict(self.output),
        }


SECTIONS: dict[str, Any] = {
    "model": ModelSpec,
    "calibration": DataSpec,
    "target": TargetSpec,
    "quantize": QuantizeSpec,
    "runtime": RuntimeSpec,
    "output": OutputSpec,
}
TOP_KEYS = ("name", *SECTIONS, "collect", "score", "allocate", "transform", "decode", "evaluate")


