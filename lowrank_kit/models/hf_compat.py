"""Every use of transformers' internals, in one place, for the versions lowrank-kit knows.

What the compressed modules and the generation hooks need from transformers beyond its public
API: the keyword under which the KV cache reaches a forward (``past_key_values`` up to 5.23,
``cache`` from 5.24 on), the rotary and eager-attention helpers, and the attention-interface
registry. Each is read from the installed library by inspection, never assumed from a version
number, and an unknown spelling stops with an error that names the class and the versions
tested: a forward that quietly ignored its cache would generate garbage (as value-dim attention
did under 5.24 before this module existed).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

# The range the test suite ran against (docs/quickstart.md lists the locked set); pyproject.toml
# declares the same bounds. The upper bound is the first release not tested.
TESTED_FROM, TESTED_BELOW = Version("5.23.0"), Version("5.26")
# Spellings of the forward's KV-cache keyword, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values")

__all__ = ["CACHE_KEYWORDS", "UnsupportedTransformers", "apply_rotary_pos_emb", "attention_function",
           "cache_bytes", "cache_in", "cache_keyword", "check_version", "output_cache",
           "parameters_on_meta", "pop_cache", "version_note"]


class UnsupportedTransformers(RuntimeError):
    """The installed transformers does something lowrank-kit cannot follow safely."""


def version_note() -> str:
    return (f"transformers {transformers.__version__} is installed; lowrank-kit is tested with "
            f">={TESTED_FROM},<{TESTED_BELOW} (pip install 'transformers>={TESTED_FROM},<{TESTED_BELOW}')")


@functools.cache
def check_version() -> bool:
    """Warn once when transformers is outside the tested range; True when inside it."""
    inside = TESTED_FROM <= Version(Version(transformers.__version__).base_version) < TESTED_BELOW
    if not inside:
        warnings.warn(f"{version_note()}. Compressed attention checks every forward signature it relies on "
                      "and stops with an error where it cannot follow one.", stacklevel=2)
    return inside


@functools.cache
def cache_keyword(cls: type) -> str:
    """The keyword under which ``cls.forward`` takes the KV cache (an attention module or a whole model)."""
    parameters = inspect.signature(cls.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise UnsupportedTransformers(
        f"{cls.__name__}.forward takes the KV cache under none of {', '.join(CACHE_KEYWORDS)} "
        f"(its parameters: {', '.join(parameters)}); {version_note()}")


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed to a forward under any known spelling (None when there is none)."""
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the KV cache from forward keyword arguments, whatever its spelling, and return it."""
    found = None
    for name in CACHE_KEYWORDS:
        value = kwargs.pop(name, None)
        found = value if found is None else found
    return found


def output_cache(output: Any) -> Any:
    """The KV cache a model's forward returned (``cache`` from transformers 5.24 on, where reading
    ``past_key_values`` warns; ``past_key_values`` before)."""
    for name in CACHE_KEYWORDS:
        if name in output:  # a ModelOutput is a mapping of the fields it holds
            return output[name]
    return None


def cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a KV cache holds, whatever its layout (per-layer objects, as in
    the transformers this package is tested with, or plain lists of tensors)."""
    holders = getattr(cache, "layers", None) or [cache]
    total = 0
    for holder in holders:
        for value in vars(holder).values():
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.dim() >= 3:  # [batch, heads, tokens, dim]
                    total += tensor.numel() * tensor.element_size()
    return total


def attention_function(module: Any) -> Callable[..., tuple[Any, Any]]:
    """The attention kernel the model's config selects (eager, SDPA, ...), from transformers' registry."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)


def silence_gguf_progress() -> None:
    """transformers' GGUF loader draws its own tqdm bar, which its progress-bar switch does not
    reach; ``--quiet`` silences it here."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # gguf support not importable: no bar either
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_utils.tqdm = functools.partial(bar, disable=True)


def forget_gguf_quantizer(model: Any) -> None:
    """A model loaded from GGUF is dequantised to ordinary dense weights, but transformers keeps
    its GGUF quantizer on the model (and in the config), so ``save_pretrained`` refuses it."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "quantization_config", None):
            del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def parameters_on_meta() -> Any:
    """A context in which new modules get meta parameters but real buffers (rotary tables are
    computed in ``__init__`` and are in no checkpoint); accelerate's ``init_empty_weights``."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        from lowrank_kit.recipe.schema import RecipeError

        raise RecipeError("runtime.offload", "disk offloading needs accelerate: pip install 'lowrank-kit[offload]'"
                          ) from None
    return init_empty_weights(include_buffers=False)
