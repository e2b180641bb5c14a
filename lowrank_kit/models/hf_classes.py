"""Compressed models as transformers classes: after ``import lowrank_kit``,
``AutoModelForCausalLM.from_pretrained(folder)``, ``AutoConfig`` and ``pipeline`` load a saved folder.

For each supported family there is a config subclass with a model type of its own and a
model subclass that, when built from such a config, replaces the dense projections named in
the config's ``lowrank`` section by empty compressed modules of the saved shapes (and installs
a saved decode strategy), so transformers' own loading fills them; no remote code.

The model type is a sentence on purpose: without ``import lowrank_kit`` transformers does not
know it and its error quotes it, so the user reads what to do instead of getting a dense model
whose compressed layers were randomly re-initialised.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lowrank_kit.compressed.modules import HeadwiseLowRank, LowRankLinear, ResizedLinear
from lowrank_kit.models.attention import rebuild

# base model type → (config class, causal-LM class) in transformers
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
MARK = " compressed by lowrank-kit; pip install lowrank-kit and import lowrank_kit to load it"


def compressed_type(base: str) -> str:
    return base + MARK


def base_type(model_type: str) -> str:
    """The dense family of a (possibly compressed) model type."""
    return model_type[: -len(MARK)] if model_type.endswith(MARK) else model_type


class CompressedCausalLM:
    """Mixed in before a family's causal-LM class: builds the compressed modules the config names."""

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        install_modules(self, config.lowrank)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """A folder with int8 weights (torchao's safetensors layout) goes through lowrank-kit's loader;
        every other one through transformers' own."""
        config = kwargs.get("config")
        if config is None or isinstance(config, str):
            config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path)
        if (getattr(config, "lowrank", None) or {}).get("quantization"):
            saved = getattr(config, "dtype", None) or torch.float32
            dtype = kwargs.get("dtype") or (getattr(torch, saved) if isinstance(saved, str) else saved)
            return load_quantized(str(pretrained_model_name_or_path), config, dtype)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]


def module_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``lowrank`` description of every compressed module, by its dotted name."""
    return {name: module.spec() for name, module in model.named_modules() if callable(getattr(module, "spec", None))}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _resized_linear(spec: dict[str, Any], _dense: nn.Module) -> nn.Module:
    return ResizedLinear(spec["in_features"], spec["out_features"], bias=spec["bias"])


def _low_rank_linear(spec: dict[str, Any], _dense: nn.Module) -> nn.Module:
    return LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"])


def _headwise_low_rank(spec: dict[str, Any], _dense: nn.Module) -> nn.Module:
    return HeadwiseLowRank(spec["in_features"], spec["heads"], spec["head_dim"], spec["rank"], spec["bias"])


# Module kind → builder of an empty compressed module from the dense one it replaces (shapes
# only, weights are loaded afterwards); new compressed modules register here.
MODULE_BUILDERS: dict[str, Callable[[dict[str, Any], nn.Module], nn.Module]] = {
    "low_rank_linear": _low_rank_linear,
    "headwise_low_rank": _headwise_low_rank,
    "linear": _resized_linear,
    "value_dim_attention": rebuild,
}


def build_module(spec: dict[str, Any], dense: nn.Module) -> nn.Module:
    kind = spec.get("kind")
    if kind not in MODULE_BUILDERS:
        raise ValueError(f"unknown compressed module kind {kind!r}; known: {sorted(MODULE_BUILDERS)}")
    return MODULE_BUILDERS[kind](spec, dense)


def install_modules(model: Any, lowrank: dict[str, Any]) -> None:
    """Swap in empty compressed modules of the saved shapes, then the saved decode strategy."""
    for name, spec in lowrank["modules"].items():
        dense = model.get_submodule(name)
        reference = next(dense.parameters())
        set_module(model, name, build_module(spec, dense).to(device=reference.device, dtype=reference.dtype))
    if lowrank.get("decode"):
        from lowrank_kit.compressed.decoding import install

        install(model, lowrank["decode"])


@functools.cache
def classes(base: str) -> tuple[type[PretrainedConfig], type[nn.Module]]:
    """The registered (config, model) classes of a family's compressed variant."""
    config_name, model_name = FAMILIES[base]
    base_config, base_model = getattr(transformers, config_name), getattr(transformers, model_name)
    config_cls = type(f"LowRank{config_name}", (base_config,), {
        "model_type": compressed_type(base), "__module__": __name__,
        "__doc__": f"{config_name} of a model compressed by lowrank-kit (its ``lowrank`` section)."})
    model_cls = type(f"LowRank{model_name}", (CompressedCausalLM, base_model), {
        "config_class": config_cls, "__module__": __name__,
        "__doc__": f"{model_name} whose projections are lowrank-kit's compressed modules."})
    globals()[config_cls.__name__], globals()[model_cls.__name__] = config_cls, model_cls
    return config_cls, model_cls


def register() -> None:
    """Make every family's compressed variant known to transformers' Auto classes (idempotent)."""
    for base in FAMILIES:
        config_cls, model_cls = classes(base)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def as_compressed(model: Any) -> bool:
    """Turn an in-memory compressed model (a dense class with swapped modules) into an instance
    of its registered class, so its own ``save_pretrained`` writes a folder transformers loads
    correctly. The classes add no state, so only the type changes. False for families without one."""
    config = model.config
    base = base_type(config.model_type)
    if base not in FAMILIES or getattr(config, "lowrank", None) is None:
        return False
    config_cls, model_cls = classes(base)
    if not isinstance(model, _dense_class(base)):
        return False
    config.__class__ = config_cls
    model.__class__ = model_cls
    config.architectures = [model_cls.__name__]
    return True


def _dense_class(base: str) -> type:
    return getattr(transformers, FAMILIES[base][1])


def load_quantized(where: str, config: Any, dtype: torch.dtype) -> Any:
    """A folder with int8 weights: the compressed model built empty, then filled from the file."""
    from lowrank_kit.compressed import quantization

    if not quantization.available():
        raise ImportError(f"'{where}' holds int8 weights; {quantization.EXTRA}")
    if not Path(where).is_dir():
        from huggingface_hub import snapshot_download

        where = snapshot_download(where)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not isinstance(model, CompressedCausalLM):  # a family without a registered class
        install_modules(model, config.lowrank)
    quantization.load(model, Path(where) / "model.safetensors")
    return model
