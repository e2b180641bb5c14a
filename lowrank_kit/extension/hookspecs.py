"""The hook points of a compression run, as pluggy hook specifications.

The five stages of a run are collect (``lowrank_collect_dense`` for the scoring pass,
``lowrank_collect_layer`` per decoder layer) → ``lowrank_score`` → ``lowrank_allocate`` →
``lowrank_transform`` → ``lowrank_decode``. ``lowrank_units`` is how a transform reports
what it can compress and what each kept rank costs, so any allocator can drive any transform;
``lowrank_error_curves`` what each kept rank loses, for allocators that plan from errors.
``lowrank_register`` is called once per installed plugin module to announce its strategies.

Implementations are methods of configured strategy instances (see ``lowrank_kit.extension.manager``):
a run's plugin manager holds only the strategies its recipe selected, so every registered
implementation is meant to run. Implementations run in recipe order; a method marked
``@hookimpl`` whose name is no hook here is an error (a misspelt hook would never run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from lowrank_kit.calibration.stats import Tap
    from lowrank_kit.compressed.plan import ErrorCurve, RankPlan, Unit
    from lowrank_kit.extension.strategy import StrategyRegistry
    from lowrank_kit.pipeline.state import RunState

PROJECT = "lowrank_kit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lowrank_register(registry: StrategyRegistry) -> None:
    """Add this plugin module's strategy classes with ``registry.add(cls)``."""


@hookspec
def lowrank_collect_dense(run: RunState, tap: Tap) -> None:
    """Attach statistic gatherers for the dense scoring pass over the whole model (pass 1).

    Runs only when the recipe has a score strategy or a transform sets ``needs_dense_statistics``;
    results land in ``run.stats`` once the pass is over, before ``lowrank_score``, and stay there
    until the compression pass is done with their layer (keys at a layer's sites, ``site_name``,
    are freed then; other keys stay for the whole run). Attach with ``tap.watch`` (forward) or ``tap.watch_grad``
    (a backward pass per batch). Transforms are called before the other strategies. In a bench, a
    transform's statistics may come from an earlier cell's pass (the store), with no pass run: they
    are shared, so read them and never modify them.
    """


@hookspec
def lowrank_collect_layer(run: RunState, tap: Tap, layer: int) -> None:
    """Attach statistic gatherers to decoder layer ``layer`` before it is compressed (pass 2).

    Its inputs come from the already-compressed earlier layers (``calibration.pipeline:
    sequential``) or from the dense model (``dense_input``). The pass may call this more than
    once for a layer (the dense-input pass first asks which statistics a layer needs, to skip
    forwards for statistics it already holds), so an implementation only attaches gatherers.
    Results land in ``run.stats`` before ``lowrank_transform`` for the layer and are dropped after it.
    The sequential pass stops a layer's dense forward once every watched module has fed its
    statistic (``Tap.until_filled``), so attach gatherers through ``tap``, not hooks of your own.
    """


@hookspec
def lowrank_score(run: RunState) -> dict[str, float] | None:
    """Turn pass-1 statistics into importances keyed by unit or layer name."""


@hookspec
def lowrank_units(run: RunState) -> list[Unit]:
    """A transform's compressible units: modules, dense size and parameter cost per kept rank."""


@hookspec
def lowrank_error_curves(run: RunState, layer: int) -> list[ErrorCurve]:
    """What truncating each of this transform's units in decoder layer ``layer`` costs, per kept rank.

    Called by the error-curve pass (only for allocators that plan from error curves) once the
    statistics this transform attaches in ``lowrank_collect_layer`` were gathered on the dense
    model; the plan is then a probe that keeps every unit at rank 0, so every unit collects, and
    ``run.planning`` is true (a transform needing more for its curves than for its transform
    attaches it then). Keep only the curves: the statistics are dropped after the layer.
    """


@hookspec(firstresult=True)
def lowrank_allocate(run: RunState, units: list[Unit]) -> RankPlan | None:
    """Turn importances and the target ratio into a rank plan (the first allocator wins)."""


@hookspec
def lowrank_transform(run: RunState, layer: int) -> None:
    """Rewrite the modules of decoder layer ``layer`` that this transform targets, per the plan."""


@hookspec
def lowrank_decode(run: RunState, model: nn.Module) -> None:
    """Install generation-time behaviour (e.g. a progressive rank schedule) on the model."""
