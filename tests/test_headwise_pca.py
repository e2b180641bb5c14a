"""Head-wise PCA of value/output (FLAT-LLM §1a): exactness, error = dropped eigenvalues, GQA, cache, I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ByteTokenizer, sample_ids, tiny_model, tiny_recipe
from lowrank_kit_plugins.headwise_pca import project_heads, project_queries, value_bases, weighted_bases

from lowrank_kit import compress, load_pretrained
from lowrank_kit.calibration.stats import HeadGram, Tap
from lowrank_kit.compressed.linalg import output_weighting
from lowrank_kit.compressed.modules import HeadwiseLowRank
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.models.attention import ValueDimAttention, shrink_values
from lowrank_kit.pipeline.replay import LayerInputs, capture, run_layer


def compress_values(model, rank: int, ids: torch.Tensor) -> list[dict]:
    """Head-wise PCA of every layer at ``rank`` with value statistics from ``ids``, layer by layer."""
    adapter = adapter_for(model)
    g = adapter.geometry
    inputs = capture(model, adapter.layers, ids)
    records = []
    for index, layer in enumerate(adapter.layers):
        tap = Tap()
        stat = tap.watch("v", adapter.projection(index, "v_proj"), HeadGram(g.head_dim), where="output")
        x: list[torch.Tensor] = []
        hook = adapter.projection(index, "v_proj").register_forward_hook(lambda m, a, o, x=x: x.append(a[0]))
        with torch.no_grad():
            run_layer(layer, inputs, index)
        hook.remove()
        tap.close()
        values, vectors = value_bases(stat.sum)
        attention = adapter.attention(index)
        dense_v = attention.v_proj
        basis = vectors[:, :, :rank]
        new_v, new_o = project_heads(attention, basis, g.kv_heads, g.heads)
        shrink_values(attention, new_v, new_o, rank)
        records.append({"values": values, "basis": basis, "dense_v": dense_v, "new_v": new_v, "x": x[0]})
        with torch.no_grad():
            inputs = LayerInputs(run_layer(layer, inputs, index), inputs.kwargs)
    return records


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
def test_full_value_dim_reproduces_dense_logits(family: str) -> None:
    model = tiny_model(family)
    ids = sample_ids(n=2, length=40, seed=3)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    compress_values(model, adapter_for(model).geometry.head_dim, sample_ids(n=2, length=40, seed=4))
    assert isinstance(adapter_for(model).attention(0), ValueDimAttention)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_value_error_equals_dropped_eigenvalues(family: str) -> None:
    model = tiny_model(family).double()
    rank = 5
    for rec in compress_values(model, rank, sample_ids(n=2, length=40, seed=4)):
        with torch.no_grad():
            dense = rec["dense_v"](rec["x"])  # [.., G·d_h] on exactly the calibration inputs
            small = rec["new_v"](rec["x"])  # [.., G·r]
        groups, head_dim = rec["basis"].shape[:2]
        dense = dense.reshape(-1, groups, head_dim)
        small = small.reshape(-1, rank, groups).transpose(1, 2)  # rank-major rows → [n, G, r]
        rebuilt = torch.einsum("gir,ngr->ngi", rec["basis"], small)
        error = (dense - rebuilt).pow(2).sum()
        assert torch.allclose(error, rec["values"][:, rank:].sum(), rtol=1e-6)


def test_gqa_each_query_head_uses_its_groups_basis() -> None:
    """The compressed attention equals dense attention on per-group projected values Q Qᵀ v."""
    model = tiny_model("llama")  # 4 query heads, 2 KV groups
    adapter = adapter_for(model)
    g = adapter.geometry
    assert g.kv_heads < g.heads
    attention = adapter.attention(0)
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(g.kv_heads, g.head_dim, g.head_dim, dtype=torch.float64))[0][:, :, :6]
    reference = tiny_model("llama")
    ref_attention = adapter_for(reference).attention(0)
    with torch.no_grad():
        wv = ref_attention.v_proj.weight.double().view(g.kv_heads, g.head_dim, -1)
        projector = basis @ basis.transpose(1, 2)  # per group Q Qᵀ
        projected = torch.einsum("gij,gjd->gid", projector, wv)
        ref_attention.v_proj.weight.copy_(projected.reshape_as(ref_attention.v_proj.weight))
    new_v, new_o = project_heads(attention, basis, g.kv_heads, g.heads)
    shrink_values(attention, new_v, new_o, 6)
    ids = sample_ids(n=1, length=20)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generation_with_a_smaller_value_cache(family: str) -> None:
    model = tiny_model(family)
    compress_values(model, 5, sample_ids(n=2, length=40, seed=4))
    prompt = sample_ids(n=1, length=12, seed=9)
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=257)
    ids = prompt
    with torch.no_grad():  # the same tokens without any cache
        for _ in range(10):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_engine_run_saves_and_reloads(tmp_path: Path, family: str) -> None:
    recipe = tiny_recipe(tmp_path, "headwise_pca", 0.1)
    result = compress(recipe, model=tiny_model(family), tokenizer=ByteTokenizer(), progress=False)
    attention = result.run.adapter.attention(0)
    assert isinstance(attention, ValueDimAttention) and attention.v_head_dim < result.run.geometry.head_dim
    reloaded = load_pretrained(result.output_dir)
    ids = sample_ids(n=2, length=32)
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    prompt = sample_ids(n=1, length=8)
    a = result.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=257)
    b = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=257)
    assert torch.equal(a, b)


# --- queries and keys (targets q_proj / k_proj) -------------------------------------------------


def query_key_bases(model, ids: torch.Tensor) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer and projection: eigenvalues, eigenvectors of its per-head output Gram, and its inputs."""
    adapter = adapter_for(model)
    found = {}
    for index in range(len(adapter.layers)):
        for name in ("q_proj", "k_proj"):
            tap = Tap()
            module = adapter.projection(index, name)
            stat = tap.watch(name, module, HeadGram(adapter.geometry.head_dim), where="output")
            x: list[torch.Tensor] = []
            hook = module.register_forward_hook(lambda m, a, o, x=x: x.append(a[0]))
            with torch.no_grad():
                model(input_ids=ids)
            hook.remove()
            tap.close()
            values, vectors = value_bases(stat.sum)
            found[(index, name)] = (values, vectors, x[0])
    return found


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
def test_full_rank_queries_and_keys_reproduce_dense_logits(family: str) -> None:
    """Per query head for q, per KV head for k; q/k norms (Gemma3), biases (Qwen2), GQA included."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = sample_ids(n=2, length=40, seed=3)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    bases = query_key_bases(model, sample_ids(n=2, length=40, seed=4))
    heads = {"q_proj": adapter.geometry.heads, "k_proj": adapter.geometry.kv_heads}
    for (index, name), (_values, vectors, _x) in bases.items():
        assert vectors.shape[0] == heads[name]
        dense_module = adapter.projection(index, name)
        adapter.replace(index, name, project_queries(dense_module.weight, dense_module.bias, vectors))
    assert isinstance(adapter.projection(0, "k_proj"), HeadwiseLowRank)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_query_key_error_equals_dropped_eigenvalues(family: str) -> None:
    model = tiny_model(family).double()
    adapter = adapter_for(model)
    rank = 3
    for (index, name), (values, vectors, x) in query_key_bases(model, sample_ids(n=2, length=40, seed=4)).items():
        dense_module = adapter.projection(index, name)
        small = project_queries(dense_module.weight, dense_module.bias, vectors[:, :, :rank])
        with torch.no_grad():
            error = (dense_module(x) - small(x)).pow(2).sum()
        assert torch.allclose(error, values[:, rank:].sum(), rtol=1e-6), (index, name)


def random_weighting(width: int, heads: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head blocks of a damped, normalised output Fisher of random anisotropic gradients."""
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(200, width, generator=generator, dtype=torch.float64)
    g = g * torch.logspace(0, -2, width, dtype=torch.float64)[torch.randperm(width, generator=generator)]
    return output_weighting(g.T @ g, 0.05, blocks=heads)


def weighted_error(diff: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Σ over tokens and heads of ‖R_h e_h‖² for an output error ``diff`` [.., H·d_h]."""
    heads, head_dim = root.shape[:2]
    return torch.einsum("hij,nhj->nhi", root, diff.reshape(-1, heads, head_dim)).pow(2).sum()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_weighted_query_key_error_equals_dropped_eigenvalues(family: str) -> None:
    """Under an output Fisher weighting R_h per head, the oblique projection (R⁻¹U_r)(R U_r)ᵀ loses
    exactly the dropped eigenvalues of R C R in the R-weighted error, biases included, and less
    there than the unweighted PCA does; at full rank it is exact."""
    model = tiny_model(family).double()
    adapter = adapter_for(model)
    rank = 3
    bases = query_key_bases(model, sample_ids(n=2, length=40, seed=4))
    for (index, name), (_values, plain_vectors, x) in bases.items():
        dense_module = adapter.projection(index, name)
        heads = plain_vectors.shape[0]
        root, inverse = random_weighting(heads * adapter.geometry.head_dim, heads, seed=index)
        tap = Tap()
        stat = tap.watch(name, dense_module, HeadGram(adapter.geometry.head_dim), where="output")
        with torch.no_grad():
            dense = dense_module(x)
        tap.close()
        values, down, up = weighted_bases(stat.sum, root, inverse)
        small = project_queries(dense_module.weight, dense_module.bias, down[:, :, :rank], up[:, :, :rank])
        plain = project_queries(dense_module.weight, dense_module.bias, plain_vectors[:, :, :rank])
        full = project_queries(dense_module.weight, dense_module.bias, down, up)
        with torch.no_grad():
            errors = [weighted_error(dense - module(x), root) for module in (small, plain, full)]
        assert torch.allclose(errors[0], values[:, rank:].sum(), rtol=1e-6), (index, name)
        assert errors[0] < errors[1]
        assert float(errors[2]) < 1e-12 * float(values.sum())


def test_weighted_values_are_attention_on_obliquely_projected_values() -> None:
    """The weighted v/o rewrite equals dense attention whose values pass (R⁻¹U_r)(R U_r)ᵀ per group."""
    model = tiny_model("llama").double()  # 4 query heads, 2 KV groups
    adapter = adapter_for(model)
    g = adapter.geometry
    root, inverse = random_weighting(g.kv_heads * g.head_dim, g.kv_heads, seed=0)
    torch.manual_seed(0)
    y = torch.randn(300, g.kv_heads, g.head_dim, dtype=torch.float64)
    _values, down, up = weighted_bases(torch.einsum("ngi,ngj->gij", y, y), root, inverse)
    down, up = down[:, :, :6], up[:, :, :6]
    reference = tiny_model("llama").double()
    ref_attention = adapter_for(reference).attention(0)
    with torch.no_grad():
        wv = ref_attention.v_proj.weight.view(g.kv_heads, g.head_dim, -1)
        projected = torch.einsum("gir,gjr,gjd->gid", up, down, wv)
        ref_attention.v_proj.weight.copy_(projected.reshape_as(ref_attention.v_proj.weight))
    attention = adapter.attention(0)
    new_v, new_o = project_heads(attention, down, g.kv_heads, g.heads, up)
    shrink_values(attention, new_v, new_o, 6)
    ids = sample_ids(n=1, length=20)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-9)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_weighted_head_wise_pca_compresses_saves_and_reloads(tmp_path: Path, family: str) -> None:
    recipe = tiny_recipe(tmp_path, "headwise_pca", 0.3, score="output_gradient", allocate="error_budget")
    recipe["transform"] = [{"plugin": "headwise_pca", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                            "output_fisher": 0.1}, {"plugin": "nystrom", "output_fisher": 0.1}]
    result = compress(recipe, model=tiny_model(family), tokenizer=ByteTokenizer(), progress=False)
    assert result.report["achieved_ratio"] == pytest.approx(0.3, abs=0.01)
    ids = sample_ids(n=2, length=32)
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, load_pretrained(result.output_dir)(input_ids=ids).logits)


def test_query_key_rank_slice_equals_the_truncated_module() -> None:
    model = tiny_model("qwen2").double()
    (_values, vectors, x) = query_key_bases(model, sample_ids(n=2, length=40, seed=4))[(0, "q_proj")]
    dense_module = adapter_for(model).projection(0, "q_proj")
    full = project_queries(dense_module.weight, dense_module.bias, vectors[:, :, :6])
    full.active_rank = 4
    with torch.no_grad():
        assert torch.allclose(full(x), project_queries(dense_module.weight, dense_module.bias, vectors[:, :, :4])(x))
    assert full.macs_per_token(4) == 4 * full.heads * (full.in_features + full.head_dim)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_queries_keys_and_values_compress_save_and_reload(tmp_path: Path, family: str) -> None:
    recipe = tiny_recipe(tmp_path, "headwise_pca", 0.3, score="angular_importance", allocate="iprs")
    recipe["transform"] = [{"plugin": "headwise_pca", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                           {"plugin": "nystrom"}]
    result = compress(recipe, model=tiny_model(family), tokenizer=ByteTokenizer(), progress=False)
    assert result.report["achieved_ratio"] == pytest.approx(0.3, abs=0.01)
    kinds = {type(m).__name__ for m in result.model.modules()}
    assert "HeadwiseLowRank" in kinds
    ids = sample_ids(n=2, length=24, seed=9)
    loaded = load_pretrained(result.output_dir)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-5)


def test_value_and_output_are_rewritten_together(tmp_path: Path) -> None:
    from lowrank_kit.recipe.loading import from_data
    from lowrank_kit.recipe.schema import RecipeError

    recipe = tiny_recipe(tmp_path, "headwise_pca")
    recipe["transform"] = [{"plugin": "headwise_pca", "targets": ["q_proj", "v_proj"]}]
    with pytest.raises(RecipeError, match=r"transform\[0\]\.targets.*v_proj and o_proj together"):
        from_data(recipe)
