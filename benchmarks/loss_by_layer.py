"""Where a compressed model's loss sits: per decoder layer, predicted against measured.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/loss_by_layer.py runs/flat-svd-budget-0.2 \\
        --dataset austen-emma --tokens 4096

Takes a saved folder made by an allocator that predicts each unit's loss (``error_budget``
writes ``predicted_loss`` per module into report.json) and measures, for every decoder layer
alone, the increase of the mean next-token loss when only that layer is the compressed one
(the rest dense), on the first ``--tokens`` tokens of ``--dataset`` in windows of
``--seq-len``. Prints a Markdown table (layer, predicted ΔL, measured ΔL, shares of the total)
and the whole model's measured ΔL next to the sum of the single-layer ones, which shows how
far errors of different layers add up or compound.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    import torch

    from lowrank_kit.data.texts import evaluation_windows, load_text, tokenize
    from lowrank_kit.models import hf_compat
    from lowrank_kit.models.adapters import adapter_for
    from lowrank_kit.models.loading import load_model
    from lowrank_kit.persistence.saving import load_pretrained

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dataset", default="austen-emma")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    hf_compat.silence_gguf_progress()
    report = json.loads((args.folder / "report.json").read_text())
    dense, tokenizer = load_model(report["model"])
    compressed = load_pretrained(args.folder)
    dense_layers, compressed_layers = adapter_for(dense).layers, adapter_for(compressed).layers
    windows = evaluation_windows(tokenize(tokenizer, load_text(args.dataset, "evaluation")), tokenizer,
                                 args.seq_len, args.tokens, adapter_for(dense).needs_bos)

    @torch.no_grad()
    def loss(model: torch.nn.Module) -> float:
        return sum(float(model(input_ids=w[None], labels=w[None]).loss) for w in windows) / len(windows)

    base = loss(dense)
    predicted: dict[int, float] = {}
    for module in report["modules"]:
        layer = int(module["unit"].split(".")[1])
        predicted[layer] = predicted.get(layer, 0.0) + module.get("predicted_loss", 0.0)
    measured = {}
    for index in range(len(dense_layers)):
        original = dense_layers[index]
        dense_layers[index] = compressed_layers[index]
        try:
            measured[index] = loss(dense) - base
        finally:
            dense_layers[index] = original
    whole = loss(compressed) - base
    total_p, total_m = sum(predicted.values()), sum(measured.values())
    print(f"{args.folder.name}: {len(windows)} windows of {args.seq_len} tokens of {args.dataset}; dense loss "
          f"{base:.4f} nats\n")
    print("| layer | predicted ΔL | measured ΔL (this layer alone) | predicted share | measured share |")
    print("|---:|---:|---:|---:|---:|")
    for index in range(len(dense_layers)):
        p, m = predicted.get(index, 0.0), measured[index]
        print(f"| {index} | {p:.4f} | {m:.4f} | {p / total_p if total_p else 0:.1%} | "
              f"{m / total_m if total_m else 0:.1%} |")
    print(f"| all | {total_p:.4f} | {total_m:.4f} (sum of single layers) | | |")
    print(f"\nWhole compressed model: measured ΔL {whole:.4f} nats (perplexity ×{torch.tensor(whole).exp():.3f}); "
          f"the single-layer increases sum to {total_m:.4f}, the prediction to {total_p:.4f}.")


if __name__ == "__main__":
    main()
