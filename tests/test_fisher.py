"""FLRC's Fisher score and allocator (ALGORITHMS.md §3a): the formula, the budget, the cache."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from conftest import ByteTokenizer, tiny_model, tiny_recipe
from lowrank_kit_plugins.fisher import FisherAllocator, FisherAllocatorArgs, unit_importance

from lowrank_kit import compress
from lowrank_kit.compressed.factorization import projection_units
from lowrank_kit.compressed.plan import achieved_ratio
from lowrank_kit.models.adapters import PROJECTIONS, Geometry

FLRC = {"score": "fisher", "allocate": "fisher"}


def test_fisher_scores_equal_direct_autograd(tmp_path: Path) -> None:
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    result = compress(tiny_recipe(tmp_path, "svd_llm", 0.3, **FLRC), model=model, tokenizer=ByteTokenizer(),
                      progress=False)
    windows = result.run.calibration
    weights = {f"layers.{i}.{p}": getattr(layer.self_attn if p in ("q_proj", "k_proj", "v_proj", "o_proj")
                                          else layer.mlp, p).weight
               for i, layer in enumerate(dense.model.layers) for p in PROJECTIONS}
    squares = {name: torch.zeros_like(w) for name, w in weights.items()}
    batches = windows.split(4)
    for batch in batches:
        loss = dense(input_ids=batch, labels=batch).loss
        grads = torch.autograd.grad(loss, list(weights.values()))
        for name, grad in zip(weights, grads, strict=True):
            squares[name] += grad.pow(2)
    for name, square in squares.items():
        expected = (square / len(batches)).sqrt().mean().item()
        assert result.run.scores[name] == pytest.approx(expected, rel=1e-4), name
    assert all(p.requires_grad for p in model.parameters())  # gradients switched back on after scoring


def fake_run(scores: dict[str, float], ratio: float, geometry: Geometry) -> SimpleNamespace:
    return SimpleNamespace(geometry=geometry, scores=scores, target_ratio=ratio)


GEOMETRY = Geometry(layers=4, hidden=96, heads=6, kv_heads=2, head_dim=16, intermediate=256)


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("rule", ["parameters", "ranks"])
def test_allocator_meets_budget_caps_and_order(ratio: float, multiple: int, rule: str) -> None:
    run = SimpleNamespace(geometry=GEOMETRY, name="x", targets=PROJECTIONS)
    units = [dataclasses.replace(u, multiple=multiple) for u in projection_units(run, "svd_llm", PROJECTIONS)]
    generator = torch.Generator().manual_seed(1)
    scores = {u.name: float(torch.rand((), generator=generator)) + 0.05 for u in units}
    scores["layers.2.gate_proj"] = 50.0  # far more important than the rest: kept whole (capped)
    allocator = FisherAllocator(FisherAllocatorArgs(rule=rule))
    plan = allocator.lowrank_allocate(fake_run(scores, ratio, GEOMETRY), units)
    achieved = achieved_ratio(plan, units, GEOMETRY.total_linear_params)
    assert ratio <= achieved < ratio + 0.01
    by_name = {u.name: u for u in units}
    assert by_name["layers.2.gate_proj"].is_dense(plan.ranks["layers.2.gate_proj"])
    for unit in units:
        rank = plan.ranks[unit.name]
        assert unit.params(rank) <= unit.dense_params
        assert unit.is_dense(rank) or rank % multiple == 0
    # Among projections of one shape, more important ones keep at least as much.
    for kind in PROJECTIONS:
        same = sorted((u for u in units if u.kind == kind), key=lambda u: scores[u.name])
        kept = [u.params(plan.ranks[u.name]) for u in same]
        slack = multiple * same[0].rank_cost  # rounding down to a multiple can tie neighbours
        assert all(b >= a - slack for a, b in itertools.pairwise(kept)), kind
    assert len({plan.ranks[u.name] for u in units if u.kind == "up_proj"}) > 1  # not a uniform split


def test_allocator_splits_parameters_not_ranks() -> None:
    """Equal importance gives equal kept parameters (until a cap), whatever the matrix shape."""
    run = SimpleNamespace(geometry=GEOMETRY)
    units = projection_units(run, "svd_llm", ("q_proj", "gate_proj"))
    allocator = FisherAllocator(FisherAllocatorArgs(rule="parameters"))
    plan = allocator.lowrank_allocate(fake_run(dict.fromkeys((u.name for u in units), 1.0), 0.25, GEOMETRY), units)
    q, gate = units[0], units[1]
    assert abs(q.params(plan.ranks[q.name]) - gate.params(plan.ranks[gate.name])) <= gate.rank_cost


def test_grouped_units_take_element_weighted_importance() -> None:
    from lowrank_kit.compressed.plan import Unit

    unit = Unit("layers.0.v_proj+o_proj", 0, ("v_proj", "o_proj"), "headwise_pca", 1, 1, 1)
    scores = {"layers.0.v_proj": 1.0, "layers.0.o_proj": 4.0}
    v, o = GEOMETRY.dense_params("v_proj"), GEOMETRY.dense_params("o_proj")
    assert unit_importance(unit, scores, GEOMETRY) == pytest.approx((v + 4 * o) / (v + o))
    with pytest.raises(ValueError, match="score: fisher"):
        unit_importance(unit, {}, GEOMETRY)


def test_scores_are_cached_across_ratios(tmp_path: Path) -> None:
    first = compress(tiny_recipe(tmp_path, "svd_llm", 0.3, **FLRC), model=tiny_model("llama"),
                     tokenizer=ByteTokenizer(), progress=False)
    assert first.run.notes["scores"] == {"cached": False}
    recipe = tiny_recipe(tmp_path, "svd_llm", 0.5, **FLRC)
    recipe["output"]["dir"] = str(tmp_path / "out-0.5")
    second = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    assert second.run.notes["scores"] == {"cached": True}
    assert second.run.scores == first.run.scores
    other = compress({**recipe, "output": {**recipe["output"], "dir": str(tmp_path / "other")}},
                     model=tiny_model("llama", seed=5), tokenizer=ByteTokenizer(), progress=False)
    assert other.run.notes["scores"] == {"cached": False}  # other weights: a different fingerprint


def test_fisher_drives_headwise_pca_and_nystrom(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, "headwise_pca", 0.3, **FLRC)
    recipe["transform"] = [{"plugin": "headwise_pca"}, {"plugin": "nystrom"}]
    result = compress(recipe, model=tiny_model("qwen2"), tokenizer=ByteTokenizer(), progress=False)
    assert result.report["achieved_ratio"] >= 0.3
    assert {m["transform"] for m in result.report["modules"]} == {"headwise_pca", "nystrom"}


class _Geometry:
    """Three hand-made projections: q and k 100×100, gate 100×300 (dense sizes by projection)."""

    sizes: ClassVar[dict[str, int]] = {"q_proj": 100 * 100, "k_proj": 100 * 100, "gate_proj": 100 * 300}
    total_linear_params = sum(sizes.values())
    layers = 1

    def dense_params(self, projection: str) -> int:
        return self.sizes[projection]


@pytest.mark.parametrize(("rule", "expected"), [("ranks", [6, 20, 48]), ("parameters", [11, 34, 40])])
def test_fisher_rules_against_a_hand_computed_example(rule: str, expected: list[int]) -> None:
    """Importances 1, 3, 7 at ratio 0.5 (keep at most 25,000 of 50,000 parameters; a rank of q or
    k costs 200 parameters, of gate 400).

    ranks: r = B·(1, 3, 7)/11; below B = 77 (where all three reach (7, 21, 49) = 25,200) the
    floored ranks are (6, 20, 48) = 24,400.
    parameters: shares P·(1, 3, 7)/11; gate's 40th rank arrives at P = 25,142.9 giving
    (11, 34, 40) = 25,000 (exactly half), k's 35th only at P = 25,666.7 (25,200: too many).
    """
    from types import SimpleNamespace

    from lowrank_kit_plugins.fisher import FisherAllocator, FisherAllocatorArgs

    from lowrank_kit.compressed.plan import Unit

    units = [Unit(name=f"layers.0.{p}", layer=0, projections=(p,), transform="svd", dense_params=n,
                  rank_cost=100 + n // 100, max_rank=100) for p, n in _Geometry.sizes.items()]
    run = SimpleNamespace(geometry=_Geometry(), target_ratio=0.5,
                          scores={"layers.0.q_proj": 1.0, "layers.0.k_proj": 3.0, "layers.0.gate_proj": 7.0})
    plan = FisherAllocator(FisherAllocatorArgs(rule=rule)).lowrank_allocate(run=run, units=units)
    assert [plan.rank(u) for u in units] == expected


def test_truncation_rule_plans_from_weight_errors_and_refuses_other_transforms(tmp_path: Path) -> None:
    from lowrank_kit.models.adapters import adapter_for
    from lowrank_kit.recipe.schema import RecipeError

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    recipe = tiny_recipe(tmp_path, "svd_llm", 0.4, score="fisher", allocate={"plugin": "fisher", "rule": "truncation"})
    result = compress(recipe, model=model, tokenizer=ByteTokenizer(), progress=False)
    assert result.report["achieved_ratio"] == pytest.approx(0.4, abs=0.01)
    plan, run = result.run.plan, result.run
    assert len(set(plan.ranks.values())) > 1  # not a uniform split (random weights: flat spectra, so mostly 0 or full)
    for unit in run.units[:7]:  # the curve's weight error is the factorised weight's distance from dense
        rank = plan.rank(unit)
        if unit.is_dense(rank):
            continue
        module = adapter_for(result.model).projection(unit.layer, unit.projection)
        weight = (module.a @ module.b).detach().double()
        expected = (adapter_for(dense).projection(unit.layer, unit.projection).weight.double() - weight).pow(2).sum()
        assert run.error_curves[unit.name].weight_error[rank] == pytest.approx(float(expected), rel=1e-3)
    recipe = tiny_recipe(tmp_path, "headwise_pca", 0.3, score="fisher", allocate={"plugin": "fisher",
                                                                                   "rule": "truncation"})
    recipe["output"]["dir"] = str(tmp_path / "other")
    with pytest.raises(RecipeError, match=r"allocate\.rule.*weight-space error curves"):
        compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)


def test_output_sensitivity_equals_the_output_gradient_energy_for_one_token_batches() -> None:
    """With one token per batch G = g xᵀ exactly, so the K-FAC reading has no approximation left:
    n_b · mean(G²) / E[x²] = Σ_b ‖g_b‖² / d_out when every batch's input has the same energy."""
    from lowrank_kit_plugins.fisher import output_sensitivity

    from lowrank_kit.calibration.stats import AbsMean, GradEnergy, SquaredGrad

    generator = torch.Generator().manual_seed(0)
    fisher, squares, energy = SquaredGrad(), AbsMean(power=2.0), GradEnergy()
    for _ in range(3):
        g = torch.randn(1, 5, generator=generator, dtype=torch.float64)
        x = torch.randn(1, 7, generator=generator, dtype=torch.float64)
        x = x / x.norm() * 2.0  # equal input energy in every batch
        fisher.update(g.T @ x)
        squares.update(x)
        energy.update(g)
    assert output_sensitivity(fisher, squares) == pytest.approx(float(energy.sum) / energy.width, rel=1e-6)


def test_output_rule_weights_each_units_error_curve_by_its_sites_fisher() -> None:
    """Two units with equal error curves: the one whose site the Fisher marks as more sensitive
    keeps more rank; a unit with no error beyond rank 2 keeps no more than 2; the ratio is met."""
    from lowrank_kit_plugins.fisher import output_score

    from lowrank_kit.compressed.plan import ErrorCurve

    run = SimpleNamespace(geometry=GEOMETRY, name="x", targets=PROJECTIONS)
    units = projection_units(run, "svd_llm", PROJECTIONS)
    curves, scores = {}, {}
    for unit in units:
        dropped = [1.0 / (i + 1) for i in range(unit.max_rank)]
        if unit.name == "layers.3.q_proj":
            dropped = [5.0, 5.0] + [0.0] * (unit.max_rank - 2)
        curves[unit.name] = ErrorCurve.from_tail(unit.name, unit.projection, dropped)
        scores[output_score(unit.layer, unit.projection)] = 1.0
    scores[output_score(1, "up_proj")] = 30.0
    fake = SimpleNamespace(geometry=GEOMETRY, scores=scores, target_ratio=0.4, error_curves=curves)
    plan = FisherAllocator(FisherAllocatorArgs(rule="output")).lowrank_allocate(run=fake, units=units)
    by_name = {u.name: u for u in units}
    assert plan.rank(by_name["layers.1.up_proj"]) > plan.rank(by_name["layers.0.up_proj"])
    assert plan.rank(by_name["layers.3.q_proj"]) <= 2
    assert 0.4 <= achieved_ratio(plan, units, GEOMETRY.total_linear_params) < 0.41
    del scores[output_score(0, "v_proj")]
    from lowrank_kit.recipe.schema import RecipeError
    with pytest.raises(RecipeError, match="score: fisher"):
        FisherAllocator(FisherAllocatorArgs(rule="output")).lowrank_allocate(run=fake, units=units)


@pytest.mark.parametrize("transforms", [["svd_llm"], ["headwise_pca", "nystrom"]])
def test_output_rule_plans_any_transform_on_a_tiny_model(tmp_path: Path, transforms: list[str]) -> None:
    recipe = tiny_recipe(tmp_path, transforms[0], 0.3, score="fisher", allocate={"plugin": "fisher",
                                                                                  "rule": "output"})
    recipe["transform"] = [{"plugin": t} for t in transforms]
    result = compress(recipe, model=tiny_model("qwen2"), tokenizer=ByteTokenizer(), progress=False)
    assert 0.3 <= result.report["achieved_ratio"] < 0.31
    assert {m["transform"] for m in result.report["modules"]} == set(transforms)
    assert len(set(result.run.plan.ranks.values())) > 1
