"""Per-layer checkpoints in a run's private partial folder, so ``--resume`` continues after a crash.

While a run goes, ``.<output>.partial`` beside the output folder holds:

- ``run.json``: the resolved recipe, the versions, the dense model's fingerprint, the process
  that owns the folder, how many decoder layers are finished, their compressed-module specs and
  the run's notes;
- ``scores.json``: the run's importances (a resumed run does not score again);
- ``layers/NNN.safetensors``: the weights of finished decoder layer NNN.

Every file is written under a temporary name and renamed, and ``run.json`` is renamed last,
so a kill -9 at any moment leaves a consistent folder: a layer counts as finished only once
``run.json`` says so. The model files are saved into the same folder at the end, the
checkpoint files removed and the folder renamed to the output (``saving.finish``).

A folder is resumed only by the same recipe (up to its name, decode, evaluation and output
sections, which act after the layers), the same dense model and the same library versions:
anything else could not give the weights an uninterrupted run gives, so it is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_model, save_model

from lowrank_kit.models import hf_classes
from lowrank_kit.recipe.schema import RecipeError, flat_fields
from lowrank_kit.reporting.report import library_versions

if TYPE_CHECKING:
    from lowrank_kit.pipeline.state import RunState
    from lowrank_kit.recipe.spec import Recipe

STATE = "run.json"
SCORES = "scores.json"
LAYERS = "layers"
# Recipe sections that act only after the last layer is compressed: a resumed run may change them.
AFTER_LAYERS = ("name", "decode", "evaluate", "quantize", "output")


def partial_dir(folder: Path) -> Path:
    """The private folder a run writes into before it becomes ``folder``."""
    return folder.with_name(f".{folder.name}.partial")


def _resume_key(recipe: Recipe) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in recipe.to_dict().items() if k not in AFTER_LAYERS}, default=str))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _remove_abandoned(output: Path) -> None:
    """Partial folders of older versions (``.<output>.partial-<pid>``) whose process is gone."""
    for old in output.parent.glob(f".{output.name}.partial-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


class Checkpoints:
    """A run's partial folder: the finished layers it can restore and the ones it records.

    ``writer`` is false on every process but rank 0 of a data-parallel run: those only read.
    """

    def __init__(self, folder: Path, recipe: Recipe, writer: bool, state: dict[str, Any] | None):
        self.folder = folder
        self.writer = writer
        self.key = _resume_key(recipe)
        self.state: dict[str, Any] = state or {"recipe": self.key, "versions": library_versions(), "fingerprint": None,
                                               "done": 0, "layers": {}, "notes": {}}
        self.resumed = state is not None  # whether this run continues an unfinished one
        self.seconds = 0.0  # spent writing layer checkpoints, for the report

    @classmethod
    def open(cls, output: Path, recipe: Recipe, resume: bool, writer: bool = True) -> Checkpoints:
        """Take the partial folder of ``output``: reuse it (``resume``) or start it afresh.

        Refuses a folder another live process is writing, and, when resuming, one made by a
        different recipe or library version (the model is checked by ``check_model``).
        """
        folder = partial_dir(output)
        _remove_abandoned(output)
        state = _read_state(folder) if folder.is_dir() else None
        if writer and state is not None:
            owner = state.get("pid")
            if isinstance(owner, int) and owner != os.getpid() and _alive(owner):
                raise RecipeError("output.dir", f"another lowrank-kit run (process {owner}) is writing "
                                                f"'{output}' (its work is in '{folder}'); wait for it or choose "
                                                "another output.dir")
        usable = state is not None and bool(state.get("done") or state.get("scored"))
        if resume and usable:
            cls._check_recipe(folder, state, recipe)
        else:
            if writer:
                if usable:
                    warnings.warn(f"discarding the unfinished run in '{folder}' ({state['done']} decoder "
                                  f"layer{'s' if state['done'] != 1 else ''} finished); --resume would have "
                                  "continued it", stacklevel=3)
                elif resume:
                    warnings.warn(f"nothing to resume in '{folder}': starting from the first layer", stacklevel=3)
                if folder.exists():
                    shutil.rmtree(folder)
            state = None
        checkpoints = cls(folder, recipe, writer, state)
        if writer:
            checkpoints.state["pid"] = os.getpid()
            checkpoints._save_state()
        return checkpoints

    @staticmethod
    def _check_recipe(folder: Path, state: dict[str, Any], recipe: Recipe) -> None:
        here, there = flat_fields(_resume_key(recipe)), flat_fields(state.get("recipe", {}))
        changed = sorted(k for k in here.keys() | there.keys() if here.get(k) != there.get(k))
        if changed:
            first = changed[0]
            raise RecipeError(first, f"cannot resume the unfinished run in '{folder}': it was made with "
                                     f"{first}={there.get(first)!r}, this recipe has {here.get(first)!r}"
                                     + (f" ({len(changed)} fields differ)" if len(changed) > 1 else "")
                                     + "; run without --resume to start over")
        versions, now = state.get("versions", {}), library_versions()
        if versions != now:
            raise RecipeError("output.dir", f"cannot resume the unfinished run in '{folder}': it was made with "
                                            f"{versions}, this is {now}; run without --resume to start over")

    def check_model(self, fingerprint: str) -> None:
        """Record the dense model's fingerprint, or refuse a resumed folder made from another model."""
        recorded = self.state.get("fingerprint")
        if recorded is not None and recorded != fingerprint:
            raise RecipeError("model.path", f"cannot resume the unfinished run in '{self.folder}': it was made "
                                            "from a different model (weights fingerprint "
                                            f"{recorded} here {fingerprint}); run without --resume to start over")
        self.state["fingerprint"] = fingerprint
        self._save_state()

    @property
    def done(self) -> int:
        return int(self.state["done"])

    def has(self, layer: int) -> bool:
        return layer < self.done

    def scores(self) -> dict[str, float] | None:
        if not self.state.get("scored"):
            return None
        try:
            return json.loads((self.folder / SCORES).read_text())
        except (OSError, ValueError):
            return None

    def save_scores(self, scores: dict[str, float]) -> None:
        if self.writer:
            _write_atomic(self.folder / SCORES, json.dumps(scores))
            self.state["scored"] = True
            self._save_state()

    def notes(self) -> dict[str, Any]:
        return dict(self.state.get("notes", {}))

    def save_layer(self, run: RunState, index: int) -> None:
        """Record decoder layer ``index`` as finished (layers are finished in order)."""
        if not self.writer:
            self.state["done"] = index + 1
            return
        start = time.perf_counter()
        layer = run.adapter.layers[index]
        folder = self.folder / LAYERS
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{index:03d}.tmp"
        save_model(layer, str(tmp))
        tmp.replace(folder / f"{index:03d}.safetensors")
        self.state["layers"][str(index)] = hf_classes.module_specs(layer)
        self.state["notes"] = json.loads(json.dumps(run.notes, default=str))
        self.state["done"] = index + 1
        self._save_state()
        self.seconds += time.perf_counter() - start

    def restore_layer(self, run: RunState, index: int) -> None:
        """Put finished layer ``index`` (its compressed modules and weights) into the model."""
        layer = run.adapter.layers[index]
        hf_classes.install_modules(layer, {"modules": self.state["layers"][str(index)]})
        path = self.folder / LAYERS / f"{index:03d}.safetensors"
        try:  # strict: a missing, damaged or mismatched file raises
            load_model(layer, str(path), strict=True, device=str(next(layer.parameters()).device))
        except Exception as err:  # the folder cannot give this layer back
            raise RecipeError("output.dir", f"cannot resume from '{self.folder}': layer {index} does not load "
                                            f"({type(err).__name__}: {err}); run without --resume") from None

    def finish(self) -> None:
        """Drop the checkpoint files before the folder becomes the output."""
        if self.writer:
            shutil.rmtree(self.folder / LAYERS, ignore_errors=True)
            for name in (SCORES, STATE):
                (self.folder / name).unlink(missing_ok=True)

    def release(self) -> None:
        """After a failure: remove the folder when it holds nothing worth resuming, else give up
        its ownership (this process may live on, e.g. a notebook, and must not block a rerun)."""
        if not self.writer or not self.folder.exists():
            return
        if not self.done and not self.state.get("scored"):
            shutil.rmtree(self.folder, ignore_errors=True)
        elif (self.folder / STATE).exists():
            self.state["pid"] = None
            self._save_state()

    def hint(self) -> str | None:
        """What a failed or interrupted run leaves behind, for its message."""
        if not self.writer or not self.folder.exists() or not (self.done or self.state.get("scored")):
            return None
        kept = (f"{self.done} finished decoder layer{'s are' if self.done > 1 else ' is'}" if self.done
                else "the scores are")
        return f"{kept} kept in '{self.folder}'; rerun with --resume to continue"

    def _save_state(self) -> None:
        if self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.folder / STATE, json.dumps(self.state))
