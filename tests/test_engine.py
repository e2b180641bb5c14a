"""End to end on tiny models: ratio from real shapes, report, save → load, files left alone."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from conftest import ByteTokenizer, sample_ids, tiny_model, tiny_recipe

from lowrank_kit import Strategy, compress, hookimpl, load_pretrained
from lowrank_kit.api import resolve_recipe
from lowrank_kit.calibration.stats import Gram, Tap
from lowrank_kit.compressed.modules import LowRankLinear
from lowrank_kit.extension.manager import registry
from lowrank_kit.pipeline import passes as passes_module
from lowrank_kit.pipeline.cache import DenseStore
from lowrank_kit.pipeline.callbacks import Callback
from lowrank_kit.pipeline.engine import Engine
from lowrank_kit.recipe.schema import RecipeError
from lowrank_kit.reporting.report import decoder_linear_params


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_compress_save_load_gives_equal_logits(tmp_path: Path, family: str) -> None:
    result = compress(tiny_recipe(tmp_path, "svd_llm", 0.3), model=tiny_model(family),
                      tokenizer=ByteTokenizer(), progress=False)
    assert sum(isinstance(m, LowRankLinear) for m in result.model.modules()) > 0
    out = result.output_dir
    assert out is not None
    for name in ("model.safetensors", "config.json", "recipe.yaml", "report.json", "report.md"):
        assert (out / name).is_file(), name
    reloaded = load_pretrained(out)
    ids = sample_ids(n=2, length=32)
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_report_ratio_is_counted_from_real_shapes(tmp_path: Path) -> None:
    model = tiny_model("llama")
    result = compress(tiny_recipe(tmp_path, "svd", 0.3), model=model, tokenizer=ByteTokenizer(), progress=False)
    rep = json.loads((result.output_dir / "report.json").read_text())
    geometry = result.run.geometry
    kept = decoder_linear_params(result.run.adapter)
    assert rep["achieved_ratio"] == pytest.approx(1 - kept / geometry.total_linear_params)
    assert rep["achieved_ratio"] >= 0.3 and abs(rep["achieved_ratio"] - 0.3) < 0.03  # tiny matrices: coarse ranks
    ranks = {m["unit"]: m["rank"] for m in rep["modules"]}
    assert result.model.model.layers[1].mlp.down_proj.rank == ranks["layers.1.down_proj"]
    assert rep["evaluation"][0]["dense"] > 0 and rep["evaluation"][0]["compressed"] > 0
    assert set(rep["timings_s"]) >= {"load", "allocate", "compress", "save"}
    assert "| layers.0.q_proj | svd |" in (result.output_dir / "report.md").read_text()


def test_input_model_folder_is_never_modified(tmp_path: Path) -> None:
    source = tmp_path / "input-model"
    tiny_model("llama").save_pretrained(source)
    before = digest(source)
    recipe = tiny_recipe(tmp_path, "svd_llm", 0.2, model={"path": str(source)})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    compress(recipe, model=model, tokenizer=ByteTokenizer(), progress=False)
    assert digest(source) == before
    # and the input folder can never be the output folder
    with pytest.raises(RecipeError, match="not a lowrank-kit output folder"):
        compress(tiny_recipe(tmp_path, output={"dir": str(source)}), model=model, tokenizer=ByteTokenizer(),
                 progress=False, overwrite=True)
    assert digest(source) == before


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, "svd", 0.2)
    compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    with pytest.raises(RecipeError, match="already exists; pass --overwrite"):
        compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    result = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False, overwrite=True)
    assert (result.output_dir / "report.json").is_file()
    assert not list(tmp_path.glob(".out.partial*"))


class LayerInputWatcher(Strategy):
    """Test-only collect strategy: keeps the Gram of the inputs of layers 1 and 2."""

    name = "layer_input_watcher"
    point = "collect"
    description = "test"
    seen: ClassVar[dict[int, Gram]] = {}

    @hookimpl
    def lowrank_collect_layer(self, run, tap, layer):
        if layer in (1, 2):
            self.seen[layer] = tap.watch(f"test:{layer}", run.adapter.layers[layer], Gram())


@pytest.mark.parametrize("plugin", ["svd", "svd_llm"])
def test_layer_statistics_see_the_compressed_predecessors(tmp_path: Path, plugin: str) -> None:
    """Pass 2 feeds layer i with the outputs of the compressed layers < i (skipping idle layers)."""
    registry().add(LayerInputWatcher)
    try:
        recipe = tiny_recipe(tmp_path, plugin, 0.4, collect=["layer_input_watcher"])
        result = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    finally:
        registry.cache_clear()  # the next registry() is rebuilt from the installed plugins only
    with torch.no_grad():
        states = result.model(input_ids=result.run.calibration, output_hidden_states=True).hidden_states
    for layer in (1, 2):
        x = states[layer].double().reshape(-1, states[layer].shape[-1])
        assert torch.allclose(LayerInputWatcher.seen[layer].matrix, x.T @ x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [64, 600, 1537])
def test_a_gram_from_its_upper_blocks_is_the_whole_symmetric_product(width: int) -> None:
    """Wide inputs multiply only the column blocks on and above the diagonal (a ragged last
    block at 1,537); the matrix every consumer reads is whole, symmetric and one tensor, and
    stays right after a further update and after an all-reduce."""
    torch.manual_seed(0)
    x = torch.randn(300, width, dtype=torch.float64)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        gram = Gram()
        gram.update(x[:100].to(dtype))
        first = gram.matrix
        assert gram.matrix is first and torch.equal(first, first.T)
        assert torch.allclose(first, x[:100].T @ x[:100], rtol=rtol, atol=rtol * 100)
        gram.update(x[100:].to(dtype))
        assert gram.matrix is not first
        assert torch.allclose(gram.matrix, x.T @ x, rtol=rtol, atol=rtol * 300)
        gram.all_reduce(lambda t: t * 2)  # two processes that saw the same tokens, after a read
        assert torch.allclose(gram.matrix, 2 * x.T @ x, rtol=rtol, atol=rtol * 600)


def test_a_forward_stops_once_its_statistics_are_fed() -> None:
    """``Tap.until_filled``: after a first full forward that counts the watched modules' calls, a
    module read at its input never runs, nor anything after it; the statistics are those of
    whole forwards. Without watches, or with a module that runs twice, forwards run to the end."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    ran: list[int] = []
    for index, module in enumerate(net):
        module.register_forward_hook(lambda _m, _a, _o, index=index: ran.append(index))
    x = torch.randn(7, 4)
    early = Tap()
    early.watch("out0", net[0], Gram(), where="output")
    early.watch("in2", net[2], Gram())
    for expected in ([0, 1, 2, 3], [0, 1], [0, 1]):
        ran.clear()
        with early.until_filled():
            net(x)
        assert ran == expected
    assert early.stopped == 2
    stats = early.close()  # the statistics of three whole forwards
    with torch.no_grad():
        out0 = net[0](x).double()
        in2 = torch.relu(out0)
    assert torch.allclose(stats["out0"].matrix, 3 * out0.T @ out0, rtol=1e-6)
    assert torch.allclose(stats["in2"].matrix, 3 * in2.T @ in2, rtol=1e-6)
    ran.clear()
    with Tap().until_filled():
        net(x)
    assert ran == [0, 1, 2, 3]

    twice = torch.nn.Linear(5, 5)
    looped = torch.nn.Sequential(torch.nn.Linear(4, 5), twice, twice, torch.nn.Linear(5, 2))
    tap = Tap()
    tap.watch("in", twice, Gram())
    for _ in range(3):
        with tap.until_filled():
            looped(x)
    assert tap.stopped == 0 and tap.stats["in"].count == 3 * 2 * 7


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_statistics_forward_that_stops_early_changes_no_weight(tmp_path: Path, family: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """FLAT-LLM's sequential pass runs each dense layer only until its statistics are fed
    (down_proj's product is skipped): the compressed model is the one a full forward gives."""
    recipe = tiny_recipe(tmp_path, "headwise_pca", 0.3, allocate="iprs", score="angular_importance",
                         transform=[{"plugin": "headwise_pca", "targets": ["v_proj", "o_proj"]},
                                    {"plugin": "nystrom", "targets": ["gate_proj", "up_proj", "down_proj"]}],
                         evaluate=[])
    dense = tiny_model(family)

    def run(name: str):
        return compress(recipe, model=dense, tokenizer=ByteTokenizer(), progress=False,
                        output={"dir": str(tmp_path / name), "cache_dir": None})

    early = run("early")
    taps: list[Tap] = []
    original = Tap.until_filled

    def counted(self):
        taps.append(self)
        return original(self)

    monkeypatch.setattr(Tap, "until_filled", lambda self: contextlib.nullcontext())
    full = run("full")
    monkeypatch.setattr(Tap, "until_filled", counted)
    run("counted")
    assert taps and all(tap.stopped > 0 for tap in taps)  # every layer's dense forward was cut short
    weights = full.model.state_dict()
    for name, tensor in early.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_dense_input_statistics_come_from_the_dense_model(tmp_path: Path) -> None:
    """calibration.sequential: false takes every layer's statistics on the dense model's activations."""
    registry().add(LayerInputWatcher)
    try:
        recipe = tiny_recipe(tmp_path, "svd_llm", 0.4, collect=["layer_input_watcher"],
                             calibration={**tiny_recipe(tmp_path)["calibration"], "sequential": False})
        dense = tiny_model("llama")
        result = compress(recipe, model=copy.deepcopy(dense), tokenizer=ByteTokenizer(), progress=False)
    finally:
        registry.cache_clear()
    with torch.no_grad():
        states = dense(input_ids=result.run.calibration, output_hidden_states=True).hidden_states
    for layer in (1, 2):
        x = states[layer].double().reshape(-1, states[layer].shape[-1])
        assert torch.allclose(LayerInputWatcher.seen[layer].matrix, x.T @ x, rtol=1e-5, atol=1e-6)


def test_dense_store_shares_dense_statistics_across_ratios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second ratio reads the stored statistics (no layer runs) and compresses exactly as without the store."""
    store = DenseStore()
    calibration = {**tiny_recipe(tmp_path)["calibration"], "sequential": False}
    dense = tiny_model("qwen2")
    first = tiny_recipe(tmp_path / "a", "svd_llm", 0.2, calibration=calibration)
    Engine(resolve_recipe(first), progress=False, store=store).run(copy.deepcopy(dense), ByteTokenizer())
    second = resolve_recipe(tiny_recipe(tmp_path / "b", "svd_llm", 0.4, calibration=calibration))
    fresh = Engine(second, progress=False, overwrite=True).run(copy.deepcopy(dense), ByteTokenizer())
    calls: list[int] = []
    real_run_layer = passes_module.run_layer
    monkeypatch.setattr(passes_module, "run_layer", lambda *a: calls.append(1) or real_run_layer(*a))
    shared = Engine(second, progress=False, overwrite=True, store=store).run(copy.deepcopy(dense),
                                                                                    ByteTokenizer())
    assert calls == []
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(shared.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)


def test_store_shares_factorisations_only_of_dense_inputs(tmp_path: Path) -> None:
    """svd (weights only) and svd_llm on dense statistics reuse their spectra at another ratio and give
    the logits of a run without the store; svd_llm on sequential statistics never reads stored spectra."""
    dense = tiny_model("llama")
    ids = sample_ids()
    for plugin, sequential, shared in (("svd", True, True), ("svd_llm", False, True), ("svd_llm", True, False)):
        store = DenseStore()
        calibration = {**tiny_recipe(tmp_path)["calibration"], "sequential": sequential}
        first = resolve_recipe(tiny_recipe(tmp_path / "a", plugin, 0.2, calibration=calibration))
        Engine(first, progress=False, overwrite=True, store=store).run(copy.deepcopy(dense), ByteTokenizer())
        spectra = [k for k in store._items if k.startswith("spectrum|")]
        assert bool(spectra) == shared
        second = resolve_recipe(tiny_recipe(tmp_path / "b", plugin, 0.5, calibration=calibration))
        with_store = Engine(second, progress=False, overwrite=True, store=store).run(copy.deepcopy(dense),
                                                                                     ByteTokenizer())
        assert [k for k in store._items if k.startswith("spectrum|")] == spectra  # read, none added
        alone = Engine(second, progress=False, overwrite=True).run(copy.deepcopy(dense), ByteTokenizer())
        with torch.no_grad():
            assert torch.equal(with_store.model(input_ids=ids).logits, alone.model(input_ids=ids).logits)


def test_store_shares_output_fishers_so_a_later_ratio_runs_no_scoring_pass(tmp_path: Path) -> None:
    """The output Fishers of the scoring pass are the dense model's: with them stored (and no scorer in
    the recipe), a second ratio runs no scoring pass and compresses exactly as a run without the store."""
    seen: list[str] = []

    class Passes(Callback):
        def on_batches_start(self, run: object, label: str, total: int) -> None:
            seen.append(label)

    dense = tiny_model("llama")
    weighted = [{"plugin": "svd_llm", "output_fisher": 0.1}]
    store = DenseStore()
    first = resolve_recipe(tiny_recipe(tmp_path / "a", "svd_llm", 0.2, transform=weighted))
    Engine(first, progress=False, store=store).run(copy.deepcopy(dense), ByteTokenizer())
    assert any(k.startswith("scoring|") for k in store._items)
    second = resolve_recipe(tiny_recipe(tmp_path / "b", "svd_llm", 0.4, transform=weighted))
    shared = Engine(second, progress=False, store=store, callbacks=[Passes()]).run(copy.deepcopy(dense),
                                                                                 ByteTokenizer())
    assert seen and not any(label.startswith("score") for label in seen)
    alone = Engine(second, progress=False, overwrite=True).run(copy.deepcopy(dense), ByteTokenizer())
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(shared.model(input_ids=ids).logits, alone.model(input_ids=ids).logits)


@pytest.mark.parametrize("pipeline", ["scoring", "dense_input"])
def test_store_finds_a_statistic_whose_settings_change_while_it_fills(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipeline: str) -> None:
    """A statistic is stored under the identity its lookup computes, from the unfilled copy: one
    whose plain settings change as it fills (as GradEnergy's width does) is still found."""
    real_update = Gram.update

    def update(self: Gram, x: torch.Tensor) -> None:
        real_update(self, x)
        self.filled = True  # a setting the unfilled copy of a later lookup lacks

    monkeypatch.setattr(Gram, "update", update)
    dense = tiny_model("llama")
    store = DenseStore()
    if pipeline == "scoring":
        options = {"transform": [{"plugin": "svd_llm", "output_fisher": 0.1}]}
    else:
        options = {"calibration": {**tiny_recipe(tmp_path)["calibration"], "sequential": False}}
    first = resolve_recipe(tiny_recipe(tmp_path / "a", "svd_llm", 0.2, **options))
    Engine(first, progress=False, store=store).run(copy.deepcopy(dense), ByteTokenizer())
    assert any("Gram|" in key for key in store._items)
    seen: list[str] = []

    class Passes(Callback):
        def on_batches_start(self, run: object, label: str, total: int) -> None:
            seen.append(label)

    calls: list[int] = []
    real_run_layer = passes_module.run_layer
    monkeypatch.setattr(passes_module, "run_layer", lambda *a: calls.append(1) or real_run_layer(*a))
    second = resolve_recipe(tiny_recipe(tmp_path / "b", "svd_llm", 0.4, **options))
    Engine(second, progress=False, store=store, callbacks=[Passes()]).run(copy.deepcopy(dense), ByteTokenizer())
    if pipeline == "scoring":
        assert seen and not any(label.startswith("score") for label in seen)  # the output Fishers were found
    else:
        assert calls == []  # every layer's input statistics were found


def test_store_keeps_nothing_past_its_memory_limit() -> None:
    store = DenseStore(max_bytes=1000)
    small, large = Gram(), Gram()
    small.update(torch.ones(3, 4))  # 4×4 float64 + count: 136 bytes
    large.update(torch.ones(3, 20))  # 3,208 bytes
    store.put("base", "small", small)
    store.put("base", "large", large)
    assert store.get("base", "small") is small and store.get("base", "large") is None
    for _ in range(8):  # replacing an entry counts its bytes once: 8 × 136 would pass the limit
        store.put("base", "small", small)
    assert store._bytes == 136
    assert store.get("other", "small") is None  # another model or data drops the rest


def test_the_old_sequential_flag_names_a_pipeline(tmp_path: Path) -> None:
    import typing

    from lowrank_kit.pipeline.passes import LAYER_PASSES
    from lowrank_kit.recipe.loading import from_raw
    from lowrank_kit.recipe.schema import RecipeError
    from lowrank_kit.recipe.spec import DataSpec

    calibration = tiny_recipe(tmp_path)["calibration"]
    assert from_raw(tiny_recipe(tmp_path)).calibration.pipeline == "sequential"
    old = from_raw(tiny_recipe(tmp_path, calibration={**calibration, "sequential": False})).calibration
    assert (old.pipeline, old.sequential) == ("dense_input", None)
    with pytest.raises(RecipeError, match=r"calibration\.sequential: says sequential but pipeline says dense_input"):
        from_raw(tiny_recipe(tmp_path, calibration={**calibration, "sequential": True, "pipeline": "dense_input"}))
    with pytest.raises(RecipeError, match=r"calibration\.pipeline"):
        from_raw(tiny_recipe(tmp_path, calibration={**calibration, "pipeline": "sequentail"}))
    choices = typing.get_args(typing.get_args(typing.get_type_hints(DataSpec)["pipeline"])[0])
    assert set(choices) == set(LAYER_PASSES)


def test_an_error_reaches_the_callbacks_and_closes_its_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowrank_kit.pipeline.callbacks import Callback

    events: list[str] = []

    class Recorder(Callback):
        def on_phase_end(self, run, phase, seconds):
            events.append(f"end {phase}")

        def on_exception(self, run, error):
            events.append(f"error {error}")

    def broken(*_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(passes_module.SequentialPass, "gather", broken)
    with pytest.raises(RuntimeError, match="boom"):
        compress(tiny_recipe(tmp_path), model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False,
                 callbacks=[Recorder()])
    assert events[-2:] == ["end compress", "error boom"]


def test_a_damaged_weight_is_named_before_any_decomposition(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"decoder layer 1: weight 'mlp\.down_proj\.weight' holds NaN") as caught:
        compress(tiny_recipe(tmp_path, "svd_llm", 0.3), model=model, tokenizer=ByteTokenizer(), progress=False)
    assert caught.value.lowrank_summary.startswith("compress failed at decoder layer 1: ValueError")


def test_a_failing_strategy_is_named_and_its_traceback_logged(tmp_path: Path) -> None:
    from lowrank_kit.pipeline.errors import summary

    class Exploding(Strategy):
        name, point, description = "exploding", "collect", "test"

        @hookimpl
        def lowrank_collect_layer(self, run, tap, layer):
            if layer == 2:
                raise KeyError("no such module")

    registry().add(Exploding)
    try:
        with pytest.raises(KeyError) as caught:
            compress(tiny_recipe(tmp_path, collect=["exploding"]), model=tiny_model("llama"),
                     tokenizer=ByteTokenizer(), progress=False)
    finally:
        registry.cache_clear()
    line, log = summary(caught.value)
    assert line == ("compress failed in collect strategy 'exploding' (lowrank_collect_layer) at decoder layer 2: "
                    "KeyError: 'no such module'")
    assert log is not None and log.parent == (tmp_path / "out").parent and "raise KeyError" in log.read_text()


def test_the_cli_reports_a_failed_run_in_two_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from lowrank_kit import api, cli
    from lowrank_kit.pipeline.errors import annotate

    def failing(*_args, **_kwargs):
        err = RuntimeError("boom")
        annotate(err, "compress failed at decoder layer 4: RuntimeError: boom", tmp_path / "x.log")
        raise err

    monkeypatch.setattr(api, "compress", failing)
    recipe = Path(__file__).parent.parent / "recipes" / "svd.yaml"
    assert cli.main(["compress", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: compress failed at decoder layer 4: RuntimeError: boom",
                   f"the full traceback is in {tmp_path / 'x.log'}"]
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", "compress", str(recipe)])


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_a_damaged_weights_file_is_named_on_load(tmp_path: Path, damage: str) -> None:
    result = compress(tiny_recipe(tmp_path, "svd", 0.3, evaluate=[]), model=tiny_model("llama"),
                      tokenizer=ByteTokenizer(), progress=False)
    weights = result.output_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match="is damaged or truncated"):
        load_pretrained(result.output_dir)


def test_our_output_given_as_the_model_is_refused_and_never_modified(tmp_path: Path, capsys) -> None:
    from lowrank_kit.cli import main

    saved = compress(tiny_recipe(tmp_path, "svd_llm", 0.3), model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                     progress=False).output_dir
    before = digest(saved)
    raw = tiny_recipe(tmp_path, "svd_llm", 0.3, model={"path": str(saved)})
    for out in (saved, tmp_path / "again"):  # over itself (the case that destroyed it), and elsewhere
        raw["output"]["dir"] = str(out)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        assert main(["compress", str(path), "--overwrite", "--quiet"]) == 2
        assert "is a lowrank-kit output" in capsys.readouterr().err
        assert digest(saved) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial folder left


def test_the_model_passed_in_is_never_modified_and_the_result_is_short(tmp_path: Path) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(tiny_recipe(tmp_path, "svd_llm", 0.3), model=model, tokenizer=ByteTokenizer(), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(model).__name__ == "LlamaForCausalLM" and result.model is not model
    assert len(repr(result)) < 400 and "ratio 0.3" in repr(result) and "perplexity" in repr(result)
    with pytest.raises(TypeError, match="unexpected keyword argument 'overwite'; did you mean 'overwrite'"):
        compress(tiny_recipe(tmp_path, "svd_llm", 0.3), model=model, tokenizer=ByteTokenizer(), overwite=True)
    inplace = compress(tiny_recipe(tmp_path, "svd_llm", 0.3, output={"dir": str(tmp_path / "b")}), model=model,
                       tokenizer=ByteTokenizer(), progress=False, inplace=True)
    assert inplace.model is model


def test_calibration_and_evaluation_data_can_be_strings_or_a_dataset(tmp_path: Path) -> None:
    import datasets

    from lowrank_kit.data.texts import load_text

    text = load_text("austen-emma")
    paragraphs = [p for p in text.split("\n\n") if p.strip()][:400]
    held_out = datasets.Dataset.from_dict({"body": text.split("\n\n")[-300:]})  # not Persuasion, the default
    result = compress(tiny_recipe(tmp_path, "svd_llm", 0.3), model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                      progress=False, calibration={"dataset": paragraphs, "samples": 8, "seq_len": 64},
                      evaluate=[{"dataset": held_out, "text_field": "body", "seq_len": 64, "max_tokens": 512}])
    assert result.run.recipe.calibration.dataset.startswith("in-memory-")
    row = result.report["evaluation"][0]
    assert row["dataset"].startswith("in-memory-") and row["tokens"] == 512
    reference = compress(tiny_recipe(tmp_path, "svd_llm", 0.3, output={"dir": str(tmp_path / "ref")}),
                         model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False,
                         calibration={"dataset": "austen-emma", "samples": 8, "seq_len": 64})
    assert reference.report["evaluation"][0]["dense"] != row["dense"]  # it really read the other text
    with pytest.raises(RecipeError, match="no column 'text'"):
        compress(tiny_recipe(tmp_path, "svd_llm", 0.3), model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                 calibration={"dataset": held_out})


def test_calibration_mixes_sources_in_proportion_to_their_weights(tmp_path: Path) -> None:
    from lowrank_kit.data.texts import load_text, window_counts

    assert window_counts([1.0, 0.5], 16) == [11, 5]
    assert window_counts([100.0, 1.0, 1.0], 4) == [2, 1, 1]  # every source keeps at least one window
    recipe = tiny_recipe(tmp_path, "svd_llm", 0.3)
    recipe["calibration"]["dataset"] = ["austen-emma", {"dataset": "gnu-licenses", "weight": 0.6}]
    result = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    windows = result.run.calibration
    assert windows.shape == (8, 64)
    emma, licences = load_text("austen-emma").encode(), load_text("gnu-licenses").encode()
    found = [(bytes(w.tolist()) in emma, bytes(w.tolist()) in licences) for w in windows]
    assert found == [(True, False)] * 5 + [(False, True)] * 3
    assert result.report["calibration"]["dataset"] == ["austen-emma", {"dataset": "gnu-licenses", "weight": 0.6}]


def test_fingerprint_sums_in_chunks_like_one_float64_sum() -> None:
    """The chunked sum keeps the key's meaning: equal to the whole float64 sum at the printed
    precision, and one changed element changes the key."""
    from lowrank_kit.pipeline.cache import _sum, fingerprint

    torch.manual_seed(0)
    big = torch.randn(3 * (1 << 20) + 7)
    assert f"{_sum(big):.10e}" == f"{float(big.double().sum()):.10e}"
    assert _sum(torch.empty(0)) == 0.0
    model = tiny_model("llama")
    before = fingerprint(model)
    assert fingerprint(model) == before
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert fingerprint(model) != before
