"""Transform ``svd_llm``: SVD-LLM's whitened factorisation (ALGORITHMS.md §2).

Truncating W S (S S^T = X^T X) loses exactly the squared dropped singular values in output
error on the calibration inputs. Works on GQA models: k/v shapes come from the adapter.
A bias-free projection with fewer outputs than inputs and an input of its own (down_proj) is
read at its output: the Gram Y^T Y = W X^T X W^T is all its factors need, and it is the narrower
one (deviation from §2's per-layer X^T X in what is gathered; the factors differ only by the
rounding of Y; ``output_whitened_spectrum``).

``output_fisher: λ`` (an option, our extension; null keeps SVD-LLM) also weights the output
side: the SVD is of R W S, with R² the projection's output Fisher Σ gᵀg (loss gradients at its
output, gathered in the scoring pass) damped by λ and scaled to mean eigenvalue 1
(``output_weighting``). SVD-LLM treats an error in every output direction alike; the loss does
not, and with both Kronecker factors of the Fisher the truncation minimises the second-order
loss increase K-FAC predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowrank_kit.extend import (
    Gram,
    ProjectionFactorization,
    RunState,
    Spectrum,
    Statistic,
    StrategyRegistry,
    Tap,
    Unit,
    check_output_fisher,
    hookimpl,
    output_fisher,
    output_whitened_spectrum,
    watch_output_fisher,
    whitened_spectrum,
)


@dataclass
class SvdLlmArgs:
    output_fisher: float | None = field(default=None, metadata={
        "help": "weight output errors by the projection's output Fisher, damped by this much (relative to its "
                "mean eigenvalue): the truncation then minimises the loss increase K-FAC predicts; null: every "
                "output direction alike (SVD-LLM). Gathered in the scoring pass (a backward per batch)"})

    def check(self, path: str) -> None:
        check_output_fisher(path, self.output_fisher)


class SvdLlm(ProjectionFactorization):
    name = "svd_llm"
    description = "Whitened SVD (SVD-LLM): truncation error measured on calibration activations."
    Args = SvdLlmArgs
    statistic = Gram

    @property  # type: ignore[override]
    def needs_dense_statistics(self) -> bool:
        return self.args.output_fisher is not None

    def spectrum(self, weight: torch.Tensor, stat: Statistic | None) -> Spectrum:
        return whitened_spectrum(weight, stat.matrix)

    @hookimpl
    def lowrank_collect_dense(self, run: RunState, tap: Tap) -> None:
        if self.args.output_fisher is not None:
            for unit in run.units:
                if unit.transform == self.name:
                    watch_output_fisher(run, tap, unit.layer, unit.projection)

    def reads_output(self, run: RunState, layer: int, projection: str) -> bool:
        """A bias-free projection with fewer outputs than inputs (down_proj) is factorised from the
        Gram of its outputs, W XᵀX Wᵀ, narrower than its input's (``output_whitened_spectrum``),
        unless another of our targets reads the same input (k/v beside q): that Gram is gathered
        anyway."""
        rows, cols = run.geometry.dense_shape(projection)
        site = run.adapter.input_site(layer, projection)
        shared = any(run.adapter.input_site(layer, other) == site for other in self.targets if other != projection)
        return rows < cols and not shared and run.adapter.projection(layer, projection).bias is None

    def unit_spectrum(self, run: RunState, unit: Unit, weight: torch.Tensor, stat: Statistic | None) -> Spectrum:
        weighting = (None if self.args.output_fisher is None
                     else output_fisher(run, unit.layer, unit.projection, self.args.output_fisher))
        if self.reads_output(run, unit.layer, unit.projection):
            return output_whitened_spectrum(weight, stat.matrix, weighting)
        return whitened_spectrum(weight, stat.matrix, weighting)


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(SvdLlm)
