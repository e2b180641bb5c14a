"""Progressive decoding's trade-off: ROUGE-L against the dense continuation vs decode multiply-adds.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/progressive_tradeoff.py runs/flrc-static-0.2 \\
        --schedule '[[0, 1.0], [16, 0.9], [32, 0.8]]' --schedule '[[0, 1.0], [24, 0.7]]'

Takes a saved compressed model whose run evaluated generation (its generations.jsonl holds the
dense model's continuations of the same prompts), re-generates them under each schedule and
prints a Markdown table: ROUGE-L vs dense, multiply-adds of the low-rank modules per generated
token, the share the schedule saves, and decode tokens/s. The first row is the static model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    import torch
    import yaml
    from transformers import AutoTokenizer

    from lowrank_kit.compressed.decoding import install
    from lowrank_kit.data.texts import generation_prompts
    from lowrank_kit.evaluation.generation import generate_continuations, rouge_l
    from lowrank_kit.models.adapters import adapter_for
    from lowrank_kit.persistence.saving import load_pretrained
    from lowrank_kit.recipe.loading import from_raw

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--schedule", action="append", default=[], help="JSON list of [token, fraction] stages")
    parser.add_argument("--floor", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    recipe = from_raw(yaml.safe_load((args.folder / "recipe.yaml").read_text()))
    spec = next(e for e in recipe.evaluate if e.metric == "generation")
    rows = [json.loads(line) for line in (args.folder / "generations.jsonl").read_text().splitlines()]
    dense = [r["dense"] for r in rows if r["dataset"] == spec.dataset]
    model = load_pretrained(args.folder)
    decoder = getattr(model, "lowrank_decoder", None)
    if decoder is not None:
        decoder.remove()
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    prompts, _ = generation_prompts(tokenizer, spec, adapter_for(model).needs_bos)
    print(f"{args.folder}: {len(prompts)} prompts of {spec.prompt_len} tokens, {spec.new_tokens} new tokens, "
          f"batch {spec.batch_size}\n")
    print("| schedule | ROUGE-L vs dense | low-rank MACs/token | MACs saved | decode tok/s |")
    print("|---|---:|---:|---:|---:|")
    for schedule in [None, *args.schedule]:
        if schedule is not None:
            install(model, {"kind": "progressive", "stages": json.loads(schedule), "floor": args.floor})
        texts, meter = generate_continuations(model, tokenizer, prompts, spec.new_tokens, spec.batch_size)
        saved = 1 - meter.decode_macs / meter.static_decode_macs
        print(f"| {schedule or 'static (allocated ranks)'} | {rouge_l(texts, dense):.3f} | "
              f"{meter.decode_macs / meter.decode_tokens:,.0f} | {saved:.1%} | "
              f"{meter.decode_tokens / meter.decode_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
