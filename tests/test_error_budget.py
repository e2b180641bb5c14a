"""The error_budget allocator: truncation-error curves, the greedy plan against brute force, the budget."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ByteTokenizer, sample_ids, tiny_model, tiny_recipe
from lowrank_kit_plugins.error_budget import ErrorBudget, ErrorBudgetArgs

from lowrank_kit import compress
from lowrank_kit.compressed.linalg import output_weighting
from lowrank_kit.compressed.plan import ErrorCurve, RankPlan, Unit, achieved_ratio, candidates, plan_ranks
from lowrank_kit.data.texts import calibration_windows, heldout_windows, load_text, tokenize
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.pipeline import passes
from lowrank_kit.pipeline.callbacks import Callback
from lowrank_kit.recipe.loading import from_raw
from lowrank_kit.recipe.schema import RecipeError

BUDGET = {"score": "output_gradient", "allocate": "error_budget"}


def unit(name: str, layer: int, rank_cost: int, max_rank: int, transform: str = "svd_llm",
         projections: tuple[str, ...] = ("q_proj",)) -> Unit:
    return Unit(name=name, layer=layer, projections=projections, transform=transform,
                dense_params=rank_cost * max_rank * 2, rank_cost=rank_cost, max_rank=max_rank)


def curve_of(u: Unit, dropped: list[float], site: str = "q_proj") -> ErrorCurve:
    return ErrorCurve.from_tail(u.name, site, dropped)


def fake_run(units: list[Unit], curves: list[ErrorCurve], ratio: float, total: int | None = None,
             scores: dict[str, float] | None = None) -> SimpleNamespace:
    geometry = SimpleNamespace(total_linear_params=total or sum(u.dense_params for u in units),
                               layers=max(u.layer for u in units) + 1)
    names = {f"layers.{u.layer}.{c.site}" for u, c in zip(units, curves, strict=True)}
    return SimpleNamespace(geometry=geometry, target_ratio=ratio, error_curves={c.unit: c for c in curves},
                           scores=scores or dict.fromkeys(names, 1.0), plan=None, layer_losses={})


def loss_of(ranks: dict[str, int], options: dict) -> float:
    return sum(next(p[1] for p in options[name] if p[2] == rank) for name, rank in ranks.items())


def test_greedy_plan_equals_brute_force_on_a_small_case() -> None:
    """Equal parameter cost per rank and convex curves: the greedy plan is the exact optimum."""
    generator = torch.Generator().manual_seed(0)
    units = [unit(f"layers.0.u{i}", 0, rank_cost=10, max_rank=6) for i in range(4)]
    options = {}
    for u in units:
        dropped = sorted(torch.rand(6, generator=generator).mul(10).tolist(), reverse=True)
        options[u.name] = candidates(u, curve_of(u, dropped).error, 1.0)
    for budget in (0, 40, 90, 130, 200, 240):
        ranks = plan_ranks(options, budget)
        assert sum(u.params(ranks[u.name]) for u in units) <= budget
        best = min(loss_of(dict(zip(options, combo, strict=True)), options)
                   for combo in itertools.product(*[[p[2] for p in options[u.name]] for u in units])
                   if sum(u.params(r) for u, r in zip(units, combo, strict=True)) <= budget)
        assert loss_of(ranks, options) == pytest.approx(best), budget


def test_brute_force_with_unequal_costs_and_a_dense_choice() -> None:
    """Different shapes and the dense option (cheaper than the largest ranks): optimum on these cases."""
    units = [unit("layers.0.a", 0, rank_cost=7, max_rank=5), unit("layers.0.b", 0, rank_cost=3, max_rank=8),
             unit("layers.1.c", 1, rank_cost=5, max_rank=6)]
    dropped = {"layers.0.a": [9, 4, 2, 1, 0.5], "layers.0.b": [3, 3, 2, 2, 1, 1, 0.5, 0.2],
               "layers.1.c": [20, 5, 1, 0.5, 0.2, 0.1]}
    options = {u.name: candidates(u, curve_of(u, dropped[u.name]).error, 1.0) for u in units}
    assert options["layers.0.a"][-1] == (70, 0.0, 5)  # dense: 70 parameters, below 5 · 7 · 2 at rank 5
    exact = 0
    for budget in range(0, 150, 7):
        ranks = plan_ranks(options, budget)
        best = min(loss_of(dict(zip(options, combo, strict=True)), options)
                   for combo in itertools.product(*[[p[2] for p in options[u.name]] for u in units])
                   if sum(u.params(r) for u, r in zip(units, combo, strict=True)) <= budget)
        assert sum(u.params(ranks[u.name]) for u in units) <= budget
        # A greedy knapsack is optimal up to one step it could not afford: its loss is within
        # the largest loss reduction of a single candidate step of the optimum.
        largest_step = max(p[1] - q[1] for points in options.values() for p, q in itertools.pairwise(points))
        assert best <= loss_of(ranks, options) <= best + largest_step, budget
        exact += loss_of(ranks, options) == pytest.approx(best)
    assert exact >= 15  # of the 22 budgets


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("multiple", [1, 4])
def test_ratio_from_real_shapes_within_one_percent(ratio: float, multiple: int) -> None:
    generator = torch.Generator().manual_seed(3)
    units, curves = [], []
    for layer in range(6):
        for name, cost, rank in (("q_proj", 192, 96), ("mlp", 288, 256), ("v_proj+o_proj", 480, 16)):
            u = Unit(name=f"layers.{layer}.{name}", layer=layer, projections=(name,), transform="t",
                     dense_params=cost * rank if name != "q_proj" else 96 * 96, rank_cost=cost, max_rank=rank,
                     multiple=multiple)
            decay = float(torch.rand((), generator=generator)) * 0.2 + 0.01
            units.append(u)
            curves.append(curve_of(u, [float(torch.exp(torch.tensor(-decay * i))) for i in range(rank)], name))
    total = sum(u.dense_params for u in units) + 50_000  # weights no transform targets
    plan = ErrorBudget(ErrorBudgetArgs()).lowrank_allocate(fake_run(units, curves, ratio, total), units)
    reached = achieved_ratio(plan, units, total)
    assert ratio <= reached <= ratio + 0.01
    assert all(r % multiple == 0 or u.is_dense(r) for u, r in ((u, plan.rank(u)) for u in units))


def test_a_unit_with_zero_error_keeps_nothing_it_does_not_need() -> None:
    low = unit("layers.0.low", 0, rank_cost=10, max_rank=8)  # exactly rank 2: no error from rank 2 on
    other = unit("layers.0.other", 0, rank_cost=10, max_rank=8)
    curves = [curve_of(low, [5.0, 4.0] + [0.0] * 6), curve_of(other, [1.0] * 8)]
    plan = ErrorBudget(ErrorBudgetArgs()).lowrank_allocate(fake_run([low, other], curves, 0.3), [low, other])
    assert plan.rank(low) == 2
    assert plan.rank(other) > 2


def test_transforms_compete_a_flat_mlp_keeps_its_rank() -> None:
    """One layer: the MLP's spectrum is flat (every channel matters), attention's decays fast."""
    mlp = Unit("layers.0.mlp", 0, ("gate_proj", "up_proj", "down_proj"), "nystrom", dense_params=3 * 64 * 128,
               rank_cost=3 * 64, max_rank=128)
    attention = Unit("layers.0.v_proj+o_proj", 0, ("v_proj", "o_proj"), "headwise_pca", dense_params=64 * 6 * 16,
                     rank_cost=64 * 6, max_rank=16)
    curves = [curve_of(mlp, [1.0] * 128, "down_proj"),
              curve_of(attention, [10.0 * 0.3**i for i in range(16)], "v_proj")]
    units = [mlp, attention]
    plan = ErrorBudget(ErrorBudgetArgs()).lowrank_allocate(fake_run(units, curves, 0.1), units)
    assert plan.rank(mlp) == mlp.max_rank  # the MLP stays whole
    assert plan.rank(attention) == 8  # attention gives up all 0.1 · 30,720 parameters: 8 of its 16 ranks


def test_sensitivity_moves_rank_to_the_unit_the_loss_feels() -> None:
    a, b = unit("layers.0.a", 0, 10, 8), unit("layers.1.b", 1, 10, 8)
    curves = [curve_of(a, [1.0] * 8), curve_of(b, [1.0] * 8)]
    run = fake_run([a, b], curves, 0.5, scores={"layers.0.q_proj": 10.0, "layers.1.q_proj": 1.0})
    plan = ErrorBudget(ErrorBudgetArgs()).lowrank_allocate(run, [a, b])
    assert plan.rank(a) > plan.rank(b)


def _dense_inputs(model, windows: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Every decoder projection's input on the dense model, all calibration windows."""
    adapter = adapter_for(model)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index in range(len(adapter.layers)):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"):
            module = adapter.projection(index, name)
            handles.append(module.register_forward_hook(
                lambda m, a, o, key=(index, name): seen.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return {key: torch.cat(parts) for key, parts in seen.items()}


@pytest.mark.parametrize("selection", ["leverage", "greedy"])
def test_curves_equal_the_measured_output_error_at_the_planned_rank(tmp_path: Path, selection: str) -> None:
    """svd (plain), asvd and the Nyström MLP: the curve at the rank the plan chose is the output error
    of the compressed module on the dense calibration inputs (svd_llm's σ² is covered by its own test)."""
    model = tiny_model("llama").double()
    dense = copy.deepcopy(model)
    recipe = tiny_recipe(tmp_path, "svd", 0.3, **BUDGET)
    recipe["calibration"]["pipeline"] = "dense_input"
    recipe["runtime"]["precision"] = "64-true"
    recipe["transform"] = [{"plugin": "svd", "targets": ["q_proj"]}, {"plugin": "asvd", "targets": ["k_proj"]},
                           {"plugin": "nystrom", "selection": selection}]
    result = compress(recipe, model=model, tokenizer=ByteTokenizer(), progress=False)
    run = result.run
    inputs = _dense_inputs(dense, run.calibration)
    dense_adapter, adapter = adapter_for(dense), adapter_for(result.model)
    checked = 0
    for u in run.units:
        rank = run.plan.rank(u)
        predicted = run.error_curves[u.name].error[rank] if not u.is_dense(rank) else 0.0
        index = u.layer
        with torch.no_grad():
            if u.transform == "nystrom":
                x = inputs[(index, "gate_proj")]
                measured = (dense_adapter.layers[index].mlp(x) - adapter.layers[index].mlp(x)).pow(2).sum()
            else:
                name = u.projection
                x = inputs[(index, name)]
                measured = (dense_adapter.projection(index, name)(x) - adapter.projection(index, name)(x)).pow(2).sum()
        assert float(measured) == pytest.approx(predicted, rel=1e-5, abs=1e-8), (u.name, rank)
        checked += 1
    assert checked == len(run.units)
    assert result.report["achieved_ratio"] == pytest.approx(0.3, abs=0.01)


def test_output_fisher_curves_equal_the_weighted_error_at_the_planned_rank(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With output_fisher, svd_llm's and Nyström's curves are the output error in the metric of the
    damped, normalised output Fisher (R² = F̃): at the planned rank, ‖R (y_dense − y)‖² measured on
    the dense calibration inputs. The Fisher is Σ gᵀg of the loss gradient at the output, so its
    trace per output dim is output_gradient's score."""
    model = tiny_model("llama").double()
    dense = copy.deepcopy(model)
    recipe = tiny_recipe(tmp_path, "svd_llm", 0.3, **BUDGET)
    recipe["calibration"]["pipeline"] = "dense_input"
    recipe["runtime"]["precision"] = "64-true"
    recipe["transform"] = [{"plugin": "svd_llm", "targets": ["q_proj", "v_proj", "o_proj"], "output_fisher": 0.1},
                           {"plugin": "nystrom", "selection": "greedy", "output_fisher": 0.5}]
    monkeypatch.setattr(passes, "_drop_layer_statistics", lambda run, index: None)  # keep them to check
    result = compress(recipe, model=model, tokenizer=ByteTokenizer(), progress=False)
    run = result.run
    inputs = _dense_inputs(dense, run.calibration)
    dense_adapter, adapter = adapter_for(dense), adapter_for(result.model)
    compressed = 0
    for u in run.units:
        rank = run.plan.rank(u)
        site = "down_proj" if u.transform == "nystrom" else u.projection
        fisher = run.stats[f"GradientGram:layers.{u.layer}.{site}_output"].matrix
        width = fisher.shape[0]
        assert float(fisher.trace()) / width == pytest.approx(run.scores[f"layers.{u.layer}.{site}"], rel=1e-6)
        root, _ = output_weighting(fisher, 0.5 if u.transform == "nystrom" else 0.1)
        assert float((root @ root).trace()) == pytest.approx(width)  # mean eigenvalue 1
        with torch.no_grad():
            if u.transform == "nystrom":
                x = inputs[(u.layer, "gate_proj")]
                error = dense_adapter.layers[u.layer].mlp(x) - adapter.layers[u.layer].mlp(x)
            else:
                x = inputs[(u.layer, site)]
                error = dense_adapter.projection(u.layer, site)(x) - adapter.projection(u.layer, site)(x)
        measured = (error.reshape(-1, width) @ root).pow(2).sum()
        predicted = run.error_curves[u.name].error[rank] if not u.is_dense(rank) else 0.0
        assert float(measured) == pytest.approx(predicted, rel=1e-5, abs=1e-8), (u.name, rank)
        compressed += not u.is_dense(rank)
    assert compressed > len(run.units) // 2
    assert result.report["achieved_ratio"] == pytest.approx(0.3, abs=0.01)


def test_a_transform_reading_the_output_fisher_runs_the_scoring_pass_even_when_scores_are_cached(
        tmp_path: Path) -> None:
    """The statistics of the scoring pass are not cached, only the scores: a transform that reads
    them (output_fisher) runs the pass again (the cached scores are kept), and without any score
    strategy in the recipe too."""

    class Passes(Callback):
        def __init__(self) -> None:
            self.labels: list[str] = []

        def on_batches_start(self, run: object, label: str, total: int) -> None:
            self.labels.append(label)

    recipe = tiny_recipe(tmp_path, "svd_llm", 0.3, **BUDGET)
    recipe["transform"] = [{"plugin": "svd_llm", "output_fisher": 0.1}]
    first = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    seen = Passes()
    again = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False, overwrite=True,
                     callbacks=[seen])
    assert (first.run.notes["scores"], again.run.notes["scores"]) == ({"cached": False}, {"cached": True})
    assert "score (forward + backward)" in seen.labels
    assert again.run.plan.ranks == first.run.plan.ranks
    uniform = tiny_recipe(tmp_path, "svd_llm", 0.3, transform=[{"plugin": "svd_llm", "output_fisher": 0.1}])
    result = compress(uniform, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False, overwrite=True)
    assert result.report["achieved_ratio"] == pytest.approx(0.3, abs=0.03)
    assert not result.run.stats  # every layer's output Fisher was freed once the layer was compressed


def test_output_fisher_is_refused_without_damping_and_ignored_where_nothing_reads_it(tmp_path: Path) -> None:
    for plugin in ("svd_llm", "nystrom", "headwise_pca"):
        with pytest.raises(RecipeError, match=r"transform\[0\]\.output_fisher: must be positive"):
            from_raw(tiny_recipe(tmp_path, plugin, 0.3, transform=[{"plugin": plugin, "output_fisher": 0}]))
    recipe = tiny_recipe(tmp_path, "nystrom", 0.3, score="angular_importance", allocate="iprs",
                         transform=[{"plugin": "nystrom", "output_fisher": 0.1}])
    with pytest.warns(UserWarning, match="changes only the error curve, which allocator 'iprs' does not read"):
        result = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    assert result.report["achieved_ratio"] == pytest.approx(0.3, abs=0.03)
    # With the scores cached there is nothing left to gather, so no calibration pass runs for it.
    labels: list[str] = []

    class Passes(Callback):
        def on_batches_start(self, run: object, label: str, total: int) -> None:
            labels.append(label)

    with pytest.warns(UserWarning, match="does not read"):
        again = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False,
                         overwrite=True, callbacks=[Passes()])
    assert again.run.notes["scores"] == {"cached": True}
    assert labels and not any(label.startswith("score") for label in labels)
    assert again.run.plan.ranks == result.run.plan.ranks


def test_error_budget_drives_every_transform_kind(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, "headwise_pca", 0.3, **BUDGET)
    recipe["transform"] = [{"plugin": "headwise_pca", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                           {"plugin": "nystrom"}]
    result = compress(recipe, model=tiny_model("qwen2"), tokenizer=ByteTokenizer(), progress=False)
    assert result.report["achieved_ratio"] == pytest.approx(0.3, abs=0.01)
    assert set(result.run.error_curves) == {u.name for u in result.run.units}
    assert result.run.notes["error_curves"] == {"cached": False}
    again = compress({**recipe, "output": {**recipe["output"], "dir": str(tmp_path / "again")}},
                     model=tiny_model("qwen2"), tokenizer=ByteTokenizer(), progress=False)
    assert again.run.notes["error_curves"] == {"cached": True}
    assert again.run.plan.ranks == result.run.plan.ranks


def test_output_gradient_equals_direct_autograd(tmp_path: Path) -> None:
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    result = compress(tiny_recipe(tmp_path, "svd_llm", 0.3, **BUDGET), model=model, tokenizer=ByteTokenizer(),
                      progress=False)
    adapter = adapter_for(dense)
    outputs: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    for index in range(len(adapter.layers)):
        for name in ("q_proj", "v_proj", "down_proj"):
            adapter.projection(index, name).register_forward_hook(
                lambda m, a, o, key=f"layers.{index}.{name}": outputs.__setitem__(key, o))
    for batch in result.run.calibration.split(4):
        loss = dense(input_ids=batch, labels=batch).loss
        grads = torch.autograd.grad(loss, list(outputs.values()))
        for key, grad in zip(list(outputs), grads, strict=True):
            energy[key] = energy.get(key, 0.0) + float(grad.double().pow(2).sum()) / grad.shape[-1]
    for key, value in energy.items():
        assert result.run.scores[key] == pytest.approx(value, rel=1e-4), key
    assert all(p.requires_grad for p in model.parameters())


def test_plan_records_what_it_predicts() -> None:
    a = unit("layers.0.a", 0, 10, 8)
    plan = ErrorBudget(ErrorBudgetArgs()).lowrank_allocate(fake_run([a], [curve_of(a, [1.0] * 8)], 0.25), [a])
    assert isinstance(plan, RankPlan)
    assert plan.notes["predicted_loss"] == pytest.approx(plan.notes["predicted_loss_per_unit"]["layers.0.a"])


# Measured refinement (error_budget refine: N)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_next_token_loss_from_the_last_layer_equals_the_model_loss(family: str) -> None:
    model = tiny_model(family)
    if family == "gemma3":
        model.config.final_logit_softcapping = 5.0  # soft-capped logits are part of the loss
    ids = sample_ids(2, 40)
    hidden = model.model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
        assert float(adapter_for(model).next_token_loss(hidden, ids)) == pytest.approx(float(expected), rel=1e-5)


def test_refinement_measures_each_layer_alone_and_rescales_its_sensitivity(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, "svd_llm", 0.4, score="output_gradient")
    recipe["calibration"]["pipeline"] = "dense_input"  # the compressed layers are the ones the refinement measures
    first = compress({**recipe, "allocate": "error_budget"}, model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                     progress=False)
    refined = compress({**recipe, "allocate": {"plugin": "error_budget", "refine": 1, "refine_windows": 4},
                        "output": {**recipe["output"], "dir": str(tmp_path / "refined")}},
                       model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    # The loss of the dense model with only layer l taken from the unrefined compressed model, on
    # 4 held-out windows of the calibration text, minus the dense loss.
    dense = tiny_model("llama")
    batch = heldout_windows(tokenize(ByteTokenizer(), load_text("austen-emma")), ByteTokenizer(), 4, 64, 8, 0)
    with torch.no_grad():
        base = float(dense(input_ids=batch, labels=batch).loss)
        expected = []
        for index in range(len(dense.model.layers)):
            original = dense.model.layers[index]
            dense.model.layers[index] = first.model.model.layers[index]
            expected.append(float(dense(input_ids=batch, labels=batch).loss) - base)
            dense.model.layers[index] = original
    rounds = refined.run.notes["refine"]["rounds"]
    assert len(rounds) == 1
    assert rounds[0]["measured_loss_by_layer"] == pytest.approx(expected, abs=2e-6)
    assert rounds[0]["predicted_loss"] == pytest.approx(first.run.plan.notes["predicted_loss"])
    predicted = first.run.plan.notes["predicted_loss_per_unit"]
    factors = refined.run.plan.notes["layer_factors"]
    for index, measured in enumerate(expected):
        layer_predicted = sum(v for k, v in predicted.items() if k.startswith(f"layers.{index}."))
        assert factors[index] == pytest.approx((max(measured, 0) + 1e-3) / (layer_predicted + 1e-3), rel=1e-3)
    assert refined.report["achieved_ratio"] == pytest.approx(0.4, abs=0.01)
    assert set(refined.run.notes) >= set(first.run.notes)  # the measurement leaves no notes of its own
    assert refined.report["timings_s"]["refine plan"] > 0


def test_heldout_windows_share_no_token_with_the_calibration_windows() -> None:
    positions = torch.arange(3000)  # token i is position i
    calibration = calibration_windows(positions, ByteTokenizer(), 20, 100, seed=3)
    heldout = heldout_windows(positions, ByteTokenizer(), 6, 100, 20, 3)
    assert heldout.shape == (6, 100)
    assert not set(calibration.flatten().tolist()) & set(heldout.flatten().tolist())
    assert all(bool((row[1:] - row[:-1] == 1).all()) for row in heldout)  # contiguous text
    with pytest.raises(ValueError, match="room for only"):
        heldout_windows(positions, ByteTokenizer(), 25, 100, 20, 3)
