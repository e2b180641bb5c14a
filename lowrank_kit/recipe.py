"""Recipes: YAML → validated objects, before any model is loaded.

Every error names its place (file, line and key path) and, for an unknown key or strategy,
the closest valid name. ``--set key.path=value`` overrides are applied to the raw data first,
so they are validated like the file itself.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lowrank_kit.data import check_name
from lowrank_kit.schema import RecipeError, closest, from_dict, join, to_dict
from lowrank_kit.strategy import HOOK_POINTS, Strategy, registry


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelSpec:
    path: str = _help("built-in alias (smollm2-135m, gemma3-270m), local folder, or hub id")
    gguf_file: str | None = _help("GGUF file inside the `path` folder (aliases know theirs)", default=None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("weights dtype while compressing", default="float32")


@dataclass
class DataSpec:
    dataset: str = _help("austen-emma, austen-persuasion, a .txt/.json/.jsonl file, or wikitext2/c4",
                         default="austen-emma")
    samples: int = _help("number of calibration windows", default=32)
    seq_len: int = _help("tokens per window", default=512)
    seed: int = _help("seed of the window sampling", default=0)
    batch_size: int = _help("windows per forward pass", default=4)
    text_field: str = _help("field holding the text in JSON/JSONL files", default="text")
    sequential: bool = _help(
        "true: a layer's statistics are taken on inputs from the already compressed earlier layers "
        "(FLAT-LLM's order); false: on the dense model's activations (SVD-LLM's and ASVD's whitening), "
        "one forward per layer, and a bench gathers them once for all ratios and recipes", default=True)

    def check(self, path: str) -> None:
        for key in ("samples", "seq_len", "batch_size"):
            if getattr(self, key) < 1:
                raise RecipeError(join(path, key), f"must be at least 1, got {getattr(self, key)}")


@dataclass
class TargetSpec:
    ratio: float = _help("fraction of decoder-layer linear weights to remove, in (0, 1)")

    def check(self, path: str) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise RecipeError(
                join(path, "ratio"), f"must lie strictly between 0 and 1 (e.g. 0.2), got {self.ratio}"
            )


@dataclass
class EvalSpec:
    metric: Literal["perplexity", "generation", "lastword"] = _help(
        "perplexity; generation: greedy continuations scored by ROUGE-L against the dense model's; "
        "lastword: accuracy of predicting held-out paragraphs' final word", default="perplexity")
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

    def check(self, path: str) -> None:
        if self.seq_len < 2 or self.max_tokens < self.seq_len:
            raise RecipeError(path, "needs seq_len >= 2 and max_tokens >= seq_len")
        for key in ("prompts", "prompt_len", "new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise RecipeError(join(path, key), f"must be at least 1, got {getattr(self, key)}")


@dataclass
class RuntimeSpec:
    accelerator: str = _help("Lightning Fabric accelerator: auto, cpu, cuda, mps", default="auto")
    devices: int = _help("devices for data-parallel calibration", default=1)
    precision: str = _help("Fabric precision of calibration forwards (statistics stay float64)", default="32-true")
    backward_chunk: int = _help("windows per backward pass when scoring needs gradients (memory bound); "
                                "a batch's gradient is accumulated over its chunks", default=1)

    def check(self, path: str) -> None:
        if self.backward_chunk < 1:
            raise RecipeError(join(path, "backward_chunk"), f"must be at least 1, got {self.backward_chunk}")


@dataclass
class OutputSpec:
    dir: str = _help("output folder; {name} and {ratio} are filled in", default="runs/{name}-{ratio}")
    save_model: bool = _help("write the compressed model (safetensors) to the folder", default=True)
    overwrite: bool = _help("replace an existing output folder", default=False)
    cache_dir: str | None = _help("folder of cached scores and dense evaluations shared by runs; null: no cache",
                                  default="runs/.cache")


@dataclass
class StrategyChoice:
    """One selected strategy with its validated arguments (and targets, for transforms)."""

    point: str
    plugin: str
    args: Any
    targets: list[str] = field(default_factory=list)

    def build(self) -> Strategy:
        return registry().get(self.point, self.plugin)(self.args, self.targets)

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
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    source: str | None = None

    def strategies(self) -> list[StrategyChoice]:
        return [*self.collect, *self.score, self.allocate, *self.transform, *([self.decode] if self.decode else [])]

    def calibration_data(self) -> dict[str, Any]:
        """What determines the calibration tokens (not how statistics are taken from them)."""
        return {k: v for k, v in to_dict(self.calibration).items() if k != "sequential"}

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
            "runtime": to_dict(self.runtime),
            "output": to_dict(self.output),
        }


SECTIONS: dict[str, Any] = {
    "model": ModelSpec,
    "calibration": DataSpec,
    "target": TargetSpec,
    "runtime": RuntimeSpec,
    "output": OutputSpec,
}
TOP_KEYS = ("name", *SECTIONS, "collect", "score", "allocate", "transform", "decode", "evaluate")


def _strategy(point: str, raw: Any, path: str) -> StrategyChoice:
    if isinstance(raw, str):
        raw = {"plugin": raw}
    if not isinstance(raw, dict) or "plugin" not in raw:
        raise RecipeError(path, f"expected a strategy name or a mapping with 'plugin', got {raw!r}")
    raw = dict(raw)
    name = raw.pop("plugin")
    cls = registry().get(point, str(name), join(path, "plugin"))
    targets: list[str] = []
    if point == "transform":
        targets = raw.pop("targets", list(cls.allowed_targets))
        if not isinstance(targets, list):
            raise RecipeError(join(path, "targets"), f"expected a list of projections, got {targets!r}")
        cls.check_targets(targets, join(path, "targets"))
    return StrategyChoice(point, cls.name, from_dict(cls.Args, raw, path), targets)


def _strategy_list(point: str, raw: Any, path: str) -> list[StrategyChoice]:
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    return [_strategy(point, item, join(path, i) if isinstance(raw, list) else path) for i, item in enumerate(items)]


def from_data(data: Any, source: str | None = None) -> Recipe:
    """Validate plain data (a parsed YAML file, with overrides applied) into a Recipe."""
    if not isinstance(data, dict):
        raise RecipeError("", "a recipe is a mapping of keys such as model, calibration, target, transform")
    for key in data:
        if key not in TOP_KEYS:
            raise RecipeError(str(key), f"unknown key '{key}'; {closest(str(key), TOP_KEYS)}")
    for key in ("name", "model", "target", "transform"):
        if data.get(key) is None:
            raise RecipeError(key, f"missing required key '{key}'")
    if not isinstance(data["name"], str):
        raise RecipeError("name", f"expected a string, got {data['name']!r}")
    sections = {key: from_dict(cls, data.get(key), key) for key, cls in SECTIONS.items()}
    evaluate = data.get("evaluate") or []
    if not isinstance(evaluate, list):
        raise RecipeError("evaluate", "expected a list of evaluations")
    transform = _strategy_list("transform", data["transform"], "transform")
    _check_overlap(transform)
    recipe = Recipe(
        name=data["name"],
        transform=transform,
        allocate=_strategy("allocate", data.get("allocate") or "uniform", "allocate"),
        collect=_strategy_list("collect", data.get("collect"), "collect"),
        score=_strategy_list("score", data.get("score"), "score"),
        decode=_strategy("decode", data["decode"], "decode") if data.get("decode") else None,
        evaluate=[from_dict(EvalSpec, e, join("evaluate", i)) for i, e in enumerate(evaluate)],
        source=source,
        **sections,
    )
    check_name(recipe.calibration.dataset, "calibration.dataset")
    for i, spec in enumerate(recipe.evaluate):
        check_name(spec.dataset, f"evaluate[{i}].dataset")
    allocator = registry().get("allocate", recipe.allocate.plugin)
    if allocator.needs_scores and not recipe.score:
        raise RecipeError("allocate", f"'{allocator.name}' allocates from importances: add a 'score' strategy")
    return recipe


def _check_overlap(transforms: list[StrategyChoice]) -> None:
    owner: dict[str, int] = {}
    for i, choice in enumerate(transforms):
        for target in choice.targets:
            if target in owner:
                first = transforms[owner[target]]
                raise RecipeError(
                    f"transform[{i}].targets",
                    f"'{target}' is already taken by transform[{owner[target]}] ({first.plugin}); "
                    "two transforms never rewrite the same module: remove it from one of them",
                )
            owner[target] = i


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``a.b[0].c=value`` → (['a', 'b', 0, 'c'], parsed YAML value)."""
    if "=" not in text:
        raise RecipeError("--set", f"expected key.path=value, got '{text}'")
    key, value = text.split("=", 1)
    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+", key):
        parts.append(int(token) if token.isdigit() else token)
    if not parts:
        raise RecipeError("--set", f"empty key in '{text}'")
    return parts, yaml.safe_load(value) if value else None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Return a copy of the raw recipe with dotted-path overrides set."""
    data = copy.deepcopy(data)
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else [
        (parse_override(f"{k}=")[0], v) for k, v in overrides.items()
    ]
    for parts, value in items:
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise RecipeError(_path(parts[: i + 1]), "no such list item to override")
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise RecipeError(_path(parts[: i + 1]), "cannot set a key inside a non-mapping")
                if node.get(part) is None:
                    node[part] = {}
                elif isinstance(node[part], str):  # "allocate: uniform", then --set allocate.x=1
                    node[part] = {"plugin": node[part]}
                node = node[part]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise RecipeError(_path(parts), "no such list item to override")
        elif not isinstance(node, dict):
            raise RecipeError(_path(parts), "cannot set a key inside a non-mapping")
        node[last] = value
    return data


def _path(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        out = join(out, part)
    return out


def _line_map(text: str) -> dict[str, int]:
    """Key path → 1-based line, from the YAML node tree (safe_load keeps no positions)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = join(path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, join(path, i))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if root is not None:
        walk(root, "")
    return lines


def _locate(err: RecipeError, lines: dict[str, int]) -> None:
    path = err.path
    while path and path not in lines:
        path = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", path)
    err.line = lines.get(path)


def load(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; every problem is a located RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError("", f"no recipe file at '{path}'", source=str(path))
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise RecipeError(
            "", f"not valid YAML: {getattr(err, 'problem', err)}", mark.line + 1 if mark else None, str(path)
        ) from None
    return from_raw(data, overrides, source=str(path), lines=_line_map(text))


def from_raw(
    data: Any,
    overrides: dict[str, Any] | list[str] | None = None,
    source: str | None = None,
    lines: dict[str, int] | None = None,
) -> Recipe:
    try:
        if overrides:
            if not isinstance(data, dict):
                raise RecipeError("", "a recipe is a mapping")
            data = apply_overrides(data, overrides)
        return from_data(data, source)
    except RecipeError as err:
        err.source = err.source or source
        if err.line is None and lines:
            _locate(err, lines)
        raise


__all__ = ["HOOK_POINTS", "Recipe", "RecipeError", "StrategyChoice", "from_raw", "load"]
