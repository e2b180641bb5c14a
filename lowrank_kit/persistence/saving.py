"""Saving a compressed model to a folder and loading it back, with no pickle and no remote code.

The folder holds ``model.safetensors``, the base ``config.json`` plus a ``lowrank`` section
describing every replaced module (kind and shape), the tokenizer, the resolved recipe and the
report. ``load_pretrained`` rebuilds the architecture from the config, swaps in empty
compressed modules from that section and loads the weights strictly.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from lowrank_kit.compressed.modules import LowRankLinear, ResizedLinear
from lowrank_kit.models.attention import rebuild
from lowrank_kit.recipe.schema import RecipeError

if TYPE_CHECKING:
    from lowrank_kit.pipeline.state import RunState

FORMAT_VERSION = 2  # 2: head-wise PCA values stored rank-major; decode section
WEIGHTS = "model.safetensors"
MARKERS = ("report.json", "recipe.yaml")  # files that identify a folder as one of our outputs


def check_output_dir(folder: Path, overwrite: bool) -> None:
    """Refuse to write over anything the user did not ask us to replace, or where we cannot write;
    checked before any work, so no compute is lost to it."""
    _check_writable(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RecipeError("output.dir", f"'{folder}' exists and is not a folder")
    if not any(folder.iterdir()):
        return
    if not overwrite:
        raise RecipeError("output.dir", f"'{folder}' already exists; pass --overwrite or choose another output.dir")
    if not any((folder / m).exists() for m in MARKERS):
        raise RecipeError("output.dir", f"'{folder}' is not a lowrank-kit output folder; it is never overwritten")


def _check_writable(folder: Path) -> None:
    """The nearest existing folder at or above ``folder`` must accept a new file."""
    existing = folder if folder.is_dir() else next((p for p in folder.absolute().parents if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError("output.dir", f"cannot write '{folder}': '{existing}' is not a writable folder")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def module_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``lowrank`` description of every compressed module, by its dotted name."""
    return {name: module.spec() for name, module in model.named_modules() if callable(getattr(module, "spec", None))}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def save_model_files(model: Any, tokenizer: Any, folder: Path, extra: dict[str, Any] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    decoder = getattr(model, "lowrank_decoder", None)
    model.config.lowrank = {"format": FORMAT_VERSION, "modules": module_specs(model),
                            "decode": decoder.spec() if decoder is not None else None, **(extra or {})}
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS))  # drops the duplicate names of tied tensors
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_model(run: RunState, partial: Path) -> None:
    """Write the model files into the run's private partial folder (``checkpoint.partial_dir``).

    An interrupted run leaves only that folder, never a half-written output.
    """
    partial.mkdir(parents=True, exist_ok=True)
    if run.recipe.output.save_model:
        extra = {"plan": run.plan.to_dict() if run.plan else None}
        save_model_files(run.model, run.tokenizer, partial, extra)


def finish(run: RunState, partial: Path, folder: Path, report: dict[str, Any], overwrite: bool = False,
           files: dict[str, str] | None = None) -> Path:
    """Add the resolved recipe, the report and ``files`` (name → text), then move the folder into place."""
    from lowrank_kit.reporting.report import markdown

    for name, text in (files or {}).items():
        if text:
            (partial / name).write_text(text)
    (partial / "recipe.yaml").write_text(yaml.safe_dump(run.recipe.to_dict(), sort_keys=False))
    (partial / "report.json").write_text(json.dumps(report, indent=2))
    (partial / "report.md").write_text(markdown(report))
    check_output_dir(folder, overwrite)
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def _resized_linear(spec: dict[str, Any], _dense: nn.Module) -> nn.Module:
    return ResizedLinear(spec["in_features"], spec["out_features"], bias=spec["bias"])


def _low_rank_linear(spec: dict[str, Any], _dense: nn.Module) -> nn.Module:
    return LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"])


# Module kind → builder of an empty compressed module from the dense one it replaces (shapes
# only, weights are loaded afterwards); new compressed modules register here.
MODULE_BUILDERS: dict[str, Callable[[dict[str, Any], nn.Module], nn.Module]] = {
    "low_rank_linear": _low_rank_linear,
    "linear": _resized_linear,
    "value_dim_attention": rebuild,
}


def build_module(spec: dict[str, Any], dense: nn.Module) -> nn.Module:
    kind = spec.get("kind")
    if kind not in MODULE_BUILDERS:
        raise ValueError(f"unknown compressed module kind {kind!r}; known: {sorted(MODULE_BUILDERS)}")
    return MODULE_BUILDERS[kind](spec, dense)


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> Any:
    """Rebuild a compressed model saved by lowrank-kit; its logits equal the in-memory model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in '{folder}': not a saved lowrank-kit model")
    config = AutoConfig.from_pretrained(folder)
    lowrank = getattr(config, "lowrank", None)
    if not isinstance(lowrank, dict) or lowrank.get("format") != FORMAT_VERSION:
        raise ValueError(f"'{folder}/config.json' has no lowrank section of format {FORMAT_VERSION}")
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in lowrank["modules"].items():
        set_module(model, name, build_module(spec, model.get_submodule(name)).to(dtype))
    model.tie_weights()
    try:
        missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=True)
    except SafetensorError as err:  # a cut or garbled file
        raise ValueError(f"'{folder / WEIGHTS}' is damaged or truncated ({err}); copy or compress it again") from None
    if missing or unexpected:
        raise ValueError(f"weights do not match the rebuilt model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if lowrank.get("decode"):
        from lowrank_kit.compressed.decoding import install

        install(model, lowrank["decode"])
    return model.to(device).eval()
