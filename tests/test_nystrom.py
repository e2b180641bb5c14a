"""Nyström MLP pruning (FLAT-LLM §1b): exact with every channel, better than dropping with fewer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ByteTokenizer, sample_ids, tiny_model, tiny_recipe
from lowrank_kit_plugins.nystrom import greedy_order, leverage_scores, nystrom_down

from lowrank_kit import compress, load_pretrained
from lowrank_kit.compressed.modules import ResizedLinear
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.pipeline.replay import capture, run_layer
from lowrank_kit.recipe.loading import from_raw
from lowrank_kit.recipe.schema import RecipeError


def down_inputs(family: str = "llama", n: int = 4, length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs z of layer 0's down_proj on real forward passes, and its dense weight."""
    model = tiny_model(family).double()
    adapter = adapter_for(model)
    seen: list[torch.Tensor] = []
    down = adapter.projection(0, "down_proj")
    hook = down.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        run_layer(adapter.layers[0], capture(model, adapter.layers, sample_ids(n=n, length=length)), 0)
    hook.remove()
    return torch.cat(seen), down.weight.detach()


def test_all_channels_kept_is_exact() -> None:
    z, weight = down_inputs()
    assert z.shape[0] > z.shape[1]  # more tokens than channels: C is invertible
    keep = torch.arange(z.shape[1])
    new = nystrom_down(weight, z.T @ z, keep)
    assert torch.allclose(z @ new.T, z @ weight.T, atol=1e-8)


@pytest.mark.parametrize("k", [16, 48, 80])
def test_nystrom_beats_plain_channel_dropping(k: int) -> None:
    z, weight = down_inputs()
    gram = z.T @ z
    keep = leverage_scores(gram, 1e-3).topk(k).indices.sort().values
    dense = z @ weight.T
    nystrom_error = (z[:, keep] @ nystrom_down(weight, gram, keep).T - dense).pow(2).sum()
    dropping_error = (z[:, keep] @ weight[:, keep].T - dense).pow(2).sum()
    assert nystrom_error < dropping_error


def test_leverage_scores_sum_to_effective_dimension() -> None:
    z, _ = down_inputs()
    gram = z.T @ z
    values = torch.linalg.eigvalsh(gram)
    lam = 1e-2 * gram.trace() / gram.shape[0]
    assert torch.allclose(leverage_scores(gram, 1e-2).sum(), (values / (values + lam)).sum())


def output_error(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> float:
    """trace(W R Wᵀ): down_proj's squared output error on the calibration inputs, keeping ``keep``."""
    residual = gram - gram[:, keep] @ torch.linalg.solve(gram[keep][:, keep], gram[keep])
    return float(torch.einsum("ij,jk,ik->", weight, residual, weight))


def test_greedy_picks_the_best_channel_then_the_best_second() -> None:
    z, weight = down_inputs()
    gram = z.T @ z
    order = greedy_order(gram, weight, block=1)
    assert sorted(order.tolist()) == list(range(gram.shape[0]))
    singles = [output_error(weight, gram, torch.tensor([j])) for j in range(gram.shape[0])]
    assert int(order[0]) == min(range(len(singles)), key=singles.__getitem__)
    first = int(order[0])
    pairs = {j: output_error(weight, gram, torch.tensor([first, j])) for j in range(gram.shape[0]) if j != first}
    assert int(order[1]) == min(pairs, key=pairs.__getitem__)


@pytest.mark.parametrize("k", [16, 48, 80])
def test_greedy_blocks_lose_less_output_error_than_leverage(k: int) -> None:
    """On the data it fits, ranking by the output error itself beats leverage (which ignores W)."""
    z, weight = down_inputs()
    gram = z.T @ z
    greedy = greedy_order(gram, weight, count=k)
    assert torch.equal(greedy, greedy_order(gram, weight)[:k])  # stopping early changes nothing
    leverage = leverage_scores(gram, 1.0).topk(k).indices
    assert output_error(weight, gram, greedy) < output_error(weight, gram, leverage)


def test_greedy_order_survives_channels_without_energy() -> None:
    z, weight = down_inputs()
    z[:, :5] = 0.0  # five dead channels: no residual to remove, they come last
    order = greedy_order(z.T @ z, weight)
    assert sorted(order.tolist()) == list(range(z.shape[1]))
    assert set(order[-5:].tolist()) == set(range(5))


def test_ridge_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"transform\[0\]\.ridge: must be positive"):
        from_raw(tiny_recipe(tmp_path, "nystrom", transform=[{"plugin": "nystrom", "ridge": 0}]))
    with pytest.raises(RecipeError, match="rewrites"):
        from_raw(tiny_recipe(tmp_path, transform=[{"plugin": "nystrom", "targets": ["down_proj"]}]))
    with pytest.raises(RecipeError, match=r"transform\[0\]\.selection: must be one of leverage, greedy"):
        from_raw(tiny_recipe(tmp_path, "nystrom", transform=[{"plugin": "nystrom", "selection": "best"}]))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_flat_llm_pair_compresses_saves_and_reloads(tmp_path: Path, family: str) -> None:
    recipe = tiny_recipe(tmp_path, "nystrom", 0.3, transform=[{"plugin": "headwise_pca"}, {"plugin": "nystrom"}])
    result = compress(recipe, model=tiny_model(family), tokenizer=ByteTokenizer(), progress=False)
    down = result.run.adapter.projection(1, "down_proj")
    assert isinstance(down, ResizedLinear) and down.in_features < result.run.geometry.intermediate
    assert abs(result.report["achieved_ratio"] - 0.3) < 0.03  # tiny matrices: coarse ranks
    reloaded = load_pretrained(result.output_dir)
    ids = sample_ids(n=2, length=32)
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_leverage_scores_cholesky_form_equals_eigen_form() -> None:
    """diag(C (C + λI)⁻¹) through a Cholesky factor equals the eigendecomposition's, also for a
    rank-deficient C (fewer tokens than channels)."""
    torch.manual_seed(3)
    x = torch.randn(20, 48, dtype=torch.float64)
    gram = x.T @ x
    for ridge in (1e-3, 1.0):
        lam = ridge * gram.diagonal().sum() / 48
        values, vectors = torch.linalg.eigh(gram)
        shrink = values.clamp_min(0) / (values.clamp_min(0) + lam)
        expected = (vectors.pow(2) * shrink).sum(dim=1)
        assert torch.allclose(leverage_scores(gram, ridge), expected, atol=1e-12)
