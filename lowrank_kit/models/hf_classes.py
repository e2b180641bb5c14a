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
from typing import Any

import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

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
            from lowrank_kit.persistence.saving import load_pretrained

            return load_pretrained(pretrained_model_name_or_path, dtype=kwargs.get("dtype"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]


def install_modules(model: Any, lowrank: dict[str, Any]) -> None:
    """Swap in empty compressed modules of the saved shapes, then the saved decode strategy."""
    from lowrank_kit.persistence.saving import build_module, set_module

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
