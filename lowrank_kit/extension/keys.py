"""The names strategies share, built in one place, so no two strategies agree on a string by habit.

Statistics are keyed by kind and site (``statistic_key(Gram, adapter.input_site(i, "down_proj"))``
is the Gram of down_proj's input, whichever transform asked for it); scores are keyed per
layer or per projection, and a scorer and an allocator declare which level they speak
(``ScoreLevel``), which the recipe validator checks; units are named per projection or per
group of projections of one layer.
"""

from __future__ import annotations

from typing import Literal

# The projections of a decoder layer by their logical names: recipes target these, and each
# model adapter maps them onto its architecture's modules.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

# What a score strategy produces and an allocator consumes: one importance per decoder layer
# (FLAT-LLM's angular importance → IPRS), one per projection weight of each layer (FLRC's
# Fisher), or one loss sensitivity per projection output (output_gradient → error_greedy).
ScoreLevel = Literal["layer", "projection", "output"]
SCORE_LEVELS: tuple[ScoreLevel, ...] = ("layer", "projection", "output")


def layer_name(layer: int) -> str:
    """A decoder layer, as statistics, scores and units name it: ``layers.3``."""
    return f"layers.{layer}"


def projection_name(layer: int, projection: str) -> str:
    """One projection of a layer: ``layers.3.q_proj`` (also its score key and its unit's name)."""
    return f"{layer_name(layer)}.{projection}"


def group_name(layer: int, group: str) -> str:
    """A unit holding several projections of a layer, e.g. ``layers.3.mlp``."""
    return f"{layer_name(layer)}.{group}"


def site_name(layer: int, site: str) -> str:
    """Where in a layer a statistic is taken, e.g. ``layers.3.mlp_input``, ``layers.3.v_proj_output``."""
    return f"{layer_name(layer)}.{site}"


def statistic_key(statistic: type | str, where: str) -> str:
    """The key of a gathered statistic: its kind and where it was taken, e.g. ``Gram:layers.3.mlp_input``.

    Two strategies asking for the same kind at the same site share one statistic.
    """
    kind = statistic if isinstance(statistic, str) else statistic.__name__
    return f"{kind}:{where}"


def is_layer_statistic(key: str, layer: int) -> bool:
    """Whether a statistic key (``statistic_key``) was taken in decoder layer ``layer``: at the layer
    itself (``AngularChange:layers.3``) or at one of its sites (``Gram:layers.3.mlp_input``)."""
    where = key.partition(":")[2]
    return where == layer_name(layer) or where.startswith(f"{layer_name(layer)}.")


def layer_score(layer: int) -> str:
    """The key of a per-layer importance (score level ``layer``)."""
    return layer_name(layer)


def projection_score(layer: int, projection: str) -> str:
    """The key of a per-projection importance (score level ``projection``)."""
    return projection_name(layer, projection)
