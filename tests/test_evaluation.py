"""Evaluations: last-word accuracy is greedy generation of the word; paragraphs are held out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ByteTokenizer, tiny_model, tiny_recipe

from lowrank_kit import compress
from lowrank_kit.data.texts import lastword_examples
from lowrank_kit.evaluation.lastword import lastword_accuracy
from lowrank_kit.recipe.spec import EvalSpec


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_lastword_accuracy_matches_greedy_generation(family: str) -> None:
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (5, 17, 9, 30, 12):  # different lengths: padding must not move any position
        context = torch.randint(0, 256, (length,), generator=generator).tolist()
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([context]), max_new_tokens=3, do_sample=False,
                                 pad_token_id=257, eos_token_id=None)
        word = out[0, length:].tolist()
        examples.append((context, word))  # exactly what greedy decoding produces: correct
        examples.append((context, [*word[:2], (word[2] + 1) % 256]))  # last token wrong: incorrect
    assert lastword_accuracy(model, examples, batch_size=4) == 0.5
    assert lastword_accuracy(model, examples[::2], batch_size=3) == 1.0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_perplexity_with_the_head_in_chunks_equals_the_whole_logits(family: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of positions through the vocabulary head (and Gemma's logit soft-cap) give the same
    perplexity as the model's own forward over whole windows."""
    from torchmetrics.text import Perplexity

    from lowrank_kit.evaluation import perplexity as module

    model = tiny_model(family)
    if family == "gemma3":
        model.config.final_logit_softcapping = 2.0  # a cap that bites on these logits
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    metric = Perplexity()
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    metric.update(logits[:, :-1], windows[:, 1:])
    monkeypatch.setattr(module, "HEAD_CHUNK", 16)  # 39 targets per window: chunks of 16, 16, 7
    assert module.perplexity(model, windows, batch_size=2) == pytest.approx(float(metric.compute()), rel=1e-5)


def test_lastword_paragraphs_come_from_the_held_out_half() -> None:
    tokenizer = ByteTokenizer()
    spec = EvalSpec(metric="lastword", dataset="austen-persuasion", prompts=20, seq_len=64)
    examples = lastword_examples(tokenizer, spec)
    assert len(examples) == 20
    from lowrank_kit.data.texts import load_text

    text = load_text("austen-persuasion", "evaluation")
    first_half = " ".join(text[: len(text) // 2].split())
    for context, target in examples:
        assert len(context) + len(target) <= 64
        assert tokenizer.decode(target).startswith(" ") and tokenizer.decode(target)[1:].isalpha()
        assert tokenizer.decode(context)[-40:] not in first_half


def test_lastword_in_a_run_and_from_jsonl(tmp_path: Path) -> None:
    data = tmp_path / "passages.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Passage {i} ends with the word morning."}) for i in range(4)))
    evaluate = [{"metric": "lastword", "dataset": "austen-persuasion", "prompts": 6, "seq_len": 64},
                {"metric": "lastword", "dataset": str(data)}]
    result = compress(tiny_recipe(tmp_path, evaluate=evaluate), model=tiny_model("llama"),
                      tokenizer=ByteTokenizer())
    rows = result.report["evaluation"]
    assert [r["metric"] for r in rows] == ["lastword", "lastword"]
    assert rows[0]["details"]["compressed"]["examples"] == 6 and rows[1]["details"]["compressed"]["examples"] == 4
    assert all(0.0 <= r["dense"] <= 1.0 and 0.0 <= r["compressed"] <= 1.0 for r in rows)
