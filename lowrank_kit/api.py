"""The Python API; the CLI calls the same functions."""

from __future__ import annotations

import copy
import difflib
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_kit.data.texts import in_memory
from lowrank_kit.pipeline.engine import Engine, Result
from lowrank_kit.recipe.loading import load, resolve_recipe
from lowrank_kit.recipe.spec import Recipe

# resolve_recipe lives with the recipe loading (the bench uses it too) and is part of this API.
__all__ = ["bench", "compress", "load_recipe", "resolve_recipe"]

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from lowrank_kit.pipeline.callbacks import Callback


def compress(recipe: str | Path | dict[str, Any] | Recipe, overrides: dict[str, Any] | list[str] | None = None, *,
             model: PreTrainedModel | None = None, tokenizer: Any = None, overwrite: bool = False,
             progress: bool = True, callbacks: list[Callback] | None = None, resume: bool = False,
             checkpoint: bool = True, inplace: bool = False, **recipe_sections: Any) -> Result:
    """Compress as the recipe says; returns the compressed model, tokenizer, report and output folder.

    ``recipe`` is a recipe file, a shipped recipe's name (``"flat_llm"``), a raw dict or a Recipe;
    ``overrides`` and ``recipe_sections`` change it (``target={"ratio": 0.3}``). ``model`` and
    ``tokenizer`` replace loading ``model.path``; the model passed in is copied and never
    modified unless ``inplace=True``. ``resume`` continues a crashed run of the same recipe from
    its last finished layer; ``checkpoint=False`` does not record finished layers.
    """
    _check_sections(recipe_sections)
    resolved = resolve_recipe(recipe, overrides, **_texts_in_memory(recipe_sections))
    if model is not None and not inplace:
        model = copy.deepcopy(model)
    engine = Engine(resolved, callbacks=callbacks, overwrite=overwrite, progress=progress, resume=resume,
                    checkpoint=checkpoint)
    return engine.run(model=model, tokenizer=tokenizer)


def bench(recipes: list[str | Path], ratios: list[float] | tuple[float, ...] = (0.2, 0.3, 0.5),
          output: str | Path = "runs/bench", *, overrides: list[str] | None = None, save_models: bool = False,
          progress: bool = True, model: PreTrainedModel | None = None, tokenizer: Any = None
          ) -> list[dict[str, Any]]:
    """Every recipe at every ratio on one model and data: the rows of the table (dense first),
    written with plots to ``output``; finished cells already there are reused."""
    from lowrank_kit.harness.bench import run_bench

    return run_bench(recipes, list(ratios), output, overrides, save_models, progress=progress, model=model,
                     tokenizer=tokenizer)


def load_recipe(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Recipe:
    """Read and validate a recipe (a file or a shipped recipe's name) without loading any model."""
    return load(path, overrides)


def _texts_in_memory(sections: dict[str, Any]) -> dict[str, Any]:
    """``calibration={"dataset": [...]}`` or an evaluation's ``dataset`` given as a list of strings or a
    ``datasets.Dataset``: registered in memory, named in the recipe by the name it was given."""

    def named(section: Any) -> Any:
        if isinstance(section, dict) and section.get("dataset") is not None and not isinstance(section["dataset"], str):
            return {**section, "dataset": in_memory(section["dataset"], section.get("text_field", "text"))}
        return section

    out = dict(sections)
    if "calibration" in out:
        out["calibration"] = named(out["calibration"])
    if isinstance(out.get("evaluate"), list):
        out["evaluate"] = [named(entry) for entry in out["evaluate"]]
    return out


def _check_sections(sections: dict[str, Any]) -> None:
    """A misspelt run option is a TypeError naming the options, not an 'unknown recipe section'."""
    known = {f.name for f in fields(Recipe)} - {"source"}
    wrong = sorted(set(sections) - known)
    if wrong:
        options = ("model", "tokenizer", "overwrite", "progress", "callbacks", "resume", "checkpoint", "inplace")
        near = difflib.get_close_matches(wrong[0], [*options, *known], n=1)
        raise TypeError(f"compress() got an unexpected keyword argument '{wrong[0]}'"
                        + (f"; did you mean '{near[0]}'?" if near else "")
                        + f" (run options: {', '.join(options)}; recipe sections: {', '.join(sorted(known))})")
