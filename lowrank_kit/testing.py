"""Helpers for testing strategies on tiny models without any download (what lowrank-kit's own
tests use; plugin authors import them too): tiny random models of each supported family, a byte
tokenizer, and a raw recipe for them.

    from lowrank_kit.testing import ByteTokenizer, tiny_model, tiny_recipe
    result = compress(tiny_recipe(tmp_path, "my_transform", 0.3), model=tiny_model("llama"),
                      tokenizer=ByteTokenizer(), progress=False)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 260  # 256 bytes + specials


class ByteTokenizer:
    """Bytes as token ids (BOS = 256): enough for calibration windows on tiny models."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 257

    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> dict[str, list[int]]:
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        ids = [int(i) for i in ids]
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder, "byte_tokenizer.json").write_text(json.dumps({"kind": "bytes"}))


def byte_level_tokenizer() -> Any:
    """A real transformers tokenizer over the tiny models' vocabulary: one token per byte, plus
    <s> (256) and </s> (257); saved with a folder, it loads with AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | {"<s>": 256, "</s>": 257}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_config(family: str) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=256, eos_token_id=257, pad_token_id=257)
    if family == "llama":
        return LlamaConfig(**common, head_dim=16)
    if family == "mistral":
        return MistralConfig(**common, head_dim=16, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(**{**common, "num_key_value_heads": 1}, head_dim=32, sliding_window=8,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    if family == "qwen2":  # random biases, so that keeping them is actually tested
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model.eval()


FAMILIES = ["llama", "qwen2", "gemma3", "mistral"]


def tiny_recipe(tmp_path: Path, plugin: str = "svd_llm", ratio: float = 0.3, **extra: Any) -> dict[str, Any]:
    """A raw recipe for a tiny model passed in directly (model.path is then only a label)."""
    recipe = {
        "name": f"tiny-{plugin}",
        "model": {"path": "tiny"},
        "calibration": {"dataset": "austen-emma", "samples": 8, "seq_len": 64, "seed": 0, "batch_size": 4},
        "target": {"ratio": ratio},
        "allocate": "uniform",
        "transform": [{"plugin": plugin}],
        "evaluate": [{"dataset": "austen-persuasion", "seq_len": 64, "max_tokens": 512}],
        "runtime": {"accelerator": "cpu"},
        "output": {"dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")},
    }
    recipe.update(extra)
    return recipe


def sample_ids(n: int = 2, length: int = 48, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=generator)
