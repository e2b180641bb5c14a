"""The decompositions: exact at full rank, and the error of a truncation is what the theory says."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, sample_ids, tiny_model
from lowrank_kit_plugins.asvd import Asvd, AsvdArgs
from lowrank_kit_plugins.svd import Svd
from lowrank_kit_plugins.svd_llm import SvdLlm

from lowrank_kit.calibration.stats import Gram, Tap
from lowrank_kit.compressed.linalg import (
    lower_triangular_product,
    output_weighting,
    output_whitened_spectrum,
    scaled_spectrum,
    svd_spectrum,
    symmetric_product,
    whitened_spectrum,
)
from lowrank_kit.compressed.modules import LowRankLinear
from lowrank_kit.models.adapters import PROJECTIONS, adapter_for
from lowrank_kit.pipeline.replay import LayerInputs, capture, run_layer


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_whitened_truncation_error_equals_dropped_singular_values(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape[0], 40, dtype=torch.float64) @ torch.randn(40, shape[1], dtype=torch.float64)
    x = torch.randn(500, shape[1], dtype=torch.float64) @ torch.randn(shape[1], shape[1], dtype=torch.float64)
    gram = x.T @ x
    s = whitened_spectrum(weight, gram).s
    for rank in (1, 5, 17):
        a, b = whitened_spectrum(weight, gram).factors(rank)
        error = ((weight - a @ b) @ x.T).pow(2).sum()
        assert torch.allclose(error, s[rank:].pow(2).sum(), rtol=1e-8)
        # and it beats plain SVD on the data, which only minimises the weight error
        pa, pb = svd_spectrum(weight).factors(rank)
        assert error <= ((weight - pa @ pb) @ x.T).pow(2).sum() + 1e-9


@pytest.mark.parametrize("width", [64, 600, 1537])
def test_blocked_products_equal_the_whole_products(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    """From 512 columns on, a symmetric product multiplies only its blocks on and above the
    diagonal and a product with a Cholesky factor skips its zero blocks (a ragged last block at
    1,537): the matrices are the one product's, and the blocked symmetric one is exactly symmetric."""
    torch.manual_seed(0)
    blocks, original = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda *args, **kwargs: blocks.append(1) or original(*args, **kwargs))
    weight = torch.randn(width, 50, dtype=torch.float64)
    x = torch.randn(80, 50, dtype=torch.float64)
    product = symmetric_product(weight @ (x.T @ x), weight)
    assert torch.equal(product, product.T) or width < 512  # mirrored where blocked
    assert torch.allclose(product, weight @ (x.T @ x) @ weight.T, rtol=1e-12, atol=1e-10)
    lower = torch.randn(width, width, dtype=torch.float64).tril()
    matrix = torch.randn(30, width, dtype=torch.float64)
    assert torch.allclose(lower_triangular_product(matrix, lower), matrix @ lower, rtol=1e-12, atol=1e-10)
    assert len(blocks) == (0 if width < 512 else 8)  # four blocks each where the blocked route applies


def test_weights_that_track_gradients_are_factorised_through_whole_products() -> None:
    """A parameter straight from a module (``requires_grad``) still gets its spectra: blocks are
    written into a buffer (``out=``), which autograd refuses, so such inputs take the whole product."""
    torch.manual_seed(0)
    weight = torch.nn.Linear(576, 600).weight  # tall, 576 columns: every blocked product would apply
    x = torch.randn(1200, 576)
    for spectrum in (svd_spectrum(weight), whitened_spectrum(weight, (x.T @ x).double())):
        a, b = spectrum.factors(576)
        assert torch.allclose(a @ b, weight.double(), atol=1e-6)


@pytest.mark.parametrize("shape", [(640, 576), (576, 640)], ids=["tall", "wide"])
def test_whitened_factors_of_blocked_sizes_equal_the_svd_of_w_s(shape: tuple[int, int]) -> None:
    """At SmolLM2's sizes the products take their blocked routes: A B at a rank is still
    U_r Σ_r V_rᵀ S⁻¹ from the SVD of W S (torch's SVD, Cholesky's S)."""
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    x = torch.randn(1500, shape[1], dtype=torch.float64) * torch.logspace(0, -2, shape[1], dtype=torch.float64)
    gram = x.T @ x
    spectrum = whitened_spectrum(weight, gram)
    factor = torch.linalg.cholesky(gram)
    u, s, vh = torch.linalg.svd(weight @ factor, full_matrices=False)
    assert torch.allclose(spectrum.s, s, rtol=1e-8)
    a, b = spectrum.factors(100)
    reference = (u[:, :100] * s[:100]) @ torch.linalg.solve_triangular(factor, vh[:100], upper=False, left=False)
    assert torch.allclose(a @ b, reference, atol=1e-9 * reference.abs().max())


@pytest.mark.parametrize("output", [False, True], ids=["plain", "fisher-weighted"])
def test_wide_whitened_factors_equal_those_of_the_cholesky_route(output: bool) -> None:
    """A W with no more rows than columns skips the Cholesky factor (U from W XᵀX Wᵀ, B from W):
    the product A B at every rank is SVD-LLM's U_r Σ_r V_rᵀ S⁻¹ from the SVD of (R) W S."""
    torch.manual_seed(0)
    weight = torch.randn(24, 40, dtype=torch.float64)
    x = torch.randn(500, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    gram = x.T @ x
    weighting = None
    root = inverse = torch.eye(24, dtype=torch.float64)
    if output:
        g = torch.randn(300, 24, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
        weighting = root, inverse = output_weighting(g.T @ g, 0.01)
    spectrum = whitened_spectrum(weight, gram, weighting)
    assert spectrum.whitening is None
    factor = torch.linalg.cholesky(gram)
    u, s, vh = torch.linalg.svd(root @ weight @ factor, full_matrices=False)
    assert torch.allclose(spectrum.s, s, rtol=1e-9)
    for rank in (1, 7, 24):
        a, b = spectrum.factors(rank)
        reference = inverse @ (u[:, :rank] * s[:rank]) @ torch.linalg.solve_triangular(
            factor, vh[:rank], upper=False, left=False)
        assert torch.allclose(a @ b, reference, atol=1e-9 * reference.abs().max())


def test_output_weighted_truncation_minimises_the_fisher_weighted_error() -> None:
    """With the output Fisher F of a projection, the SVD of R W S (R² = F̃, F normalised to mean
    eigenvalue 1) drops exactly σ² of ‖R (W − A B) Xᵀ‖², beats SVD-LLM's factors in that metric,
    and becomes SVD-LLM's as the damping grows."""
    torch.manual_seed(0)
    weight = torch.randn(24, 40, dtype=torch.float64)
    x = torch.randn(500, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    g = torch.randn(300, 24, dtype=torch.float64) * torch.logspace(0, -3, 24, dtype=torch.float64)  # anisotropic
    fisher, gram = g.T @ g, x.T @ x
    root, inverse = output_weighting(fisher, 1e-12)
    assert torch.allclose(root @ root, fisher * 24 / fisher.trace(), atol=1e-10)
    with pytest.raises(ValueError, match="damping > 0"):
        output_weighting(fisher, 0.0)
    with pytest.raises(ValueError, match="no gradient energy"):
        output_weighting(torch.zeros_like(fisher), 0.01)
    assert torch.allclose(root @ inverse, torch.eye(24, dtype=torch.float64), atol=1e-8)
    spectrum = whitened_spectrum(weight, gram, (root, inverse))
    for rank in (1, 5, 17):
        a, b = spectrum.factors(rank)
        weighted = (root @ (weight - a @ b) @ x.T).pow(2).sum()
        assert torch.allclose(weighted, spectrum.s[rank:].pow(2).sum(), rtol=1e-8)
        pa, pb = whitened_spectrum(weight, gram).factors(rank)
        assert weighted < (root @ (weight - pa @ pb) @ x.T).pow(2).sum()
    far = whitened_spectrum(weight, gram, output_weighting(fisher, 1e9)).factors(5)
    plain = whitened_spectrum(weight, gram).factors(5)
    assert torch.allclose(far[0] @ far[1], plain[0] @ plain[1], atol=1e-6)


@pytest.mark.parametrize("rows", [8, 32], ids=["wide", "tall"])
def test_whitening_survives_a_singular_gram(rows: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(rows, 16, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)  # fewer tokens than channels: XᵀX is singular
    spectrum = whitened_spectrum(weight, x.T @ x)
    assert spectrum.whitening is not None  # singular: SVD-LLM's shifted Cholesky route, for a wide W too
    a, b = spectrum.factors(5)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # rank 5 covers the data's span, up to the small shift that made XᵀX factorisable
    error = (a @ b @ x.T - weight @ x.T).norm() / (weight @ x.T).norm()
    assert error < 1e-2
    a, b = spectrum.factors(min(weight.shape))  # and full rank is the weight itself
    assert torch.allclose(a @ b, weight, atol=1e-8)


@pytest.mark.parametrize("output", [False, True], ids=["plain", "fisher-weighted"])
def test_factors_from_the_output_gram_equal_those_from_the_input_gram(output: bool) -> None:
    """Y = X Wᵀ, so YᵀY = W XᵀX Wᵀ: a wide W factorised from its outputs' Gram gets SVD-LLM's
    factors at every rank; a tall one needs its input Gram and is refused."""
    torch.manual_seed(0)
    weight = torch.randn(24, 40, dtype=torch.float64)
    x = torch.randn(500, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    y = x @ weight.T
    weighting = None
    if output:
        g = torch.randn(300, 24, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
        weighting = output_weighting(g.T @ g, 0.01)
    reference = whitened_spectrum(weight, x.T @ x, weighting)
    spectrum = output_whitened_spectrum(weight, y.T @ y, weighting)
    assert torch.allclose(spectrum.s, reference.s, rtol=1e-9)
    for rank in (1, 7, 24):
        a, b = spectrum.factors(rank)
        ra, rb = reference.factors(rank)
        assert torch.allclose(a @ b, ra @ rb, atol=1e-9 * (ra @ rb).abs().max())
    with pytest.raises(ValueError, match="input Gram"):
        output_whitened_spectrum(weight.T, x.T @ x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factors_from_a_singular_output_gram_take_the_shift(dtype: torch.dtype) -> None:
    """Fewer tokens than rows: YᵀY is singular (and indefinite by its rounding, from float32
    outputs), and the shifted W (XᵀX + λI) Wᵀ orders the directions the data never reached, as
    SVD-LLM's shifted Cholesky route does."""
    torch.manual_seed(0)
    weight = torch.randn(8, 16, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    y = x @ weight.T
    low = y.to(dtype)
    spectrum = output_whitened_spectrum(weight, (low.T @ low).double())
    reference = whitened_spectrum(weight, x.T @ x)
    # past the data's span (rank 5) the order follows the shift only where rounding is below it
    for rank in (5, 6) if dtype == torch.float64 else (5,):
        a, b = spectrum.factors(rank)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        ra, rb = reference.factors(rank)
        assert torch.allclose(a @ b, ra @ rb, atol=1e-3 * weight.abs().max())
    a, b = spectrum.factors(5)  # rank 5 spans the data, up to the shift
    assert (a @ b @ x.T - y.T).norm() / y.norm() < 1e-2
    a, b = spectrum.factors(8)
    assert torch.allclose(a @ b, weight, atol=1e-8)


def test_full_rank_reproduces_a_rank_deficient_weight() -> None:
    """σ below eigh's resolution is raised to it, never 0: full-rank factors multiply back to W."""
    torch.manual_seed(0)
    weight = torch.randn(8, 4, dtype=torch.float64) @ torch.randn(4, 16, dtype=torch.float64)  # rank 4
    x = torch.randn(200, 16, dtype=torch.float64)
    for spectrum in (svd_spectrum(weight), svd_spectrum(weight.T), whitened_spectrum(weight, x.T @ x)):
        assert (spectrum.s > 0).all()
        a, b = spectrum.factors(8)
        assert torch.allclose(a @ b, weight if a.shape[0] == 8 else weight.T, atol=1e-10)


def test_projections_reading_one_gram_share_its_whitening() -> None:
    """gate/up read the same Gram object: one Cholesky factor, recomputed if the Gram changes in place."""
    from lowrank_kit.compressed.linalg import psd_cholesky

    torch.manual_seed(0)
    x = torch.randn(200, 16, dtype=torch.float64)
    gram = x.T @ x
    # tall weights (gate/up): a wide one needs no whitening factor at all
    first, second = whitened_spectrum(torch.randn(32, 16), gram), whitened_spectrum(torch.randn(24, 16), gram)
    assert first.whitening is second.whitening
    assert torch.equal(first.whitening, psd_cholesky(gram))
    gram.mul_(4.0)  # a Gram updated in place gets a new factor (S scales by 2)
    third = whitened_spectrum(torch.randn(32, 16), gram)
    assert third.whitening is not first.whitening
    assert torch.allclose(third.whitening, 2 * first.whitening)


@pytest.mark.parametrize("sleep", [True, False])
def test_eigh_runs_on_one_thread_only_where_threads_sleep(monkeypatch: pytest.MonkeyPatch, sleep: bool) -> None:
    from lowrank_kit.compressed import linalg, modules

    monkeypatch.setattr(modules, "THREADS_SLEEP", sleep)
    threads, seen = torch.get_num_threads(), []
    original = torch.linalg.eigh

    def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(torch.get_num_threads())
        return original(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    monkeypatch.setattr(linalg, "EIGH_ONE_THREAD_DIM", 10)
    small, large = torch.eye(10, dtype=torch.float64), torch.eye(11, dtype=torch.float64)
    assert torch.equal(linalg.symmetric_eigh(small)[0], torch.ones(10, dtype=torch.float64))
    linalg.symmetric_eigh(large)
    assert seen == [1 if sleep and threads > 1 else threads, threads]
    assert torch.get_num_threads() == threads


def test_factors_are_ordered_by_importance() -> None:
    torch.manual_seed(0)
    weight = torch.randn(30, 20, dtype=torch.float64)
    a, b = svd_spectrum(weight).factors(20)
    norms = (a.norm(dim=0) * b.norm(dim=1)).tolist()
    assert norms == sorted(norms, reverse=True)


def test_active_rank_slice_equals_truncated_model() -> None:
    torch.manual_seed(0)
    weight = torch.randn(12, 10, dtype=torch.float64)
    full = LowRankLinear.from_factors(*svd_spectrum(weight).factors(10), None)
    small = LowRankLinear.from_factors(*svd_spectrum(weight).factors(4), None)
    x = torch.randn(3, 10, dtype=torch.float64)
    full.active_rank = 4
    assert torch.allclose(full(x), small(x))


def _factorize_everything_at_full_rank(model, strategy) -> None:
    """Gram of every projection input via the engine's replay and tap, then full-rank factors."""
    adapter = adapter_for(model)
    layers = adapter.layers
    inputs = capture(model, layers, sample_ids(n=2, length=40))
    for index, layer in enumerate(layers):
        tap = Tap()
        for proj in PROJECTIONS:
            tap.watch(proj, adapter.projection(index, proj), strategy.new_statistic() if strategy.statistic else Gram())
        with torch.no_grad():
            run_layer(layer, inputs, index)
        stats = tap.close()
        for proj in PROJECTIONS:
            dense = adapter.projection(index, proj)
            rank = min(dense.weight.shape)
            a, b = strategy.spectrum(dense.weight.detach(), stats[proj]).factors(rank)
            adapter.replace(index, proj, LowRankLinear.from_factors(a.float(), b.float(), dense.bias))
        with torch.no_grad():
            inputs = LayerInputs(run_layer(layer, inputs, index), inputs.kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", [Svd(), SvdLlm(), Asvd()], ids=["svd", "svd_llm", "asvd"])
def test_full_rank_reproduces_dense_logits(family: str, strategy) -> None:
    model = tiny_model(family)
    ids = sample_ids(n=2, length=40, seed=3)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    _factorize_everything_at_full_rank(model, strategy)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    with torch.no_grad():
        compressed = model(input_ids=ids).logits
    assert torch.allclose(dense, compressed, atol=1e-4), (dense - compressed).abs().max()


def test_asvd_weighs_channels_by_activation() -> None:
    """α = 0 is plain SVD; with one loud input channel, ASVD's output error is the lower one."""
    torch.manual_seed(0)
    weight = torch.randn(16, 24, dtype=torch.float64)
    x = torch.randn(400, 24, dtype=torch.float64)
    x[:, 3] *= 50.0
    a0, b0 = scaled_spectrum(weight, torch.ones(24, dtype=torch.float64)).factors(6)
    pa, pb = svd_spectrum(weight).factors(6)
    assert torch.allclose(a0 @ b0, pa @ pb)
    stat = Asvd.statistic()
    stat.update(x)
    a, b = Asvd(AsvdArgs(alpha=0.5)).spectrum(weight, stat).factors(6)
    assert ((weight - a @ b) @ x.T).norm() < ((weight - pa @ pb) @ x.T).norm()


@pytest.mark.parametrize("sleep", [True, False])
def test_small_products_run_on_one_thread_only_where_threads_sleep(monkeypatch: pytest.MonkeyPatch,
                                                                   sleep: bool) -> None:
    """LowRankLinear's output is the same either way; one thread only for small inputs under PASSIVE."""
    from lowrank_kit.compressed import modules

    monkeypatch.setattr(modules, "THREADS_SLEEP", sleep)
    threads = torch.get_num_threads()
    seen: list[int] = []
    module = LowRankLinear.from_factors(torch.randn(12, 5), torch.randn(5, 10), torch.randn(12))
    original = torch.nn.functional.linear

    def linear(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    x_one, x_small, x_large = torch.randn(1, 1, 10), torch.randn(3, 10), torch.randn(2, 3, 10)  # 1, 3, 6 tokens
    expected = [module(x) for x in (x_one, x_small, x_large)]
    monkeypatch.setattr(modules.F, "linear", linear)
    monkeypatch.setattr(LowRankLinear, "ONE_THREAD_MACS", 4 * module.macs_per_token(5))  # 1 and 3 tokens below, 6 not
    assert all(torch.equal(module(x), e) for x, e in zip((x_one, x_small, x_large), expected, strict=True))
    small = 1 if sleep and threads > 1 else threads
    assert seen == [threads, threads, small, small, threads, threads]  # one token: no switch, nothing to gain
    assert torch.get_num_threads() == threads


def test_low_rank_modules_compile_whole_under_the_thread_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` traces LowRankLinear and HeadwiseLowRank in one graph (the thread calls
    would break it) and gives their eager outputs."""
    from lowrank_kit.compressed import modules

    monkeypatch.setattr(modules, "THREADS_SLEEP", True)
    linear = LowRankLinear.from_factors(torch.randn(12, 5), torch.randn(5, 10), None)
    headwise = modules.HeadwiseLowRank(10, heads=2, head_dim=4, rank=3)
    torch.nn.init.normal_(headwise.a)
    torch.nn.init.normal_(headwise.b)
    x = torch.randn(2, 3, 10)
    for module in (linear, headwise):
        torch._dynamo.reset()
        compiled = torch.compile(module, backend="eager", fullgraph=True)  # fullgraph: a break raises
        torch.testing.assert_close(compiled(x), module(x))


@pytest.mark.parametrize("bias", [False, True])
def test_large_products_write_into_rows_padded_to_a_multiple_of_8(bias: bool) -> None:
    """An output width that is not a multiple of 8 goes into padded rows at prefill sizes (faster
    on CPUs), with F.linear's values; small, autograd and aligned products take F.linear itself."""
    from lowrank_kit.compressed import modules

    torch.manual_seed(0)
    weight, b = torch.randn(13, 24), (torch.randn(13) if bias else None)
    x = torch.randn(2, modules.ALIGNED_MIN_ROWS // 2, 24)
    with torch.no_grad():
        y = modules.aligned_linear(x, weight, b)
        assert y.shape == (2, modules.ALIGNED_MIN_ROWS // 2, 13) and y.stride(-2) == 16  # 13 padded to 16
        torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, b), rtol=1e-6, atol=1e-6)
        assert modules.aligned_linear(x[:, :3], weight, b).stride(-2) == 13  # 6 rows: plain
        assert modules.aligned_linear(x, weight[:8], b[:8] if bias else None).stride(-2) == 8
        # the compressed modules take the padded rows: a pruned MLP width, a rank
        resized = modules.ResizedLinear(24, 13, bias=bias)
        low_rank = LowRankLinear.from_factors(torch.randn(10, 13), torch.randn(13, 24), b[:10] if bias else None)
        assert resized(x).stride(-2) == 16
        torch.testing.assert_close(resized(x), torch.nn.functional.linear(x, resized.weight, resized.bias))
        torch.testing.assert_close(low_rank(x), torch.nn.functional.linear(x, low_rank.a @ low_rank.b, low_rank.bias),
                                   rtol=1e-5, atol=1e-5)
    leaf = x.clone().requires_grad_()
    y = modules.aligned_linear(leaf, weight, b)
    assert y.stride(-2) == 13 and y.requires_grad  # autograd: F.linear, gradients flow
    y.sum().backward()
    assert leaf.grad is not None
    if bias:  # a bias alone that wants a gradient takes F.linear too (out= has no autograd)
        trained = b.clone().requires_grad_()
        modules.aligned_linear(x, weight, trained).sum().backward()
        assert trained.grad is not None
    empty = modules.aligned_linear(x[..., :0], weight[:, :0])  # no input features: zeros, no division by 0
    assert empty.shape == y.shape and not empty.any()


def test_padded_rows_add_no_guard_on_the_sequence_length() -> None:
    """Compiled with dynamic shapes, one graph serves prompts on both sides of ALIGNED_MIN_ROWS."""
    from lowrank_kit.compressed import modules

    resized = modules.ResizedLinear(24, 13)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(resized, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for tokens in (8, 9, modules.ALIGNED_MIN_ROWS + 88, modules.ALIGNED_MIN_ROWS + 188):
            x = torch.randn(1, tokens, 24)
            torch.testing.assert_close(compiled(x), resized(x))
    assert counter.frame_count == 1


@pytest.mark.parametrize(("family", "output_fisher"), [("llama", None), ("llama", 0.01), ("qwen2", None)],
                         ids=["plain", "fisher-weighted", "qwen2"])
def test_svd_llm_reads_a_wide_projection_at_its_output_with_the_same_result(
        tmp_path, monkeypatch: pytest.MonkeyPatch, family: str, output_fisher: float | None) -> None:
    """The engine gathers down_proj's (narrower) output Gram for svd_llm, and the compressed
    model matches the one factorised from its input Gram; k/v (narrower too, and biased on
    Qwen2) read the input Gram q needs anyway."""
    from conftest import ByteTokenizer, tiny_recipe

    from lowrank_kit import compress

    watched: list[tuple[str, str]] = []
    original = Tap.watch

    def watch(self: Tap, key: str, module, stat, where: str = "input"):
        watched.append((key, where))
        return original(self, key, module, stat, where)

    monkeypatch.setattr(Tap, "watch", watch)
    ids = sample_ids(n=2, length=32)
    logits = []
    for reads_output in (True, False):
        if not reads_output:
            monkeypatch.setattr(SvdLlm, "reads_output", lambda self, run, layer, projection: False)
        recipe = tiny_recipe(tmp_path / str(reads_output), "svd_llm", 0.3,
                             transform=[{"plugin": "svd_llm", "output_fisher": output_fisher}])
        model = compress(recipe, model=tiny_model(family), tokenizer=ByteTokenizer(), progress=False).model
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
        if reads_output:
            assert ("Gram:layers.0.down_proj_output", "output") in watched
            assert not any(key == "Gram:layers.0.down_proj_input" for key, _ in watched)
            assert [key for key, where in watched if where == "output" and key.startswith("Gram:layers.0.")] == [
                "Gram:layers.0.down_proj_output"]
    assert torch.allclose(logits[0], logits[1], atol=1e-4 * logits[1].abs().max())


def test_side_by_side_runs_jobs_on_one_thread_each_and_keeps_their_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from lowrank_kit.compressed import modules
    from lowrank_kit.compressed.linalg import EIGH_ONE_THREAD_DIM, side_by_side

    monkeypatch.setattr(modules, "THREADS_SLEEP", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    try:
        seen: list[tuple[int, str]] = []

        def job(i: int):
            def run() -> int:
                seen.append((torch.get_num_threads(), threading.current_thread().name))
                return i
            return run

        assert list(side_by_side([job(i) for i in range(5)], cpu, 576)) == list(range(5))
        assert all(n == 1 and name.startswith("decompose") for n, name in seen)
        fresh: list[int] = []  # the process-wide setting is put back too, as a new thread sees it
        thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert torch.get_num_threads() == 2 and fresh == [2]
        seen.clear()  # one job, another device, larger matrices, or spinning threads: here, as configured
        assert list(side_by_side([job(7)], cpu, 576)) == [7]
        assert list(side_by_side([job(8), job(9)], torch.device("meta"), 576)) == [8, 9]
        assert list(side_by_side([job(10), job(11)], cpu, EIGH_ONE_THREAD_DIM + 1)) == [10, 11]
        monkeypatch.setattr(modules, "THREADS_SLEEP", False)
        assert list(side_by_side([job(12), job(13)], cpu, 576)) == [12, 13]
        assert seen == [(2, threading.current_thread().name)] * 7
        monkeypatch.setattr(modules, "THREADS_SLEEP", True)

        def fails() -> int:
            raise ValueError("no factor")

        with pytest.raises(ValueError, match="no factor"):
            list(side_by_side([job(1), fails], cpu, 576))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("plugin", ["svd", "svd_llm", "asvd"])
def test_spectra_side_by_side_give_the_model_of_one_after_the_other(
        tmp_path, monkeypatch: pytest.MonkeyPatch, plugin: str) -> None:
    from conftest import ByteTokenizer, tiny_recipe

    from lowrank_kit import compress
    from lowrank_kit.compressed import linalg, modules
    from lowrank_kit.pipeline import state

    monkeypatch.setattr(modules, "THREADS_SLEEP", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    calls: list[int] = []
    original = linalg.side_by_side

    def counted(jobs, device, largest_dim):
        calls.append(len(jobs))
        return original(jobs, device, largest_dim)

    try:
        ids = sample_ids(n=2, length=32)
        logits = []
        for together in (True, False):
            monkeypatch.setattr(state, "side_by_side", counted if together else
                                lambda jobs, device, largest_dim: (job() for job in jobs))
            model = compress(tiny_recipe(tmp_path / str(together), plugin, 0.3), model=tiny_model("llama"),
                             tokenizer=ByteTokenizer(), progress=False).model
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits)
        assert calls and max(calls) == 7  # a layer's seven projections at once
        assert torch.allclose(logits[0], logits[1], atol=1e-4 * logits[1].abs().max())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
