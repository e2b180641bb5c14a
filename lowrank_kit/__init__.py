"""lowrank_kit: training-free low-rank compression of LLMs from pluggable strategies.

    import lowrank_kit
    result = lowrank_kit.compress("recipes/svd_llm.yaml", target={"ratio": 0.3})
    model = lowrank_kit.load_pretrained(result.output_dir)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# First (sorted before the rest, which import transformers, which imports torchao): see there.
from lowrank_kit.compressed import quantization as _quantization  # noqa: F401
from lowrank_kit.extension.hookspecs import hookimpl, hookspec
from lowrank_kit.extension.strategy import Strategy
from lowrank_kit.models import hf_classes as _hf_classes

if TYPE_CHECKING:
    from lowrank_kit.api import bench, compress, load_recipe, resolve_recipe
    from lowrank_kit.persistence.saving import load_pretrained

__version__ = "0.1.0"

# Compressed folders load through transformers' own Auto classes once this package is imported.
_hf_classes.register()
__all__ = ["Strategy", "__version__", "bench", "compress", "hookimpl", "hookspec", "load_pretrained", "load_recipe",
           "resolve_recipe"]


def __getattr__(name: str) -> Any:
    """The API functions, imported on first use (they pull in the engine and Lightning)."""
    if name in ("compress", "load_recipe", "resolve_recipe"):
        from lowrank_kit import api

        return getattr(api, name)
    if name == "bench":
        from lowrank_kit.api import bench

        return bench
    if name == "load_pretrained":
        from lowrank_kit.persistence.saving import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'lowrank_kit' has no attribute '{name}'")
