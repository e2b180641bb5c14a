"""Shared machinery of transforms that factorise single projections (svd, svd_llm, asvd).

A subclass says which statistics it needs and how to factorise one weight at any rank; units, the rank
lookup in the plan and the module swap live here once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch

from lowrank_kit.calibration.stats import GradientGram, Gram, Statistic, Tap
from lowrank_kit.compressed.linalg import Spectrum, output_weighting
from lowrank_kit.compressed.modules import LowRankLinear
from lowrank_kit.compressed.plan import ErrorCurve, Unit
from lowrank_kit.extension.hookspecs import hookimpl
from lowrank_kit.extension.keys import PROJECTIONS, projection_name, statistic_key
from lowrank_kit.extension.strategy import Strategy
from lowrank_kit.recipe.schema import RecipeError, to_dict

if TYPE_CHECKING:
    from lowrank_kit.pipeline.state import RunState


def projection_units(run: RunState, transform: str, targets: tuple[str, ...]) -> list[Unit]:
    """One unit per targeted projection: an m×n matrix at rank r keeps r·(m+n) parameters."""
    geometry = run.geometry
    units = []
    for layer in range(geometry.layers):
        for projection in targets:
            out, inp = geometry.dense_shape(projection)
            units.append(Unit(name=projection_name(layer, projection), layer=layer, projections=(projection,),
                              transform=transform, dense_params=out * inp, rank_cost=out + inp,
                              max_rank=min(out, inp), factorised=True))
    return units


def output_fisher_key(run: RunState, layer: int, projection: str) -> str:
    """The key of a projection's output Fisher (``GradientGram``), gathered by the scoring pass."""
    return statistic_key(GradientGram, run.adapter.output_site(layer, projection))


def watch_output_fisher(run: RunState, tap: Tap, layer: int, projection: str) -> None:
    """Gather a projection's output Fisher in the scoring pass (a backward pass per batch)."""
    tap.watch_output_grad(output_fisher_key(run, layer, projection), run.adapter.projection(layer, projection),
                          GradientGram())


def check_output_fisher(path: str, damping: float | None) -> None:
    """A transform's ``output_fisher`` must be null or a positive damping: with none, output directions
    that no calibration gradient reached would cost nothing to cut."""
    if damping is not None and not damping > 0:
        raise RecipeError(f"{path}.output_fisher", f"must be positive (e.g. 0.01) or null, got {damping}: without "
                                                   "damping, output directions no calibration gradient reached "
                                                   "would cost nothing")


def output_fisher(run: RunState, layer: int, projection: str, damping: float,
                  blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R⁻¹) of the projection's damped, normalised output Fisher (``output_weighting``)."""
    return output_weighting(run.stat(output_fisher_key(run, layer, projection)).matrix, damping, blocks)


class ProjectionFactorization(Strategy):
    """A transform replacing each targeted projection by a LowRankLinear at its planned rank."""

    point = "transform"
    allowed_targets: ClassVar[tuple[str, ...]] = PROJECTIONS
    # Statistic of the projection's input this transform needs; None for data-free transforms.
    statistic: ClassVar[type[Statistic] | None] = Gram

    def spectrum(self, weight: torch.Tensor, stat: Statistic | None) -> Spectrum:
        """The rank-independent factorisation of one dense weight (float64)."""
        raise NotImplementedError

    def reads_output(self, run: RunState, layer: int, projection: str) -> bool:
        """Whether ``statistic`` is taken at the projection's output rather than its input (never here)."""
        return False

    def _key(self, run: RunState, layer: int, projection: str) -> str:
        assert self.statistic is not None
        adapter = run.adapter
        site = (adapter.output_site(layer, projection) if self.reads_output(run, layer, projection)
                else adapter.input_site(layer, projection))
        return statistic_key(self.statistic, site)

    @hookimpl
    def lowrank_units(self, run: RunState) -> list[Unit]:
        return projection_units(run, self.name, self.targets)

    @hookimpl
    def lowrank_collect_layer(self, run: RunState, tap: Tap, layer: int) -> None:
        for unit, _ in run.pending(self.name, layer):
            module = run.adapter.projection(layer, unit.projection)
            if self.statistic is not None:
                where = "output" if self.reads_output(run, layer, unit.projection) else "input"
                tap.watch(self._key(run, layer, unit.projection), module, self.new_statistic(), where)
            if run.planning:  # output errors of any factorisation are measured with the input Gram
                tap.watch(statistic_key(Gram, run.adapter.input_site(layer, unit.projection)), module, Gram())

    def new_statistic(self) -> Statistic:
        assert self.statistic is not None
        return self.statistic()

    def unit_spectrum(self, run: RunState, unit: Unit, weight: torch.Tensor, stat: Statistic | None) -> Spectrum:
        """``spectrum`` of one unit; a transform that also reads other statistics of the run
        (e.g. an output Fisher) overrides this instead."""
        return self.spectrum(weight, stat)

    def _spectra(self, run: RunState, layer: int, units: list[Unit]) -> contextlib.closing[Iterator[Spectrum]]:
        """Each unit's spectrum, in order, computed side by side (``RunState.dense_results``); a
        context manager, so workers stop if the caller fails half-way."""
        jobs = []
        for unit in units:
            dense = run.adapter.projection(layer, unit.projection)
            stat_key = self._key(run, layer, unit.projection) if self.statistic is not None else None
            stat = run.stat(stat_key) if stat_key is not None else None
            if isinstance(stat, Gram):
                stat.matrix  # noqa: B018 -- made whole here, once, not by two workers at once
            # The same weight and statistic give the same spectrum at every rank: a bench computes
            # it once for all ratios and for every recipe using this transform with these arguments.
            jobs.append((f"spectrum|{self.name}|{to_dict(self.args)}|{unit.name}|{stat_key}",
                         partial(self.unit_spectrum, run, unit, dense.weight.detach(), stat)))
        largest = max((max(run.geometry.dense_shape(unit.projection)) for unit in units), default=0)
        return contextlib.closing(run.dense_results(jobs, self.statistic is not None, largest))

    @hookimpl
    def lowrank_error_curves(self, run: RunState, layer: int) -> list[ErrorCurve]:
        """Output error on the calibration inputs at every rank, for any of the three spectra.

        W ≈ Σᵢ aᵢ bᵢᵀ with orthogonal aᵢ (columns of U Σ½), so dropping components i ≥ r costs
        ‖Σ_{i≥r} aᵢ bᵢᵀ X‖² = Σ_{i≥r} ‖aᵢ‖² · bᵢᵀ (XᵀX) bᵢ (the cross terms vanish); for SVD-LLM's
        whitened spectrum this is exactly σᵢ². In weight space the same components cost
        ‖aᵢ‖²‖bᵢ‖² each (``weight_error``; exact too, as the aᵢ are orthogonal). For a tall
        weight the aᵢ of components below ~1e-8·σ₁ are only nearly orthogonal (``thin_svd``), so
        the tail of the curve is exact to that level, far below any error that decides a rank.
        """
        curves = []
        units = run.units_of(self.name, layer)
        with self._spectra(run, layer, units) as spectra:
            for unit, spectrum in zip(units, spectra, strict=True):
                curves.append(self._error_curve(run, layer, unit, spectrum))
        return curves

    def _error_curve(self, run: RunState, layer: int, unit: Unit, spectrum: Spectrum) -> ErrorCurve:
        gram = run.stat(statistic_key(Gram, run.adapter.input_site(layer, unit.projection))).matrix
        a, b = spectrum.factors(unit.max_rank, weighted=True)
        left = a.pow(2).sum(0)
        dropped = left * ((b @ gram.to(b.dtype)) * b).sum(1)
        # Under an output weighting the error is in its metric and the unweighted aᵢ are not
        # orthogonal, so no exact weight error comes with it.
        weight = (left * b.pow(2).sum(1)).tolist() if spectrum.unweight is None else None
        return ErrorCurve.from_tail(unit.name, unit.projection, dropped.tolist(), weight)

    @hookimpl
    def lowrank_transform(self, run: RunState, layer: int) -> None:
        pending = run.pending(self.name, layer)
        with self._spectra(run, layer, [unit for unit, _ in pending]) as spectra:
            for (unit, rank), spectrum in zip(pending, spectra, strict=True):
                dense = run.adapter.projection(layer, unit.projection)
                a, b = spectrum.factors(rank)
                bias = dense.bias.detach() if dense.bias is not None else None
                module = LowRankLinear.from_factors(a.to(dense.weight.dtype), b.to(dense.weight.dtype), bias)
                run.adapter.replace(layer, unit.projection, module.to(dense.weight.device))
