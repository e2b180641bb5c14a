"""Memory and compute budget of compressing a large model, calculated from its config.

    python scripts/memory_budget.py [--tokens 1048576] [--dtype-bytes 2]

Prints, for Llama-3-8B and Llama-3-70B (their published configs, written out below), the
bytes of one decoder layer and of the whole model, of one layer's calibration inputs
(FLAT-LLM's 256 × 4,096 tokens by default), of every statistic each recipe keeps, and the
multiply-adds of one dense forward over the calibration tokens. Pure arithmetic: nothing is
loaded; docs/scaling.md quotes its output.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Config:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # embeddings and lm_head are separate matrices in both models

    @property
    def layer_params(self) -> int:
        d, kv = self.hidden, self.kv_heads * self.head_dim
        attention = d * self.heads * self.head_dim * 2 + d * kv * 2
        return attention + 3 * d * self.intermediate

    @property
    def embedding_params(self) -> int:
        return 2 * self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params


LLAMA3_8B = Config("Llama-3-8B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                   vocab=128256)
LLAMA3_70B = Config("Llama-3-70B", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128,
                    vocab=128256)


def statistics_per_layer(c: Config) -> dict[str, float]:
    """Bytes of the float64 statistics one decoder layer holds while it is calibrated."""
    gram_d = c.hidden**2 * 8  # Σ xᵀx of a hidden-size input (q/k/v share one, gate/up one, o one)
    gram_int = c.intermediate**2 * 8  # down_proj's input: the MLP covariance
    head_gram = c.kv_heads * c.head_dim**2 * 8  # value states per KV head
    return {
        "flat_llm (v/o head Grams + MLP covariance)": head_gram + gram_int,
        # down_proj is read at its (hidden-size) output: its factors need only W XᵀX Wᵀ
        "svd_llm (Grams of q/k/v, o, gate/up inputs and down's output)": 4 * gram_d,
    }


def output_fisher_per_layer(c: Config) -> int:
    """Bytes of the float64 output Fishers svd_nystrom_kfac keeps per layer (q, k, v, o, down outputs)."""
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    return (q**2 + 2 * kv**2 + 2 * c.hidden**2) * 8


def report(c: Config, tokens: int, dtype_bytes: int) -> None:
    layer = c.layer_params * dtype_bytes
    inputs = tokens * c.hidden * dtype_bytes
    fisher = c.layers * c.layer_params * 4  # float32 Σ g² per decoder weight, all layers at once
    grads = c.layers * c.layer_params * dtype_bytes  # only the decoder linears' weights get gradients
    print(f"\n### {c.name}: {c.params / 1e9:.2f} B parameters, {c.layers} layers\n")
    print("| quantity | calculation | bytes |")
    print("|---|---|---:|")
    print(f"| whole model | {c.params:,} × {dtype_bytes} | {c.params * dtype_bytes / GB:.1f} GB |")
    print(f"| one decoder layer | {c.layer_params:,} × {dtype_bytes} | {layer / GB:.2f} GB |")
    print(f"| embeddings + lm_head | {c.embedding_params:,} × {dtype_bytes} | "
          f"{c.embedding_params * dtype_bytes / GB:.2f} GB |")
    print(f"| one layer's calibration inputs | {tokens:,} tokens × {c.hidden} × {dtype_bytes} | {inputs / GB:.1f} GB |")
    for label, size in statistics_per_layer(c).items():
        print(f"| statistics of one layer, {label} | float64 | {size / GB:.2f} GB |")
    print(f"| Fisher sums (flrc, every decoder weight) | {c.layers * c.layer_params:,} × 4 | {fisher / GB:.1f} GB |")
    kfac = output_fisher_per_layer(c)
    print(f"| output Fishers (svd_nystrom_kfac, all layers at once) | {c.layers} × {kfac:,} | "
          f"{c.layers * kfac / GB:.1f} GB |")
    print(f"| weight gradients of a backward pass (Fisher) | {c.layers * c.layer_params:,} × {dtype_bytes} | "
          f"{grads / GB:.1f} GB |")
    macs = tokens * c.params
    print(f"| one dense forward over the calibration tokens | {tokens:,} × {c.params:,} multiply-adds | "
          f"{2 * macs / 1e15:.1f} PFLOP |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256 * 4096, help="calibration tokens")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per weight/activation (bfloat16: 2)")
    args = parser.parse_args()
    for config in (LLAMA3_8B, LLAMA3_70B):
        report(config, args.tokens, args.dtype_bytes)


if __name__ == "__main__":
    main()
