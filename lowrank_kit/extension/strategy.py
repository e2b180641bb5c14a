"""Strategies: named, configurable plugin classes, and the registry of them by hook point.

A strategy class names its hook point, has a dataclass of typed arguments with defaults, and
implements the hooks it needs with ``@hookimpl``. Discovery (entry points) and the per-run
plugin manager live in ``extension.manager``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from lowrank_kit.extension.keys import ScoreLevel
from lowrank_kit.recipe.schema import RecipeError, closest

HookPoint = Literal["collect", "score", "allocate", "transform", "decode"]
HOOK_POINTS: tuple[str, ...] = ("collect", "score", "allocate", "transform", "decode")


def moved_argument(value: object, path: str, where: str) -> None:
    """Reject an argument that moved elsewhere in the recipe, saying where (None: not given)."""
    if value is not None:
        raise RecipeError(path, f"moved to {where}, which applies to every allocator; write "
                                f"{where}: {value} instead")


@dataclasses.dataclass
class NoArgs:
    """For strategies without arguments."""


class Strategy:
    """Base class of every strategy. Subclasses set the class attributes and implement hooks."""

    name: ClassVar[str]
    point: ClassVar[str]
    description: ClassVar[str]
    Args: ClassVar[type] = NoArgs
    # Transforms only: the projections they may rewrite (recipe key ``targets``), and whether
    # the chosen targets must be all of them (e.g. head-wise PCA rewrites v and o together).
    allowed_targets: ClassVar[tuple[str, ...]] = ()
    targets_all_or_none: ClassVar[bool] = False
    default_targets: ClassVar[tuple[str, ...] | None] = None  # when a recipe names none (None: all allowed)
    # Scorers: the level of the importances they produce; allocators: the level they consume
    # (None: none). The recipe validator rejects an allocator whose level no scorer produces.
    produces: ClassVar[ScoreLevel | None] = None
    consumes: ClassVar[ScoreLevel | None] = None
    # Allocators that need importances of any level (plugins written before ``consumes``).
    needs_scores: ClassVar[bool] = False
    # Allocators that plan from the transforms' truncation-error curves (``run.error_curves``):
    # the engine runs the error-curve pass over the dense model before allocating.
    needs_error_curves: ClassVar[bool] = False
    # Transforms that read statistics of the scoring pass (``lowrank_collect_dense``, e.g. an
    # output Fisher): the engine then runs that pass even without a score strategy, and even
    # when the scores are cached (statistics are not).
    needs_dense_statistics: ClassVar[bool] = False
    # Allocators that refine their plan by measurement: after each plan the engine measures every
    # decoder layer's loss increase when it alone is compressed at that plan (``run.layer_losses``,
    # on ``refine_windows`` held-out windows of the calibration text) and asks again, this many times.
    refine_rounds: ClassVar[int] = 0
    refine_windows: ClassVar[int] = 4

    def __init__(self, args: Any = None, targets: Iterable[str] = ()):
        self.args = args if args is not None else self.Args()
        self.targets: tuple[str, ...] = tuple(targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args})"

    @classmethod
    def check_targets(cls, targets: list[str], path: str) -> None:
        """Reject targets this transform cannot rewrite; called by the recipe validator."""
        for i, target in enumerate(targets):
            if not isinstance(target, str):
                raise RecipeError(f"{path}[{i}]", f"expected a projection name such as "
                                                  f"'{cls.allowed_targets[0]}', got {target!r}")
            if target not in cls.allowed_targets:
                raise RecipeError(
                    f"{path}[{i}]",
                    f"'{cls.name}' cannot target '{target}'; {closest(target, cls.allowed_targets)}",
                )
        if len(set(targets)) != len(targets):
            raise RecipeError(path, "a target is listed twice")
        if cls.targets_all_or_none and set(targets) != set(cls.allowed_targets):
            raise RecipeError(path, f"'{cls.name}' rewrites {list(cls.allowed_targets)} together")


class StrategyRegistry:
    """Strategy classes by hook point and name, with where each came from."""

    def __init__(self) -> None:
        self._classes: dict[str, dict[str, type[Strategy]]] = {p: {} for p in HOOK_POINTS}
        self.sources: dict[tuple[str, str], str] = {}

    def add(self, cls: type[Strategy], source: str | None = None) -> None:
        if cls.point not in self._classes:
            raise ValueError(f"{cls.__name__}.point must be one of {HOOK_POINTS}, not {cls.point!r}")
        if not dataclasses.is_dataclass(cls.Args):
            raise ValueError(f"{cls.__name__}.Args must be a dataclass")
        self._classes[cls.point][cls.name] = cls
        self.sources[(cls.point, cls.name)] = source or cls.__module__

    def remove(self, cls: type[Strategy]) -> None:
        self._classes[cls.point].pop(cls.name, None)
        self.sources.pop((cls.point, cls.name), None)

    def names(self, point: str) -> list[str]:
        return sorted(self._classes[point])

    def get(self, point: str, name: str, path: str = "") -> type[Strategy]:
        found = self._classes[point].get(name)
        if found is None:
            raise RecipeError(path, f"unknown {point} strategy '{name}'; {closest(name, self._classes[point])}")
        return found

    def all(self) -> list[type[Strategy]]:
        return [cls for point in HOOK_POINTS for _, cls in sorted(self._classes[point].items())]
