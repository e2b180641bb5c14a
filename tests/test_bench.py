"""``lowrank-kit bench`` on a tiny model: table, plots, failed cells, resume, one set of data."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import ByteTokenizer, tiny_model, tiny_recipe

from lowrank_kit import bench
from lowrank_kit.api import resolve_recipe
from lowrank_kit.evaluation.metrics import evaluate
from lowrank_kit.pipeline.engine import Engine
from lowrank_kit.recipe.schema import RecipeError

EVALUATE = [{"dataset": "austen-persuasion", "seq_len": 64, "max_tokens": 256},
            {"metric": "lastword", "prompts": 4, "seq_len": 64},
            {"metric": "generation", "prompts": 2, "prompt_len": 24, "new_tokens": 4}]


def recipes(tmp_path: Path) -> list[dict]:
    svd = tiny_recipe(tmp_path, "svd", evaluate=EVALUATE)
    svd_llm = tiny_recipe(tmp_path, "svd_llm", evaluate=EVALUATE)
    only_q = tiny_recipe(tmp_path, "svd_llm", name="only-q", evaluate=EVALUATE,
                         transform=[{"plugin": "svd_llm", "targets": ["q_proj"]}])  # 0.5 is out of its reach
    return [svd, svd_llm, only_q]


def test_bench_table_plots_failed_cell_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bench"
    rows = bench(recipes(tmp_path), [0.05, 0.5], out, model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                 progress=False)
    assert [(r["recipe"], r["target_ratio"]) for r in rows] == [
        ("dense", 0.0), ("tiny-svd", 0.05), ("tiny-svd_llm", 0.05), ("only-q", 0.05), ("tiny-svd", 0.5),
        ("tiny-svd_llm", 0.5), ("only-q", 0.5)]
    failed = [r for r in rows if r.get("error")]
    assert [(r["recipe"], r["target_ratio"]) for r in failed] == [("only-q", 0.5)]
    assert "out of reach" in failed[0]["error"]
    for row in rows[1:6]:
        assert row["achieved_ratio"] >= row["target_ratio"]
        assert row["perplexity"] > 1 and 0 <= row["lastword_acc"] <= 1 and 0 <= row["rougeL_vs_dense"] <= 1
        assert row["compress_s"] > 0 and row["peak_rss_mb"] > 0 and row["decode_tok_s"] > 0
    with (out / "bench.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 7 and float(table[2]["perplexity"]) == pytest.approx(rows[2]["perplexity"])
    assert "Failed cells" in (out / "bench.md").read_text()
    assert (out / "perplexity.png").stat().st_size > 0 and (out / "keep_fractions.png").stat().st_size > 0
    assert (out / "cells" / "tiny-svd_llm-0.05" / "report.json").is_file()

    def no_engine(*_args, **_kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr("lowrank_kit.harness.bench.Engine.run", no_engine)
    again = bench(recipes(tmp_path)[:2], [0.05, 0.5], out, model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                  progress=False)
    assert [r["perplexity"] for r in again] == [r["perplexity"] for r in rows[:3] + rows[4:6]]


def test_bench_compares_on_one_set_of_data(tmp_path: Path) -> None:
    first, second, _ = recipes(tmp_path)
    second["calibration"] = {**second["calibration"], "samples": 4}
    with pytest.raises(RecipeError, match="one model and one set of data") as err:
        bench([first, second], [0.2], tmp_path / "b", model=tiny_model("llama"), tokenizer=ByteTokenizer())
    assert err.value.path == "calibration"


def test_bench_never_writes_into_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RecipeError, match="other files"):
        bench(recipes(tmp_path)[:1], [0.2], tmp_path / "mine", model=tiny_model("llama"), tokenizer=ByteTokenizer())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_decode_only_variant_reuses_the_compressed_model(tmp_path: Path) -> None:
    static = tiny_recipe(tmp_path, "svd_llm", name="static", evaluate=EVALUATE[:1] + EVALUATE[2:])
    progressive = {**static, "name": "progressive", "decode": {"plugin": "progressive", "stages": [[0, 0.5]]}}
    rows = bench([static, progressive], [0.3], tmp_path / "b", model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                 progress=False)
    assert rows[1]["perplexity"] == rows[2]["perplexity"]  # the same compressed weights (prefill at full rank)
    assert rows[1]["compress_s"] == pytest.approx(rows[2]["compress_s"], abs=0.05)
    assert rows[1]["decode_macs_saved"] == 0 and rows[2]["decode_macs_saved"] > 0.4
    import json

    report = json.loads((tmp_path / "b" / "cells" / "progressive-0.3" / "report.json").read_text())
    assert report["notes"]["compression_reused_from"] == "static"
    assert report["strategies"]["decode"] == "progressive"


def test_reused_whole_sequence_evaluations_equal_fresh_ones(tmp_path: Path) -> None:
    """A decode-only variant copies perplexity and last-word rows: recomputing them gives the same values."""
    static = tiny_recipe(tmp_path / "s", "svd_llm", name="static", evaluate=EVALUATE)
    progressive = {**tiny_recipe(tmp_path / "p", "svd_llm", name="progressive", evaluate=EVALUATE),
                   "decode": {"plugin": "progressive", "stages": [[0, 0.5]]}}
    first = Engine(resolve_recipe(static)).run(tiny_model("llama"), ByteTokenizer())
    second = Engine(resolve_recipe(progressive)).run(reuse=first)
    recipe = second.run.recipe
    for index in (0, 1):  # perplexity, lastword
        fresh = evaluate(second.model, ByteTokenizer(), recipe.evaluate[index], False)
        assert second.evaluations["compressed"][index]["value"] == pytest.approx(fresh["value"], rel=1e-6)
    assert second.evaluations["compressed"][2]["decode_macs_saved"] > 0.4  # generation did run again


def test_a_second_perplexity_fills_its_own_columns_with_ratios_to_dense() -> None:
    from lowrank_kit.harness.bench import _evaluation_columns

    report = {"evaluation": [
        {"metric": "perplexity", "dataset": "austen-persuasion", "dense": 40.0, "compressed": 50.0},
        {"metric": "perplexity", "dataset": "python-reference", "dense": 10.0, "compressed": 15.0}]}
    columns = _evaluation_columns(report, "compressed")
    assert columns["perplexity"] == 50.0 and columns["ppl_x_dense"] == 1.25
    assert columns["perplexity_2"] == 15.0 and columns["ppl_2_x_dense"] == 1.5
