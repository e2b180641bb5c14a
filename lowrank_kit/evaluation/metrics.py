"""The metrics a recipe's ``evaluate`` section can name, and one call that runs any of them.

Each metric is one module with a ``row(model, tokenizer, spec, needs_bos, fabric, desc, progress,
dense)`` function returning a report row (keys starting "_" stay out of the report); a new
metric is one module plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowrank_kit.evaluation import generation, lastword, perplexity
from lowrank_kit.recipe.spec import EvalSpec
from lowrank_kit.reporting.progress import Progress, quiet


@dataclass(frozen=True)
class Metric:
    row: Callable[..., dict[str, Any]]
    # Computed by whole-sequence forwards without a KV cache: every forward is a prompt, run at
    # the allocated ranks, so a decode strategy (which acts on generated tokens) cannot change it.
    decode_independent: bool


def _lm_eval_row(*args: Any) -> dict[str, Any]:
    from lowrank_kit.evaluation import lmeval  # lm-eval is an extra and slow to import

    return lmeval.row(*args)


METRICS: dict[str, Metric] = {
    "perplexity": Metric(perplexity.row, decode_independent=True),
    "lastword": Metric(lastword.row, decode_independent=True),
    "generation": Metric(generation.row, decode_independent=False),
    "lm_eval": Metric(_lm_eval_row, decode_independent=False),  # its tasks may generate
}
DECODE_INDEPENDENT = tuple(name for name, metric in METRICS.items() if metric.decode_independent)


def evaluate(model: Any, tokenizer: Any, spec: EvalSpec, needs_bos: bool, fabric: Any = None,
             desc: str = "perplexity", progress: Progress = quiet, dense: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Run one recipe evaluation entry; returns a row for the report."""
    return METRICS[spec.metric].row(model, tokenizer, spec, needs_bos, fabric, desc, progress, dense)
