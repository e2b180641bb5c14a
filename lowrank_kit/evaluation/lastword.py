"""Last-word accuracy: zero-shot prediction of a held-out paragraph's final word (LAMBADA-style)."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_kit.data.texts import lastword_examples
from lowrank_kit.evaluation.generation import padded
from lowrank_kit.recipe.spec import EvalSpec
from lowrank_kit.reporting.progress import Progress, quiet


@torch.no_grad()
def lastword_accuracy(model: Any, examples: list[tuple[list[int], list[int]]], batch_size: int = 8,
                      device: Any = None, desc: str = "lastword", progress: Progress = quiet) -> float:
    """Share of examples whose final word the model predicts greedily, every token of it.

    With the context and the word's earlier tokens as input, the argmax at each of the word's
    positions must be its token: exactly what greedy generation of the word would produce.
    """
    device = device or next(model.parameters()).device
    correct = 0
    examples = sorted(examples, key=lambda e: len(e[0]) + len(e[1]))  # similar lengths batch with little padding
    starts = range(0, len(examples), batch_size)
    for start in progress(starts, len(starts), desc):
        chunk = examples[start : start + batch_size]
        ids, mask = padded([context + target[:-1] for context, target in chunk], 0, left=False)
        # Logits only where some row's word is predicted: the vocabulary projection of every
        # context position would cost a fifth of the forward pass.
        wanted = sorted({len(c) - 1 + j for c, t in chunk for j in range(len(t))})
        column = {position: k for k, position in enumerate(wanted)}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                       logits_to_keep=torch.tensor(wanted, device=device)).logits
        for i, (context, target) in enumerate(chunk):
            first = len(context) - 1  # the position whose prediction is the word's first token
            predicted = [int(logits[i, column[first + j]].argmax()) for j in range(len(target))]
            correct += predicted == target
    return correct / len(examples)



def row(model: Any, tokenizer: Any, spec: EvalSpec, needs_bos: bool, fabric: Any = None,
        desc: str = "lastword", progress: Progress = quiet, dense: dict[str, Any] | None = None) -> dict[str, Any]:
    """One report row: the share of paragraphs whose last word the model predicts."""
    examples = lastword_examples(tokenizer, spec, needs_bos)
    device = fabric.device if fabric is not None else None
    value = lastword_accuracy(model, examples, spec.batch_size, device, desc, progress)
    return {"metric": "lastword", "dataset": spec.dataset, "tokens": sum(len(c) + len(t) for c, t in examples),
            "value": value, "examples": len(examples)}
