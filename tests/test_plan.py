"""Rank plans and the ratio: ranks from ratio as ALGORITHMS.md says, achieved ratio near target."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from lowrank_kit_plugins.uniform import Uniform

from lowrank_kit.compressed.factorization import projection_units
from lowrank_kit.compressed.plan import achieved_ratio, uniform_fraction
from lowrank_kit.models.adapters import PROJECTIONS, Geometry

SMOLLM2 = Geometry(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536)
GEMMA3 = Geometry(layers=18, hidden=640, heads=4, kv_heads=1, head_dim=256, intermediate=2048)


def fake_run(geometry: Geometry, ratio: float) -> SimpleNamespace:
    return SimpleNamespace(geometry=geometry, target_ratio=ratio)


@pytest.mark.parametrize("geometry", [SMOLLM2, GEMMA3], ids=["smollm2", "gemma3"])
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
def test_uniform_ranks_follow_the_formula_and_hit_the_target(geometry: Geometry, ratio: float) -> None:
    run = fake_run(geometry, ratio)
    units = projection_units(run, "svd_llm", PROJECTIONS)
    plan = Uniform().lowrank_allocate(run, units)
    for unit in units:
        m, n = geometry.dense_shape(unit.kind)
        assert plan.rank(unit) == math.floor((1 - ratio) * m * n / (m + n))
    achieved = achieved_ratio(plan, units, geometry.total_linear_params)
    assert achieved >= ratio and abs(achieved - ratio) <= 0.01 * ratio


def test_untouched_modules_raise_the_fraction_of_the_others() -> None:
    run = fake_run(SMOLLM2, 0.2)
    units = projection_units(run, "svd_llm", ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    fraction = uniform_fraction(units, SMOLLM2.total_linear_params, 0.2)
    d = SMOLLM2
    qk = d.dense_params("q_proj") + d.dense_params("k_proj")
    rest = sum(d.dense_params(p) for p in ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert fraction == pytest.approx((0.8 * (qk + rest) - qk) / rest)  # ALGORITHMS.md §1c
    plan = Uniform().lowrank_allocate(run, units)
    assert abs(achieved_ratio(plan, units, d.total_linear_params) - 0.2) <= 0.002


def test_unreachable_ratio_is_explained() -> None:
    run = fake_run(SMOLLM2, 0.9)
    units = projection_units(run, "svd_llm", ("k_proj",))
    with pytest.raises(ValueError, match="out of reach"):
        Uniform().lowrank_allocate(run, units)


def test_a_rank_that_saves_nothing_stays_dense() -> None:
    (unit,) = projection_units(fake_run(Geometry(1, 8, 1, 1, 8, 8), 0.2), "svd", ("q_proj",))
    assert unit.rank_for_fraction(1.0) == unit.max_rank and unit.is_dense(unit.max_rank)
    assert unit.is_dense(5) and unit.params(5) == 64  # 5·(8+8) > 8·8
    assert not unit.is_dense(3) and unit.params(3) == 48
