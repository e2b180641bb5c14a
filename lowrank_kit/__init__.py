"""lowrank_kit: training-free low-rank compression of LLMs from pluggable strategies.

    import lowrank_kit
    result = lowrank_kit.compress("recipes/svd_llm.yaml", target={"ratio": 0.3})
    model = lowrank_kit.load_pretrained(result.output_dir)
"""

from __future__ import annotations

from typing import Any

from lowrank_kit.extension.hookspecs import hookimpl, hookspec
from lowrank_kit.extension.strategy import Strategy

__version__ = "0.1.0"
__all__ = ["Strategy", "__version__", "bench", "compress", "hookimpl", "hookspec", "load_pretrained", "load_recipe"]


def compress(recipe: Any, overrides: dict[str, Any] | list[str] | None = None, **sections: Any) -> Any:
    """Run a recipe (a path, a dict, or a Recipe); see ``lowrank_kit.api.compress``."""
    from lowrank_kit.api import compress as _compress

    return _compress(recipe, overrides, **sections)


def bench(recipes: list[Any], ratios: list[float], output: Any = "runs/bench", **kwargs: Any) -> list[dict[str, Any]]:
    """Every recipe at every ratio on one model and data; see ``lowrank_kit.harness.bench.run_bench``."""
    from lowrank_kit.harness.bench import run_bench

    return run_bench(recipes, ratios, output, **kwargs)


def load_pretrained(folder: Any, device: Any = "cpu") -> Any:
    """Load a model saved by ``compress`` (no pickle, no remote code)."""
    from lowrank_kit.persistence.saving import load_pretrained as _load

    return _load(folder, device)


def load_recipe(path: Any, overrides: Any = None) -> Any:
    """Read and validate a recipe file without loading any model."""
    from lowrank_kit.recipe.loading import load

    return load(path, overrides)
