"""The speed benchmark: its limits follow from the real shapes, its KV-cache model matches the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ByteTokenizer, sample_ids, tiny_model, tiny_recipe

from lowrank_kit import compress
from lowrank_kit.harness import speed
from lowrank_kit.harness.speed import Regime, Shapes, interleaved, limit
from lowrank_kit.models import hf_compat


def test_multiply_adds_and_bytes_follow_the_compressed_shapes(tmp_path: Path) -> None:
    dense = tiny_model("llama")
    result = compress(tiny_recipe(tmp_path, "svd_llm", 0.3), model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                      progress=False)
    c = dense.config
    head = c.vocab_size * c.hidden_size
    d, k = Shapes.of(dense), Shapes.of(result.model)
    assert d.matmul_macs == result.report["decoder_linear_params"]["dense"] + head
    assert k.matmul_macs == result.report["decoder_linear_params"]["compressed"] + head
    assert d.weight_bytes == 4 * d.matmul_macs
    attention = c.num_hidden_layers * c.num_attention_heads * 2 * c.head_dim * (64 + 1) / 2
    assert d.prefill_macs_per_token(64) == pytest.approx(d.matmul_macs + attention)
    prefill = limit(d, k, Regime("prefill", 1, 64))
    assert prefill == pytest.approx((d.matmul_macs + attention) / (k.matmul_macs + attention))
    kv = 3 * c.num_hidden_layers * c.num_key_value_heads * 2 * c.head_dim * (64 + 8) * 4
    decode = limit(d, k, Regime("decode", 3, 64, 16))
    assert decode == pytest.approx((d.weight_bytes + kv) / (k.weight_bytes + kv))
    assert prefill > 1 and decode > 1


@pytest.mark.parametrize(("family", "plugin"), [("llama", None), ("llama", "headwise_pca"), ("gemma3", None)])
def test_kv_cache_model_equals_the_cache_a_forward_builds(tmp_path: Path, family: str, plugin: str | None) -> None:
    model = tiny_model(family)
    if plugin:
        model = compress(tiny_recipe(tmp_path, plugin, 0.1), model=model, tokenizer=ByteTokenizer(),
                         progress=False).model
    ids = sample_ids(2, 20)
    with torch.no_grad():
        cache = hf_compat.output_cache(model(input_ids=ids, use_cache=True))
    shapes = Shapes.of(model)
    assert hf_compat.cache_bytes(cache) == shapes.kv_bytes(2, 20)
    if plugin:  # the value heads are narrower than the key heads, and the cache shows it
        assert shapes.kv_bytes(2, 20) < Shapes.of(tiny_model(family)).kv_bytes(2, 20)


def test_interleaved_alternates_and_drops_the_warm_up() -> None:
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name) or 1.0) for name in ("dense", "compressed")}
    times = interleaved(calls, repeats=3, warmup=1)
    assert order == ["dense", "compressed", "compressed", "dense", "dense", "compressed", "compressed", "dense"]
    assert times == {"dense": [1.0] * 3, "compressed": [1.0] * 3}


def test_measure_a_saved_folder(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, "svd_llm", 0.3)
    compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
    regimes = (Regime("prefill", 2, 32), Regime("decode", 2, 16, 4))
    result = speed.measure(tmp_path / "out", tiny_model("llama"), regimes, repeats=2, device=torch.device("cpu"),
                           dtype=None, memory_check=False, say=lambda _: None)
    assert [row["label"] for row in result["rows"]] == [r.label for r in regimes]
    for row in result["rows"]:
        assert row["speedup"] == pytest.approx(row["dense"]["median_s"] / row["compressed"]["median_s"])
        assert row["limit"] > 1
    text = speed.markdown([result])
    assert "decode batch 2" in text and "KV cache from the shapes" in text


def test_decode_timer_counts_only_the_decode_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    stamps: list[int] = []
    original = speed.StepClock.end

    def end(self: speed.StepClock) -> None:
        original(self)
        stamps.append(len(self.stamps))

    monkeypatch.setattr(speed.StepClock, "end", end)
    seconds = speed.timer(tiny_model("llama"), Regime("decode", 2, 16, 5), torch.device("cpu"))()
    assert seconds > 0
    assert stamps == [1 + 1 + 5 + 1]  # the prompt, the prefill's token, five decode steps, the end


def test_refuses_to_write_into_a_folder_of_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "report.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a speed benchmark"):
        speed.run_speed([tmp_path / "m"], tmp_path)


def test_the_memory_probe_reports_its_own_peak_not_its_parents() -> None:
    """A spawned child inherits ru_maxrss across exec on Linux; the probe must not report it."""
    hog = bytearray(600 * 2**20)  # the parent's peak rises by 600 MB
    hog[:: 4096] = b"x" * len(hog[:: 4096])
    child = speed.in_fresh_process("peak_rss_mb")
    assert child < speed.peak_rss_mb() - 400
    del hog


def test_regimes_are_picked_by_kind_or_name() -> None:
    assert speed.select(None) == speed.REGIMES
    assert [r.name for r in speed.select(["decode"])] == ["decode-1", "decode-8", "decode-32"]
    assert [r.name for r in speed.select(["prefill-8x512", "decode-1"])] == ["prefill-8x512", "decode-1"]
    with pytest.raises(ValueError, match="unknown regime 'decode-4'; choose from"):
        speed.select(["decode-4"])
