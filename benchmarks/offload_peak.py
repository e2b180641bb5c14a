"""Peak host memory of one compress run with and without ``runtime.offload: disk``, on a model
whose weights outweigh what the libraries allocate on import.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/offload_peak.py [--recipe flat_llm] \
        [--hidden 1024 --layers 24 --intermediate 2816] [--work runs/offload-peak]

SmolLM2-135M's float32 weights (538 MB) are about as large as what importing torch,
transformers and Lightning already holds (~450 MB), so its peak says little about offloading.
This builds a Llama-architecture model of the chosen shape with random weights (seed 0) and
SmolLM2's tokenizer, saves it as safetensors under ``--work``, and runs the same recipe on it
once per offload mode, each in its own process, whose report gives that process's own peak RSS
(``VmHWM``; ``ru_maxrss`` would carry this larger parent's across the exec). The bar it prints
is the issue's: the model's float32 parameter bytes plus one layer's calibration inputs. Random
weights make the perplexity meaningless as quality, but every mode must give the same
perplexity and achieved ratio (on a CPU: to the last digit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from lowrank_kit.models.loading import resolve
from lowrank_kit.recipe.loading import load

PERPLEXITY = "evaluate=[{metric: perplexity, dataset: austen-persuasion, seq_len: 512, max_tokens: 8192}]"


def build_model(folder: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> int:
    """Save a random Llama with SmolLM2's tokenizer into ``folder`` (once); its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    where, gguf = resolve("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if not (folder / "model.safetensors").is_file():  # the weights are saved last: a crashed save is redone
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)
        del model
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def run(recipe: str, folder: Path, offload: str, output: Path) -> dict[str, float]:
    """One compress in its own process: wall seconds, and its peak RSS (MB), ratio, perplexity and
    phase times from its report."""
    command = [sys.executable, "-m", "lowrank_kit.cli", "compress", recipe, "--quiet", "--overwrite",
               "--output", str(output), "--set", f"model.path={folder}", "--set", f"runtime.offload={offload}",
               "--set", "output.cache_dir=null", "--set", PERPLEXITY]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    report = json.loads((output / "report.json").read_text())
    timings = report["timings_s"]
    return {"wall": wall, "rss_mb": report["peak_rss_mb"], "ratio": report["achieved_ratio"],
            "perplexity": report["evaluation"][0]["compressed"],
            "compress": timings["compress"], "load": timings["load"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="flat_llm")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["none", "disk"], choices=["none", "cpu", "disk"])
    parser.add_argument("--work", type=Path, default=Path("runs/offload-peak"))
    args = parser.parse_args()

    folder = args.work / f"llama-{args.hidden}x{args.layers}-{args.intermediate}-h{args.heads}-kv{args.kv_heads}"
    params = build_model(folder, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads)
    # The sequential replay holds one layer's inputs: the recipe's calibration tokens × hidden, float32.
    calibration = load(args.recipe).calibration
    inputs_mb = calibration.samples * calibration.seq_len * args.hidden * 4 / 2**20
    bar = params * 4 / 2**20 + inputs_mb
    rows = {mode: run(args.recipe, folder, mode, args.work / f"out-{mode}") for mode in args.modes}

    print(f"\n{args.recipe} on a random Llama ({args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
          f"{params / 1e6:.1f} M parameters, {params * 4 / 2**20:,.0f} MB in float32); bar: parameter bytes "
          f"+ one layer's calibration inputs ({inputs_mb:,.0f} MB) = {bar:,.0f} MB\n")
    print("| offload | peak RSS (MB) | < bar | achieved ratio | perplexity | load (s) | compress (s) | wall (s) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for mode, row in rows.items():
        print(f"| {mode} | {row['rss_mb']:,.0f} | {'yes' if row['rss_mb'] < bar else 'no'} | {row['ratio']:.4f} | "
              f"{row['perplexity']!r} | {row['load']:.1f} | {row['compress']:.1f} | {row['wall']:.1f} |")


if __name__ == "__main__":
    main()
