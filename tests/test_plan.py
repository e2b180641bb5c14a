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


ALLOCATOR_RECIPES = {
    "uniform": {"allocate": "uniform"},
    "iprs": {"score": "angular_importance", "allocate": "iprs"},
    "fisher": {"score": "fisher", "allocate": "fisher"},
    "fisher truncation": {"score": "fisher", "allocate": {"plugin": "fisher", "rule": "truncation"}},
    "error_budget": {"score": "output_gradient", "allocate": "error_budget"},
}


@pytest.mark.parametrize("allocator", list(ALLOCATOR_RECIPES))
def test_every_allocator_plans_multiples_of_target_multiple(tmp_path, allocator: str) -> None:
    """One rounding in the plan (Unit.multiple): whichever allocator plans, every compressed module's
    rank is a multiple of target.multiple, and the ratio counted from the real shapes still holds."""
    from conftest import ByteTokenizer, tiny_model, tiny_recipe

    from lowrank_kit import compress

    recipe = tiny_recipe(tmp_path, "svd_llm", 0.3, target={"ratio": 0.3, "multiple": 4},
                         **ALLOCATOR_RECIPES[allocator])
    result = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    modules = result.report["modules"]
    assert all(m["dense"] or m["rank"] % 4 == 0 for m in modules)
    assert any(not m["dense"] and m["rank"] > 0 for m in modules)
    # One fraction for all units moves every rank by 4 at once (on 64-wide matrices, ~4% of the
    # weights); the allocators that plan unit by unit stay within 1%.
    assert 0.3 <= result.report["achieved_ratio"] <= 0.3 + (0.05 if allocator == "uniform" else 0.01)


def test_an_allocator_multiple_says_where_it_moved(tmp_path) -> None:
    from conftest import tiny_recipe

    from lowrank_kit.recipe.loading import from_raw
    from lowrank_kit.recipe.schema import RecipeError

    with pytest.raises(RecipeError, match=r"allocate.multiple: moved to target.multiple.*target.multiple: 8"):
        from_raw(tiny_recipe(tmp_path, score="fisher", allocate={"plugin": "fisher", "multiple": 8}))


def test_round_keeps_dense_and_never_reaches_zero() -> None:
    from lowrank_kit.compressed.plan import Unit

    u = Unit("layers.0.q_proj", 0, ("q_proj",), "svd", dense_params=64 * 64, rank_cost=128, max_rank=64, multiple=8)
    assert [u.round(r) for r in (0, 3, 8, 15, 31, 32, 64)] == [0, 8, 8, 8, 24, 32, 64]
    assert u.plannable_ranks() == [0, 8, 16, 24, 64]  # 32 × 128 = the dense size: kept dense instead
    assert u.rank_for_fraction(0.3) == 8  # floor(0.3 · 4096 / 128) = 9 → 8


def test_break_even_keeps_factorised_units_dense_and_the_ratio_honest(tmp_path) -> None:
    """target.break_even: a factorisation keeping that share of its parameters or more stays dense,
    its parameters count as dense, and the allocator cuts elsewhere to meet the target."""
    from conftest import ByteTokenizer, tiny_model, tiny_recipe

    from lowrank_kit import compress

    recipe = tiny_recipe(tmp_path, "svd_llm", 0.3, target={"ratio": 0.3, "break_even": 0.8},
                         score="fisher", allocate="fisher")
    result = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    units = {u.name: u for u in result.run.units}
    for m in result.report["modules"]:
        share = m["rank"] * units[m["unit"]].rank_cost / m["params_dense"]
        assert m["dense"] == (share >= 0.8 or m["rank"] >= m["max_rank"]), m
        assert m["params_kept"] == (m["params_dense"] if m["dense"] else m["rank"] * units[m["unit"]].rank_cost)
    assert 0.3 <= result.report["achieved_ratio"] <= 0.31
    kept_dense_by_break_even = 0
    for m in result.report["modules"]:
        _, layer, projection = m["unit"].split(".")
        module = result.run.adapter.projection(int(layer), projection)
        assert type(module).__name__ == ("Linear" if m["dense"] else "LowRankLinear"), m
        kept_dense_by_break_even += m["dense"] and m["rank"] < m["max_rank"]
    assert kept_dense_by_break_even  # the case this test is about happened
