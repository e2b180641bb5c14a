"""Perplexity over non-overlapping windows (torchmetrics), and batch-1 prefill speed as a by-product."""

from __future__ import annotations

import time
from typing import Any

import torch
from torchmetrics.text import Perplexity

from lowrank_kit.data.texts import evaluation_windows, load_text, tokenize
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
        logits = model(input_ids=batch, use_cache=False).logits
        metric.update(logits[:, :-1].float(), batch[:, 1:])
    return float(metric.compute())



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
