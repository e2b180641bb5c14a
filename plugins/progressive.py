"""Decode strategy ``progressive``: FLRC's progressive low-rank decoding (ALGORITHMS.md §3b).

The prompt runs at the allocated ranks; while generating, every low-rank module (LowRankLinear
factors, head-wise PCA value dims with their cache slice and o_proj columns) keeps a fraction
of its rank that falls with the number of generated tokens. The schedule lives in the recipe
and is saved with the model, so ``load_pretrained`` restores it; ``model.lowrank_decoder.trace``
shows the fraction used at every step.

The default schedule was chosen on the standard bench (benchmarks/progressive_tradeoff.py on
flrc_static at 0.2, 32 Persuasion prompts, 64 new tokens): it saves 24.9% of the low-rank
modules' decode multiply-adds for a 6% relative loss of ROUGE-L against the dense model
(0.253 → 0.238); docs/results.md has the whole curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lowrank_kit.extend import RecipeError, RunState, Strategy, StrategyRegistry, hookimpl, install_decoder


@dataclass
class ProgressiveArgs:
    stages: list[list[float]] = field(
        default_factory=lambda: [[0, 1.0], [16, 0.75], [40, 0.6]],
        metadata={"help": "[generated-token index, kept fraction of each module's rank] pairs: from that "
                          "token on; starts increasing, fractions not increasing"},
    )
    floor: float = field(default=0.5, metadata={"help": "never keep less than this fraction of a rank"})

    def check(self, path: str) -> None:
        if not self.stages:
            raise RecipeError(f"{path}.stages", "needs at least one [token, fraction] stage, e.g. [[0, 1.0]]")
        previous: list[float] | None = None
        for i, stage in enumerate(self.stages):
            where = f"{path}.stages[{i}]"
            if len(stage) != 2 or stage[0] < 0 or stage[0] != int(stage[0]):
                raise RecipeError(where, f"expected [generated-token index (integer >= 0), fraction], got {stage}")
            if not 0.0 < stage[1] <= 1.0:
                raise RecipeError(where, f"the kept fraction must lie in (0, 1], got {stage[1]}")
            if previous is not None and (stage[0] <= previous[0] or stage[1] > previous[1]):
                raise RecipeError(where, "stages must start later and keep no more than the stage before "
                                         "(the rank only shrinks while generating)")
            previous = stage
        if not 0.0 < self.floor <= 1.0:
            raise RecipeError(f"{path}.floor", f"must lie in (0, 1], got {self.floor}")


class Progressive(Strategy):
    name = "progressive"
    point = "decode"
    description = "Active rank of low-rank modules shrinks as more tokens are generated (FLRC)."
    Args = ProgressiveArgs

    @hookimpl
    def lowrank_decode(self, run: RunState, model: nn.Module) -> None:
        decoder = install_decoder(model, {"kind": "progressive", "stages": self.args.stages, "floor": self.args.floor})
        run.notes[self.name] = {"modules": len(decoder.modules), **decoder.spec()}


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(Progressive)
