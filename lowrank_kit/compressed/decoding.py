"""Generation-time behaviour of a compressed model: progressive low-rank decoding (ALGORITHMS.md §3b).

Low-rank modules store their components ordered by importance (singular values for
LowRankLinear, eigenvalues for head-wise PCA's value dims), so a lower active rank is a slice.
A ``ProgressiveDecoder`` is a forward pre-hook on the model: the prompt (prefill) runs at the
allocated ranks; each later forward of ``generate`` produces generated token t and runs at the
schedule's fraction for t. The controller is saved in the config's ``lowrank.decode`` section and
re-installed by ``load_pretrained``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from lowrank_kit.compressed.modules import SliceableRank
from lowrank_kit.models import hf_compat


def rank_modules(model: nn.Module) -> list[SliceableRank]:
    """Modules whose rank can be sliced at generation time."""
    return [m for m in model.modules() if isinstance(m, SliceableRank)]


def is_prompt(kwargs: dict[str, Any]) -> bool:
    """Whether a forward of ``generate`` processes a prompt (empty or no KV cache) rather than a new token."""
    cache = hf_compat.cache_in(kwargs)
    return cache is None or cache.get_seq_length() == 0


def set_fraction(modules: list[SliceableRank], fraction: float) -> None:
    """Keep ``fraction`` of every module's allocated rank (at least 1); 1.0 restores all of it."""
    for module in modules:
        module.active_rank = None if fraction >= 1.0 else max(1, math.floor(fraction * module.full_rank + 1e-6))


class ProgressiveDecoder:
    """Lowers the active rank of every low-rank module as more tokens are generated.

    ``stages`` are (generated-token index, kept fraction) pairs, starts increasing and fractions
    not increasing: from token t on, the fraction of the last stage starting at or before t
    applies, never below ``floor``. ``trace`` holds (generated index, fraction) of every forward
    of the latest generation, for reports and tests.
    """

    kind = "progressive"

    def __init__(self, model: nn.Module, stages: list[tuple[int, float]], floor: float):
        hf_compat.cache_keyword(type(model))  # tells prompts from decode steps only by a cache it can see
        self.stages = [(int(t), float(f)) for t, f in stages]
        self.floor = floor
        self.modules = rank_modules(model)
        self.generated = 0
        self.trace: list[tuple[int, float]] = []
        self._handle = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def fraction(self, generated: int) -> float:
        kept = 1.0
        for start, fraction in self.stages:
            if generated >= start:
                kept = fraction
        return max(kept, self.floor)

    def _before_forward(self, _model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        fed = tokens.shape[1] if tokens is not None else kwargs["inputs_embeds"].shape[1]
        if is_prompt(kwargs):  # all of the allocated rank
            self.generated, fraction = 0, 1.0
            self.trace = []
        else:  # this forward feeds the last `fed` tokens and produces the next one
            self.generated += fed
            fraction = self.fraction(self.generated)
        set_fraction(self.modules, fraction)
        self.trace.append((self.generated, fraction))

    def remove(self) -> None:
        self._handle.remove()
        set_fraction(self.modules, 1.0)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "stages": [list(s) for s in self.stages], "floor": self.floor}


# Decoder kind → installer from a saved spec; third-party decode strategies register here.
DECODERS: dict[str, Callable[[nn.Module, dict[str, Any]], Any]] = {
    "progressive": lambda model, spec: ProgressiveDecoder(model, spec["stages"], spec["floor"]),
}


def install(model: nn.Module, spec: dict[str, Any]) -> Any:
    """Install a decoder on ``model`` from its spec, replacing any installed one."""
    if spec.get("kind") not in DECODERS:
        raise ValueError(f"unknown decoder kind {spec.get('kind')!r}; known: {sorted(DECODERS)}")
    previous = getattr(model, "lowrank_decoder", None)
    if previous is not None:
        previous.remove()
    decoder = DECODERS[spec["kind"]](model, spec)
    model.lowrank_decoder = decoder
    return decoder
