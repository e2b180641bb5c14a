"""The hook points of a compression run, as pluggy hook specifications.

The five stages of a run are ``lowrank_collect`` → ``lowrank_score`` → ``lowrank_allocate``
→ ``lowrank_transform`` → ``lowrank_decode``. ``lowrank_units`` is how a transform reports
what it can compress and what each kept rank costs, so any allocator can drive any transform.
``lowrank_register`` is called once per installed plugin module to announce its strategies.

Implementations are methods of configured strategy instances (see ``lowrank_kit.strategy``):
a run's plugin manager holds only the strategies its recipe selected, so every registered
implementation is meant to run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from lowrank_kit.plan import RankPlan, Unit
    from lowrank_kit.state import RunState
    from lowrank_kit.stats import Tap
    from lowrank_kit.strategy import StrategyRegistry

PROJECT = "lowrank_kit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lowrank_register(registry: StrategyRegistry) -> None:
    """Add this plugin module's strategy classes with ``registry.add(cls)``."""


@hookspec
def lowrank_collect(run: RunState, tap: Tap, layer: int | None) -> None:
    """Attach statistic gatherers to modules with ``tap`` before a calibration pass.

    ``layer`` is None for the dense scoring pass over the whole model (pass 1), else the index
    of the decoder layer about to be compressed (pass 2), whose inputs come from the
    already-compressed earlier layers. Results land in ``run.stats`` once the pass is over.
    """


@hookspec
def lowrank_score(run: RunState) -> dict[str, float] | None:
    """Turn pass-1 statistics into importances keyed by unit or layer name."""


@hookspec
def lowrank_units(run: RunState) -> list[Unit]:
    """A transform's compressible units: modules, dense size and parameter cost per kept rank."""


@hookspec(firstresult=True)
def lowrank_allocate(run: RunState, units: list[Unit]) -> RankPlan | None:
    """Turn importances and the target ratio into a rank plan (the first allocator wins)."""


@hookspec
def lowrank_transform(run: RunState, layer: int) -> None:
    """Rewrite the modules of decoder layer ``layer`` that this transform targets, per the plan."""


@hookspec
def lowrank_decode(run: RunState, model: Any) -> None:
    """Install generation-time behaviour (e.g. a progressive rank schedule) on the model."""
