"""Model adapters: where the decoder layers and projections are, and the head geometry.

Algorithms speak to an adapter, never to ``model.model.layers`` or to class names. One
adapter class per architecture family, chosen by ``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lowrank_kit.extension.keys import ATTENTION_PROJECTIONS, PROJECTIONS, site_name
from lowrank_kit.models import hf_compat
from lowrank_kit.models.hf_classes import base_type


@dataclass(frozen=True)
class Geometry:
    """Head geometry of the dense model: H query heads in G key/value groups of head dim d_h."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def dense_shape(self, projection: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection's dense weight."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i),
        }[projection]

    def dense_params(self, projection: str) -> int:
        out, inp = self.dense_shape(projection)
        return out * inp

    @property
    def total_linear_params(self) -> int:
        """All decoder-layer linear weights: the denominator of every compression ratio."""
        return self.layers * sum(self.dense_params(p) for p in PROJECTIONS)


class ModelAdapter:
    """Llama-style decoder (Llama, Mistral, SmolLM2): ``self_attn.{q,k,v,o}_proj``, ``mlp.*_proj``."""

    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral")
    # The logical projections (``extension.keys``) this architecture has, attention then MLP.
    projections: ClassVar[tuple[str, ...]] = PROJECTIONS
    # Gemma3 is trained with a BOS token at the start of every sequence; windows need one.
    needs_bos: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config.get_text_config()
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.geometry = Geometry(
            layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads, head_dim=head_dim, intermediate=c.intermediate_size,
        )

    @property
    def decoder(self) -> nn.Module:
        """The decoder stack without the vocabulary head (statistics never need the logits)."""
        return self.model.get_decoder()

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def next_token_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss from the last decoder layer's output (final norm, vocabulary
        head, the logit soft-cap of families that have one), as ``model(labels=...)`` computes it;
        lets a pass measure the loss from a layer's replayed output without a whole forward."""
        logits = self.head_logits(self.decoder.norm(hidden))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Float32 vocabulary logits of the decoder's final (normed) output, as the model's forward
        computes them: the head, then the logit soft-cap of families that have one."""
        logits = self.model.get_output_embeddings()(normed).float()
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _parent(self, layer: int, projection: str) -> nn.Module:
        block = self.layers[layer]
        return block.self_attn if projection in ATTENTION_PROJECTIONS else block.mlp

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def projection(self, layer: int, projection: str) -> nn.Module:
        return getattr(self._parent(layer, projection), projection)

    def replace(self, layer: int, projection: str, module: nn.Module) -> None:
        setattr(self._parent(layer, projection), projection, module)

    def input_site(self, layer: int, projection: str) -> str:
        """A name for where a projection's input comes from: q/k/v read the same normed hidden
        states, gate/up too, so statistics of their inputs are gathered once and shared."""
        if projection in ("q_proj", "k_proj", "v_proj"):
            return site_name(layer, "attention_input")
        if projection in ("gate_proj", "up_proj"):
            return site_name(layer, "mlp_input")
        return site_name(layer, f"{projection}_input")

    def output_site(self, layer: int, projection: str) -> str:
        """A name for a projection's output (e.g. the value states head-wise PCA reads)."""
        return site_name(layer, f"{projection}_output")

    def module_name(self, module: nn.Module) -> str:
        """The dotted name of a module inside the whole model (the key in saved files)."""
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise KeyError("module is not part of the model")


class Qwen2Adapter(ModelAdapter):
    """Qwen2: the Llama layout with biases on q/k/v (kept by the compressed modules)."""

    model_types = ("qwen2",)


class Gemma3Adapter(ModelAdapter):
    """Gemma3 text decoder: q/k norms, sliding-window layers, BOS required at window start."""

    model_types = ("gemma3_text", "gemma3")
    needs_bos = True


ADAPTERS: list[type[ModelAdapter]] = [ModelAdapter, Qwen2Adapter, Gemma3Adapter]


def adapter_for(model: nn.Module) -> ModelAdapter:
    hf_compat.check_version()  # once per process: a warning outside the tested transformers range
    model_type = base_type(model.config.get_text_config().model_type)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    known = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise ValueError(f"no adapter for model_type '{model_type}'; supported: {', '.join(known)}")
