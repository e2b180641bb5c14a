"""Parts of calibration timed old way against new way, interleaved in one process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/calibration_parts.py [--layers 0,10,20,29] [--repeats 3]

On the standard calibration data (the flat_llm recipe's: Emma 16×512, batches of 4), layer by
layer on the dense model:

- **statistics forward**: FLAT-LLM's sequential pass runs each dense layer only for its
  statistics (value states, down_proj's input). Full forward against ``Tap.until_filled``
  (the first batch runs to the end to count the watched calls, later ones stop before
  down_proj).
- **SVD-LLM factorisation** of the layer's seven projections at the uniform rank of ratio 0.2:
  Cholesky of each input Gram and the SVD of W S for every projection, against
  ``whitened_spectrum`` (no Cholesky factor and no triangular solve for q, k, v, o, down_proj).
  Both give the same factors; the largest difference of A·B is printed. Then ``whitened_spectrum``
  of the seven as svd_llm computes them now (down_proj from its output Gram) one after the other
  against ``side_by_side`` (one thread each, on every thread); and side by side with the products
  known symmetric (W XᵀX Wᵀ, MᵀM) or triangular (W S) taken whole against from their blocks.
- **input Grams** of the layer's four projection inputs (q/k/v's, o's, gate/up's, down's) over
  the calibration tokens: one product XᵀX per block of tokens against the column blocks on and
  above the diagonal only (``SYMMETRIC_BLOCKS``).
- **down_proj's Gram for SVD-LLM**: of its 1,536-wide input against its 576-wide output
  (``output_whitened_spectrum`` needs only YᵀY = W XᵀX Wᵀ). The largest difference of A·B
  between the factors from the two is printed.

Medians of the repeats per layer, summed over the layers timed; the ratio new/old is what the
change saves of that part. Sharing the cores shifts both sides alike (interleaved).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from functools import partial

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from lowrank_kit import api
from lowrank_kit.calibration import stats as stats_module
from lowrank_kit.calibration.stats import Gram, HeadGram, Tap
from lowrank_kit.compressed.linalg import (
    Spectrum,
    output_whitened_spectrum,
    psd_cholesky,
    side_by_side,
    thin_svd,
    whitened_spectrum,
)
from lowrank_kit.models.adapters import PROJECTIONS, adapter_for
from lowrank_kit.models.loading import load_model
from lowrank_kit.pipeline.engine import calibration_batches
from lowrank_kit.pipeline.replay import capture, run_layer


def statistics_forward(adapter, layer: int, inputs: list, early: bool) -> float:
    tap = Tap()
    tap.watch("v", adapter.projection(layer, "v_proj"), HeadGram(adapter.geometry.head_dim), where="output")
    tap.watch("z", adapter.projection(layer, "down_proj"), Gram())
    start = time.perf_counter()
    with torch.no_grad():
        for item in inputs:
            with tap.until_filled() if early else contextlib.nullcontext():
                run_layer(adapter.layers[layer], item, layer)
    seconds = time.perf_counter() - start
    tap.close()
    return seconds


def gram_of(batches: list[torch.Tensor]) -> torch.Tensor:
    gram = Gram()
    for x in batches:
        gram.update(x)
    return gram.matrix  # the whole matrix, as its consumers read it


def timed_gram(batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    gram_of(batches)
    return time.perf_counter() - start


@contextlib.contextmanager
def blocked_products(on: bool):
    """Products known symmetric or triangular from their blocks (``SYMMETRIC_MIN_WIDTH``), or whole."""
    saved = stats_module.SYMMETRIC_MIN_WIDTH
    stats_module.SYMMETRIC_MIN_WIDTH = saved if on else 1 << 30
    try:
        yield
    finally:
        stats_module.SYMMETRIC_MIN_WIDTH = saved


def input_grams(activations: dict[str, list[torch.Tensor]], symmetric: bool) -> float:
    with blocked_products(symmetric):
        start = time.perf_counter()
        for batches in activations.values():
            gram_of(batches)
        return time.perf_counter() - start


def cholesky_route(weights: dict[str, torch.Tensor], grams: dict[str, torch.Tensor],
                   site: dict[str, str]) -> dict[str, Spectrum]:
    factors = {key: psd_cholesky(gram) for key, gram in grams.items()}
    return {proj: Spectrum(*thin_svd(w.double() @ factors[site[proj]]), whitening=factors[site[proj]])
            for proj, w in weights.items()}


def engine_job(proj: str, weight: torch.Tensor, grams: dict[str, torch.Tensor], site: dict[str, str],
               down_output: torch.Tensor) -> partial[Spectrum]:
    """The spectrum as svd_llm computes it now: down_proj from its output Gram."""
    if proj == "down_proj":
        return partial(output_whitened_spectrum, weight, down_output)
    return partial(whitened_spectrum, weight, grams[site[proj]])


def factorise(weights: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], site: dict[str, str], how: str,
              ranks: dict[str, int], down_output: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Factors at ``ranks`` of every weight, its input Gram found through ``site`` (the adapter's
    input site: q/k/v share one, gate/up another): ``how`` is "cholesky", "whitened", or svd_llm's
    routes now (down_proj from its output Gram) "one after the other" or "side by side"."""
    start = time.perf_counter()
    if how == "whitened":
        spectra = {proj: whitened_spectrum(w, grams[site[proj]]) for proj, w in weights.items()}
    elif how in ("one after the other", "side by side"):
        jobs = [engine_job(proj, w, grams, site, down_output) for proj, w in weights.items()]
        together = side_by_side(jobs, torch.device("cpu"), max(max(w.shape) for w in weights.values()))
        spectra = dict(zip(weights, together if how == "side by side" else (job() for job in jobs), strict=True))
    else:
        spectra = cholesky_route(weights, grams, site)
    products = {proj: spectra[proj].factors(ranks[proj]) for proj in weights}
    seconds = time.perf_counter() - start
    return seconds, {proj: a @ b for proj, (a, b) in products.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,10,20,29")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    recipe = api.load_recipe("flat_llm")
    model, tokenizer = load_model(recipe.model.path, recipe.model.gguf_file, recipe.model.dtype)
    adapter = adapter_for(model)
    batches = calibration_batches(recipe.calibration, tokenizer, adapter.needs_bos)
    with torch.no_grad():
        inputs = [capture(model, adapter.layers, batch) for batch in batches]
    layers = [int(x) for x in args.layers.split(",")]
    times: dict[str, list[float]] = {"forward full": [], "forward until filled": [],
                                     "SVD-LLM Cholesky route": [], "SVD-LLM whitened_spectrum": [],
                                     "SVD-LLM one after the other": [], "SVD-LLM side by side": [],
                                     "SVD-LLM side by side, whole products": [],
                                     "Grams, one product": [], "Grams, upper blocks": [],
                                     "down_proj input Gram": [], "down_proj output Gram": []}
    largest = largest_down = largest_side = largest_blocked = 0.0
    depth = 0
    for layer in layers:
        with torch.no_grad():  # move the inputs on to this layer, dense
            for item in inputs:
                for index in range(depth, layer):
                    item.hidden = run_layer(adapter.layers[index], item, index)
        depth = layer
        site = {proj: adapter.input_site(layer, proj) for proj in PROJECTIONS}
        activations: dict[str, list[torch.Tensor]] = {}
        handles = []
        for proj in PROJECTIONS:
            if site[proj] not in activations:  # one input per site (q/k/v read one, gate/up another)
                kept = activations[site[proj]] = []
                handles.append(adapter.projection(layer, proj).register_forward_pre_hook(
                    lambda _m, args, kept=kept: kept.append(args[0].detach().reshape(-1, args[0].shape[-1]))))
        down_outputs: list[torch.Tensor] = []
        handles.append(adapter.projection(layer, "down_proj").register_forward_hook(
            lambda _m, _args, out, kept=down_outputs: kept.append(out.detach().reshape(-1, out.shape[-1]))))
        with torch.no_grad():
            for item in inputs:
                run_layer(adapter.layers[layer], item, layer)
        for handle in handles:
            handle.remove()
        grams = {key: gram_of(batches) for key, batches in activations.items()}
        weights = {proj: adapter.projection(layer, proj).weight.detach() for proj in PROJECTIONS}
        ranks = {proj: int(0.8 * w.shape[0] * w.shape[1] / sum(w.shape)) for proj, w in weights.items()}
        down = site["down_proj"]
        a, b = whitened_spectrum(weights["down_proj"], grams[down]).factors(ranks["down_proj"])
        down_output = gram_of(down_outputs)
        oa, ob = output_whitened_spectrum(weights["down_proj"], down_output).factors(ranks["down_proj"])
        largest_down = max(largest_down, float((a @ b - oa @ ob).abs().max() / (a @ b).abs().max()))
        runs: dict[str, list[float]] = {key: [] for key in times}
        for _ in range(args.repeats):
            runs["forward full"].append(statistics_forward(adapter, layer, inputs, early=False))
            runs["forward until filled"].append(statistics_forward(adapter, layer, inputs, early=True))
            old_s, old = factorise(weights, grams, site, "cholesky", ranks, down_output)
            new_s, new = factorise(weights, grams, site, "whitened", ranks, down_output)
            runs["SVD-LLM Cholesky route"].append(old_s)
            runs["SVD-LLM whitened_spectrum"].append(new_s)
            one_s, one = factorise(weights, grams, site, "one after the other", ranks, down_output)
            side_s, side = factorise(weights, grams, site, "side by side", ranks, down_output)
            runs["SVD-LLM one after the other"].append(one_s)
            runs["SVD-LLM side by side"].append(side_s)
            with blocked_products(False):
                whole_s, whole = factorise(weights, grams, site, "side by side", ranks, down_output)
            runs["SVD-LLM side by side, whole products"].append(whole_s)
            largest_blocked = max(largest_blocked, max(float((side[p] - whole[p]).abs().max() / whole[p].abs().max())
                                                       for p in whole))
            largest_side = max(largest_side, max(float((side[p] - one[p]).abs().max() / one[p].abs().max())
                                                 for p in one))
            runs["Grams, one product"].append(input_grams(activations, symmetric=False))
            runs["Grams, upper blocks"].append(input_grams(activations, symmetric=True))
            runs["down_proj input Gram"].append(timed_gram(activations[down]))
            runs["down_proj output Gram"].append(timed_gram(down_outputs))
            largest = max(largest, max(float((old[p] - new[p]).abs().max() / old[p].abs().max()) for p in old))
        for key in times:
            times[key].append(statistics.median(runs[key]))
        print(f"layer {layer}: " + ", ".join(f"{key} {statistics.median(runs[key]):.3f} s" for key in times),
              flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; layers {args.layers}, "
          f"{len(batches)} batches of {batches[0].shape}; medians of {args.repeats} per layer, summed\n")
    print("| part | old s | new s | new / old |")
    print("|---|---:|---:|---:|")
    for old_key, new_key in (("forward full", "forward until filled"),
                             ("SVD-LLM Cholesky route", "SVD-LLM whitened_spectrum"),
                             ("SVD-LLM one after the other", "SVD-LLM side by side"),
                             ("SVD-LLM side by side, whole products", "SVD-LLM side by side"),
                             ("Grams, one product", "Grams, upper blocks"),
                             ("down_proj input Gram", "down_proj output Gram")):
        old, new = sum(times[old_key]), sum(times[new_key])
        print(f"| {old_key} → {new_key} | {old:.3f} | {new:.3f} | {new / old:.3f} |")
    print(f"\nlargest difference of A·B between the two routes, relative to its largest entry: {largest:.1e}")
    print(f"the same between one after the other and side by side: {largest_side:.1e}")
    print(f"the same between whole and blocked symmetric/triangular products: {largest_blocked:.1e}")
    print(f"the same for down_proj's factors from its input Gram and from its output Gram: {largest_down:.1e}")


if __name__ == "__main__":
    main()
