"""The run state: what strategies share. The engine owns it; strategies read and write it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from lightning.fabric import Fabric
from transformers import PreTrainedModel

from lowrank_kit.calibration.stats import Statistic
from lowrank_kit.compressed.linalg import side_by_side
from lowrank_kit.compressed.plan import ErrorCurve, RankPlan, Unit
from lowrank_kit.models.adapters import Geometry, ModelAdapter
from lowrank_kit.models.offload import Offloader
from lowrank_kit.pipeline.cache import DenseStore
from lowrank_kit.recipe.spec import Recipe

T = TypeVar("T")


@dataclass
class RunState:
    """Statistics, scores and the rank plan of one run, plus the model being compressed.

    Strategies never call each other: a transform reads the plan an allocator wrote, an
    allocator reads the scores a scorer returned, through this object.
    """

    recipe: Recipe
    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer, or anything with the same encode/decode calls
    adapter: ModelAdapter
    fabric: Fabric
    calibration: torch.Tensor  # this process's calibration windows, [n, seq_len]
    stats: dict[str, Statistic] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    units: list[Unit] = field(default_factory=list)
    plan: RankPlan | None = None
    error_curves: dict[str, ErrorCurve] = field(default_factory=dict)  # by unit name, when the allocator needs them
    layer_losses: dict[int, float] = field(default_factory=dict)  # measured at run.plan, for refining allocators
    planning: bool = False  # during the error-curve pass: transforms collect for every unit
    notes: dict[str, Any] = field(default_factory=dict)  # per-strategy facts for the report
    store: DenseStore | None = None  # results shared with other runs of this process (a bench)
    store_base: str = ""  # the dense model and calibration data those results belong to
    dense_statistics: bool = False  # whether the layer pass takes statistics on the dense model
    offload: Offloader | None = None  # runtime.offload: brings decoder layers in while they are used

    def layer_in(self, index: int, changed: bool = False) -> contextlib.AbstractContextManager[Any]:
        """Decoder layer ``index`` on the device for the block (a no-op without offloading);
        ``changed``: the block gives the layer new weights, which offloading must keep."""
        return self.offload.layer(index, changed) if self.offload is not None else contextlib.nullcontext()

    @property
    def geometry(self) -> Geometry:
        return self.adapter.geometry

    @property
    def target_ratio(self) -> float:
        return self.recipe.target.ratio

    def stat(self, key: str) -> Statistic:
        if key not in self.stats:
            raise KeyError(f"statistic '{key}' was not collected; did a strategy attach it in "
                           "lowrank_collect_dense or lowrank_collect_layer?")
        return self.stats[key]

    def dense_result(self, key: str, compute: Callable[[], T], reads_statistics: bool) -> T:
        """``compute()``, or its result from an earlier run of this process on the same dense
        model and data. Only results of dense inputs are shared: the weights being transformed
        are always dense, statistics only under the dense-input pass.
        """
        with contextlib.closing(self.dense_results([(key, compute)], reads_statistics, 0)) as results:
            return next(results)

    def dense_results(self, jobs: Sequence[tuple[str, Callable[[], T]]], reads_statistics: bool,
                      largest_dim: int) -> Iterator[T]:
        """``dense_result`` of each (key, compute), in order; those not stored are computed side
        by side on the CPU's threads (``side_by_side``: one layer's decompositions of matrices
        no larger than ``largest_dim``). Close the iterator if you stop early."""
        store = self.store if not (reads_statistics and not self.dense_statistics) else None
        found = [store.get(self.store_base, key) if store is not None else None for key, _ in jobs]
        missing = [compute for (_, compute), value in zip(jobs, found, strict=True) if value is None]
        computed = side_by_side(missing, self.fabric.device, largest_dim)
        try:
            for (key, _), value in zip(jobs, found, strict=True):
                if value is None:
                    value = next(computed)
                    if store is not None:
                        store.put(self.store_base, key, value)
                yield value
        finally:
            computed.close()  # workers stop and the thread count is put back now, not at garbage collection

    def units_of(self, transform: str, layer: int) -> list[Unit]:
        return [u for u in self.units if u.transform == transform and u.layer == layer]

    def pending(self, transform: str, layer: int) -> list[tuple[Unit, int]]:
        """The units of ``transform`` in ``layer`` the plan compresses, with their ranks (dense ones left out)."""
        plan = self.require_plan()
        return [(u, plan.rank(u)) for u in self.units_of(transform, layer) if not u.is_dense(plan.rank(u))]

    def require_plan(self) -> RankPlan:
        if self.plan is None:
            raise RuntimeError("no rank plan: transforms run after the allocator")
        return self.plan
