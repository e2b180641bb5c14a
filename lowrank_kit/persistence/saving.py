"""Saving a compressed model to a folder and loading it back, with no pickle and no remote code.

The folder holds ``model.safetensors``, ``config.json`` (the base model's, with the model type
and class of its registered compressed variant, ``persistence.hf_classes``, and a ``lowrank``
section describing every replaced module: kind and shape), the tokenizer, the resolved recipe
and the report. So transformers' own ``from_pretrained`` rebuilds it once ``lowrank_kit`` is
imported; ``load_pretrained`` does that and checks that every weight was found.
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

from lowrank_kit.compressed import quantization
from lowrank_kit.models import hf_classes
from lowrank_kit.models.offload import INDEX, Offloader
from lowrank_kit.recipe.schema import RecipeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from lowrank_kit.pipeline.state import RunState

FORMAT_VERSION = 3  # 2: head-wise PCA values stored rank-major; decode section. 3: registered model type
LEGACY_FORMATS = (2,)  # folders of these formats still load, through ``_load_legacy``
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


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a saved model: ``model.safetensors``, or the shards its index names."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    index = folder / INDEX
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    return []


def save_model_files(model: Any, tokenizer: Any, folder: Path, extra: dict[str, Any] | None = None,
                     offload: Offloader | None = None) -> None:
    """``offload``: layers are read back one at a time (``runtime.offload: disk``), so the weights
    are written as shards, one per decoder layer, with transformers' index file."""
    folder.mkdir(parents=True, exist_ok=True)
    decoder = getattr(model, "lowrank_decoder", None)
    model.config.lowrank = {"format": FORMAT_VERSION, "modules": hf_classes.module_specs(model),
                            "decode": decoder.spec() if decoder is not None else None, **(extra or {})}
    if quantization.has_quantized(model):
        model.config.lowrank["quantization"] = {"weights": "int8", "layout": "torchao-safetensors"}
    if not hf_classes.as_compressed(model):
        model.config.lowrank["format"] = LEGACY_FORMATS[-1]  # a family without a registered class
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if quantization.has_quantized(model):
        quantization.save(model, folder / WEIGHTS)
    elif offload is not None and offload.mode == "disk":
        (folder / WEIGHTS).unlink(missing_ok=True)  # one weight format per folder
        offload.save_shards(folder, metadata={"format": "pt"})
    else:  # drops the duplicate names of tied tensors; "pt" is what transformers writes and expects
        save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_model(run: RunState, partial: Path) -> None:
    """Write the model files into the run's private partial folder (``checkpoint.partial_dir``).

    An interrupted run leaves only that folder, never a half-written output.
    """
    partial.mkdir(parents=True, exist_ok=True)
    if run.recipe.output.save_model:
        extra = {"plan": run.plan.to_dict() if run.plan else None}
        save_model_files(run.model, run.tokenizer, partial, extra, run.offload)


def finish(run: RunState, partial: Path, folder: Path, report: dict[str, Any], overwrite: bool = False,
           files: dict[str, str] | None = None, before_move: Callable[[], None] | None = None) -> Path:
    """Add the resolved recipe, the report and ``files`` (name → text), then move the folder into
    place; ``before_move`` runs last before the move (the checkpoint files are dropped there, so
    a failure up to that point leaves them for --resume)."""
    from lowrank_kit.reporting.report import markdown

    for name, text in (files or {}).items():
        if text:
            (partial / name).write_text(text)
    (partial / "recipe.yaml").write_text(yaml.safe_dump(run.recipe.to_dict(), sort_keys=False))
    (partial / "report.json").write_text(json.dumps(report, indent=2))
    (partial / "report.md").write_text(markdown(report))
    check_output_dir(folder, overwrite)
    if before_move is not None:
        before_move()
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def load_pretrained(folder: str | Path, *, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None, **from_pretrained: Any) -> PreTrainedModel:
    """A compressed model saved by lowrank-kit, from a folder or a hub id; its logits equal the
    in-memory model's. ``dtype`` defaults to the saved one; other keyword arguments go to
    transformers' ``from_pretrained`` (e.g. ``revision``, ``device_map``). Unlike a bare
    ``from_pretrained``, a weight missing from the file is an error, never a random initialisation.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_classes.register()
    where = str(folder)
    if Path(where).is_dir() and not weight_files(Path(where)):
        raise FileNotFoundError(f"no {WEIGHTS} in '{where}': not a saved lowrank-kit model")
    config = AutoConfig.from_pretrained(where, **{k: v for k, v in from_pretrained.items() if k in HUB_ARGS})
    lowrank = getattr(config, "lowrank", None)
    if not isinstance(lowrank, dict) or lowrank.get("format") not in (FORMAT_VERSION, *LEGACY_FORMATS):
        raise ValueError(f"'{where}/config.json' has no lowrank section of format {FORMAT_VERSION}: "
                         "not a model saved by this version of lowrank-kit")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    saved = getattr(config, "dtype", None) or torch.float32
    dtype = dtype or (getattr(torch, saved) if isinstance(saved, str) else saved)
    try:
        if lowrank.get("quantization"):
            model = hf_classes.load_quantized(where, config, dtype)
        elif lowrank["format"] in LEGACY_FORMATS:
            model = _load_legacy(where, config, lowrank, dtype)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype,
                                                               output_loading_info=True, **from_pretrained)
            wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            if wrong:
                raise ValueError(f"weights in '{where}' do not match the rebuilt model: "
                                 + "; ".join(f"{k}: {sorted(v)[:3]}" for k, v in wrong.items()))
    except SafetensorError as err:  # a cut or garbled file
        raise ValueError(f"'{where}/{WEIGHTS}' is damaged or truncated ({err}); copy or compress it again") from None
    if device is not None:
        model = model.to(device)
    return model.eval()


# from_pretrained arguments that say where the files come from, so the config is read from there too
HUB_ARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download")


def _load_legacy(where: str, config: Any, lowrank: dict[str, Any], dtype: torch.dtype) -> Any:
    """A folder saved before the compressed variants were registered (format 2)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf_classes.install_modules(model, lowrank)
    model.tie_weights()
    try:
        load_model(model, str(Path(where) / WEIGHTS), strict=True)
    except RuntimeError as err:  # strict: names or shapes that do not match the rebuilt model
        raise ValueError(f"weights in '{where}' do not match the rebuilt model: {err}") from None
    return model
