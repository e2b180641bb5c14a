"""Perplexity over non-overlapping windows (torchmetrics), and batch-1 prefill speed as a by-product."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torchmetrics.text import Perplexity

from lowrank_kit.data.texts import evaluation_windows, load_text, tokenize
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.recipe.spec import EvalSpec
from lowrank_kit.reporting.progress import Progress, quiet


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, fabric: Any = None, batch_size: int = 1,
               desc: str = "perplexity", progress: Progress = quiet) -> float:
    """exp(mean next-token NLL) over every position but the first of each window.

    With a BOS token at each window start, the BOS is context only: it is never a target.
    """
    device = fabric.device if fabric is not None else next(model.parameters()).device
    metric = Perplexity().to(device)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    shard = windows[rank::world]
    starts = range(0, len(shard), batch_size)
    for start in progress(starts, len(starts), desc):
        batch = shard[start : start + batch_size].to(device)
        for logits, targets in _next_token_logits(model, batch):
            metric.update(logits, targets)
    return float(metric.compute())


# Positions per call of the vocabulary head. A whole window's logits (512 × 49,152 float32 is
# 100 MB for SmolLM2, and the metric's softmax as much again) are never held at once, which
# matters where peak memory is the point (offloaded runs); the sums are the same.
HEAD_CHUNK = 128


def _next_token_logits(model: Any, batch: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits, next tokens) of a batch of windows, ``HEAD_CHUNK`` positions at a time.

    The model's own forward (all logits at once) where the decoder and head cannot be called
    apart: families without an adapter, and models with a generation-time decoder installed
    (progressive decoding hooks the whole model's forward to tell a prompt from a decode step)."""
    try:
        adapter = None if getattr(model, "lowrank_decoder", None) is not None else adapter_for(model)
    except ValueError:
        adapter = None
    if adapter is None:
        logits = model(input_ids=batch, use_cache=False).logits
        yield logits[:, :-1].float(), batch[:, 1:]
        return
    hidden = adapter.decoder(input_ids=batch, use_cache=False).last_hidden_state
    for start in range(0, batch.shape[1] - 1, HEAD_CHUNK):
        stop = min(start + HEAD_CHUNK, batch.shape[1] - 1)
        yield adapter.head_logits(hidden[:, start:stop]), batch[:, start + 1 : stop + 1]


def row(model: Any, tokenizer: Any, spec: EvalSpec, needs_bos: bool, fabric: Any = None,
        desc: str = "perplexity", progress: Progress = quiet, dense: dict[str, Any] | None = None) -> dict[str, Any]:
    """One report row: perplexity over the recipe's windows, and the prefill speed it measured."""
    ids = tokenize(tokenizer, load_text(spec.dataset, "evaluation", spec.text_field))
    windows = evaluation_windows(ids, tokenizer, spec.seq_len, spec.max_tokens, needs_bos)
    start = time.perf_counter()
    value = perplexity(model, windows, fabric, desc=desc, progress=progress)
    seconds = time.perf_counter() - start
    # Windows run one at a time: a by-product is the prefill speed at batch 1 (logits included).
    return {"metric": spec.metric, "dataset": spec.dataset, "seq_len": spec.seq_len,
            "tokens": int(windows.numel()), "value": value, "prefill_tok_s": windows.numel() / seconds}
