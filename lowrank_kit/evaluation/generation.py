"""Generation: greedy continuations of held-out prompts through ``model.generate`` with the KV cache.

ROUGE-L (torchmetrics) against the dense model's continuation and against references where
present, prefill/decode tokens per second, and the multiply-adds per generated token of the
low-rank modules (which progressive decoding lowers).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torchmetrics.text import ROUGEScore

from lowrank_kit.compressed.decoding import is_prompt, rank_modules
from lowrank_kit.data.texts import generation_prompts
from lowrank_kit.models import hf_compat
from lowrank_kit.recipe.spec import EvalSpec
from lowrank_kit.reporting.progress import Progress, quiet


class GenerationMeter:
    """Forward hooks timing prefill and decode steps and counting low-rank multiply-adds.

    A forward with an empty KV cache is a prefill; every other one is a decode step that feeds
    one token per sequence. Multiply-adds are read after each forward, at the ranks it used.
    ``end_call`` checks each ``generate`` call: several forwards that all saw an empty cache mean
    the cache never grew (a forward ignored it), which is an error, since such a model generates
    garbage; where decode speed cannot be measured, ``note`` says why.
    """

    def __init__(self, model: Any):
        self.modules = rank_modules(model)
        self.static_macs = sum(m.macs_per_token(m.full_rank) for m in self.modules)  # per token, allocated ranks
        self.prefill_s = self.decode_s = 0.0
        self.prefill_tokens = self.decode_tokens = 0
        self.decode_macs = 0  # at the active ranks
        self.static_decode_macs = 0  # the same tokens at the allocated ranks
        self._start = 0.0
        self._prefill = False
        self._call_forwards = self._call_decodes = 0
        self._call_cached = False
        self.note: str | None = None
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, _model: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        self._prefill = is_prompt(kwargs)
        self._call_forwards += 1
        self._call_decodes += not self._prefill
        self._call_cached |= hf_compat.cache_in(kwargs) is not None
        self._tokens = int(kwargs["input_ids"].numel())
        self._start = time.perf_counter()

    def _after(self, _model: Any, _args: Any, _kwargs: dict[str, Any], _output: Any) -> None:
        seconds = time.perf_counter() - self._start
        if self._prefill:
            self.prefill_s += seconds
            self.prefill_tokens += self._tokens
            return
        self.decode_s += seconds
        self.decode_tokens += self._tokens
        self.decode_macs += self._tokens * sum(m.macs_per_token(m.used_rank()) for m in self.modules)
        self.static_decode_macs += self._tokens * self.static_macs

    def end_call(self, new_tokens: int) -> None:
        """Check one finished ``generate`` call that produced ``new_tokens`` tokens per sequence."""
        forwards, decodes, cached = self._call_forwards, self._call_decodes, self._call_cached
        self._call_forwards = self._call_decodes = 0
        self._call_cached = False
        if not decodes and new_tokens > 1:
            if cached:
                raise hf_compat.UnsupportedTransformers(
                    f"the KV cache stayed empty through {forwards} forwards of generate: a module ignored it, so the "
                    f"continuations are garbage; {hf_compat.version_note()}")
            reason = "generate ran without a KV cache (use_cache is off), so no forward was a decode step"
        else:
            reason = "no decode step: every continuation ended after its first token"
        # Why decode speed is missing, only while no decode step has been timed at all.
        self.note = None if self.decode_tokens else reason

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def padded(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch and its attention mask.

    Left padding for generation (every row ends where new tokens start); right padding keeps
    each real token at its own position (for reading logits at known positions).
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where] = torch.tensor(row)
        mask[i, where] = 1
    return ids, mask


@torch.no_grad()
def generate_continuations(model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int,
                           batch_size: int, device: Any = None, desc: str = "generation",
                           progress: Progress = quiet) -> tuple[list[str], GenerationMeter]:
    """Greedy continuations (text, generated part only) of token prompts, and their measurements."""
    device = device or next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    meter = GenerationMeter(model)
    texts: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in progress(starts, len(starts), desc):
            ids, mask = padded(prompts[start : start + batch_size], pad_id, left=True)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=pad_id, temperature=None, top_p=None,
                                 top_k=None)
            meter.end_call(out.shape[1] - ids.shape[1])
            texts += [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out.tolist()]
    finally:
        meter.remove()
    return texts, meter


def rouge_l(predictions: list[str], targets: list[str]) -> float:
    """Mean ROUGE-L F-measure over pairs (torchmetrics)."""
    metric = ROUGEScore(rouge_keys="rougeL")
    return float(metric(predictions, targets)["rougeL_fmeasure"])


def row(model: Any, tokenizer: Any, spec: EvalSpec, needs_bos: bool, fabric: Any = None,
        desc: str = "generation", progress: Progress = quiet, dense: dict[str, Any] | None = None) -> dict[str, Any]:
    """One generation evaluation row; ``dense`` is the dense model's row (None when it is the dense model)."""
    prompts, references = generation_prompts(tokenizer, spec, needs_bos)
    device = fabric.device if fabric is not None else None
    texts, meter = generate_continuations(model, tokenizer, prompts, spec.new_tokens, spec.batch_size, device,
                                          desc, progress)
    row: dict[str, Any] = {
        "metric": "generation", "dataset": spec.dataset, "tokens": meter.decode_tokens + meter.prefill_tokens,
        "value": rouge_l(texts, dense["_texts"]) if dense is not None else 1.0,
        "rougeL_vs_reference": rouge_l(texts, references) if references else None,
        "prefill_tok_s": meter.prefill_tokens / meter.prefill_s if meter.prefill_s else None,
        "decode_tok_s": meter.decode_tokens / meter.decode_s if meter.decode_s else None,
        "decode_note": meter.note,
        "batch_size": spec.batch_size,
        "lowrank_decode_macs_per_token": meter.decode_macs / meter.decode_tokens if meter.decode_tokens else 0,
        "decode_macs_saved": 1 - meter.decode_macs / meter.static_decode_macs if meter.static_decode_macs else 0.0,
        "_texts": texts,
        "_prompts": [tokenizer.decode(p, skip_special_tokens=True) for p in prompts],
        "_references": references,
    }
    return row


