"""Calibration and evaluation text through ``datasets``, cut into token windows.

Built-in names point to the Austen novels bundled with the package (see data/PROVENANCE.md);
local .txt/.json/.jsonl files and hub names (for users who are online) work the same way.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from lowrank_kit import heap
from lowrank_kit.recipe.schema import RecipeError, closest

DATA_DIR = Path(__file__).parent  # the bundled texts lie beside this module
BUILTIN = {
    "austen-emma": DATA_DIR / "austen_emma.txt",
    "austen-persuasion": DATA_DIR / "austen_persuasion.txt",
    # Held-out text of another domain and period (technical prose, 2020s), and a third one
    # (legal prose) to mix into calibration: see data/PROVENANCE.md.
    "python-reference": DATA_DIR / "python_reference.txt",
    "gnu-licenses": DATA_DIR / "gnu_licenses.txt",
}
# Hub datasets: (path, config, split for calibration, split for evaluation, text field).
HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
}
LOCAL_SUFFIXES = {".txt": "text", ".json": "json", ".jsonl": "json"}


# Texts handed over in memory through the Python API (a list of strings or a datasets.Dataset),
# under the names ``in_memory`` gave them; a recipe names them like any dataset.
IN_MEMORY: dict[str, str] = {}


def in_memory(data: Any, text_field: str = "text") -> str:
    """Register a list of strings or a ``datasets.Dataset`` (its ``text_field`` column) as a text;
    returns the name a recipe uses for it."""
    if isinstance(data, str):
        raise TypeError("a dataset given as a string is a name or a file; pass texts as a list of strings")
    if hasattr(data, "column_names"):  # a datasets.Dataset
        if text_field not in data.column_names:
            raise RecipeError("dataset", f"the Dataset has no column '{text_field}' (columns: "
                                         f"{', '.join(data.column_names)}); set text_field")
        texts = data[text_field]
    else:
        texts = list(data)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise RecipeError("dataset", "in-memory data must be a non-empty list of strings or a Dataset of texts")
    text = "\n\n".join(texts)
    # named by content, so caches and resumed runs keyed by the name never mix two datasets
    name = f"in-memory-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    IN_MEMORY[name] = text
    return name


def check_name(name: str, path: str) -> None:
    """Fail early (at validation) for a dataset that is neither built in, local, nor on the hub."""
    if name in BUILTIN or name in HUB or name in IN_MEMORY:
        return
    suffix = Path(name).suffix.lower()
    if suffix in LOCAL_SUFFIXES:
        try:
            found = Path(name).is_file()
        except OSError as err:  # e.g. a name longer than the filesystem allows
            raise RecipeError(path, f"not a usable file name ({err.strerror or err})") from None
        if not found:
            raise RecipeError(path, f"no file at '{name}'")
        return
    raise RecipeError(
        path, f"unknown dataset '{name}': use a .txt/.json/.jsonl file or one of; "
        f"{closest(name, [*BUILTIN, *HUB])}"
    )


def is_json(name: str) -> bool:
    return Path(name).suffix.lower() in (".json", ".jsonl")


def json_column(name: str, field: str, key: str, optional: bool = False) -> list[str]:
    """One field of every row of a local JSON/JSONL file (empty if ``optional`` and missing);
    ``key`` names the recipe field in errors."""
    import datasets

    datasets.disable_progress_bars()
    rows = datasets.load_dataset("json", data_files=name, split="train")
    if field not in rows.column_names:
        if optional:
            return []
        raise RecipeError(key, f"'{name}' has no field '{field}'; fields: {rows.column_names}")
    return [str(value) for value in rows[field]]


@functools.lru_cache(maxsize=8)
def load_text(name: str, purpose: str = "calibration", text_field: str = "text") -> str:
    """The whole text of a dataset as one string (documents joined by blank lines).

    A text file is read directly: the same string as ``datasets``' text loader with
    ``sample_by="document"`` gives (UTF-8, universal newlines; checked equal on every bundled
    text), without importing ``datasets`` and pyarrow (about 250 MB of a run's peak memory).
    """
    if name in IN_MEMORY:
        return IN_MEMORY[name]
    if name in BUILTIN or Path(name).suffix.lower() == ".txt":
        return BUILTIN.get(name, Path(name)).read_text(encoding="utf-8")
    if is_json(name):
        return "\n\n".join(json_column(name, text_field, "text_field"))
    import datasets

    datasets.disable_progress_bars()
    if name in HUB:
        hub_path, config, calib_split, eval_split, field = HUB[name]
        split = calib_split if purpose == "calibration" else eval_split
        ds = datasets.load_dataset(hub_path, config, split=split, streaming=name == "c4")
        if name == "c4":  # a few thousand documents are plenty for calibration or evaluation
            ds = ds.take(5000)
        return "\n\n".join(row[field] for row in ds)
    check_name(name, "dataset")
    raise AssertionError("unreachable")


# Tokenizing Emma (883 k characters) with SmolLM2's fast tokenizer left 98 MB resident after its
# objects were freed, 6 MB once the heap was trimmed; flat_llm's peak under runtime.offload: disk
# on SmolLM2 fell from 834 to 807 MB. A trim costs milliseconds, so short texts skip it.
TRIM_AFTER_CHARS = 100_000


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if len(text) > TRIM_AFTER_CHARS:  # the tokenizer's objects for a novel: ~100 MB the heap would keep
        heap.trim()
    return ids


def _bos(tokenizer: Any, needs_bos: bool) -> list[int]:
    if not needs_bos:
        return []
    if tokenizer.bos_token_id is None:
        raise ValueError("this model needs a BOS token at the start of each window, but its tokenizer has none")
    return [tokenizer.bos_token_id]


def calibration_windows(ids: torch.Tensor, tokenizer: Any, samples: int, seq_len: int, seed: int,
                        needs_bos: bool = False) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets, [samples, seq_len]."""
    bos = _bos(tokenizer, needs_bos)
    length = seq_len - len(bos)
    if ids.numel() <= length:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if samples * length > ids.numel():
        warnings.warn(f"calibration asks for {samples:,} windows of {seq_len} tokens but the text has only "
                      f"{ids.numel():,} tokens: the windows overlap, so the calibration data repeats itself",
                      stacklevel=2)
    rows = [torch.cat([torch.tensor(bos, dtype=torch.long), ids[s : s + length]])
            for s in _starts(ids.numel(), length, samples, seed)]
    return torch.stack(rows)


def _starts(tokens: int, length: int, samples: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokens - length, (samples,), generator=generator).tolist()


def heldout_windows(ids: torch.Tensor, tokenizer: Any, count: int, seq_len: int, samples: int, seed: int,
                    needs_bos: bool = False) -> torch.Tensor:
    """``count`` windows of the calibration text that share no token with the ``samples`` windows
    ``calibration_windows`` draws with ``seed``: consecutive windows from the end of the text
    backwards, skipping any that would overlap one. For measuring a plan on data it was not fitted to."""
    bos = _bos(tokenizer, needs_bos)
    length = seq_len - len(bos)
    taken = [(s, s + length) for s in _starts(ids.numel(), length, samples, seed)] if ids.numel() > length else []
    rows: list[torch.Tensor] = []
    end = ids.numel()
    while len(rows) < count and end >= length:
        start = end - length
        clash = [a for a, b in taken if a < end and start < b]
        if clash:
            end = min(clash)
            continue
        rows.append(torch.cat([torch.tensor(bos, dtype=torch.long), ids[start:end]]))
        end = start
    if len(rows) < count:
        raise ValueError(f"the calibration text has room for only {len(rows)} windows of {seq_len} tokens outside "
                         f"its {samples} calibration windows, {count} asked")
    return torch.stack(rows)


def window_counts(weights: list[float], samples: int) -> list[int]:
    """``samples`` windows split in proportion to ``weights`` (largest remainders), at least one each."""
    total = sum(weights)
    exact = [samples * w / total for w in weights]
    counts = [max(1, int(e)) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in by_remainder[: max(samples - sum(counts), 0)]:
        counts[i] += 1
    while sum(counts) > samples:  # floors of 1 took more than the share allowed
        largest = max(range(len(counts)), key=lambda i: counts[i])
        counts[largest] -= 1
    return counts


def evaluation_windows(ids: torch.Tensor, tokenizer: Any, seq_len: int, max_tokens: int,
                       needs_bos: bool = False) -> torch.Tensor:
    """Consecutive non-overlapping windows over the first ``max_tokens`` tokens, [n, seq_len]."""
    bos = _bos(tokenizer, needs_bos)
    length = seq_len - len(bos)
    count = min(max_tokens, ids.numel()) // length
    if count == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_tokens > ids.numel():
        warnings.warn(f"evaluation asks for {max_tokens:,} tokens but the text has {ids.numel():,}: measured on "
                      f"{count * length:,}", stacklevel=2)
    body = ids[: count * length].view(count, length)
    return torch.cat([torch.tensor(bos, dtype=torch.long).expand(count, len(bos)), body], dim=1)


def generation_prompts(tokenizer: Any, spec: Any, needs_bos: bool = False) -> tuple[list[list[int]], list[str]]:
    """Token prompts for a generation evaluation, and reference continuations (empty if none).

    From a text: ``spec.prompts`` passages of ``spec.prompt_len`` tokens evenly spaced over the
    second half of it (the first part is where perplexity is measured), each with the text's own
    next ``spec.new_tokens`` tokens as its reference. From a JSONL file: its prompt/reference rows.
    """
    bos = _bos(tokenizer, needs_bos)
    if is_json(spec.dataset):
        texts = json_column(spec.dataset, spec.prompt_field, "prompt_field")[: spec.prompts]
        references = json_column(spec.dataset, spec.reference_field, "reference_field", optional=True)
        return [bos + tokenize(tokenizer, text).tolist() for text in texts], references[: spec.prompts]
    ids = tokenize(tokenizer, load_text(spec.dataset, "evaluation", spec.text_field))
    length = spec.prompt_len - len(bos)
    first, last = ids.numel() // 2, ids.numel() - length - spec.new_tokens
    if last < first:
        raise ValueError(f"'{spec.dataset}' is too short for prompts of {spec.prompt_len} tokens")
    if spec.prompts > last - first + 1:
        warnings.warn(f"'{spec.dataset}' holds only {last - first + 1} distinct prompts of {spec.prompt_len} tokens "
                      f"in its second half; {spec.prompts} asked for, some repeat", stacklevel=2)
    starts = torch.linspace(first, last, spec.prompts).long().tolist()
    prompts = [bos + ids[s : s + length].tolist() for s in starts]
    references = [tokenizer.decode(ids[s + length : s + length + spec.new_tokens].tolist()) for s in starts]
    return prompts, references


def _last_word(paragraph: str) -> tuple[str, str] | None:
    """(context, final word) of a paragraph, or None when it does not end in a plain word."""
    text = " ".join(paragraph.split())
    head, _, tail = text.rpartition(" ")
    word = tail.strip(".,;:!?\"'()[]-_—“”‘’")
    if not head or not word.isalpha() or not tail.startswith(word[:1]):
        return None
    return head, word


def lastword_examples(tokenizer: Any, spec: Any, needs_bos: bool = False) -> list[tuple[list[int], list[int]]]:
    """(context tokens, final-word tokens) of held-out paragraphs, LAMBADA-style.

    From a text: ``spec.prompts`` paragraphs of at least 20 words, evenly spaced over the second
    half (the first part is where perplexity is measured). From a JSON/JSONL file: the first
    ``spec.prompts`` rows' ``text_field``. The context is cut to its last ``spec.seq_len`` tokens.
    """
    if is_json(spec.dataset):
        paragraphs = json_column(spec.dataset, spec.text_field, "text_field")
    else:
        text = load_text(spec.dataset, "evaluation", spec.text_field)
        paragraphs = [p for p in text[len(text) // 2 :].split("\n\n")[1:] if len(p.split()) >= 20]
    pairs = [pair for pair in map(_last_word, paragraphs) if pair is not None]
    if not pairs:
        raise ValueError(f"'{spec.dataset}' has no paragraph ending in a word")
    if len(pairs) < spec.prompts:
        warnings.warn(f"'{spec.dataset}' has {len(pairs)} usable paragraphs, fewer than the {spec.prompts} asked for: "
                      f"measured on {len(pairs)}", stacklevel=2)
    if len(pairs) > spec.prompts:
        pairs = [pairs[i] for i in torch.linspace(0, len(pairs) - 1, spec.prompts).long().tolist()]
    bos = _bos(tokenizer, needs_bos)
    examples = []
    for context, word in pairs:
        target = tokenize(tokenizer, " " + word).tolist()
        keep = spec.seq_len - len(bos) - len(target)
        examples.append((bos + tokenize(tokenizer, context).tolist()[-keep:], target))
    return examples
