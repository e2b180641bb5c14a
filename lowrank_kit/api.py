"""The Python API; the CLI calls the same functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank_kit.pipeline.engine import Engine, Result
from lowrank_kit.recipe.loading import from_raw, load
from lowrank_kit.recipe.spec import Recipe

RUN_OPTIONS = ("overwrite", "progress", "callbacks", "model", "tokenizer", "resume", "checkpoint")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, out)
    else:
        out[prefix] = value


def resolve_recipe(recipe: str | Path | dict[str, Any] | Recipe,
                   overrides: dict[str, Any] | list[str] | None = None, **sections: Any) -> Recipe:
    """A validated Recipe from a path, raw dict or Recipe, with overrides.

    ``overrides`` are dotted paths (``{"target.ratio": 0.3}`` or ``["target.ratio=0.3"]``);
    keyword sections merge key by key (``target={"ratio": 0.3}`` changes only the ratio).
    """
    merged: dict[str, Any] = {}
    for key, value in sections.items():
        _flatten(key, value, merged)
    if isinstance(overrides, list):
        extra = overrides + [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in merged.items()]
        all_overrides: dict[str, Any] | list[str] = extra
    else:
        all_overrides = {**(overrides or {}), **merged}
    if isinstance(recipe, Recipe):
        if all_overrides:
            return from_raw(recipe.to_dict(), all_overrides, source=recipe.source)
        return recipe
    if isinstance(recipe, dict):
        return from_raw(recipe, all_overrides)
    return load(recipe, all_overrides)


def compress(recipe: str | Path | dict[str, Any] | Recipe, overrides: dict[str, Any] | list[str] | None = None,
             **kwargs: Any) -> Result:
    """Compress as the recipe says; returns the model, tokenizer, report and output folder.

    Run options (``overwrite``, ``progress``, ``callbacks``, ``model``/``tokenizer`` to use an
    already-loaded model, ``resume`` to continue a crashed run from its last finished layer,
    ``checkpoint=False`` not to record finished layers) are taken out of ``kwargs``; the rest
    override recipe sections.
    """
    options = {key: kwargs.pop(key) for key in RUN_OPTIONS if key in kwargs}
    resolved = resolve_recipe(recipe, overrides, **kwargs)
    engine = Engine(resolved, callbacks=options.get("callbacks"), overwrite=options.get("overwrite", False),
                    progress=options.get("progress", True), resume=options.get("resume", False),
                    checkpoint=options.get("checkpoint", True))
    return engine.run(model=options.get("model"), tokenizer=options.get("tokenizer"))
